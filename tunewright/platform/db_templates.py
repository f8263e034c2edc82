"""New SQLite databases as copies of empty ones their library has already migrated.

Prefect and MLflow each bring a new SQLite database up to date by running their whole history of
schema migrations: 3.7 s for Prefect's and 0.54 s for MLflow's on a 2-core AMD EPYC, paid by
every new state folder (and by every test that makes one). tunewright makes each empty, migrated
database once per library version, keeps it in ~/.cache/tunewright/db-templates (or
TUNEWRIGHT_DB_TEMPLATES), and copies it where a database does not exist yet. The library still
checks the schema on opening, and finds it current. Anything that goes wrong here only costs the
time saved: the library then creates the database itself, as it would have.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
from pathlib import Path

CACHE_ENV = "TUNEWRIGHT_DB_TEMPLATES"

log = logging.getLogger(__name__)

# each in a process of its own: both libraries keep the first database they open for the life of the process
_PREFECT = """
import asyncio
from prefect.server.database import provide_database_interface
asyncio.run(provide_database_interface().create_db())
"""
_MLFLOW = """
import sys
from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore
SqlAlchemyStore("sqlite:///" + sys.argv[1], sys.argv[2])
"""


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "tunewright" / "db-templates")


def seed_prefect(url: str) -> Path | None:
    """Prefect's database at SQLAlchemy `url`, if it is SQLite and does not exist yet; returns the template used."""
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or "mode=memory" in str(parsed.query):
        return None
    return _seed(parsed.database, "prefect", _template_prefect)


def seed_mlflow(tracking_uri: str) -> Path | None:
    """MLflow's store at `tracking_uri`, if it is SQLite and does not exist yet; returns the template used."""
    if not tracking_uri.startswith("sqlite:///"):
        return None
    return _seed(tracking_uri.removeprefix("sqlite:///").split("?")[0], "mlflow", _template_mlflow)


def _seed(database: str | None, library: str, template_for) -> Path | None:
    if not database or database == ":memory:":
        return None
    target = Path(database)
    if target.exists():
        return None
    try:
        template = template_for()
        target.parent.mkdir(parents=True, exist_ok=True)
        staged = target.with_name(f".{target.name}.{os.getpid()}.seed")
        shutil.copyfile(template, staged)
        try:
            os.link(staged, target)  # only where nothing has appeared meanwhile: never over a database in use
        except FileExistsError:
            pass
        finally:
            staged.unlink()
    except Exception as exc:  # noqa: BLE001 - the template only saves time; the library can always migrate
        log.warning("%s database %s: no migrated template (%s: %s); %s migrates it itself", library, target,
                    type(exc).__name__, exc, library)
        return None
    return template


def _migrations_digest(package_dir: Path, versions: str) -> str:
    names = sorted(p.name for p in (package_dir / versions).glob("*.py"))
    return hashlib.sha256("\n".join(names).encode()).hexdigest()[:12]


def _template_prefect() -> Path:
    import prefect

    digest = _migrations_digest(Path(prefect.__file__).parent, "server/database/_migrations/versions/sqlite")

    def build(work: Path, db: Path) -> None:
        env = {**os.environ, "PREFECT_HOME": str(work), "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{db}"}
        _run([sys.executable, "-c", _PREFECT], env)

    return _template(f"prefect-{prefect.__version__}-{digest}.db", build)


def _template_mlflow() -> Path:
    import importlib.metadata
    import importlib.util

    package = Path(importlib.util.find_spec("mlflow").origin).parent
    digest = _migrations_digest(package, "store/db_migrations/versions")

    def build(work: Path, db: Path) -> None:
        _run([sys.executable, "-c", _MLFLOW, str(db), (work / "artifacts").as_uri()], dict(os.environ))
        con = sqlite3.connect(db)
        try:  # MLflow makes its Default experiment on opening a store without one, with that store's artifact root
            con.execute("DELETE FROM experiment_tags")
            con.execute("DELETE FROM experiments")
            con.commit()
        finally:
            con.close()

    return _template(f"mlflow-{importlib.metadata.version('mlflow')}-{digest}.db", build)


def _run(args: list[str], env: dict[str, str]) -> None:
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"migrating an empty database failed: {done.stderr.strip()[-500:]}")


def _template(name: str, build) -> Path:
    template = cache_dir() / name
    if template.is_file():
        return template
    template.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=template.parent, prefix=".making-") as tmp:
        work = Path(tmp)
        fresh, compact = work / "fresh.db", work / "compact.db"
        build(work, fresh)
        con = sqlite3.connect(fresh)
        try:
            con.execute("VACUUM INTO ?", (str(compact),))  # one file, whatever the write-ahead log still held
        finally:
            con.close()
        os.replace(compact, template)  # whole or not at all, also when two processes make it at once
    return template
