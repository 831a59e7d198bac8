"""The review page for held series: a small web UI served by the node (see docs/admin.md).

:mod:`.app` (routes and pages), :mod:`.data` (what the pages show), :mod:`.security` (CSRF,
same-origin, login throttle, headers), :mod:`.users` (reviewers and their bcrypt hashes),
:mod:`.server` (uvicorn in a thread, started and stopped by the node).
"""
