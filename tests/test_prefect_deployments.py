"""prefect.yaml against a real Prefect server: the deployments register, and a process worker runs one."""

import contextlib
import json
import os
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path
from uuid import uuid4

import pytest
import yaml

from tests.conftest import wait_until

ROOT = Path(__file__).resolve().parents[1]
PREFECT = str(Path(sys.executable).with_name("prefect"))
POOL = "tunewright"


@pytest.fixture()
def undeployed_afterwards(prefect_server):
    """Afterwards the deployments in prefect.yaml's work pool go from the shared server, with their triggers and
    scheduled runs, and the pool with them: drift events of later tests on this server start nothing."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    yield
    with get_client(sync_client=True) as client:
        for deployment in client.read_deployments():
            if deployment.work_pool_name == POOL:
                client.delete_resource_owned_automations(f"prefect.deployment.{deployment.id}")
                client.delete_deployment(deployment.id)
        with contextlib.suppress(ObjectNotFound):
            client.delete_work_pool(POOL)


def _drift_events(client, since: datetime) -> list:
    """The drift events the server has stored since `since`, read once it has stored a marker event sent after
    them: it stores events in the order they arrive, so by then it holds every one sent before."""
    from prefect.events import emit_event
    from prefect.events.filters import EventFilter, EventIDFilter, EventNameFilter, EventOccurredFilter

    from tasks.monitor import DRIFT_EVENT

    marker = emit_event(event="tunewright.test.marker", resource={"prefect.resource.id": f"tunewright.test.{uuid4()}"})
    # limit: the client's default (100) is more than the server allows (50)
    wait_until(lambda: client.read_events(EventFilter(id=EventIDFilter(id=[marker.id])), limit=1).events, 60,
               "the server storing an event sent after the drift events")
    return client.read_events(EventFilter(event=EventNameFilter(name=[DRIFT_EVENT]),
                                          occurred=EventOccurredFilter(since=since)), limit=50).events


@pytest.mark.slow
def test_deployments_register_and_a_worker_runs_the_retrain_flow(prefect_server, undeployed_afterwards, tiny_recipe,
                                                                 ticket_files, state, tmp_path):
    started = datetime.now(timezone.utc)
    env = dict(os.environ, PREFECT_API_URL=prefect_server, TUNEWRIGHT_REPO_DIR=str(ROOT))

    def prefect(*args, **kw):
        out = subprocess.run([PREFECT, *args], capture_output=True, text=True, env=env, cwd=ROOT, **kw)
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
        return out.stdout

    prefect("work-pool", "create", POOL, "--type", "process")
    prefect("--no-prompt", "deploy", "--all")
    for name in ("tunewright-finetune/finetune", "tunewright-retrain/retrain-weekly",
                 "tunewright-retrain/retrain-on-drift"):
        assert name.split("/")[1] in prefect("deployment", "inspect", name)

    params = json.dumps({"recipe_path": str(tiny_recipe), "overrides": ["evaluate.max_examples=2"]})
    run = prefect("deployment", "run", "tunewright-retrain/retrain-weekly", "--params", params)
    assert "Created flow run" in run
    prefect("worker", "start", "--pool", POOL, "--run-once", timeout=900)

    import time

    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        deployments = {d.id: d.name for d in client.read_deployments()}
        weekly = [r for r in client.read_flow_runs() if deployments.get(r.deployment_id) == "retrain-weekly"]
        assert [r.state.type.value for r in weekly] == ["COMPLETED"]
        # stage 7 of the run found drift in its fixed production sample: a baseline report, and no event, so the
        # retrain it ran cannot start another
        assert _drift_events(client, started) == []
        assert not [r for r in client.read_flow_runs() if deployments.get(r.deployment_id) == "retrain-on-drift"]

    # the champion serves the shifted production requests, replayed with the openai client; the monitoring flow
    # finds drift in that window, labels it and emits one event; exactly one retrain starts, trains and ends
    from flows.monitor import monitor
    from tests.conftest import free_port, load_generator, wait_http, write_jsonl

    labels: list[dict] = []
    production = write_jsonl(tmp_path / "production.jsonl",
                             load_generator().generate_production(40, seed=8, labels=labels))
    write_jsonl(tmp_path / "labels.jsonl", labels)
    requests = tmp_path / "requests"
    port = free_port()
    tw = str(Path(sys.executable).with_name("tunewright"))
    server_log = tmp_path / "serve.log"
    server = subprocess.Popen([tw, "serve", "models:/tiny-tickets@champion", "--port", str(port),
                               "--request-log", str(requests), "--max-tokens", "8"],
                              env=env, stdout=server_log.open("w"), stderr=subprocess.STDOUT)
    try:
        wait_http(f"http://127.0.0.1:{port}/ready", server, server_log, timeout=300)
        sent = subprocess.run([tw, "replay", str(production), "--url", f"http://127.0.0.1:{port}/v1",
                               "--max-tokens", "8", "--system-from", str(ticket_files["tickets"])],
                              env=env, capture_output=True, text=True, timeout=300)
        assert sent.returncode == 0 and "40 answered, 0 failed" in sent.stdout, sent.stdout + sent.stderr
    finally:
        server.terminate()  # a clean shutdown writes every logged request
        server.wait(timeout=60)
    label = (f'monitor.label_command="{{python}} {ROOT}/data/support_tickets/label_window.py {{window}} '
             f'{{labelled}} --labels {tmp_path / "labels.jsonl"}"')
    overrides = [label, "evaluate.max_examples=2"]
    end = time.time() + 1
    verdicts = [monitor(recipe_path=str(tiny_recipe), overrides=overrides, request_log=str(requests),
                        window_end=end) for _ in range(2)]
    assert verdicts[0].emitted and not verdicts[1].emitted  # the same window twice: one event
    labelled = Path(verdicts[0].window_path).with_name("window.labelled.jsonl")
    assert sum(1 for _ in labelled.open()) == 40  # the labelling job ran before the event went out
    with get_client(sync_client=True) as client:
        drift_runs = wait_until(lambda: [r for r in client.read_flow_runs()
                                         if deployments.get(r.deployment_id) == "retrain-on-drift"],
                                60, "a retrain-on-drift run started by the drift event")
        assert len(drift_runs) == 1, "the drift event did not trigger the retrain-on-drift deployment once"
        assert drift_runs[0].parameters["window"] == verdicts[0].key
        assert drift_runs[0].parameters["window_export"] == verdicts[0].window_path
    prefect("worker", "start", "--pool", POOL, "--run-once", timeout=900)
    with get_client(sync_client=True) as client:
        drift_runs = [r for r in client.read_flow_runs() if deployments.get(r.deployment_id) == "retrain-on-drift"]
        assert [r.state.type.value for r in drift_runs] == ["COMPLETED"]
    from mlflow import MlflowClient as Client

    versions = Client(f"sqlite:///{state}/mlflow.db").search_model_versions("name = 'tiny-tickets'")
    assert len(versions) == 2  # the retrain trained on the recipe's data plus the labelled window: a candidate
    mlflow_client = Client(f"sqlite:///{state}/mlflow.db")
    retrained = mlflow_client.get_run(max(versions, key=lambda v: int(v.version)).run_id)
    parent = mlflow_client.get_run(retrained.data.tags.get("mlflow.parentRunId") or retrained.info.run_id)
    assert "window.labelled.jsonl" in " ".join(d.dataset.source for d in parent.inputs.dataset_inputs)

    # after the retrain, a later window of the same drifted traffic: the cooldown holds it, nothing starts
    later = monitor(recipe_path=str(tiny_recipe), overrides=overrides, request_log=str(requests),
                    window_end=time.time() + 2)
    assert later.trigger and not later.emitted and later.suppressed.startswith("cooldown")
    with get_client(sync_client=True) as client:
        # the first window's event is the only one: neither the retrain nor the later window sent another
        assert [e.payload["window"] for e in _drift_events(client, started)] == [verdicts[0].key]
        assert len([r for r in client.read_flow_runs()
                    if deployments.get(r.deployment_id) == "retrain-on-drift"]) == 1

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
