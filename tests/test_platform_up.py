"""`tunewright up` as a user's machine sees it: its servers on the local PostgreSQL with no secret on any command line
or in any file it writes, and a Prefect API that web pages of other sites cannot reach."""

import json
import stat
import subprocess
import sys
import uuid
from pathlib import Path

import httpx
import pytest

from tests.conftest import cli_env, free_port

BIN = Path(sys.executable).parent
PG = {"host": "127.0.0.1", "port": 5432, "user": "postgres"}
EVIL = "http://evil.example"


def _tw(env: dict, *args: str, expect: int = 0, timeout: float = 600) -> subprocess.CompletedProcess:
    out = subprocess.run([str(BIN / "tunewright"), *args], env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == expect, (out.stdout + out.stderr)[-4000:]
    return out


def _env(home: Path, **extra: str) -> dict:
    env = {k: v for k, v in cli_env(TUNEWRIGHT_HOME=str(home)).items()
           if k not in ("MLFLOW_TRACKING_URI", "PGPASSWORD", "PREFECT_SERVER_API_AUTH_STRING")}
    return env | extra


@pytest.fixture()
def postgres_prefix():
    """A database prefix of this test's own on the local PostgreSQL server; what `up` creates under it is dropped."""
    import psycopg2

    prefix = f"tw_up_{uuid.uuid4().hex[:8]}"
    yield prefix
    admin = psycopg2.connect(dbname="postgres", connect_timeout=5, **PG)
    admin.autocommit = True
    with admin.cursor() as cur:
        for kind in ("prefect", "mlflow"):
            cur.execute(f'DROP DATABASE IF EXISTS "{prefix}_{kind}" WITH (FORCE)')
    admin.close()


def _query(db: str, sql: str) -> list[tuple]:
    import psycopg2

    with psycopg2.connect(dbname=db, **PG) as conn, conn.cursor() as cur:
        cur.execute(sql)
        return cur.fetchall()


@pytest.mark.slow
def test_up_on_postgresql_works_and_no_command_line_or_written_file_holds_a_secret(tmp_path, postgres_prefix):
    """The database password (from the environment) and Prefect's API auth string reach the servers, which store
    their data in PostgreSQL, yet `ps` and every file under the state folder show neither."""
    home = tmp_path / "home"
    password, auth = f"pw-{uuid.uuid4().hex}", f"tw:auth-{uuid.uuid4().hex}"
    env = _env(home, TUNEWRIGHT_DATABASE_PASSWORD=password, PREFECT_SERVER_API_AUTH_STRING=auth)
    prefect_port, mlflow_port = free_port(), free_port()
    started = _tw(env, "up", "--database", f"postgresql://{PG['user']}@{PG['host']}:{PG['port']}/{postgres_prefix}",
                  "--prefect-port", str(prefect_port), "--mlflow-port", str(mlflow_port)).stdout
    try:
        assert f"postgresql://{PG['user']}:***@{PG['host']}:{PG['port']}" in started
        assert f"{postgres_prefix}_prefect, {postgres_prefix}_mlflow" in started

        from mlflow import MlflowClient

        MlflowClient(f"http://127.0.0.1:{mlflow_port}").create_experiment("on-postgres")
        api = f"http://127.0.0.1:{prefect_port}/api"
        assert httpx.post(f"{api}/flows/", json={"name": "on-postgres"}).status_code == 401  # Prefect's basic auth
        user, _, secret = auth.partition(":")
        created = httpx.post(f"{api}/flows/", json={"name": "on-postgres"}, auth=(user, secret))
        assert created.status_code == 201, created.text
        assert _query(f"{postgres_prefix}_mlflow", "SELECT name FROM experiments WHERE name = 'on-postgres'")
        assert _query(f"{postgres_prefix}_prefect", "SELECT name FROM flow") == [("on-postgres",)]

        info = json.loads((home / "services.json").read_text())
        assert stat.S_IMODE((home / "services.json").stat().st_mode) == 0o600
        for server in info["servers"].values():  # they have it, where only their owner can read it
            assert f"PGPASSWORD={password}".encode() in Path(f"/proc/{server['pid']}/environ").read_bytes()
        commands = subprocess.run(["ps", "-eww", "-o", "args="], capture_output=True, text=True, check=True).stdout
        assert f"{prefect_port}" in commands and f"{mlflow_port}" in commands  # the servers are in the listing
        for found in (password, auth, secret):
            assert found not in commands
            assert [p for p in home.rglob("*") if p.is_file() and found.encode() in p.read_bytes()] == []
    finally:
        _tw(env, "down")


def test_a_password_in_the_url_never_reaches_the_servers_urls_or_the_record():
    from tunewright.platform import database

    db = database.parse("postgresql://ml:s%40cret@db.internal:5432/team")
    assert db.password == "s@cret" and db.password_in_url
    assert db.prefect_url() == "postgresql+asyncpg://ml@db.internal:5432/team_prefect"
    assert db.mlflow_uri() == "postgresql+psycopg2://ml@db.internal:5432/team_mlflow"
    assert db.shown() == "postgresql://ml:***@db.internal:5432 (databases team_prefect, team_mlflow)"
    assert db.environment() == {"PGPASSWORD": "s@cret"}
    assert "cret" not in repr(db)


def test_a_password_file_others_can_read_is_refused_and_nothing_starts(tmp_path):
    secret = tmp_path / "pgpass"
    secret.write_text("from-the-file\n")
    secret.chmod(0o644)
    home = tmp_path / "home"
    out = _tw(_env(home), "up", "--database", "postgresql://ml@127.0.0.1:5432", "--database-password-file",
              str(secret), "--prefect-port", str(free_port()), "--mlflow-port", str(free_port()), expect=2)
    assert str(secret) in out.stderr and "0644" in out.stderr and "chmod 600" in out.stderr
    assert not (home / "services.json").exists()

    from tunewright.platform import database

    secret.chmod(0o600)
    db = database.parse("postgresql://ml:in-url@127.0.0.1:5432", secret)  # the file wins over the URL
    assert db.environment() == {"PGPASSWORD": "from-the-file"}


@pytest.mark.slow
def test_the_prefect_server_of_up_refuses_other_sites_pages_and_host_names(tmp_path):
    """A page of another site (its Origin) and a rebound DNS name (its Host) get nothing from Prefect's API; its own
    UI, under either loopback name, and Prefect's client do."""
    from websockets.exceptions import InvalidStatus
    from websockets.sync.client import connect

    home = tmp_path / "home"
    env = _env(home)
    prefect_port, mlflow_port = free_port(), free_port()
    _tw(env, "up", "--prefect-port", str(prefect_port), "--mlflow-port", str(mlflow_port))
    api = f"http://127.0.0.1:{prefect_port}/api"
    try:
        posted = httpx.post(f"{api}/flows/", json={"name": "from-evil"}, headers={"Origin": EVIL})
        assert posted.status_code == 403 and "access-control-allow-origin" not in posted.headers
        preflight = httpx.options(f"{api}/flows/", headers={"Origin": EVIL, "Access-Control-Request-Method": "POST"})
        assert preflight.status_code == 403 and "access-control-allow-origin" not in preflight.headers
        with pytest.raises(InvalidStatus) as refused:  # CORS does not cover WebSockets: the Origin check does
            connect(f"ws://127.0.0.1:{prefect_port}/api/events/out", origin=EVIL, open_timeout=30).close()
        assert refused.value.response.status_code == 403
        assert httpx.get(f"{api}/health", headers={"Host": f"evil.example:{prefect_port}"}).status_code == 400
        assert httpx.post(f"{api}/flows/filter", json={}, headers={"Host": "evil.example"}).status_code == 400
        # MLflow refuses a foreign Host by itself
        mlflow = httpx.get(f"http://127.0.0.1:{mlflow_port}/api/2.0/mlflow/experiments/search?max_results=1",
                           headers={"Host": "evil.example"})
        assert mlflow.status_code == 403

        for origin in (f"http://127.0.0.1:{prefect_port}", f"http://localhost:{prefect_port}"):
            ui = httpx.post(f"{api}/flows/", json={"name": "from-the-ui"}, headers={"Origin": origin})
            assert ui.status_code in (200, 201) and ui.headers["access-control-allow-origin"] == origin
        connect(f"ws://127.0.0.1:{prefect_port}/api/events/out", origin=f"http://localhost:{prefect_port}",
                open_timeout=30).close()

        from prefect.client.orchestration import get_client
        from prefect.settings import PREFECT_API_URL, temporary_settings

        with temporary_settings({PREFECT_API_URL: api}), get_client(sync_client=True) as client:
            client.create_flow_from_name("from-the-client")
            names = {flow.name for flow in client.read_flows()}
        assert names == {"from-the-ui", "from-the-client"}
    finally:
        _tw(env, "down")
