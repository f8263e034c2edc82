"""`tunewright up` / `down`: a Prefect server and an MLflow server on this machine, remembered in the state folder.

`up` starts both (SQLite in the state folder by default; PostgreSQL databases and an S3 artifact store when
given), waits until each answers its health check, and writes `services.json` beside them. Every other
`tunewright` command run with the same state folder finds the servers there: runs, `deploy` and `worker` talk
to them without any environment variable to set. `down` stops what `up` started.

Both listen on 127.0.0.1 only and refuse requests for another Host or from another site's web page: MLflow by
itself, Prefect through `prefect_server.create_local_app`. A database password reaches them in their environment
only (`tunewright.platform.database`); command lines, `services.json` (readable by its owner only) and the logs
never hold it.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from tunewright.platform.database import PASSWORD_ENV, Database
from tunewright.platform.prefect_server import LOCAL_HOSTS

FILE = "services.json"


def _bin(name: str) -> str:
    return str(Path(sys.executable).with_name(name))


def _free(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def running(state: Path) -> dict | None:
    """The servers `up` started for this state folder, if they are still running."""
    path = state / FILE
    if not path.is_file():
        return None
    info = json.loads(path.read_text())
    if not all(_alive(s["pid"]) for s in info["servers"].values()):
        return None
    return info


def environment(state: Path) -> dict[str, str]:
    """The variables that point a process at the servers of this state folder (empty when none run)."""
    info = running(state)
    if info is None:
        return {}
    return {"PREFECT_API_URL": info["servers"]["prefect"]["url"] + "/api",
            "MLFLOW_TRACKING_URI": info["servers"]["mlflow"]["url"]}


def wait_http(url: str, timeout: float, proc: subprocess.Popen | None = None, log: Path | None = None) -> None:
    """Until `url` answers 200: raise if `proc` exits first (with the end of its `log`), or after `timeout` s."""
    import urllib.request

    seen = f"; see {log}" if log is not None else ""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            tail = ":\n" + log.read_text(errors="replace")[-2000:] if log is not None else ""
            raise RuntimeError(f"{url}: the server exited with {proc.returncode}{seen}{tail}")
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1)
    raise TimeoutError(f"{url} did not answer within {timeout:.0f} s{seen}")


def up(state: Path, *, prefect_port: int = 4200, mlflow_port: int = 5000, database: Database | None = None,
       artifacts: str | None = None, timeout: float = 240.0) -> dict:
    """Start both servers (or find them running) and record them in `state/services.json`.

    `database`: the PostgreSQL server for both (`database.parse`), its missing databases created first; SQLite in
    the state folder without it."""
    found = running(state)
    if found is not None:
        return found | {"already": True}
    for name, port in (("Prefect", prefect_port), ("MLflow", mlflow_port)):
        if not _free(port):
            raise RuntimeError(f"{name}: port {port} is in use on 127.0.0.1; choose another with "
                               f"--{name.lower()}-port")
    logs = state / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    env = _server_environment(state, prefect_port, database)
    env["MLFLOW_BACKEND_STORE_URI"] = database.mlflow_uri() if database else f"sqlite:///{state / 'mlflow.db'}"
    if database:
        database.create_missing()
    artifact_root = artifacts or (state / "mlartifacts").as_uri()
    started = {}
    commands = {
        "prefect": ([sys.executable, "-m", "uvicorn", "--app-dir", str(Path(__file__).resolve().parents[2]),
                     "--factory", "tunewright.platform.prefect_server:create_local_app", "--host", "127.0.0.1",
                     "--port", str(prefect_port), "--lifespan", "on", "--log-level", "warning"],
                    f"http://127.0.0.1:{prefect_port}", "/api/health"),
        "mlflow": ([_bin("mlflow"), "server", "--host", "127.0.0.1", "--port", str(mlflow_port), "--workers", "1",
                    "--artifacts-destination", artifact_root], f"http://127.0.0.1:{mlflow_port}", "/health"),
    }
    try:
        for name, (cmd, url, health) in commands.items():
            log = logs / f"{name}-server.log"
            fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            os.fchmod(fd, 0o600)  # a log an older `up` left readable by all
            with os.fdopen(fd, "ab") as out:
                proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                        start_new_session=True, cwd=state)
            started[name] = {"pid": proc.pid, "url": url, "log": str(log), "command": cmd}
            wait_http(url + health, timeout, proc, log)
    except BaseException:
        for s in started.values():
            _stop(s["pid"])
        raise
    info = {"servers": started, "state": str(state), "database": database.shown() if database else "sqlite",
            "artifacts": artifact_root, "started": time.time()}
    _write_private(state / FILE, json.dumps(info, indent=2))
    return info


def _server_environment(state: Path, prefect_port: int, database: Database | None) -> dict[str, str]:
    """The servers' environment: this one's, their homes and settings, and the database password if any."""
    env = dict(os.environ, PREFECT_HOME=str(state / "prefect"), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               MLFLOW_DISABLE_TELEMETRY="true", DO_NOT_TRACK="true", PREFECT__SERVER_FINAL="1")
    for key in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI", PASSWORD_ENV):
        env.pop(key, None)
    # the UI asks the API where the server says it is (4200 unless told): on another port it would find no server
    env.setdefault("PREFECT_SERVER_UI_API_URL", f"http://127.0.0.1:{prefect_port}/api")
    # the UI's own pages, under either loopback name, are the only web pages that may call the API
    env.setdefault("PREFECT_SERVER_CORS_ALLOWED_ORIGINS",
                   ",".join(f"http://{host}:{prefect_port}" for host in LOCAL_HOSTS))
    if database:
        env["PREFECT_API_DATABASE_CONNECTION_URL"] = database.prefect_url()
        env.update(database.environment())
    return env


def _write_private(path: Path, text: str) -> None:
    """Write `path` readable by its owner only, replacing it whole."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _stop(pid: int, grace: float = 20.0) -> None:
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and _alive(pid):
        time.sleep(0.3)
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def down(state: Path) -> list[str]:
    """Stop the servers `up` started for this state folder (their whole process groups); what was stopped."""
    path = state / FILE
    if not path.is_file():
        return []
    info = json.loads(path.read_text())
    stopped = []
    for name, s in info["servers"].items():
        _stop(s["pid"])
        stopped.append(f"{name} ({s['url']}, pid {s['pid']})")
    path.unlink()
    return stopped
