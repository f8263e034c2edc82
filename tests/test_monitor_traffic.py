"""Stage 7 on served traffic: windows of the request log judged for drift and service levels, and at most one
event per window and per cooldown, so a retrain cannot start another."""

import json
import time
from datetime import datetime, timezone

import pytest
from mlflow import MlflowClient

from tests.conftest import load_generator, spy_on_events
from tunewright.recipe import load_recipe


def _records(prompts, start, *, latency_ms=600, status=200, model="tiny-tickets"):
    # as `tunewright serve` logs them: chat requests with their messages, completions with their prompt
    return [{"time": datetime.fromtimestamp(start + 1 + i, tz=timezone.utc).isoformat(), "registered_model": model, "version": "1", "model": "tickets",
             **({"messages": [{"role": "user", "content": p}]} if i % 2 else {"prompt": p}),
             "answer": '{"category": "technical", "priority": "normal"}', "status": status, "latency_ms": latency_ms}
            for i, p in enumerate(prompts)]


def test_a_drifted_window_emits_once_and_the_cooldown_holds_the_next(prefect_server, tiny_recipe, state, tmp_path):
    from prefect.client.orchestration import get_client

    from flows.monitor import monitor

    gen = load_generator()
    shifted = [r["prompt"] for r in gen.generate_production(60, seed=8)]
    usual = [r["messages"][1]["content"] for r in gen.generate(60, seed=99)]
    hour = 3600
    t0 = (time.time() // hour) * hour - 5 * hour
    log = tmp_path / "requests"
    log.mkdir()
    rows = (_records(shifted, t0) + _records(usual, t0 + hour) + _records(shifted, t0 + 2 * hour)
            + _records(usual[:5], t0 + 3 * hour)
            + _records(usual[:40], t0 + 4 * hour) + _records(usual[40:], t0 + 4 * hour, latency_ms=4000)
            + _records(["x"] * 3, t0 + 4 * hour, status=500))
    # rotated the way `tunewright serve --request-log FOLDER` names its files; another model's traffic beside it
    for k in range(5):
        name = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(t0 + k * hour))
        part = [r for r in rows if t0 + k * hour <= datetime.fromisoformat(r["time"]).timestamp() < t0 + (k + 1) * hour]
        part += _records(usual[:30], t0 + k * hour, model="other")
        (log / f"requests-{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))

    def window(k, **extra):
        overrides = ["monitor.window_minutes=60"] + [f"monitor.{a}={b}" for a, b in extra.items()]
        return monitor(recipe_path=str(tiny_recipe), overrides=overrides, request_log=str(log),
                       window_end=t0 + (k + 1) * hour)

    with get_client(sync_client=True) as pc:
        before = len(pc.read_flow_runs())
    first = window(0)
    assert first.trigger and first.emitted and any("prompt drift" in r for r in first.reasons)
    # the words of the shifted traffic: new product lines the training data never named (109 training prompts are
    # too few to judge a word distribution by; test_vocabulary_drift judges one against 1,000)
    words = json.loads(open(first.summary_path).read())["vocabulary_drift"]
    assert not words["judged"] and words["unseen_share_current"] > words["unseen_share_reference"]
    assert any(w in words["new_words"] for w in ("router", "tablet", "heater", "halo", "quanta", "ember"))
    exported = [json.loads(line) for line in open(first.window_path)]
    assert len(exported) == 60 and {r["version"] for r in exported} == {"1"}  # the other model's traffic left out
    again = window(0)
    assert again.trigger and not again.emitted and "emitted already" in again.suppressed
    assert not window(1).trigger  # the usual traffic: no drift, within service levels
    later = window(2)
    assert later.trigger and not later.emitted and later.suppressed.startswith("cooldown")
    quiet = window(3)
    assert not quiet.trigger and "fewer than monitor.min_requests" in quiet.reasons[0]
    slow = window(4, cooldown_minutes=0)
    assert slow.trigger and slow.emitted
    assert any("p95 latency" in r for r in slow.reasons) and any("error rate" in r for r in slow.reasons)
    summary = json.loads(open(slow.summary_path).read())
    # every judged window's reports are kept in the evidently workspace, for `evidently ui`
    from evidently.ui.workspace import Workspace

    ws = Workspace(summary["evidently_workspace"])
    project = ws.search_project("tunewright tiny-tickets")[0]
    assert len(ws.list_runs(project.id)) == 15  # five judged windows (the quiet one is not): prompts, answers, words
    assert summary["service"]["requests"] == 63 and summary["service"]["error_rate"] == pytest.approx(3 / 63)
    assert summary["embedding_drift"]["method"] == "model" and 0 <= summary["embedding_drift"]["score"] <= 1

    client = MlflowClient()
    runs = client.search_runs([client.get_experiment_by_name("tiny").experiment_id],
                              filter_string="tags.`tunewright.emitted` = 'true'")
    assert sorted(r.data.tags["tunewright.window_key"] for r in runs) == sorted([first.key, slow.key])
    with get_client(sync_client=True) as pc:
        assert len(pc.read_flow_runs()) - before == 6  # the monitoring runs only: nothing here starts a retrain


def test_the_fine_tuning_flow_no_longer_emits_on_its_baseline_drift_report(run_ctx, ticket_files, monkeypatch):
    """Stage 7's baseline report finds the production file drifted and emits no event; the spy on Prefect's emitter
    does see the event a drifted window sends."""
    import logging

    from tasks.artifacts import DataArtifact
    from tasks.monitor import DRIFT_EVENT, monitor_drift
    from tasks.monitor.retrain import emit_drift_event

    emitted = spy_on_events(monkeypatch)
    recipe, ctx = run_ctx
    data = DataArtifact(train_path=str(ticket_files["tickets"]), val_path="", test_path="", quarantine_path="",
                        report_path="", n_train=160, n_val=0, n_test=0, n_rejected=0, digest="")
    baseline = monitor_drift.fn(recipe.monitor, data, ctx)
    assert baseline.drift_detected and emitted == []

    class Client:
        def set_tag(self, *args):
            pass

    emit_drift_event(recipe.monitor, "m:w/60m", "m", {"reasons": ["drift"], "service": {}}, ticket_files["production"],
                     ["1"], "", None, ctx, Client(), logging.getLogger("test"))
    assert [e["event"] for e in emitted] == [DRIFT_EVENT]


def test_a_missing_request_log_is_named(tiny_recipe):
    from tasks.monitor import read_window

    with pytest.raises(FileNotFoundError, match="monitor.request_log: /nowhere"):
        read_window("/nowhere", 0, 1)
    assert load_recipe(tiny_recipe, ["monitor.request_log=s3://b/p"]).monitor.request_log == "s3://b/p"


def test_a_retrain_for_a_window_waits_for_its_labels_then_adds_them_to_the_recipes_data(tiny_recipe, ticket_files,
                                                                                       tmp_path):
    from tasks.monitor import labelled_path, with_labelled_window

    export = tmp_path / "window.jsonl"
    export.write_text(json.dumps({"prompt": "My new Orbit Drone will not charge.", "answer": "{}"}) + "\n")
    assert with_labelled_window(str(tiny_recipe), ["train.max_steps=2"], "m:w/60m", str(export)) is None
    # a scheduled retrain (no window) keeps its overrides, given as a list or as the trigger's JSON
    assert with_labelled_window(str(tiny_recipe), '["train.max_steps=2"]', None, None) == ["train.max_steps=2"]

    gen = load_generator()
    labelled = labelled_path(str(export))
    labelled.write_text("".join(json.dumps(r) + "\n" for r in gen.generate(30, seed=77)))
    overrides = with_labelled_window(str(tiny_recipe), ["train.max_steps=2"], "m:w/60m", str(export))
    recipe = load_recipe(tiny_recipe, overrides)
    assert recipe.train.max_steps == 2 and recipe.data.path is None
    assert [s.path for s in recipe.data.sources] == [str(ticket_files["tickets"]), str(labelled)]
    assert recipe.data.sources[1].name == "window m:w/60m"


def test_io_tasks_retry_a_lost_connection_but_not_bad_input():
    from tunewright.logs import transient_io_error

    class State:
        def __init__(self, exc):
            self.exc = exc

        def result(self):
            raise self.exc

    class EndpointConnectionError(Exception):  # botocore's, by name
        pass

    assert transient_io_error(None, None, State(ConnectionResetError("reset")))
    assert transient_io_error(None, None, State(TimeoutError()))
    assert transient_io_error(None, None, State(EndpointConnectionError("s3 down")))
    assert not transient_io_error(None, None, State(FileNotFoundError("data.jsonl")))
    assert not transient_io_error(None, None, State(ValueError("gate failed")))


def test_the_demo_labelling_job_labels_known_requests_and_never_guesses(tmp_path, tiny_recipe):
    import subprocess
    import sys

    from tests.conftest import ROOT, write_jsonl
    from tunewright.recipe import RecipeError

    gen = load_generator()
    labels: list[dict] = []
    rows = gen.generate_production(5, seed=3, labels=labels)
    write_jsonl(tmp_path / "labels.jsonl", labels)
    window = write_jsonl(tmp_path / "window.jsonl", [{"messages": [{"role": "user", "content": r["prompt"]}],
                                                      "answer": "{}"} for r in rows] + [{"prompt": "unseen"}])
    out = subprocess.run([sys.executable, str(ROOT / "data/support_tickets/label_window.py"), str(window),
                          str(tmp_path / "window.labelled.jsonl"), "--labels", str(tmp_path / "labels.jsonl")],
                         capture_output=True, text=True)
    assert out.returncode == 0 and "labelled 5 requests" in out.stdout and "1 had no label" in out.stdout
    written = [json.loads(line) for line in open(tmp_path / "window.labelled.jsonl")]
    assert [r["messages"] for r in written] == [r["messages"] for r in labels]  # the reviewer's answers, not the served
    with pytest.raises(RecipeError, match="must write {labelled}"):
        load_recipe(tiny_recipe, ['monitor.label_command="label {window}"'])
    with pytest.raises(RecipeError, match="unknown placeholder {out}"):
        load_recipe(tiny_recipe, ['monitor.label_command="label {window} {out} {labelled}"'])


def test_replay_names_the_line_it_cannot_send(tmp_path):
    from tunewright.replay import ReplayError, load_requests

    path = tmp_path / "requests.jsonl"
    path.write_text('{"prompt": "hi"}\n{"text": "no prompt"}\n')
    with pytest.raises(ReplayError, match="requests.jsonl line 2: expected `messages` or `prompt`"):
        load_requests(path)
    assert load_requests(path, system="S", limit=1) == [[{"role": "system", "content": "S"},
                                                        {"role": "user", "content": "hi"}]]


def test_vocabulary_drift_tells_new_words_from_the_usual_mix(tmp_path):
    from tasks.monitor import vocabulary_drift

    gen = load_generator()
    training = [r["messages"][1]["content"] for r in gen.generate(1000, seed=7)]
    usual = vocabulary_drift(training, [r["messages"][1]["content"] for r in gen.generate(60, seed=99)], 0.5,
                             tmp_path / "usual.html")
    shifted = vocabulary_drift(training, [r["prompt"] for r in gen.generate_production(60, seed=8)], 0.5,
                               tmp_path / "shifted.html")
    assert usual["judged"] and not usual["drift_detected"] and usual["score"] < 0.1 and not usual["new_words"]
    assert shifted["drift_detected"] and shifted["score"] > 0.12 and shifted["unseen_share_current"] > 0.01
    assert {"router", "tablet", "heater"} <= set(shifted["new_words"])
    assert "jensen" in shifted["method"].lower() and (tmp_path / "shifted.html").stat().st_size > 10_000
