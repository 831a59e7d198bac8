"""Web safety of the review page: CSRF tokens, same-origin checks, login throttling, headers.

Why each:

* CSRF (synchronizer token): a release sends patient images to the TPS, so a page on
  another site must not be able to make a logged-in reviewer's browser post one.  Every
  form carries a random per-session token kept in the signed session cookie
  (itsdangerous, via Starlette's SessionMiddleware); a POST without the matching token is
  refused.  As a second line, a POST whose ``Origin`` names another site, or that the
  browser marks ``Sec-Fetch-Site: cross-site``, is refused too; the cookie is
  ``SameSite=Strict``.
* Login throttle: five failed logins from one address in five minutes lock that address
  out for five minutes (bcrypt already makes each guess slow).
* Headers: the pages hold patient data, so nothing is cached, nothing is framed and no
  script or style from elsewhere runs (the page has no script at all); the referrer stays on
  this site (``same-origin``: with ``no-referrer`` browsers send ``Origin: null`` on our own forms).
"""

from __future__ import annotations

import hmac
import secrets
import threading
import time
from collections import deque
from collections.abc import MutableMapping
from typing import Any
from urllib.parse import urlsplit

from starlette.datastructures import MutableHeaders
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = ["LoginThrottle", "SecurityHeaders", "csrf_token", "csrf_valid", "same_origin"]

_CSRF_KEY = "csrf"


def csrf_token(session: MutableMapping[str, Any]) -> str:
    """The session's CSRF token (made on first use)."""
    token = session.get(_CSRF_KEY)
    if not isinstance(token, str) or len(token) < 32:
        token = secrets.token_urlsafe(32)
        session[_CSRF_KEY] = token
    return token


def csrf_valid(session: MutableMapping[str, Any], submitted: object) -> bool:
    """True when ``submitted`` is the session's token (constant-time comparison)."""
    token = session.get(_CSRF_KEY)
    return (isinstance(token, str) and isinstance(submitted, str) and len(token) >= 32
            and hmac.compare_digest(token.encode(), submitted.encode()))


def same_origin(request: Request) -> bool:
    """False when the browser says the request came from another site (``Origin``, ``Sec-Fetch-Site``)."""
    if request.headers.get("sec-fetch-site", "").lower() == "cross-site":
        return False
    origin = request.headers.get("origin")
    if origin is None:
        return True  # older clients and non-browser tools: the CSRF token still decides
    if origin == "null":
        return False
    parts = urlsplit(origin)
    host = request.headers.get("host", "")
    return parts.netloc.lower() == host.lower() and parts.scheme == request.url.scheme


class LoginThrottle:
    """Failed logins per client address; ``blocked`` after ``max_failures`` in ``window_s``."""

    def __init__(self, max_failures: int = 5, window_s: float = 300.0, lockout_s: float = 300.0) -> None:
        self.max_failures = max_failures
        self.window_s = window_s
        self.lockout_s = lockout_s
        self._failures: dict[str, deque[float]] = {}
        self._locked_until: dict[str, float] = {}
        self._lock = threading.Lock()

    def blocked(self, client: str) -> float:
        """Seconds this client must still wait (0: may try)."""
        with self._lock:
            return max(0.0, self._locked_until.get(client, 0.0) - time.monotonic())

    def failed(self, client: str) -> None:
        """Record a failed login; lock the client out at the limit."""
        now = time.monotonic()
        with self._lock:
            q = self._failures.setdefault(client, deque())
            q.append(now)
            while q and now - q[0] > self.window_s:
                q.popleft()
            if len(q) >= self.max_failures:
                self._locked_until[client] = now + self.lockout_s
                q.clear()

    def succeeded(self, client: str) -> None:
        """A good login clears the client's failures."""
        with self._lock:
            self._failures.pop(client, None)


_HEADERS = {
    "content-security-policy": "default-src 'none'; img-src 'self'; style-src 'self'; form-action 'self'; "
                               "frame-ancestors 'none'; base-uri 'none'",
    "x-frame-options": "DENY",
    "x-content-type-options": "nosniff",
    "referrer-policy": "same-origin",
    "cache-control": "no-store",
}


class SecurityHeaders:
    """ASGI middleware: the headers above on every response (HSTS too when served over HTTPS)."""

    def __init__(self, app: ASGIApp, hsts: bool = False) -> None:
        self.app = app
        self.hsts = hsts

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for k, v in _HEADERS.items():
                    headers.setdefault(k, v)
                if self.hsts:
                    headers.setdefault("strict-transport-security", "max-age=31536000")
            await send(message)

        await self.app(scope, receive, send_with_headers)
