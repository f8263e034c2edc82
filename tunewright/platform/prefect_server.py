"""Prefect's temporary local server, made to stop with the process that started it.

Without `PREFECT_API_URL`, Prefect starts a uvicorn child process as a temporary API server for
the run and stops it when the run's process exits normally. A run killed with SIGKILL (or by
the out-of-memory killer) cannot stop it, and the orphaned server keeps its port and its
database open. `install()` makes Prefect start that server through `create_app` below, which
watches its parent process and shuts the server down once the parent is gone.

A new SQLite database (a state folder's first run) starts as a copy of an empty one Prefect has
already migrated (`tunewright.platform.db_templates`); the server still runs its migrations on start, which
then find nothing to do.
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


def create_app():
    """uvicorn's factory for the temporary server: Prefect's app, plus a thread that stops it when its parent dies."""
    parent = os.environ.get(PARENT_ENV)
    if parent:
        _stop_when_orphaned(int(parent))
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
