"""Serve the review page from inside the node: uvicorn in a thread, HTTPS when configured.

Why in the node's process: one service to install, start and watch; the page starts and
stops with the node (:class:`rtcontrast.node.service.Node`).  The listening socket is
bound here, before the thread starts, so a taken port is an ``OSError`` at start (the
node logs it and carries on: its job is DICOM), and port 0 works for tests.  HTTPS uses
TLS 1.2 or newer, like the DICOM listener.
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
import time

import uvicorn

from rtcontrast.node.review.app import create_app
from rtcontrast.settings.node import NodeConfig

__all__ = ["ReviewServer"]

log = logging.getLogger(__name__)


class ReviewServer:
    """The review page of one node: :meth:`start` (binds, then serves in a thread), :meth:`stop`."""

    def __init__(self, config: NodeConfig) -> None:
        self.config = config
        self.port: int | None = None
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """Where the page is (the bound port)."""
        r = self.config.review
        host = f"[{r.host}]" if ":" in r.host else r.host
        return f"{'https' if r.tls else 'http'}://{host}:{self.port}/"

    def start(self, timeout_s: float = 10.0) -> None:
        """Bind ``review.host:port`` and serve; OSError when the address cannot be bound."""
        r = self.config.review
        family = socket.AF_INET6 if ":" in r.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((r.host, r.port))
            sock.listen(64)
        except OSError:
            sock.close()
            raise
        self.port = int(sock.getsockname()[1])
        cfg = uvicorn.Config(
            create_app(self.config), log_config=None, access_log=True, lifespan="off", server_header=False,
            proxy_headers=False, timeout_graceful_shutdown=3,
            ssl_certfile=str(r.cert_file) if r.cert_file else None,
            ssl_keyfile=str(r.key_file) if r.key_file else None,
        )
        try:
            cfg.load()  # builds the SSL context now, so TLS 1.2 can be made the floor before serving
        except BaseException:
            sock.close()
            raise
        if cfg.ssl is not None:
            cfg.ssl.minimum_version = ssl.TLSVersion.TLSv1_2
        self._server = uvicorn.Server(cfg)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [sock]}, name="review", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self._server.started and self._thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.02)
        if not self._server.started:
            self.stop()
            raise OSError(f"review page did not start on {r.host}:{self.port}")
        log.info("review page on %s (%s)", self.url,
                 "logins from " + str(r.users_file) if r.users_file else "no logins: loopback only")

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop serving (open requests get a few seconds)."""
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                log.warning("review page thread still running at shutdown")
        self._server = None
        self._thread = None
