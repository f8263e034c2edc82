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
            # stage 7 of the run found drift in its fixed production sample: a baseline report, and no event, so the
            # retrain it ran cannot start another
            time.sleep(5)
            assert not [r for r in client.read_flow_runs() if deployments.get(r.deployment_id) == "retrain-on-drift"]

        # the monitoring flow judges a drifted window of served traffic and emits one event: one retrain starts
        from flows.monitor import monitor
        from tests.conftest import load_generator

        log = tmp_path / "requests.jsonl"
        end = time.time()
        prompts = [r["prompt"] for r in load_generator().generate_production(40, seed=8)]
        log.write_text("".join(json.dumps({"_ts": end - 100 + i, "registered_model": "tiny-tickets", "version": "1",
                                           "prompt": p, "answer": "{}", "status": 200, "latency_ms": 500}) + "\n"
                               for i, p in enumerate(prompts)))
        verdicts = [monitor(recipe_path=str(tiny_recipe), request_log=str(log), window_end=end) for _ in range(2)]
        assert verdicts[0].emitted and not verdicts[1].emitted  # the same window twice: one event
        with get_client(sync_client=True) as client:
            deadline = time.time() + 60
            while time.time() < deadline:
                drift_runs = [r for r in client.read_flow_runs() if deployments.get(r.deployment_id) == "retrain-on-drift"]
                if drift_runs:
                    break
                time.sleep(1)
            assert len(drift_runs) == 1, "the drift event did not trigger the retrain-on-drift deployment once"
            assert drift_runs[0].parameters["window"] == verdicts[0].key
            assert drift_runs[0].parameters["window_export"] == verdicts[0].window_path
        # the window is not labelled yet: the retrain starts, trains nothing and ends
        prefect("worker", "start", "--pool", "tunewright", "--run-once", timeout=600)
        with get_client(sync_client=True) as client:
            drift_runs = [r for r in client.read_flow_runs() if deployments.get(r.deployment_id) == "retrain-on-drift"]
            assert [r.state.type.value for r in drift_runs] == ["COMPLETED"]

    from mlflow import MlflowClient

    # the worker's flow run recorded into this test's state folder (not wherever earlier tests pointed MLflow)
    assert MlflowClient(f"sqlite:///{state}/mlflow.db").get_model_version_by_alias("tiny-tickets", "champion")


def test_prefect_yaml_declares_the_schedule_and_the_drift_trigger():
    spec = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    by_name = {d["name"]: d for d in spec["deployments"]}
    assert by_name["retrain-weekly"]["schedules"][0]["cron"] == "0 3 * * 1"
    trigger = by_name["retrain-on-drift"]["triggers"][0]
    from tasks.monitor import DRIFT_EVENT

    assert trigger["expect"] == [DRIFT_EVENT] and trigger["match"]["prefect.resource.id"] == "tunewright.model.*"
    assert by_name["retrain-on-drift"]["concurrency_limit"] == 1  # one retrain at a time
    assert set(trigger["parameters"]) == {"recipe_path", "overrides", "window", "window_export"}


def test_the_finetune_form_is_prefilled_with_the_demo_recipe(monkeypatch):
    from tunewright.recipe import Recipe

    spec = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    form = next(d for d in spec["deployments"] if d["name"] == "finetune")["parameters"]["recipe"]

    def from_root(v):  # the recipe's paths are relative to recipes/, the form's to the repository (the worker's cwd)
        if isinstance(v, dict):
            return {k: from_root(x) for k, x in v.items()}
        if isinstance(v, list):
            return [from_root(x) for x in v]
        return v[3:] if isinstance(v, str) and v.startswith("../") else v

    assert form == from_root(yaml.safe_load((ROOT / "recipes" / "demo.yaml").read_text()))
    monkeypatch.chdir(ROOT)
    assert Recipe.model_validate(form).name == "support-tickets-demo"  # valid as the worker will read it
