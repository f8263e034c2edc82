"""Prefect's temporary local server, made to stop with the process that started it.

Without `PREFECT_API_URL`, Prefect starts a uvicorn child process as a temporary API server for
the run and stops it when the run's process exits normally. A run killed with SIGKILL (or by
the out-of-memory killer) cannot stop it, and the orphaned server keeps its port and its
database open. `install()` makes Prefect start that server through `create_app` below, which
watches its parent process and shuts the server down once the parent is gone.

A new SQLite database (a state folder's first run) starts as a copy of an empty database that
Prefect's migrations have already brought up to date, kept once per Prefect version in
~/.cache/tunewright/prefect (TUNEWRIGHT_PREFECT_DB_CACHE): migrating a new database from scratch
took 3.7 s of every first run on a 2-core machine, copying it takes milliseconds. The server still
runs its migrations on start, which then find nothing to do.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

PARENT_ENV = "TUNEWRIGHT_SERVER_PARENT"
POLL_SECONDS = 1.0
CACHE_ENV = "TUNEWRIGHT_PREFECT_DB_CACHE"

log = logging.getLogger(__name__)

# run in a process of its own: Prefect keeps the first database it connects to for the life of the process
_MIGRATE = """
import asyncio
from prefect.server.database import provide_database_interface
asyncio.run(provide_database_interface().create_db())
"""


def create_app():
    """uvicorn's factory for the temporary server: Prefect's app, plus a thread that stops it when its parent dies."""
    parent = os.environ.get(PARENT_ENV)
    if parent:
        _stop_when_orphaned(int(parent))
    from prefect.settings import PREFECT_API_DATABASE_CONNECTION_URL

    seed_database(PREFECT_API_DATABASE_CONNECTION_URL.value())
    from prefect.server.api.server import create_app as prefect_app

    return prefect_app()


def seed_database(url: str) -> Path | None:
    """Give a SQLite database that does not exist yet the migrated empty one; returns the template used, or None
    (another database, one that exists, or no template to be had: Prefect then migrates it itself, as before)."""
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or not parsed.database or parsed.database == ":memory:" \
            or "mode=memory" in str(parsed.query):
        return None
    target = Path(parsed.database)
    if target.exists():
        return None
    try:
        template = _template()
        target.parent.mkdir(parents=True, exist_ok=True)
        staged = target.with_name(f".{target.name}.{os.getpid()}.seed")
        shutil.copyfile(template, staged)
        try:
            os.link(staged, target)  # only where nothing has appeared meanwhile: never over a database in use
        except FileExistsError:
            pass
        finally:
            staged.unlink()
    except Exception as exc:  # noqa: BLE001 - the template only saves time; Prefect can always migrate
        log.warning("Prefect's database %s: no migrated template (%s: %s); Prefect migrates it itself",
                    target, type(exc).__name__, exc)
        return None
    return template


def _template() -> Path:
    """The migrated empty SQLite database for the installed Prefect, made on first use."""
    import prefect

    versions = Path(prefect.__file__).parent / "server" / "database" / "_migrations" / "versions" / "sqlite"
    migrations = hashlib.sha256("\n".join(sorted(p.name for p in versions.glob("*.py"))).encode()).hexdigest()
    cache = Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "tunewright" / "prefect")
    template = cache / f"prefect-{prefect.__version__}-{migrations[:12]}.db"
    if template.is_file():
        return template
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache, prefix=".making-") as work:
        fresh = Path(work) / "prefect.db"
        env = {**os.environ, "PREFECT_HOME": work, "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{fresh}"}
        done = subprocess.run([sys.executable, "-c", _MIGRATE], env=env, capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            raise RuntimeError(f"migrating an empty database failed: {done.stderr.strip()[-500:]}")
        compact = Path(work) / "compact.db"
        db = sqlite3.connect(fresh)
        try:
            db.execute("VACUUM INTO ?", (str(compact),))  # one file, whatever the write-ahead log still held
        finally:
            db.close()
        os.replace(compact, template)  # whole or not at all, also when two servers make it at once
    return template


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
            [sys.executable, "-m", "uvicorn", "--app-dir", str(Path(__file__).resolve().parents[1]), "--factory",
             "tunewright.prefect_server:create_app", "--host", "127.0.0.1", "--port", str(self.port),
             "--log-level", "error", "--lifespan", "on"], env=env)

    _run_uvicorn_command._stops_with_parent = True
    cls._run_uvicorn_command = _run_uvicorn_command
    return True
