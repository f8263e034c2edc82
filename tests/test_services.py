"""The production shape: Prefect and MLflow servers on PostgreSQL, MLflow artifacts in S3 (a moto server).

Needs the PostgreSQL server on 127.0.0.1:5432 (trust auth for the `postgres` role) that the
development machine runs; each test creates its own databases and drops them afterwards.
"""

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from tests.conftest import free_port, wait_http

BIN = Path(sys.executable).parent
PG = {"host": "127.0.0.1", "port": 5432, "user": "postgres"}


@pytest.fixture()
def postgres_databases():
    """Two fresh databases (mlflow, prefect) on the local PostgreSQL server."""
    import psycopg2

    try:
        admin = psycopg2.connect(dbname="postgres", connect_timeout=5, **PG)
    except psycopg2.OperationalError as exc:
        raise RuntimeError(f"PostgreSQL is not reachable on {PG['host']}:{PG['port']} ({exc}); start it with "
                           "'pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start'") from exc
    admin.autocommit = True
    names = {kind: f"tw_test_{kind}_{uuid.uuid4().hex[:8]}" for kind in ("mlflow", "prefect")}
    with admin.cursor() as cur:
        for name in names.values():
            cur.execute(f'CREATE DATABASE "{name}"')
    yield names
    with admin.cursor() as cur:
        for name in names.values():
            cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    admin.close()


def _query(db: str, sql: str) -> list[tuple]:
    import psycopg2

    with psycopg2.connect(dbname=db, **PG) as conn, conn.cursor() as cur:
        cur.execute(sql)
        return cur.fetchall()


@pytest.fixture()
def servers(postgres_databases, s3_endpoint, tmp_path):
    """An MLflow server (PostgreSQL store, artifacts proxied to S3) and a Prefect server (PostgreSQL)."""
    import boto3

    boto3.client("s3").create_bucket(Bucket="tw-artifacts")
    mlflow_port, prefect_port = free_port(), free_port()
    url = f"postgresql://{PG['user']}@{PG['host']}:{PG['port']}"
    env = dict(os.environ, MLFLOW_S3_ENDPOINT_URL=s3_endpoint, PREFECT_HOME=str(tmp_path / "prefect-home"),
               PREFECT_API_DATABASE_CONNECTION_URL=f"{url.replace('postgresql', 'postgresql+asyncpg')}/"
                                                   f"{postgres_databases['prefect']}",
               PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_UI_ENABLED="false")
    env.pop("PREFECT_API_URL", None)
    procs = []
    mlflow_log, prefect_log = tmp_path / "mlflow-server.log", tmp_path / "prefect-server.log"
    procs.append(subprocess.Popen(
        [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(mlflow_port), "--workers", "1",
         "--backend-store-uri", f"{url.replace('postgresql', 'postgresql+psycopg2')}/{postgres_databases['mlflow']}",
         "--artifacts-destination", "s3://tw-artifacts/mlflow"],
        env=env, stdout=mlflow_log.open("w"), stderr=subprocess.STDOUT, start_new_session=True))
    procs.append(subprocess.Popen(
        [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(prefect_port)],
        env=env, stdout=prefect_log.open("w"), stderr=subprocess.STDOUT, start_new_session=True))
    try:
        wait_http(f"http://127.0.0.1:{mlflow_port}/health", procs[0], mlflow_log)
        wait_http(f"http://127.0.0.1:{prefect_port}/api/health", procs[1], prefect_log)
        yield {"mlflow": f"http://127.0.0.1:{mlflow_port}", "prefect": f"http://127.0.0.1:{prefect_port}/api",
               "databases": postgres_databases}
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, 15)
        for proc in procs:
            proc.wait(timeout=60)


@pytest.mark.slow
def test_a_run_records_on_postgres_backed_servers_and_the_model_loads_from_s3(servers, tiny_recipe, tmp_path):
    import boto3
    from mlflow import MlflowClient

    env = dict(os.environ, PREFECT_API_URL=servers["prefect"], MLFLOW_TRACKING_URI=servers["mlflow"],
               TUNEWRIGHT_HOME=str(tmp_path / "home"))
    run = subprocess.run([str(BIN / "tunewright"), "run", str(tiny_recipe), "--set", "evaluate.max_examples=4"],
                         env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]

    # MLflow: the pipeline run, its seven stage runs and the registered version live in PostgreSQL
    client = MlflowClient(servers["mlflow"])
    version = client.get_model_version_by_alias("tiny-tickets", "champion")
    parent = client.get_run(client.get_run(version.run_id).data.tags.get("mlflow.parentRunId") or version.run_id)
    assert parent.info.status == "FINISHED"
    db = servers["databases"]["mlflow"]
    runs = dict(_query(db, "SELECT e.name, count(*) FROM runs r JOIN experiments e "
                           "ON r.experiment_id = e.experiment_id GROUP BY e.name"))
    assert runs == {"tiny": 8, "tunewright-bases": 1}  # the pipeline and its stages; the base weights stored once
    assert _query(db, "SELECT name FROM registered_models") == [("tiny-tickets",)]

    # ...and its artifacts (the logged adapter, the base weights stored once) went to the S3 bucket
    keys = [o["Key"] for page in boto3.client("s3").get_paginator("list_objects_v2").paginate(Bucket="tw-artifacts")
            for o in page.get("Contents", [])]
    assert any(k.endswith("adapter_model.safetensors") for k in keys), keys[:20]
    assert any("/base/" in k and k.endswith("model.safetensors") for k in keys), keys[:20]
    assert any(k.endswith("evaluation.html") for k in keys)

    # a process with no S3 credentials loads the registered model through the MLflow server and answers
    clean = {k: v for k, v in env.items() if not k.startswith("AWS_") and k != "MLFLOW_S3_ENDPOINT_URL"}
    code = ("import mlflow, pandas as pd, json; m = mlflow.pyfunc.load_model('models:/tiny-tickets@champion');"
            "print(json.dumps(m.predict(pd.DataFrame({'prompt': ['My Orbit Mouse will not turn on.']}))))")
    out = subprocess.run([sys.executable, "-c", code], env=clean, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert isinstance(json.loads(out.stdout.strip().splitlines()[-1])[0], str)

    # Prefect: the flow run and its seven task runs completed, recorded in PostgreSQL
    prefect_db = servers["databases"]["prefect"]
    assert _query(prefect_db, "SELECT state_type FROM flow_run") == [("COMPLETED",)]
    tasks = _query(prefect_db, "SELECT name, state_type FROM task_run")
    assert len(tasks) == 7 and {s for _, s in tasks} == {"COMPLETED"}, tasks
