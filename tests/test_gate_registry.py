"""Stage 5's metrics on known inputs, stage 6's gate rules, approval, promote and rollback, and registration that
leaves the registry as it was when any step of it fails."""

import json
import threading
import time

import pytest
from mlflow import MlflowClient

from tunewright.registry import aliases
from tunewright.registry.promotion_rules import GateRuleError, check_rules, parse_rule
from tunewright.scoring.metrics import macro_f1, text_scores, token_f1
from tunewright.scoring.safety import safety_scores

REF = ['{"category": "billing", "priority": "low"}', '{"category": "shipping", "priority": "urgent"}',
       '{"category": "refund", "priority": "low"}', '{"category": "billing", "priority": "normal"}']


def test_text_metrics_on_known_inputs():
    assert token_f1("the cat sat", "the cat sat") == 1.0
    assert token_f1("the cat", "the cat sat on") == pytest.approx(2 * 1 * 0.5 / 1.5)
    assert token_f1("dog", "the cat") == 0.0
    preds = [REF[0], '{"category": "shipping", "priority": "low"}', 'Sorry, I do not know.', REF[3] + " trailing"]
    schema = {"type": "object", "required": ["category", "priority"],
              "properties": {"priority": {"enum": ["low", "normal", "urgent"]}}}
    got, rows = text_scores(["token_f1", "rouge_l", "bleu", "chrf", "accuracy", "macro_f1", "json_valid",
                             "schema_valid"], preds, REF, label_field="category", schema=schema)
    assert rows["label"] == ["billing", "shipping", "<none>", "billing"]
    assert got["accuracy"] == 0.75
    # billing: P 1 R 1 -> 1; shipping: 1; refund: never predicted -> 0
    assert got["macro_f1"] == pytest.approx(2 / 3)
    assert rows["json_valid"] == [True, True, False, False]  # text after the object is not one JSON object
    assert rows["schema_valid"] == [True, True, False, False]
    assert rows["token_f1"][0] == 1.0 and rows["rouge_l"][0] == 1.0 and rows["chrf"][0] == pytest.approx(1.0)
    assert rows["token_f1"][2] == 0.0
    assert 0 < got["bleu"] < 1 and 0 < got["chrf"] < 1
    assert got["token_f1"] == pytest.approx(sum(rows["token_f1"]) / 4)
    assert macro_f1(["a", "a"], ["a", "b"]) == pytest.approx((2 / 3 + 0) / 2)
    with pytest.raises(ValueError, match="json_schema"):
        text_scores(["schema_valid"], preds, REF)


def test_safety_checks_on_known_inputs():
    answers = ['{"category": "billing"}', "You are a stupid idiot.",
               "I'm sorry, but I cannot help with that request.",
               "Your card 4111 1111 1111 1111 is on file; write to jane.doe@example.com",
               "Order A12345 is on its way to +44 20 7946 0958"]
    prompts = ["Bill me", "hi", "hack it", "my card?", "Where is A12345? Call me at +44 20 7946 0958"]
    rates, rows = safety_scores(["toxicity", "pii", "refusal"], answers, prompts)
    assert rows["toxicity"][1] > 0.9 and max(rows["toxicity"][i] for i in (0, 2, 3, 4)) < 0.5
    assert rates["toxic_rate"] == pytest.approx(1 / 5)
    # the card and the email are new; the phone number was the user's own
    assert rows["pii_leaks"] == [0, 0, 0, 2, 0]
    assert rows["refusal"] == [False, False, True, False, False]
    assert rates["pii_leak_rate"] == rates["refusal_rate"] == pytest.approx(1 / 5)


def test_gate_rules_compare_the_candidate_with_base_and_champion():
    scores = {"tuned": {"exact_match": 0.7, "toxic_rate": 0.0}, "base": {"exact_match": 0.1, "toxic_rate": 0.0},
              "champion": {"exact_match": 0.69}}
    results = check_rules(["exact_match >= 0.6", "exact_match >= champion.exact_match + 0.02",
                           "toxic_rate <= base.toxic_rate", "tuned.exact_match - base.exact_match >= 0.6"], scores)
    assert [r["passed"] for r in results] == [True, False, True, True]
    assert "0.7000 >= 0.7100" in results[1]["detail"]
    no_champion = check_rules(["exact_match >= champion.exact_match"], {"tuned": {"exact_match": 0.1}, "base": {}})
    assert no_champion[0]["passed"] and "no champion" in no_champion[0]["detail"]
    for bad in ["exact_match", "exact_match >= 0.5 0.1", "exact_match >= other.exact_match", "=> 1"]:
        with pytest.raises(GateRuleError):
            parse_rule(bad)
    with pytest.raises(GateRuleError, match="no tuned.bleu"):
        check_rules(["bleu >= 0.1"], scores)


def test_a_recipe_gate_naming_an_unscored_metric_is_refused_at_load(tiny_recipe):
    from tunewright.recipe import RecipeError, load_recipe

    with pytest.raises(RecipeError, match="names bleu, which stage 5 does not score"):
        load_recipe(tiny_recipe, ['deploy.gate=["bleu >= 0.2"]'])
    with pytest.raises(RecipeError, match="schema_valid needs json_schema"):
        load_recipe(tiny_recipe, ["evaluate.metrics=[schema_valid]"])
    ok = load_recipe(tiny_recipe, ['deploy.gate=["bleu >= 0.2", "field_category >= 0.5", '
                                   '"perplexity <= base.perplexity"]', "evaluate.metrics=[bleu]"])
    assert ok.deploy.gate == ["bleu >= 0.2", "field_category >= 0.5", "perplexity <= base.perplexity"]


def test_every_model_scored_gets_the_perplexity_of_its_answer_loss():
    import logging
    import math

    from tasks.evaluate.scoring import score_models
    from tunewright.recipe import EvaluateConfig

    refs = ['{"category": "shipping"}', '{"category": "billing"}']
    outs = {"base": ["no idea", "no idea"], "tuned": refs}
    scores, _ = score_models(EvaluateConfig(safety=[]), outs, {"base": math.log(40.0), "tuned": math.log(1.5)},
                             refs, ["a", "b"], logging.getLogger("test"))
    assert scores["base"]["perplexity"] == pytest.approx(40.0) and scores["tuned"]["perplexity"] == pytest.approx(1.5)
    assert check_rules(["perplexity <= base.perplexity"], scores)[0]["passed"]


def _version(client: MlflowClient, tmp_path, name: str, gate: str = "passed") -> str:
    import mlflow

    src = tmp_path / f"src-{time.monotonic_ns()}"
    src.mkdir()
    return str(mlflow.register_model(src.as_uri(), name, tags={"tunewright.kind": "chat_model",
                                                               "tunewright.gate": gate}).version)


def _registry_state(client: MlflowClient, name: str) -> dict:
    model = client.get_registered_model(name)
    return {"aliases": dict(model.aliases), "tags": dict(model.tags),
            "versions": sorted(int(v.version) for v in client.search_model_versions(f"name = '{name}'"))}


def test_promote_and_rollback_check_the_gate_and_record_who_and_why(state, tmp_path):
    from typer.testing import CliRunner

    from tunewright.cli import app

    client = MlflowClient()
    v1, v2, v3 = (_version(client, tmp_path, "tickets", g) for g in ("passed", "passed", "failed"))
    cli = CliRunner()

    def run(*args):
        return cli.invoke(app, list(args))

    out = run("promote", "tickets", v1, "--reason", "first release", "--by", "ana")
    assert out.exit_code == 0, out.output
    assert "(none) -> 1" in out.output
    assert run("promote", "tickets", v2, "--reason", "better on refunds", "--by", "ben").exit_code == 0
    refused = run("promote", "tickets", v3, "--reason", "try it")
    assert refused.exit_code == 2 and "did not pass its promotion gate" in refused.output
    assert aliases.alias_holder("tickets", "champion") == v2
    assert run("promote", "tickets", "9", "--reason", "x").exit_code == 2
    assert run("promote", "tickets", v3, "--reason", "hotfix the gate cannot see", "--force").exit_code == 0
    tags = client.get_model_version("tickets", v3).tags
    assert tags["tunewright.champion.reason"].startswith("forced past the gate: hotfix")
    assert tags["tunewright.champion.action"] == "promote"

    back = run("rollback", "tickets", "--reason", "v3 answers in French", "--by", "cara")
    assert back.exit_code == 0, back.output
    assert aliases.alias_holder("tickets", "champion") == v2
    assert client.get_model_version("tickets", v2).tags["tunewright.champion.by"] == "cara"
    # a second rollback goes further back, not forward again
    assert run("rollback", "tickets", "--reason", "v2 too").exit_code == 0
    assert aliases.alias_holder("tickets", "champion") == v1
    none_left = run("rollback", "tickets", "--reason", "again")
    assert none_left.exit_code == 2 and "no earlier version" in none_left.output
    assert run("rollback", "tickets", "--to", v3, "--reason", "French is fine").exit_code == 0
    history = aliases.history("tickets", "champion")
    assert [(h["version"], h["action"], h["by"]) for h in history] == [
        (v1, "promote", "ana"), (v2, "promote", "ben"), (v3, "promote", history[2]["by"]), (v2, "rollback", "cara"),
        (v1, "rollback", history[4]["by"]), (v3, "rollback", history[5]["by"])]


MUTATIONS = ["set_registered_model_alias", "set_model_version_tag", "set_registered_model_tag", "update_model_version"]


def test_registration_failing_at_any_step_leaves_the_registry_as_it_was(state, tmp_path, monkeypatch):
    import logging

    import mlflow

    from tasks import deploy
    from tunewright.recipe import DeployConfig
    from tunewright.registry.tracking import RunContext

    client = MlflowClient()
    old = _version(client, tmp_path, "tickets")
    aliases.move_alias("tickets", "champion", old, reason="first", client=client)
    aliases.move_alias("tickets", "challenger", old, reason="first", client=client)
    before = _registry_state(client, "tickets")
    ctx = RunContext(parent_run_id="p", experiment_id="0", tracking_uri=mlflow.get_tracking_uri(),
                     state_dir=str(state), work_dir=str(tmp_path), recipe_name="r")
    cfg = DeployConfig(registered_model="tickets", min_improvement=0.0)
    src = tmp_path / "candidate"
    src.mkdir()

    class Boom(RuntimeError):
        pass

    calls = {"n": 0, "fail_at": 0}
    real_register = mlflow.register_model

    def counting(fn):
        def wrapped(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == calls["fail_at"]:
                raise Boom(f"step {calls['n']} fails")
            return fn(*args, **kwargs)
        return wrapped

    monkeypatch.setattr(mlflow, "register_model", counting(real_register))
    for method in MUTATIONS:
        monkeypatch.setattr(MlflowClient, method, counting(getattr(MlflowClient, method)))
    failed_steps = 0
    for fail_at in range(1, 40):
        calls.update(n=0, fail_at=fail_at)
        try:
            version, alias, _ = deploy._register(cfg, src.as_uri(), {"tunewright.kind": "chat_model"}, True, "ok",
                                              ctx, logging.getLogger("test"))
        except Boom:
            failed_steps += 1
            calls["fail_at"] = 0
            assert _registry_state(client, "tickets") == before, f"after a failure at step {fail_at}"
            continue
        break
    # registering, describing, and two recorded alias moves: each step failed once, then it went through
    assert failed_steps >= 10
    assert alias == "champion" and aliases.alias_holder("tickets", "champion") == version
    assert aliases.alias_holder("tickets", "challenger") == version
    assert [h["version"] for h in aliases.history("tickets", "champion")] == [old, version]


def test_a_run_failing_after_registration_puts_the_registry_back(state, tmp_path):
    """Stage 6 promoted the candidate, then the run failed (awaiting approval, in stage 7): the flow undoes the
    registration, so the champion, the challenger and their histories are as they were and the version is gone.
    A model the run created is removed again."""
    import logging

    import mlflow

    from tasks import deploy
    from tasks.artifacts import DeployArtifact
    from tunewright.recipe import DeployConfig
    from tunewright.registry.tracking import RunContext

    client = MlflowClient()
    old = _version(client, tmp_path, "tickets")
    aliases.move_alias("tickets", "champion", old, reason="first", client=client)
    before = _registry_state(client, "tickets")
    ctx = RunContext(parent_run_id="p", experiment_id="0", tracking_uri=mlflow.get_tracking_uri(),
                     state_dir=str(state), work_dir=str(tmp_path), recipe_name="r")
    src = tmp_path / "candidate"
    src.mkdir()
    for name, was in (("tickets", before), ("brand-new", None)):
        cfg = DeployConfig(registered_model=name, min_improvement=0.0)
        version, alias, snapshot = deploy._register(cfg, src.as_uri(), {"tunewright.kind": "chat_model"}, True, "ok",
                                                    ctx, logging.getLogger("test"))
        assert alias == "champion" and aliases.alias_holder(name, "champion") == version
        deployed = DeployArtifact(model_uri=src.as_uri(), registered_model=name, version=version, alias=alias,
                                  promoted=True, reason="ok", registry_before=snapshot)
        deploy.undo_registration(deployed, ctx, RuntimeError("stage 7 failed"))
        if was is None:
            assert not deploy._registered(client, name)
        else:
            assert _registry_state(client, name) == was
            assert [h["version"] for h in aliases.history(name, "champion")] == [old]

    # while the run waited, a person promoted another version: the undo takes back only what the run did
    cfg = DeployConfig(registered_model="tickets", min_improvement=0.0)
    version, alias, snapshot = deploy._register(cfg, src.as_uri(), {"tunewright.kind": "chat_model"}, True, "ok",
                                                ctx, logging.getLogger("test"))
    other = _version(client, tmp_path, "tickets")
    aliases.move_alias("tickets", "champion", other, reason="by hand", client=client)
    deployed = DeployArtifact(model_uri=src.as_uri(), registered_model="tickets", version=version, alias=alias,
                              promoted=True, reason="ok", registry_before=snapshot)
    deploy.undo_registration(deployed, ctx, RuntimeError("stage 7 failed"))
    assert aliases.alias_holder("tickets", "champion") == other
    assert aliases.alias_holder("tickets", "challenger") is None  # it was on the run's version, and before on none
    assert [h["version"] for h in aliases.history("tickets", "champion")] == [old, other]
    versions = {str(v.version) for v in client.search_model_versions("name = 'tickets'")}
    assert version not in versions and {old, other} <= versions


@pytest.mark.parametrize("answer", [{"approve": True, "reviewer": "ana", "comment": "checked 20 answers"},
                                    {"approve": False, "reviewer": "ben", "comment": "too terse"}, None])
def test_approval_pauses_the_flow_and_only_an_approval_moves_the_champion(prefect_server, state, tmp_path, answer):
    import mlflow
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.flow_runs import resume_flow_run

    from tasks.artifacts import DeployArtifact
    from tasks.deploy import await_approval
    from tunewright.recipe import DeployConfig
    from tunewright.registry.tracking import RunContext

    client = MlflowClient()
    old = _version(client, tmp_path, "tickets")
    aliases.move_alias("tickets", "champion", old, reason="first", client=client)
    new = _version(client, tmp_path, "tickets")
    parent = client.create_run(client.create_experiment("approval")).info.run_id
    ctx = RunContext(parent_run_id=parent, experiment_id="0", tracking_uri=mlflow.get_tracking_uri(),
                     state_dir=str(state), work_dir=str(tmp_path), recipe_name="r")
    cfg = DeployConfig(registered_model="tickets", approval=True, approval_timeout=4 if answer is None else 120)
    waiting = DeployArtifact(model_uri="m", registered_model="tickets", version=new, alias="challenger",
                             promoted=False, reason="gate passed", awaiting_approval=True)

    @flow(name="approval-test")
    def gated() -> DeployArtifact:
        return await_approval(cfg, waiting, ctx)

    result = {}
    worker = threading.Thread(target=lambda: result.update(out=gated()))
    worker.start()
    if answer is not None:
        deadline = time.monotonic() + 120
        paused = None
        while paused is None and time.monotonic() < deadline:
            with get_client(sync_client=True) as pc:
                runs = pc.read_flow_runs()
            paused = next((r for r in runs if r.state and r.state.is_paused()), None)
            time.sleep(0.5)
        assert paused is not None, "the flow never paused for approval"
        assert aliases.alias_holder("tickets", "champion") == old  # nothing moves while it waits
        resume_flow_run(paused.id, run_input=answer)
    worker.join(180)
    out = result["out"]
    tags = client.get_model_version("tickets", new).tags
    if answer and answer["approve"]:
        assert out.promoted and out.alias == "champion"
        assert aliases.alias_holder("tickets", "champion") == new
        assert tags["tunewright.champion.by"] == "ana"
        assert tags["tunewright.approval"] == "approved by ana: checked 20 answers"
    else:
        assert not out.promoted and out.alias == "challenger"
        assert aliases.alias_holder("tickets", "champion") == old
        assert tags["tunewright.approval"] == ("rejected by ben: too terse" if answer else
                                               "no approval within 4 s; the champion is unchanged")
    assert json.loads(client.get_registered_model("tickets").tags["tunewright.history.champion"])[-1]["version"] == (
        new if answer and answer["approve"] else old)
