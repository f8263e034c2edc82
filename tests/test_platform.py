"""`tunewright up`, `deploy`, `worker` and `down`: real Prefect and MLflow servers on this machine, a run started
through the Prefect API as the UI starts one, and nothing left running afterwards."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import cli_env, free_port

BIN = Path(sys.executable).parent


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False


@pytest.mark.slow
def test_up_deploy_a_run_from_the_api_a_worker_and_down(tiny_recipe, tmp_path):
    home = tmp_path / "home"
    env = {k: v for k, v in cli_env(TUNEWRIGHT_HOME=str(home)).items() if k != "MLFLOW_TRACKING_URI"}

    def tw(*args, timeout=600):
        out = subprocess.run([str(BIN / "tunewright"), *args], env=env, capture_output=True, text=True, timeout=timeout)
        assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
        return out.stdout

    prefect_port, mlflow_port = free_port(), free_port()
    started = tw("up", "--prefect-port", str(prefect_port), "--mlflow-port", str(mlflow_port))
    prefect_url, mlflow_url = f"http://127.0.0.1:{prefect_port}", f"http://127.0.0.1:{mlflow_port}"
    assert prefect_url in started and mlflow_url in started
    pids = [s["pid"] for s in json.loads((home / "services.json").read_text())["servers"].values()]
    try:
        assert "already running" in tw("up", "--prefect-port", str(prefect_port), "--mlflow-port", str(mlflow_port))
        # the UI in a browser asks its API on this port, not Prefect's default 4200
        assert httpx.get(f"{prefect_url}/ui-settings").json()["api_url"] == f"{prefect_url}/api"
        tw("deploy")
        limits = httpx.post(f"{prefect_url}/api/v2/concurrency_limits/filter", json={}).json()
        # beside the one retrain-on-drift's concurrency_limit makes, named after that deployment
        assert [(c["name"], c["limit"]) for c in limits if not c["name"].startswith("deployment:")] == [("gpu", 1)]
        api = httpx.Client(base_url=f"{prefect_url}/api", timeout=60)
        deployment = api.get("/deployments/name/tunewright-retrain/run-recipe").json()
        # the short form, as the UI submits it: a recipe path and overrides
        run = api.post(f"/deployments/{deployment['id']}/create_flow_run", json={"parameters": {
            "recipe_path": str(tiny_recipe), "overrides": ["evaluate.max_examples=2", "deploy.verify_samples=1"]}})
        assert run.status_code == 201, run.text
        tw("worker", "--run-once", timeout=900)
        done = api.get(f"/flow_runs/{run.json()['id']}").json()
        assert done["state"]["type"] == "COMPLETED", done["state"]
        assert done["name"].startswith("tiny-flow-")  # named after the recipe and its MLflow run

        from mlflow import MlflowClient

        client = MlflowClient(mlflow_url)  # the run recorded on the MLflow server `up` started
        version = client.get_model_version_by_alias("tiny-tickets", "champion")
        assert client.get_run(version.run_id).info.status == "FINISHED"
        assert httpx.get(f"{mlflow_url}/health").status_code == 200
    finally:
        stopped = tw("down")
    assert "prefect" in stopped and "mlflow" in stopped
    deadline = time.monotonic() + 30
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not any(_alive(p) for p in pids)
    assert not (home / "services.json").exists()
    assert "nothing to stop" in tw("down")


def test_deploy_without_a_server_says_how_to_start_one(tmp_path):
    out = subprocess.run([str(BIN / "tunewright"), "deploy"], env=cli_env(TUNEWRIGHT_HOME=str(tmp_path / "h")),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "tunewright up" in out.stderr
