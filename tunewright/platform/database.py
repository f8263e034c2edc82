"""The PostgreSQL server `tunewright up --database` puts Prefect and MLflow on: their URLs, the password, the databases.

`postgresql://user@host:5432` gives databases `prefect` and `mlflow` on that server; a path names a prefix, so
`postgresql://user@host:5432/team` gives `team_prefect` and `team_mlflow`. Missing databases are created.

The password never enters a command line or a file tunewright writes. It is read from, first to last:
`--database-password-file` (which only its owner may read), the URL itself (accepted, but shell history and `ps`
show the `tunewright up` command line), `$TUNEWRIGHT_DATABASE_PASSWORD`, else libpq's own `$PGPASSWORD` or
`~/.pgpass`. It reaches the servers as `PGPASSWORD` in their environment, which both drivers read (psycopg2 for
MLflow, asyncpg for Prefect); the URLs they are given hold no password. SQLAlchemy 2.1 maps a bare `postgresql://`
to psycopg 3, which is not installed, so each server gets its driver named.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

PASSWORD_ENV = "TUNEWRIGHT_DATABASE_PASSWORD"
KINDS = ("prefect", "mlflow")


@dataclass(frozen=True)
class Database:
    """A PostgreSQL server and the password to reach it (None: libpq finds it, or none is needed)."""

    url: object  # sqlalchemy.engine.URL without password or database
    prefix: str
    password: str | None = field(default=None, repr=False)
    password_in_url: bool = False

    def name(self, kind: str) -> str:
        """The database of `kind` (prefect or mlflow) on this server."""
        return f"{self.prefix}{kind}"

    def prefect_url(self) -> str:
        """PREFECT_API_DATABASE_CONNECTION_URL: asyncpg, no password."""
        return self._render("postgresql+asyncpg", self.name("prefect"))

    def mlflow_uri(self) -> str:
        """MLflow's backend store URI: psycopg2, no password."""
        return self._render("postgresql+psycopg2", self.name("mlflow"))

    def shown(self) -> str:
        """The server as `up` reports and records it, its password (if any) masked."""
        url = self.url.set(password="-") if self.password else self.url  # rendered as ***
        names = ", ".join(self.name(kind) for kind in KINDS)
        return f"{url.render_as_string(hide_password=True)} (databases {names})"

    def environment(self) -> dict[str, str]:
        """What the servers' environment needs to log in."""
        return {"PGPASSWORD": self.password} if self.password is not None else {}

    def create_missing(self) -> list[str]:
        """Create this server's `prefect` and `mlflow` databases where they do not exist; the ones created."""
        import psycopg2
        from psycopg2 import sql

        args = self.url.translate_connect_args(username="user") | dict(self.url.query)
        if self.password is not None:
            args["password"] = self.password
        wanted = [self.name(kind) for kind in KINDS]
        try:
            conn = psycopg2.connect(dbname="postgres", connect_timeout=10, **args)
        except psycopg2.Error as exc:  # libpq's messages never carry the password
            raise RuntimeError(f"PostgreSQL at {self.shown()}: {str(exc).strip()}") from None
        conn.autocommit = True
        created = []
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT datname FROM pg_database WHERE datname = ANY(%s)", (wanted,))
                found = {row[0] for row in cur.fetchall()}
                for name in (n for n in wanted if n not in found):
                    cur.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
                    created.append(name)
        except psycopg2.Error as exc:
            raise RuntimeError(f"PostgreSQL at {self.shown()}: {str(exc).strip()}; create the databases, or grant "
                               "this user CREATEDB") from None
        finally:
            conn.close()
        return created

    def _render(self, driver: str, database: str) -> str:
        return self.url.set(drivername=driver, database=database).render_as_string(hide_password=False)


def read_password_file(path: Path) -> str:
    """The password in `path` (its first line), refusing a file that users other than its owner may read."""
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except OSError as exc:
        raise ValueError(f"--database-password-file {path}: {exc.strerror}") from None
    if mode & 0o077:
        raise ValueError(f"--database-password-file {path}: mode {mode:04o} lets other users read it; "
                         f"chmod 600 {path}")
    lines = path.read_text().splitlines()
    if not lines or not lines[0]:
        raise ValueError(f"--database-password-file {path}: empty")
    return lines[0]


def parse(database: str, password_file: Path | None = None) -> Database:
    """The server `--database` names, with its password from `password_file`, the URL or the environment."""
    from sqlalchemy.engine import URL, make_url
    from sqlalchemy.exc import ArgumentError

    try:
        url = make_url(database)
    except ArgumentError:
        raise ValueError("--database: expected postgresql://user@host:5432") from None
    if url.get_backend_name() != "postgresql":
        raise ValueError(f"--database: expected postgresql://user@host:5432, not {url.drivername}://")
    in_url = url.password is not None
    if password_file is not None:
        password = read_password_file(password_file)
    elif in_url:
        password = url.password
    else:
        password = os.environ.get(PASSWORD_ENV) or None
    prefix = f"{url.database.strip('/')}_" if url.database and url.database.strip("/") else ""
    server = URL.create("postgresql", username=url.username, host=url.host, port=url.port, query=url.query)
    return Database(server, prefix, password, in_url)
