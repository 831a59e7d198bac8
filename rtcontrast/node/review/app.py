"""The review page's web application (Starlette, server-rendered Jinja2 templates, no JavaScript).

Pages: ``/`` (held jobs, then recent ones: state, QA verdict and reasons), ``/jobs/<id>``
(QA figures, the preview montage, lineage, the audit trail, and for a held job the two
decisions), ``/login``.  The decisions are POST forms with a note, the reviewer's name
(the login name, or typed in when the page runs without logins on loopback) and a CSRF
token; they call the same functions as ``node.py release`` / ``discard``
(:mod:`rtcontrast.node.admin`), so the audit and the DICOM say the same whichever way a
decision came.  The running node picks a release up within a second.

Why server-rendered forms: a physicist's browser on a hospital workstation, no build
chain to keep, nothing for a script-injection bug to run.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from pathlib import Path
from typing import Any

import jinja2
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware
from starlette.middleware.sessions import SessionMiddleware
from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, RedirectResponse, Response
from starlette.routing import Route

from rtcontrast import __version__
from rtcontrast.node.admin import discard_job, release_job
from rtcontrast.node.ops.holds import check_note, check_reviewer
from rtcontrast.node.review.data import job_page, list_jobs, preview_path
from rtcontrast.node.review.security import (
    LoginThrottle,
    SecurityHeaders,
    csrf_token,
    csrf_valid,
    same_origin,
)
from rtcontrast.node.review.users import UsersFileError, load_users, verify_password
from rtcontrast.settings.node import NodeConfig

__all__ = ["create_app"]

log = logging.getLogger(__name__)

_HERE = Path(__file__).resolve().parent
_DONE = {"released": "Released: the node re-runs the job within seconds and sends it marked as reviewed.",
         "discarded": "Discarded: the series will never be sent; its received files and preview were removed."}


def create_app(config: NodeConfig) -> Starlette:
    """The ASGI app for ``config`` (its database, job folders and ``review`` settings)."""
    settings = config.review
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(_HERE / "templates"), autoescape=True)
    throttle = LoginThrottle()
    # Logins live on the server too: the signed cookie names a login id, valid only while it is
    # here, so logging out (or removing the reviewer from the users file) ends it at once, even
    # for a copy of the cookie.
    active: dict[str, tuple[str, float]] = {}  # login id -> (reviewer, monotonic time of login)
    active_lock = threading.Lock()
    max_age_s = settings.session_hours * 3600.0
    decide_lock = threading.Lock()
    logins = settings.users_file is not None

    def render(request: Request, name: str, status: int = 200, **ctx: Any) -> HTMLResponse:
        html = env.get_template(name).render(
            user=current_user(request), logins=logins, csrf=csrf_token(request.session),
            version=__version__, ae_title=config.ae_title, **ctx)
        return HTMLResponse(html, status_code=status)

    def current_user(request: Request) -> str | None:
        now = time.monotonic()
        with active_lock:
            for lid in [k for k, (_, t) in active.items() if now - t > max_age_s]:
                del active[lid]  # expired logins go (the dict stays small)
            entry = active.get(str(request.session.get("login", "")))
        return entry[0] if entry else None

    def need_login(request: Request) -> Response | None:
        if logins and current_user(request) is None:
            request.session.pop("login", None)
            return RedirectResponse("/login", status_code=303)
        return None

    def still_reviewer(request: Request, user: str) -> bool:
        """The reviewer is still in the users file (read now); if not, their login ends."""
        assert settings.users_file is not None
        try:
            ok = user in load_users(settings.users_file)
        except UsersFileError as exc:
            log.error("review page: %s", exc)
            ok = False
        if not ok:
            with active_lock:
                active.pop(str(request.session.get("login", "")), None)
        return ok

    async def form_checked(request: Request) -> tuple[dict[str, str], Response | None]:
        """The POSTed form, or a 403 page when it is cross-site or its CSRF token is wrong."""
        form = {k: v for k, v in (await request.form()).items() if isinstance(v, str)}
        if not same_origin(request) or not csrf_valid(request.session, form.get("csrf")):
            log.warning("review page: refused a %s from %s: cross-site or CSRF token missing/invalid",
                        request.url.path, request.client.host if request.client else "?")
            return form, render(request, "error.html", 403, title="Refused",
                                message="The form was not sent from this page (CSRF check failed). "
                                        "Reload the page and try again.")
        return form, None

    def index(request: Request) -> Response:
        if (r := need_login(request)) is not None:
            return r
        held, recent = list_jobs(config)
        return render(request, "jobs.html", held=held, recent=recent)

    def detail(request: Request, error: str | None = None, status: int = 200, note: str = "") -> Response:
        if (r := need_login(request)) is not None:
            return r
        job_id = int(request.path_params["job_id"])
        page = job_page(config, job_id)
        if page is None:
            return render(request, "error.html", 404, title="No such job", message=f"There is no job {job_id}.")
        done = _DONE.get(request.query_params.get("done", ""))
        return render(request, "job.html", status, page=page, done=done, error=error, note=note)

    def preview(request: Request) -> Response:
        if (r := need_login(request)) is not None:
            return r
        path = preview_path(config, int(request.path_params["job_id"]))
        if not path.is_file():
            return Response("no preview", status_code=404, media_type="text/plain")
        return FileResponse(path, media_type="image/png")

    def decide_now(action: str, job_id: int, note: str | None, user: str) -> None:
        with decide_lock:  # one decision at a time: no release racing a discard in this process
            if action == "release":
                release_job(config, job_id, note, user, via="review page")
            else:
                discard_job(config, job_id, note, user, via="review page")

    async def decide(request: Request) -> Response:
        if request.path_params["action"] not in ("release", "discard"):
            return Response("not found", status_code=404, media_type="text/plain")
        if (r := need_login(request)) is not None:
            return r
        form, refused = await form_checked(request)
        if refused is not None:
            return refused
        action = request.path_params["action"]
        job_id = int(request.path_params["job_id"])
        try:
            user = current_user(request) if logins else check_reviewer(form.get("reviewer"))
            if user is None or (logins and not still_reviewer(request, user)):
                return RedirectResponse("/login", status_code=303)
            note = check_note(form.get("note"))
            if action == "discard" and form.get("confirm") != "yes":
                raise ValueError("tick the box to confirm that the received images are deleted")
            await run_in_threadpool(decide_now, action, job_id, note, user)
        except ValueError as exc:
            return detail(request, error=str(exc), status=409 if "not held" in str(exc) else 400,
                          note=form.get("note", ""))
        done = "released" if action == "release" else "discarded"
        return RedirectResponse(f"/jobs/{job_id}?done={done}", status_code=303)

    def login_page(request: Request) -> Response:
        return render(request, "login.html", error=None)

    async def login(request: Request) -> Response:
        form, refused = await form_checked(request)
        if refused is not None:
            return refused
        if not logins:
            return RedirectResponse("/", status_code=303)
        client = request.client.host if request.client else "?"
        wait = throttle.blocked(client)
        if wait:
            return render(request, "login.html", 429, error=f"Too many failed logins: try again in {wait:.0f} s.")
        assert settings.users_file is not None
        try:
            users = load_users(settings.users_file)
        except UsersFileError as exc:
            log.error("review page: %s", exc)
            return render(request, "login.html", 500, error="The users file is broken: ask the administrator.")
        name = " ".join(form.get("username", "").split())
        if not await run_in_threadpool(verify_password, users, name, form.get("password", "")):  # bcrypt: slow
            throttle.failed(client)
            log.warning("review page: failed login from %s", client)
            return render(request, "login.html", 401, error="Wrong name or password.")
        throttle.succeeded(client)
        request.session.clear()  # a fresh session (and CSRF token) at login
        login_id = secrets.token_urlsafe(24)
        with active_lock:
            active[login_id] = (name, time.monotonic())
        request.session["login"] = login_id
        log.info("review page: %s logged in from %s", name, client)
        return RedirectResponse("/", status_code=303)

    async def logout(request: Request) -> Response:
        _, refused = await form_checked(request)
        if refused is not None:
            return refused
        with active_lock:
            active.pop(str(request.session.get("login", "")), None)
        request.session.clear()
        return RedirectResponse("/login" if logins else "/", status_code=303)

    def css(request: Request) -> Response:
        return FileResponse(_HERE / "static" / "review.css", media_type="text/css")

    routes = [
        Route("/", index),
        Route("/jobs/{job_id:int}", detail),
        Route("/jobs/{job_id:int}/preview.png", preview),
        Route("/jobs/{job_id:int}/{action:str}", decide, methods=["POST"]),
        Route("/login", login_page, methods=["GET"]),
        Route("/login", login, methods=["POST"]),
        Route("/logout", logout, methods=["POST"]),
        Route("/static/review.css", css),
    ]
    middleware = [
        Middleware(SecurityHeaders, hsts=settings.tls),
        Middleware(SessionMiddleware, secret_key=secrets.token_urlsafe(32), session_cookie="rtcontrast_review",
                   max_age=int(settings.session_hours * 3600), same_site="strict", https_only=settings.tls),
    ]
    app = Starlette(routes=routes, middleware=middleware)

    async def not_found(request: Request, exc: Exception) -> Response:
        return Response("not found", status_code=404, media_type="text/plain")

    app.add_exception_handler(404, not_found)
    return app
