"""Canary and shadow traffic: replayed request logs decide a challenger's promotion or rollback once per canary, on
enough traffic only; a shadow challenger answers a copy of each request off the user's path."""

from __future__ import annotations

import json
import random
import threading
import time
from datetime import datetime, timezone

import pytest

from tests.conftest import spy_on_events
from tunewright.recipe import CanaryConfig, load_recipe
from tunewright.registry.aliases import alias_holder

GOOD = '{"category": "shipping", "priority": "normal"}'
BAD = "category: shipping, priority normal"


@pytest.fixture()
def canary(run_ctx, tmp_path, monkeypatch):
    """A registered model with a champion (version 1) and a challenger (version 2) in MLflow, a spy on Prefect's
    event emitter, and `replay` writing served traffic through a real request log."""
    from mlflow import MlflowClient

    from tunewright.registry import aliases

    recipe, ctx = run_ctx
    client = MlflowClient()
    client.create_registered_model("tickets")
    for _ in range(2):
        client.create_model_version("tickets", source=str(tmp_path), tags={"tunewright.kind": "adapter",
                                                                           "tunewright.gate": "passed"})
    aliases.move_alias("tickets", "champion", "1", reason="first", client=client)
    aliases.move_alias("tickets", "challenger", "2", reason="candidate", action="candidate", client=client)
    emitted = spy_on_events(monkeypatch)
    log_path = tmp_path / "requests.jsonl"
    clock = {"t": time.time() + 1, "rng": random.Random(0)}

    def replay(n: int, challenger_answer: str = GOOD, share: float = 0.5) -> None:
        """`n` requests as `tunewright serve` logs them, a `share` of them answered by the challenger."""
        from tunewright.serve.requestlog import RequestLog

        log = RequestLog(log_path, flush_seconds=0.01)
        for i in range(n):
            clock["t"] += 0.5
            to_challenger = clock["rng"].random() < share
            log.write({"_ts": clock["t"], "time": datetime.fromtimestamp(clock["t"], tz=timezone.utc).isoformat(),
                       "endpoint": "/v1/chat/completions", "model": "tickets@champion",
                       "served_by": "tickets@challenger" if to_challenger else "tickets@champion",
                       "registered_model": "tickets", "version": "2" if to_challenger else "1",
                       "messages": [{"role": "user", "content": f"Where is my order A{1000 + i}?"}],
                       "answer": challenger_answer if to_challenger else GOOD, "status": 200,
                       "latency_ms": 300 + i % 50})
        log.close()
        assert log.failures == 0

    def decide(cfg: CanaryConfig):
        from tasks.monitor.canary import decide_canary

        return decide_canary.fn(cfg, "tickets", str(log_path), clock["t"] + 1, ctx)

    return client, replay, decide, emitted


def test_a_good_challenger_is_promoted_once_the_window_has_enough_requests_and_not_before(canary):
    client, replay, decide, emitted = canary
    cfg = CanaryConfig(share=0.5, min_requests=20, min_minutes=0)
    replay(24)  # about a dozen requests per arm: too few to decide anything
    early = decide(cfg)
    assert early.decision == "wait" and any("fewer than deploy.canary.min_requests 20" in r for r in early.reasons)
    assert emitted == [] and "tunewright.canary.decision" not in client.get_model_version("tickets", "2").tags
    assert alias_holder("tickets", "champion") == "1"

    replay(60)
    verdict = decide(cfg)
    assert verdict.decision == "promote" and verdict.emitted
    assert alias_holder("tickets", "champion") == "2"
    assert "challenger" not in client.get_registered_model("tickets").aliases  # the canary's share ends with it
    figures = json.loads(open(verdict.figures_path).read())
    assert figures["champion"]["requests"] >= 20 and figures["challenger"]["requests"] >= 20
    assert figures["champion"]["error_rate"] == 0 and figures["challenger"]["json_valid"] == 1.0
    for version, role in (("1", "champion"), ("2", "challenger")):
        tags = client.get_model_version("tickets", version).tags
        assert tags["tunewright.canary.decision"] == "promote" and tags["tunewright.canary.role"] == role
        assert tags["tunewright.canary.key"] == "tickets:1->2"
        assert json.loads(tags["tunewright.canary.figures"])["challenger"]["version"] == "2"
    (event,) = emitted
    assert event["event"] == "tunewright.canary.promoted" and event["payload"]["key"] == "tickets:1->2"
    assert event["resource"]["prefect.resource.id"] == "tunewright.model.tickets"

    again = decide(cfg)  # exactly one decision per canary: the next monitoring run finds none running
    assert again.decision == "none" and len(emitted) == 1
    assert alias_holder("tickets", "champion") == "2"


def test_a_challenger_emitting_invalid_json_is_rolled_back_and_never_decided_twice(canary):
    from tunewright.registry import aliases

    client, replay, decide, emitted = canary
    cfg = CanaryConfig(share=0.5, min_requests=20, min_minutes=600)  # a rollback does not wait for the time
    replay(80, challenger_answer=BAD)
    verdict = decide(cfg)
    assert verdict.decision == "rollback" and any("valid JSON answers 0.00%" in r for r in verdict.reasons)
    assert alias_holder("tickets", "champion") == "1"
    assert "challenger" not in client.get_registered_model("tickets").aliases
    assert aliases.history("tickets", "challenger")[-1]["action"] == "canary-rollback"
    for version in ("1", "2"):
        assert client.get_model_version("tickets", version).tags["tunewright.canary.decision"] == "rollback"
    assert [e["event"] for e in emitted] == ["tunewright.canary.rolled-back"]
    figures = json.loads(open(verdict.figures_path).read())
    assert figures["champion"]["error_rate"] == 0 and figures["champion"]["json_valid"] == 1.0

    # someone puts the same challenger back: the canary it was is decided, and nothing is decided or sent again
    client.set_registered_model_alias("tickets", "challenger", "2")
    replay(40, challenger_answer=BAD)
    again = decide(cfg)
    assert again.decision == "decided" and len(emitted) == 1
    assert alias_holder("tickets", "challenger") == "2"


def test_enough_good_requests_still_wait_for_the_minimum_time(canary):
    client, replay, decide, emitted = canary
    replay(80)
    verdict = decide(CanaryConfig(share=0.5, min_requests=20, min_minutes=60))
    assert verdict.decision == "wait" and "deploy.canary.min_minutes 60" in verdict.reasons[0]
    assert emitted == [] and alias_holder("tickets", "challenger") == "2"


def test_the_decision_rolls_back_on_errors_latency_and_leaks_and_names_the_margin():
    from tasks.monitor.canary import arm_figures, decide

    cfg = CanaryConfig(min_requests=10, min_minutes=0)

    def arm(n, *, status=200, latency_ms=300, answer=GOOD):
        return arm_figures([{"status": status if i < n // 2 else 200, "latency_ms": latency_ms, "answer": answer,
                             "prompt": "Where is my order?"} for i in range(n)])

    assert decide(cfg, arm(20), arm(20), 5)[0] == "promote"
    decision, why = decide(cfg, arm(20), arm(20, status=503), 5)
    assert decision == "rollback" and "max_error_rate_increase" in why[0]
    decision, why = decide(cfg, arm(20), arm(20, latency_ms=3000), 5)
    assert decision == "rollback" and "max_p95_ratio" in why[0]
    decision, why = decide(cfg, arm(20), arm(20, answer='{"reply": "mail jane.doe@example.com"}'), 5)
    assert decision == "rollback" and "max_pii_leak_increase" in why[0]
    assert decide(cfg, arm(20), arm(9, status=503), 5)[0] == "wait"  # never on too few, even a bad one
    # a version whose gate failed never takes the champion's place through a canary: it goes at once
    decision, why = decide(cfg, arm(20), arm(2), 5, gate="json_exact_match 0.40 below deploy.min_score 0.6")
    assert decision == "rollback" and "did not pass its promotion gate (json_exact_match 0.40" in why[0]


def test_canary_settings_are_checked_and_errors_name_the_field(tiny_recipe):
    from tunewright.recipe import RecipeError

    recipe = load_recipe(tiny_recipe, ["deploy.canary.share=0.2", "deploy.canary.mode=shadow"])
    assert recipe.deploy.canary == CanaryConfig(share=0.2, mode="shadow")
    with pytest.raises(RecipeError, match=r"deploy\.canary\.share"):
        load_recipe(tiny_recipe, ["deploy.canary.share=0"])
    with pytest.raises(RecipeError, match=r"deploy\.canary\.mode"):
        load_recipe(tiny_recipe, ["deploy.canary.mode=blue"])
    with pytest.raises(RecipeError, match=r"deploy\.canary\.min_requests"):
        load_recipe(tiny_recipe, ["deploy.canary.min_requests=0"])


def test_a_shadow_challenger_answers_a_copy_off_the_users_path_and_its_failure_never_reaches_the_user(
        tiny_model_dir, tiny_recipe, state, tmp_path):
    """The user gets the champion's answer while the shadow is still answering; the log holds the shadow's record
    with its version; a shadow that fails is logged as failed and the user's answer is as before. Once its alias is
    removed the watcher retires it, and loads the next challenger when one is registered."""
    from mlflow import MlflowClient

    from tests.conftest import wait_until
    from tests.test_merge import _make_adapter, _register
    from tests.test_serve import _client, _engine, _read_log, serving
    from tunewright.registry.aliases import retire_alias
    from tunewright.registry.canary import set_canary
    from tunewright.registry.tracking import pipeline_run

    with pipeline_run(load_recipe(tiny_recipe)) as ctx:
        v1 = _register("shadowed", _make_adapter(tiny_model_dir, tmp_path / "v1", 31), tiny_model_dir,
                       ctx.experiment_id, {})
        v2 = _register("shadowed", _make_adapter(tiny_model_dir, tmp_path / "v2", 32), tiny_model_dir,
                       ctx.experiment_id, {})
    registry = MlflowClient()
    registry.set_registered_model_alias("shadowed", "champion", v1)
    registry.set_registered_model_alias("shadowed", "challenger", v2)
    set_canary("shadowed", 1.0, "shadow")
    # a base of its own each, so that holding the shadow's model holds nothing of the champion's
    engine, watcher = _engine(["models:/shadowed@champion"], state, share_base=False)
    assert engine.shadow == {"shadowed@champion": "shadowed@challenger"} and engine.challenger == {}
    shadow = engine.backends["shadowed@challenger"]
    entered, held = threading.Event(), threading.Event()
    # the shadow's model runs only once let go: the user's reply comes before it can have answered
    hook = shadow.net.register_forward_pre_hook(lambda *_: (entered.set(), held.wait(30)) and None)
    log = tmp_path / "requests.jsonl"
    messages = [{"role": "user", "content": "Where is order A12345?"}]
    with serving(engine, max_tokens=8, request_log=log) as (url, _app):
        client = _client(url)
        reply = client.chat.completions.create(model="shadowed", messages=messages, max_tokens=6)
        assert entered.wait(30) and not held.is_set()  # the shadow copy is being answered after the user's reply
        held.set()
        hook.remove()
        wait_until(lambda: shadow.in_flight == 0, 30, "the shadow copy answered")

        async def broken(*_args, **_kw):
            raise RuntimeError("the shadow's engine broke")

        shadow.generate = broken
        second = client.chat.completions.create(model="shadowed", messages=messages, max_tokens=6)
    assert reply.system_fingerprint.startswith("shadowed@champion:")
    assert second.choices[0].message.content == reply.choices[0].message.content
    records = _read_log(log)
    users = [r for r in records if not r.get("shadow")]
    shadows = [r for r in records if r.get("shadow")]
    assert [(r["version"], r["status"]) for r in users] == [(v1, 200), (v1, 200)]
    assert users[0]["answer"] == reply.choices[0].message.content
    assert sorted((r["version"], r["status"], r["served_by"]) for r in shadows) == [
        (v2, 200, "shadowed@challenger"), (v2, 500, "shadowed@challenger")]
    assert all(r["messages"] == messages and r["model"] == "shadowed@champion" for r in shadows)
    assert "the shadow's engine broke" in next(r["error"] for r in shadows if r["status"] == 500)

    # the canary decided: its alias is removed and the server stops sending copies to it
    retire_alias("shadowed", "challenger", reason="canary rollback")
    watcher.check()
    assert "shadowed@challenger" not in engine.backends and engine.shadow_of("shadowed@champion") is None
    # the next challenger is loaded as soon as it is registered, and gets the copies
    registry.set_registered_model_alias("shadowed", "challenger", v1)
    assert watcher.check() == ["shadowed@challenger"]
    copies_to = engine.shadow_of("shadowed@champion")
    copies_to.release()
    engine.stop()
    assert copies_to.served.source.version == v1


def test_with_deploy_canary_a_passing_version_stays_challenger_while_a_champion_exists(state, tmp_path):
    """Stage 6 under `deploy.canary`: the first version becomes champion (nothing to compare it with); the next one
    that passes its gate stays challenger, and the model carries the canary setting `tunewright serve` routes by."""
    import logging

    import mlflow
    from mlflow import MlflowClient

    from tasks import deploy
    from tunewright.recipe import DeployConfig
    from tunewright.registry.canary import canary_setting
    from tunewright.registry.tracking import RunContext

    ctx = RunContext(parent_run_id="p", experiment_id="0", tracking_uri=mlflow.get_tracking_uri(),
                     state_dir=str(state), work_dir=str(tmp_path), recipe_name="r")
    cfg = DeployConfig(registered_model="tickets", canary=CanaryConfig(share=0.25, mode="shadow"))
    registered = []
    for i in range(2):
        src = tmp_path / f"candidate-{i}"
        src.mkdir()
        registered.append(deploy._register(cfg, src.as_uri(), {"tunewright.kind": "chat_model"}, True, "ok", ctx,
                                           logging.getLogger("test"))[:2])
    assert registered == [("1", "champion"), ("2", "challenger")]
    assert alias_holder("tickets", "champion") == "1" and alias_holder("tickets", "challenger") == "2"
    assert canary_setting("tickets", MlflowClient()) == {"share": 0.25, "mode": "shadow"}


def test_tunewright_canary_records_the_setting_and_refuses_a_bad_share(state):
    from mlflow import MlflowClient
    from typer.testing import CliRunner

    from tunewright.cli import app
    from tunewright.registry.canary import canary_setting

    client = MlflowClient()
    client.create_registered_model("tickets")
    runner = CliRunner()
    out = runner.invoke(app, ["canary", "tickets", "--share", "0.2"])
    assert out.exit_code == 0 and "20% of the traffic to its challenger (none yet)" in out.output
    assert canary_setting("tickets", client) == {"share": 0.2, "mode": "canary"}
    out = runner.invoke(app, ["canary", "tickets", "--shadow"])
    assert out.exit_code == 0 and canary_setting("tickets", client)["mode"] == "shadow"
    out = runner.invoke(app, ["canary", "tickets", "--share", "1.5"])
    assert out.exit_code == 2 and "share 1.5" in out.output
    assert runner.invoke(app, ["canary", "tickets", "--share", "0"]).exit_code == 0
    assert canary_setting("tickets", client) is None


def test_the_scheduled_monitoring_flow_rolls_back_a_bad_canary_once(prefect_server, tiny_recipe, state, tmp_path,
                                                                     monkeypatch):
    """`flows/monitor.py` decides the canary on the traffic it reads: a challenger answering with invalid JSON is
    rolled back by the first run, and the second run decides nothing and sends no canary event."""
    from mlflow import MlflowClient

    from flows.monitor import monitor
    from tunewright.registry import aliases

    client = MlflowClient()
    client.create_registered_model("tiny-tickets")
    for _ in range(2):
        client.create_model_version("tiny-tickets", source=str(tmp_path), tags={"tunewright.kind": "adapter",
                                                                                "tunewright.gate": "passed"})
    aliases.move_alias("tiny-tickets", "champion", "1", reason="first", client=client)
    aliases.move_alias("tiny-tickets", "challenger", "2", reason="candidate", action="candidate", client=client)
    emitted = spy_on_events(monkeypatch)
    start = time.time() + 1
    rows = [{"time": datetime.fromtimestamp(start + i, tz=timezone.utc).isoformat(), "registered_model": "tiny-tickets",
             "model": "tiny-tickets@champion", "version": "2" if i % 2 else "1",
             "messages": [{"role": "user", "content": f"My order A{1000 + i} has not arrived."}],
             "answer": BAD if i % 2 else GOOD, "status": 200, "latency_ms": 400} for i in range(60)]
    log = tmp_path / "requests.jsonl"
    log.write_text("".join(json.dumps(r) + "\n" for r in rows))
    overrides = ["monitor.window_minutes=60", "deploy.canary.share=0.5", "deploy.canary.min_requests=20"]

    first, second = (monitor(recipe_path=str(tiny_recipe), overrides=overrides, request_log=str(log),
                             window_end=start + 61) for _ in range(2))
    assert first.canary.decision == "rollback" and second.canary.decision == "none"
    canary_events = [e for e in emitted if e["event"].startswith("tunewright.canary.")]
    assert [e["event"] for e in canary_events] == ["tunewright.canary.rolled-back"]
    assert alias_holder("tiny-tickets", "champion") == "1" and alias_holder("tiny-tickets", "challenger") is None
    assert client.get_model_version("tiny-tickets", "2").tags["tunewright.canary.decision"] == "rollback"


def test_a_shadow_on_a_shared_base_answers_as_the_challenger_does(tiny_model_dir, tiny_recipe, state, tmp_path):
    """Champion and challenger adapters over one copy of their base (the default): the shadow copy is the
    challenger's own answer, logged with its version, and the user's is the champion's."""
    from mlflow import MlflowClient

    from tests.conftest import wait_until
    from tests.test_merge import _make_adapter, _register
    from tests.test_serve import _client, _engine, _read_log, serving
    from tunewright.registry.canary import set_canary
    from tunewright.registry.tracking import pipeline_run
    from tunewright.serve.shared_base import AdapterView

    with pipeline_run(load_recipe(tiny_recipe)) as ctx:
        v1 = _register("shared-shadow", _make_adapter(tiny_model_dir, tmp_path / "v1", 41), tiny_model_dir,
                       ctx.experiment_id, {})
        v2 = _register("shared-shadow", _make_adapter(tiny_model_dir, tmp_path / "v2", 42), tiny_model_dir,
                       ctx.experiment_id, {})
    registry = MlflowClient()
    registry.set_registered_model_alias("shared-shadow", "champion", v1)
    registry.set_registered_model_alias("shared-shadow", "challenger", v2)
    set_canary("shared-shadow", 1.0, "shadow")
    engine, _watcher = _engine(["models:/shared-shadow@champion"], state)
    assert all(isinstance(b, AdapterView) for b in engine.backends.values())
    log = tmp_path / "requests.jsonl"
    messages = [{"role": "user", "content": "My invoice INV-2231 is wrong."}]
    with serving(engine, max_tokens=8, request_log=log) as (url, _app):
        client = _client(url)
        user = client.chat.completions.create(model="shared-shadow", messages=messages, max_tokens=6)
        wait_until(lambda: engine.backends["shared-shadow@challenger"].in_flight == 0 and log.exists() and
                   any(r.get("shadow") for r in _read_log(log)), 60, "the shadow copy logged")
        alone = client.chat.completions.create(model="shared-shadow@challenger", messages=messages, max_tokens=6)
    engine.stop()
    records = _read_log(log)
    [copy] = [r for r in records if r.get("shadow")]
    assert copy["version"] == v2 and copy["status"] == 200
    assert copy["answer"] == alone.choices[0].message.content
    assert user.system_fingerprint.startswith("shared-shadow@champion:")


def test_live_traffic_with_a_canary_share_decides_once_on_enough_requests(tiny_model_dir, tiny_recipe, state, tmp_path,
                                                                          monkeypatch):
    """`tunewright canary` on a registered model, `tunewright serve` of its champion (the challenger over the same
    copy of the base), traffic replayed through the server by the real client: the request log says which version
    answered each request, nothing is decided on the first few, the challenger is promoted once both arms have
    enough, the users see no error, and a second decision finds no canary running."""
    from mlflow import MlflowClient

    from tasks.monitor.canary import decide_canary
    from tests.conftest import wait_until
    from tests.test_merge import _make_adapter, _register
    from tests.test_serve import _engine, _read_log, serving
    from tunewright.registry import aliases
    from tunewright.registry.canary import set_canary
    from tunewright.registry.tracking import pipeline_run
    from tunewright.replay import replay

    emitted = spy_on_events(monkeypatch)
    with pipeline_run(load_recipe(tiny_recipe)) as ctx:
        passed = {"tunewright.kind": "adapter", "tunewright.gate": "passed"}
        v1 = _register("live", _make_adapter(tiny_model_dir, tmp_path / "v1", 51), tiny_model_dir,
                       ctx.experiment_id, passed)
        v2 = _register("live", _make_adapter(tiny_model_dir, tmp_path / "v2", 52), tiny_model_dir,
                       ctx.experiment_id, passed)
        client = MlflowClient()
        aliases.move_alias("live", "champion", v1, reason="first", client=client)
        aliases.move_alias("live", "challenger", v2, reason="candidate", action="candidate", client=client)
        set_canary("live", 0.5, "canary")
        engine, _watcher = _engine(["models:/live@champion"], state)
        assert engine.challenger == {"live@champion": ("live@challenger", 0.5)}
        log = tmp_path / "requests.jsonl"
        traffic = tmp_path / "traffic.jsonl"
        traffic.write_text("".join(json.dumps({"prompt": f"Where is my order A{1000 + i}? It was due on day {i}."})
                                   + "\n" for i in range(56)))
        # latency and toxicity margins wide: a tiny random model's answers differ in nothing but chance there
        cfg = CanaryConfig(share=0.5, min_requests=12, min_minutes=0, max_p95_ratio=20, max_toxicity_increase=1)

        def logged(n):
            wait_until(lambda: log.exists() and len(_read_log(log)) >= n, 60, f"{n} requests logged")
            return _read_log(log)

        with serving(engine, max_tokens=8, request_log=log) as (url, _app):
            first = replay(traffic, url=f"{url}/v1", model="live", concurrency=4, limit=8, max_tokens=6)
            assert first["errors"] == 0, first["first_errors"]
            logged(8)
            early = decide_canary.fn(cfg, "live", str(log), time.time() + 1, ctx)
            assert early.decision == "wait" and emitted == []
            rest = replay(traffic, url=f"{url}/v1", model="live", concurrency=4, max_tokens=6)
            assert rest["errors"] == 0
            records = logged(8 + 56)
        engine.stop()
        by_version = {v: [r for r in records if r["version"] == v] for v in (v1, v2)}
        assert all(r["status"] == 200 for r in records) and len(by_version[v1]) + len(by_version[v2]) == len(records)
        assert len(by_version[v1]) >= 12 and len(by_version[v2]) >= 12  # both arms answered their share
        assert {r["served_by"] for r in by_version[v2]} == {"live@challenger"}
        verdict = decide_canary.fn(cfg, "live", str(log), time.time() + 1, ctx)
        assert verdict.decision == "promote", verdict.reasons
        assert aliases.alias_holder("live", "champion") == v2 and [e["event"] for e in emitted] == [
            "tunewright.canary.promoted"]
        again = decide_canary.fn(cfg, "live", str(log), time.time() + 1, ctx)
        assert again.decision == "none" and len(emitted) == 1
