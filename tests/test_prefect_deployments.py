"""prefect.yaml against a real Prefect server: the deployments register, and a process worker runs one."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PREFECT = str(Path(sys.executable).with_name("prefect"))


@pytest.mark.slow
def test_deployments_register_and_a_worker_runs_the_retrain_flow(tiny_recipe, state, tmp_path):
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        from prefect.settings import PREFECT_API_URL

        env = dict(os.environ, PREFECT_API_URL=PREFECT_API_URL.value(), TUNEWRIGHT_REPO_DIR=str(ROOT))

        def prefect(*args, **kw):
            out = subprocess.run([PREFECT, *args], capture_output=True, text=True, env=env, cwd=ROOT, **kw)
            assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
            return out.stdout

        prefect("work-pool", "create", "tunewright", "--type", "process")
        prefect("--no-prompt", "deploy", "--all")
        for name in ("tunewright-finetune/finetune", "tunewright-retrain/retrain-weekly",
                     "tunewright-retrain/retrain-on-drift"):
            assert name.split("/")[1] in prefect("deployment", "inspect", name)

        params = json.dumps({"recipe_path": str(tiny_recipe), "overrides": ["evaluate.max_examples=2"]})
        run = prefect("deployment", "run", "tunewright-retrain/retrain-weekly", "--params", params)
        assert "Created flow run" in run
        prefect("worker", "start", "--pool", "tunewright", "--run-once", timeout=900)

        import time

        from prefect.client.orchestration import get_client

        with get_client(sync_client=True) as client:
            deployments = {d.id: d.name for d in client.read_deployments()}
            weekly = [r for r in client.read_flow_runs() if deployments.get(r.deployment_id) == "retrain-weekly"]
            assert [r.state.type.value for r in weekly] == ["COMPLETED"]
            # stage 7 found drift in the production sample and emitted the event: the trigger schedules a retrain
            deadline = time.time() + 60
            while time.time() < deadline:
                drift_runs = [r for r in client.read_flow_runs() if deployments.get(r.deployment_id) == "retrain-on-drift"]
                if drift_runs:
                    break
                time.sleep(1)
            assert drift_runs, "the drift event did not trigger the retrain-on-drift deployment"

    from mlflow import MlflowClient

    # the worker's flow run recorded into this test's state folder (not wherever earlier tests pointed MLflow)
    assert MlflowClient(f"sqlite:///{state}/mlflow.db").get_model_version_by_alias("tiny-tickets", "champion")


def test_prefect_yaml_declares_the_schedule_and_the_drift_trigger():
    spec = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    by_name = {d["name"]: d for d in spec["deployments"]}
    assert by_name["retrain-weekly"]["schedules"][0]["cron"] == "0 3 * * 1"
    trigger = by_name["retrain-on-drift"]["triggers"][0]
    from tasks.monitor import DRIFT_EVENT

    assert trigger["expect"] == [DRIFT_EVENT]
