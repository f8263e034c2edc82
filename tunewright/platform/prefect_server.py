"""Prefect's temporary local server, made to stop with the process that started it.

Without `PREFECT_API_URL`, Prefect starts a uvicorn child process as a temporary API server for
the run and stops it when the run's process exits normally. A run killed with SIGKILL (or by
the out-of-memory killer) cannot stop it, and the orphaned server keeps its port and its
database open. `install()` makes Prefect start that server through `create_app` below, which
watches its parent process and shuts the server down once the parent is gone.

A new SQLite database (a state folder's first run) starts as a copy of an empty one Prefect has
already migrated (`tunewright.platform.db_templates`); the server still runs its migrations on start, which
then find nothing to do.

`tunewright up` starts its long-lived server through `create_local_app`: Prefect's app (API and UI) behind a Host
allow-list and an Origin check, so that a web page on another site, open in the user's browser, can neither reach
the API through a rebound DNS name nor drive it with its own requests (Prefect answers any Host and, by default,
allows any origin). Prefect's own basic auth (`PREFECT_SERVER_API_AUTH_STRING`) works beneath both.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

PARENT_ENV = "TUNEWRIGHT_SERVER_PARENT"
POLL_SECONDS = 1.0
LOCAL_HOSTS = ("127.0.0.1", "localhost")  # the names `tunewright up`'s Prefect server answers to


def create_app():
    """uvicorn's factory for the temporary server: Prefect's app, plus a thread that stops it when its parent dies."""
    parent = os.environ.get(PARENT_ENV)
    if parent:
        _stop_when_orphaned(int(parent))
    return _prefect_app()


def create_local_app():
    """uvicorn's factory for `tunewright up`'s server: Prefect's app, answering only requests addressed to this
    machine's loopback names and coming from no web page but Prefect's own UI (PREFECT_SERVER_CORS_ALLOWED_ORIGINS)."""
    from prefect.settings import PREFECT_SERVER_CORS_ALLOWED_ORIGINS
    from starlette.middleware.trustedhost import TrustedHostMiddleware

    origins = [o.strip() for o in PREFECT_SERVER_CORS_ALLOWED_ORIGINS.value().split(",") if o.strip()]
    app = _prefect_app()
    if "*" not in origins:
        app = OriginAllowList(app, origins)
    return TrustedHostMiddleware(app, allowed_hosts=list(LOCAL_HOSTS))


class OriginAllowList:
    """ASGI middleware: refuse (403) a request whose `Origin` names a site not in `origins`.

    Browsers send `Origin` with every cross-site request that can change something (fetches, form posts) and with
    every WebSocket handshake, which CORS does not cover; a page elsewhere therefore reaches nothing. Clients that
    are not browsers (Prefect's own, workers, curl) send none and pass.
    """

    def __init__(self, app, origins: list[str]) -> None:
        self.app = app
        self.origins = {o.rstrip("/").lower() for o in origins}

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] in ("http", "websocket"):
            from starlette.datastructures import Headers
            from starlette.responses import PlainTextResponse

            origin = Headers(scope=scope).get("origin")
            if origin is not None and origin.rstrip("/").lower() not in self.origins:
                await PlainTextResponse("Origin not allowed", status_code=403)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _prefect_app():
    from prefect.settings import PREFECT_API_DATABASE_CONNECTION_URL

    from tunewright.platform import db_templates

    db_templates.seed_prefect(PREFECT_API_DATABASE_CONNECTION_URL.value())
    from prefect.server.api.server import create_app as prefect_app

    return prefect_app()


def _stop_when_orphaned(parent: int) -> None:
    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(POLL_SECONDS)
        os.kill(os.getpid(), signal.SIGTERM)  # uvicorn's graceful shutdown
        time.sleep(15)
        os._exit(0)

    threading.Thread(target=watch, name="stop-when-orphaned", daemon=True).start()


def install() -> bool:
    """Start Prefect's temporary server through `create_app` (Prefect 3's `SubprocessASGIServer`); False when this
    Prefect has no such server to adjust, in which case it starts its own as before."""
    from prefect.server.api import server

    cls = getattr(server, "SubprocessASGIServer", None)
    if cls is None or not hasattr(cls, "_run_uvicorn_command"):
        return False
    if getattr(cls._run_uvicorn_command, "_stops_with_parent", False):
        return True

    def _run_uvicorn_command(self) -> subprocess.Popen:
        from prefect.settings import get_current_settings

        env = {**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1",
               **get_current_settings().to_environment_variables(exclude_unset=True), PARENT_ENV: str(os.getpid())}
        return subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "--app-dir", str(Path(__file__).resolve().parents[2]), "--factory",
             "tunewright.platform.prefect_server:create_app", "--host", "127.0.0.1", "--port", str(self.port),
             "--log-level", "error", "--lifespan", "on"], env=env)

    _run_uvicorn_command._stops_with_parent = True
    cls._run_uvicorn_command = _run_uvicorn_command
    return True
