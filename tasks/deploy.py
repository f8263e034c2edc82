"""Stage 6, deployment: log the model to MLflow, prove it loads, register it, gate the promotion.

The logged model (an MLflow pyfunc holding base weights and adapter) is loaded in a fresh
process and must answer test prompts correctly before a version is registered; the alias
(`champion` by default) moves to the new version only when the promotion gate passes,
otherwise the version gets `challenger`. With `deploy.canary`, a version that passes stays `challenger` while a
champion exists, and meets live traffic first (the monitoring flow promotes it or rolls it back). A run that fails,
before registration or after it (awaiting approval, in stage 7), leaves the registry as it was.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from prefect import task
from prefect.input import RunInput
from pydantic import Field
from tunewright.logs import stage_logger

from tasks.artifacts import DataArtifact, DeployArtifact, EnvironmentArtifact, EvalArtifact, ModelArtifact, TrainArtifact
from tunewright.chat import autocast_dtype
from tunewright.recipe import DeployConfig, EvaluateConfig, ModelConfig
from tunewright.registry import aliases
from tunewright.registry.canary import set_canary
from tunewright.registry.adapters import lineage_tags
from tunewright.registry.bases import store_base
from tunewright.registry.promotion_rules import check_rules
from tunewright.registry.tracking import RunContext, log_to_parent, stage_run
from tunewright.scoring.metrics import score

CHALLENGER = "challenger"


class Approval(RunInput):
    """The form a reviewer answers in the Prefect UI when a gated candidate waits for approval."""

    approve: bool = Field(description="Move the alias to this version.")
    reviewer: str = Field(description="Your name, recorded on the version and in the alias history.")
    comment: str = Field("", description="Why (recorded beside your name).")


class VerificationError(RuntimeError):
    """The logged model did not load back or did not answer as it did in evaluation."""


def gate_results(cfg: DeployConfig, scores: EvalArtifact) -> list[dict]:
    """Every promotion rule with whether it passed: deploy.min_score and deploy.min_improvement first, then
    deploy.gate's rules over the figures stage 5 measured for the candidate, the base and the champion."""
    gain = scores.tuned_score - scores.base_score
    out = [{"rule": f"{scores.metric} >= deploy.min_score {cfg.min_score}", "passed": scores.tuned_score >= cfg.min_score,
            "detail": f"{scores.metric} {scores.tuned_score:.3f} {'reaches' if scores.tuned_score >= cfg.min_score else 'is below'} "
                      f"deploy.min_score {cfg.min_score}"},
           {"rule": f"gain over base >= deploy.min_improvement {cfg.min_improvement}", "passed": gain >= cfg.min_improvement,
            "detail": f"gain over base {gain:+.3f} {'reaches' if gain >= cfg.min_improvement else 'is below'} "
                      f"deploy.min_improvement {cfg.min_improvement}"}]
    if cfg.gate:
        figures = scores.scores or {"base": {scores.metric: scores.base_score}, "tuned": {scores.metric: scores.tuned_score}}
        out += check_rules(cfg.gate, figures)
    return out


def promotion_decision(cfg: DeployConfig, scores: EvalArtifact) -> tuple[bool, str]:
    """Whether the fine-tuned model earns the alias, and why (in words for the version's tags)."""
    results = gate_results(cfg, scores)
    failed = [r["detail"] for r in results if not r["passed"]]
    if failed:
        return False, "; ".join(failed)
    gain = scores.tuned_score - scores.base_score
    extra = [r["detail"] for r in results[2:]]
    return True, f"{scores.metric} {scores.base_score:.3f} -> {scores.tuned_score:.3f} (gain {gain:+.3f})" + (
        "; " + "; ".join(extra) if extra else "")


def _requirements(quantised: bool = False) -> list[str]:
    from importlib.metadata import version

    names = ["transformers", "peft", "accelerate", "safetensors", "tokenizers", "pandas", "mlflow"]
    pins = [f"{name}=={version(name)}" for name in names + (["bitsandbytes"] if quantised else [])]
    return [f"torch=={version('torch').split('+')[0]}"] + pins


def allowed_check_misses(n: int, reduced_precision: bool) -> int:
    """How many of `n` check prompts that evaluation answered right the fresh-process model may answer otherwise.

    In fp32 none. Under bf16/fp16 autocast the logits of the same weights differ in their last bits with the batch
    they are computed in (padding, and which prompts share it), so an answer evaluation got right by a hair (one
    field's two labels nearly tied) can flip; up to a third may, while a model that lost its adapter or loaded the
    wrong weights gets them all wrong."""
    return n // 3 if reduced_precision else 0


def _verify(model_uri: str, scores: EvalArtifact, metric: str, n: int, ctx: RunContext, log,
            reduced_precision: bool = False) -> list[dict]:
    """Answer test prompts with the logged model in a new Python process; raise if more are wrong than
    `allowed_check_misses` lets through."""
    rows = [json.loads(line) for line in open(scores.predictions_path, encoding="utf-8")]
    picked = [r for r in rows if r["tuned_correct"]][:n] or rows[:n]
    if not picked:
        return []
    work = Path(ctx.work_dir, "deploy")
    work.mkdir(parents=True, exist_ok=True)
    prompts, answers = work / "verify_prompts.json", work / "verify_answers.json"
    prompts.write_text(json.dumps([{"messages": json.dumps(r["messages"]), "tools": json.dumps(r["tools"])}
                                   if "tools" in r else r["prompt"] for r in picked]))
    env = dict(os.environ, MLFLOW_TRACKING_URI=ctx.tracking_uri)
    proc = subprocess.run([sys.executable, "-m", "tunewright.registry.verify", model_uri, str(prompts), str(answers)],
                          capture_output=True, text=True, env=env, timeout=1800)
    if proc.returncode != 0:
        raise VerificationError(f"the logged model {model_uri} failed to load in a fresh process:\n{proc.stderr[-3000:]}")
    got = json.loads(answers.read_text())
    _, _, hits = score(metric, got, [r["reference"] for r in picked])
    checked = [{"prompt": r["prompt"], "expected": r["reference"], "answer": a, "correct": h}
               for r, a, h in zip(picked, got, hits)]
    wrong = [c for c, r in zip(checked, picked) if r["tuned_correct"] and not c["correct"]]
    allowed = allowed_check_misses(sum(r["tuned_correct"] for r in picked), reduced_precision)
    if wrong and len(wrong) <= allowed:
        log.warning("fresh-process check: %d of %d prompts answered otherwise than in evaluation under reduced "
                    "precision (at most %d may), e.g. %r for expected %r", len(wrong), len(picked), allowed,
                    wrong[0]["answer"], wrong[0]["expected"])
    elif wrong:
        raise VerificationError(
            f"the logged model {model_uri} loaded in a fresh process but answered {len(wrong)} of {len(picked)} "
            f"check prompts wrongly, e.g. {wrong[0]['answer']!r} for expected {wrong[0]['expected']!r}")
    log.info("fresh-process check: %d/%d prompts answered correctly by %s", sum(hits), len(hits), model_uri)
    return checked


def _verify_reward_model(model_uri: str, scores: EvalArtifact, system_prompt: str | None, n: int, ctx: RunContext,
                         log) -> list[dict]:
    """Score held-out pairs with the logged reward model in a new Python process, given their prompt as users
    send it (the system prompt is the model's); raise unless it gives the scores evaluation measured."""
    system = [{"role": "system", "content": system_prompt}] if system_prompt else []
    rows = [r for r in (json.loads(line) for line in open(scores.predictions_path, encoding="utf-8"))
            if r["messages"] == system + [{"role": "user", "content": r["prompt"]}]][:n]
    if not rows:
        if n:
            log.warning("fresh-process check skipped: no held-out pair has a one-turn prompt a user could send")
        return []
    work = Path(ctx.work_dir, "deploy")
    work.mkdir(parents=True, exist_ok=True)
    inputs, outputs = work / "verify_pairs.json", work / "verify_scores.json"
    inputs.write_text(json.dumps([{"prompt": r["prompt"], "answer": a} for r in rows
                                  for a in (r["reference"], r["rejected"])]))
    env = dict(os.environ, MLFLOW_TRACKING_URI=ctx.tracking_uri)
    proc = subprocess.run([sys.executable, "-m", "tunewright.registry.verify", model_uri, str(inputs), str(outputs)],
                          capture_output=True, text=True, env=env, timeout=1800)
    if proc.returncode != 0:
        raise VerificationError(f"the logged reward model {model_uri} failed to load in a fresh process:\n"
                                f"{proc.stderr[-3000:]}")
    got = json.loads(outputs.read_text())
    checked = [{"id": r["id"], "expected": [r["chosen_score"], r["rejected_score"]], "got": got[2 * i:2 * i + 2]}
               for i, r in enumerate(rows)]
    off = [c for c in checked if any(abs(a - b) > 1e-3 * max(1.0, abs(a)) for a, b in zip(c["expected"], c["got"]))]
    if off:
        raise VerificationError(f"the logged reward model {model_uri} scored {len(off)} of {len(rows)} check pairs "
                                f"differently in a fresh process, e.g. {off[0]['got']} for {off[0]['expected']}")
    log.info("fresh-process check: %d pairs scored as in evaluation by %s", len(rows), model_uri)
    return checked


@task(name="6-deploy")
def deploy(cfg: DeployConfig, eval_cfg: EvaluateConfig, model_cfg: ModelConfig, scores: EvalArtifact,
           trained: TrainArtifact, model: ModelArtifact, data: DataArtifact, env: EnvironmentArtifact,
           ctx: RunContext) -> DeployArtifact:
    """Log, verify in a fresh process, register, and move the alias if the gate passes."""
    import mlflow

    log = stage_logger()
    with stage_run(ctx, "6-deploy"):
        scorer = trained.objective == "reward"
        info, base_ref = _log_model(eval_cfg, model_cfg, trained, model, data, env, ctx, log, scores)
        log.info("logged model %s; checking it in a fresh process", info.model_uri)
        checked = (_verify_reward_model(info.model_uri, scores, data.system_prompt, cfg.verify_samples, ctx, log)
                   if scorer else
                   _verify(info.model_uri, scores, eval_cfg.metric, cfg.verify_samples, ctx, log,
                           autocast_dtype(env.precision) is not None))
        mlflow.log_dict({"checked": checked}, "deploy/verification.json")
        export_tags = _exports(cfg, eval_cfg, scores, trained, model, data, ctx, log) if cfg.exports else {}
        if model.lineage:
            mlflow.log_dict(model.lineage, "deploy/lineage.json")

        results = gate_results(cfg, scores)
        passed, reason = promotion_decision(cfg, scores)
        mlflow.log_dict({"rules": results, "passed": passed, "scores": scores.scores, "champion": scores.champion},
                        "deploy/gate.json")
        tags = _version_tags(cfg, scores, trained, model, data, ctx, results, passed, reason) | (
            {"tunewright.base_uri": base_ref["base_uri"]} if base_ref else {}) | export_tags
        version, alias, before = _register(cfg, info.model_uri, tags, passed, reason, ctx, log)
        promoted = alias == cfg.alias
        deployed = DeployArtifact(model_uri=info.model_uri, registered_model=cfg.registered_model,
                                  version=str(version), alias=alias, promoted=promoted, reason=reason,
                                  awaiting_approval=passed and cfg.approval, registry_before=before)
        try:
            mlflow.log_params({"registered_model": cfg.registered_model, "version": version, "alias": alias})
            mlflow.set_tag("tunewright.promotion", reason)
            log_to_parent(ctx, {"promoted": float(promoted)},
                          {"tunewright.registered_model": f"{cfg.registered_model}/{version}@{alias}"})
        except BaseException as exc:
            undo_registration(deployed, ctx, exc)
            raise
        log.info("registered %s version %s with alias '%s': %s", cfg.registered_model, version, alias,
                 ("gate passed, awaiting approval: " if passed and cfg.approval else
                  "gate passed, meets live traffic first (deploy.canary): " if passed and not promoted else "")
                 + reason)
        return deployed


def _log_model(eval_cfg: EvaluateConfig, model_cfg: ModelConfig, trained: TrainArtifact, model: ModelArtifact,
               data: DataArtifact, env: EnvironmentArtifact, ctx: RunContext, log,
               scores: EvalArtifact) -> tuple[Any, dict]:
    """Log the fine-tuned model to the stage's run as an MLflow pyfunc: (its model info, where an adapter's base is
    stored, or {} when the model carries its own weights)."""
    import mlflow
    import pandas as pd
    from mlflow.models import infer_signature

    from tunewright.registry.pyfunc import ChatAdapterModel, RewardScorerModel

    example = pd.DataFrame({"prompt": ["My order A12345 has not arrived."]})
    scorer = trained.objective == "reward"
    base_ref = {}
    if not scorer and trained.kind == "adapter":  # the base once in the store, by digest; the version refers to it
        base_ref = {"base_uri": store_base(model.base_dir, model.base_digest, model.base_source,
                                           Path(ctx.state_dir), ctx.tracking_uri, log),
                    "base_digest": model.base_digest, "base_source": model.base_source}
    if scorer:  # a reward model scores (prompt, answer) rows; GRPO and PPO load it by this URI
        example["answer"] = ['{"category": "shipping"}']
        info = mlflow.pyfunc.log_model(
            name="model", python_model=RewardScorerModel(),
            artifacts={"base_model": model.base_dir, "reward_model": trained.output_dir},
            model_config={"system_prompt": data.system_prompt, "batch_size": eval_cfg.batch_size},
            signature=infer_signature(example, [0.0]), pip_requirements=_requirements())
        return info, base_ref
    info = mlflow.pyfunc.log_model(
        name="model",
        python_model=ChatAdapterModel(),
        artifacts=({"adapter": trained.output_dir} if trained.kind == "adapter"
                   else {"model": trained.output_dir}),
        model_config={**base_ref, "system_prompt": data.system_prompt, "max_new_tokens": eval_cfg.max_new_tokens,
                      "batch_size": eval_cfg.batch_size, "precision": env.precision,
                      "quantization": ({**model_cfg.quantization.model_dump(), "bits": model_cfg.load_bits()}
                                       if model_cfg.load_bits() else None)},
        signature=_chat_signature(example, eval_cfg, tools=_uses_tools(scores)),
        pip_requirements=_requirements(quantised=bool(model_cfg.load_bits())),
    )
    return info, base_ref


def _uses_tools(scores: EvalArtifact) -> bool:
    """Whether the test conversations declared tools (their prediction rows carry them)."""
    with open(scores.predictions_path, encoding="utf-8") as fh:
        return any("tools" in json.loads(line) for line in fh if line.strip())


def _chat_signature(example, eval_cfg: EvaluateConfig, tools: bool):
    """The chat model's signature: a `prompt` column; for a model trained with tools, `prompt` or `messages` with
    `tools` (both JSON text: OpenAI's message and tool lists), each optional."""
    from mlflow.models import ModelSignature, infer_signature
    from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema

    if not tools:
        return infer_signature(example, ["answer"], params={"max_new_tokens": eval_cfg.max_new_tokens})
    return ModelSignature(
        inputs=Schema([ColSpec("string", name, required=False) for name in ("prompt", "messages", "tools")]),
        outputs=Schema([ColSpec("string")]),
        params=ParamSchema([ParamSpec("max_new_tokens", "long", eval_cfg.max_new_tokens)]))


def _version_tags(cfg: DeployConfig, scores: EvalArtifact, trained: TrainArtifact, model: ModelArtifact,
                  data: DataArtifact, ctx: RunContext, results: list[dict], passed: bool, reason: str) -> dict:
    """The registered version's tags: where it came from, its figures, and the gate's verdict."""
    return {
        "tunewright.parent_run_id": ctx.parent_run_id, "tunewright.base_digest": model.base_digest,
        "tunewright.dataset_digest": data.digest, f"tunewright.{scores.metric}": f"{scores.tuned_score:.4f}",
        "tunewright.promotion": ("promoted: " if passed and not cfg.approval else
                                 "awaiting approval: " if passed else "rejected: ") + reason,
        "tunewright.gate": "passed" if passed else "failed",
        "tunewright.gate.rules": json.dumps(results)[:4900],
        "tunewright.compared_with": scores.champion or "no champion",
        **{f"tunewright.score.{k}": f"{v:.4f}" for k, v in (scores.scores.get("tuned") or {}).items()
           if not k.startswith("field_")},
        **lineage_tags(model.lineage, ctx.recipe_digest, trained.output_dir if trained.kind == "adapter" else None,
                       trained.steps),
        "tunewright.kind": "reward_model" if trained.objective == "reward" else "chat_model",
        "tunewright.base_source": model.base_source, "tunewright.git_commit": ctx.git_commit or "unknown",
    }


def _exports(cfg: DeployConfig, eval_cfg: EvaluateConfig, scores: EvalArtifact, trained: TrainArtifact,
             model: ModelArtifact, data: DataArtifact, ctx: RunContext, log) -> dict[str, str]:
    """Write the recipe's exports, check each against the adapter's answers, log them with this run; the version's
    tags that point at them. An export below its agreement floor fails the stage before anything is registered."""
    import mlflow

    from tunewright.registry.exports import export_adapter

    if trained.kind != "adapter" or trained.objective == "reward":
        log.warning("deploy.exports: skipped; %s", "a reward model is not exported" if trained.objective == "reward"
                    else "a full fine-tune is saved as full weights already (the logged model's `model` folder)")
        return {}
    rows = [json.loads(line) for line in open(scores.predictions_path, encoding="utf-8")][:cfg.export_prompts]
    system = [{"role": "system", "content": data.system_prompt}] if data.system_prompt else []
    convs = [system + [{"role": "user", "content": r["prompt"]}] for r in rows]
    out = Path(ctx.work_dir, "deploy", "exports")
    exports = export_adapter(cfg.exports, model.base_dir, trained.output_dir, out, convs,
                             max_new_tokens=eval_cfg.max_new_tokens, batch_size=eval_cfg.batch_size, log=log)
    floors = {"merged": cfg.merged_min_agreement, "int8": cfg.int8_min_agreement}
    tags = {}
    run_id = mlflow.active_run().info.run_id
    for e in exports:
        mlflow.log_metrics({f"export_{e.kind}_agreement": e.agreement, f"export_{e.kind}_mb": e.bytes / 1e6})
        mlflow.log_dict({"agreement": e.agreement, "floor": floors[e.kind], "prompts": len(convs),
                         "mismatches": e.mismatches}, f"exports/{e.kind}-check.json")
        if e.agreement < floors[e.kind]:
            example = f"; e.g. {e.mismatches[0][2]!r} where the adapter answers {e.mismatches[0][1]!r}" \
                if e.mismatches else ""
            raise VerificationError(f"the {e.kind} export answers {e.agreement:.0%} of {len(convs)} check prompts as "
                                    f"the adapter does, below deploy.{e.kind}_min_agreement {floors[e.kind]}{example}")
        mlflow.log_artifacts(e.folder, f"exports/{e.kind}")
        tags[f"tunewright.export.{e.kind}"] = f"runs:/{run_id}/exports/{e.kind}"
        tags[f"tunewright.export.{e.kind}.agreement"] = f"{e.agreement:.3f}"
    return tags


def _register(cfg: DeployConfig, model_uri: str, tags: dict, passed: bool, reason: str, ctx: RunContext,
              log) -> tuple[str, str, dict]:
    """Register the version, give it `challenger`, and, when the gate passed and no approval is asked, the alias:
    (version, alias it got, the registry as it was before, for `undo_registration`).

    All or nothing: if any step fails, the aliases go back where they were and the new version is deleted, so a
    failed run leaves the registry as it found it."""
    import mlflow
    from mlflow import MlflowClient

    client = MlflowClient(ctx.tracking_uri)
    name = cfg.registered_model
    before = _snapshot(client, name, (CHALLENGER, cfg.alias))
    canary = cfg.canary is not None and before["aliases"][cfg.alias] is not None  # a first version has no rival
    version = None
    try:
        version = str(mlflow.register_model(model_uri, name, tags=tags).version)
        if cfg.canary is not None:  # what `tunewright serve` routes by and the monitoring flow decides on
            set_canary(name, cfg.canary.share, cfg.canary.mode, client)
        client.update_model_version(name, version,
                                    description=f"{ctx.recipe_name}: {reason}. Parent run {ctx.parent_run_id}.")
        aliases.move_alias(name, CHALLENGER, version, by="tunewright", reason=f"candidate of run {ctx.parent_run_id}",
                            action="candidate", client=client)
        if passed and not cfg.approval and not canary:
            aliases.move_alias(name, cfg.alias, version, by="tunewright",
                                reason=f"gate passed: {reason}", action="promote", client=client)
            return version, cfg.alias, before
        return version, CHALLENGER, before
    except BaseException:
        log.error("registering %s failed; putting the registry back as it was", name)
        _take_back(client, name, version, before, log)
        raise


def _snapshot(client, name: str, names) -> dict:
    """What registering a version changes, as it is now: whether the model exists, who holds each alias, and the
    model's tags (the alias histories)."""
    if not _registered(client, name):
        return {"exists": False, "aliases": {a: None for a in names}, "tags": {}}
    return {"exists": True, "aliases": {a: aliases.alias_holder(name, a, client) for a in names},
            "tags": dict(client.get_registered_model(name).tags or {})}


def _take_back(client, name: str, version: str | None, before: dict, log) -> None:
    """Take back one registration and nothing else: an alias still on `version` goes back to its holder in
    `before` (a `_snapshot`), the version's entries leave the alias histories, the version is deleted, and the
    model too when the registration created it and nothing else is in it. Moves others made meanwhile stay."""
    for alias, holder in before["aliases"].items():
        try:
            if version is not None and aliases.alias_holder(name, alias, client) == version:
                aliases.restore_alias(name, alias, holder, client)
        except Exception as exc:  # noqa: BLE001  keep undoing the rest
            log.error("could not put %s@%s back on version %s: %s", name, alias, holder, exc)
    try:
        if version is not None and _registered(client, name):
            for key, value in (client.get_registered_model(name).tags or {}).items():
                if not key.startswith("tunewright.history."):
                    continue
                entries = json.loads(value)
                kept = [e for e in entries if str(e.get("version")) != version]
                if len(kept) != len(entries):
                    if kept or key in before["tags"]:
                        client.set_registered_model_tag(name, key, json.dumps(kept))
                    else:
                        client.delete_registered_model_tag(name, key)
            client.delete_model_version(name, version)
        if not before["exists"] and _registered(client, name) and \
                not client.search_model_versions(f"name = '{name}'"):
            client.delete_registered_model(name)
    except Exception as exc:  # noqa: BLE001
        log.error("could not take back %s version %s: %s", name, version, exc)


def undo_registration(deployed: DeployArtifact, ctx: RunContext, error: BaseException) -> None:
    """A run that fails after stage 6 registered its version (while awaiting approval, in stage 7, ...) takes it
    back (`_take_back`): moves others made meanwhile (another run, a person promoting by hand) stay."""
    from mlflow import MlflowClient

    if deployed.registry_before is None:
        return
    log = stage_logger()
    log.error("the run failed after registering %s version %s (%s: %s); taking the registration back",
              deployed.registered_model, deployed.version, type(error).__name__, error)
    _take_back(MlflowClient(ctx.tracking_uri), deployed.registered_model, deployed.version,
               deployed.registry_before, log)


def _registered(client, name: str) -> bool:
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
        return True
    except MlflowException:
        return False


def await_approval(cfg: DeployConfig, deployed: DeployArtifact, ctx: RunContext) -> DeployArtifact:
    """When the gate passed and the recipe asks for approval: pause the flow run until a person approves or rejects
    in the Prefect UI, then move the alias (or not). No answer within deploy.approval_timeout leaves the champion as
    it was; every outcome is recorded on the version."""
    from mlflow import MlflowClient
    from prefect.context import FlowRunContext
    from prefect.exceptions import FlowPauseTimeout
    from prefect.flow_runs import pause_flow_run

    if not deployed.awaiting_approval:
        return deployed
    log = stage_logger()
    client = MlflowClient(ctx.tracking_uri)
    name, version = deployed.registered_model, deployed.version

    def outcome(text: str, promoted: bool, alias: str) -> DeployArtifact:
        client.set_model_version_tag(name, version, "tunewright.approval", text[:4900])
        client.set_model_version_tag(name, version, "tunewright.promotion",
                                     ("promoted: " if promoted else "not promoted: ") + text[:4800])
        log_to_parent(ctx, {"promoted": float(promoted)}, {"tunewright.registered_model": f"{name}/{version}@{alias}"})
        log.info("%s version %s: %s", name, version, text)
        return DeployArtifact(model_uri=deployed.model_uri, registered_model=name, version=version, alias=alias,
                              promoted=promoted, reason=deployed.reason + "; " + text,
                              registry_before=deployed.registry_before)

    run = FlowRunContext.get()
    if run is None:
        return outcome("approval asked, but this is not a Prefect flow run: nobody can approve; stays challenger",
                       False, CHALLENGER)
    log.info("%s version %s passed the gate (%s). Waiting up to %d s for approval: resume flow run %s in the Prefect "
             "UI and answer the form", name, version, deployed.reason, cfg.approval_timeout, run.flow_run.name)
    try:
        answer = pause_flow_run(wait_for_input=Approval, timeout=cfg.approval_timeout,
                                poll_interval=max(1, min(10, cfg.approval_timeout // 10)),
                                key=f"approve-{name}-{version}")
    except FlowPauseTimeout:
        return outcome(f"no approval within {cfg.approval_timeout} s; the champion is unchanged", False, CHALLENGER)
    who = answer.reviewer.strip() or "unnamed reviewer"
    if not answer.approve:
        return outcome(f"rejected by {who}: {answer.comment or 'no comment'}", False, CHALLENGER)
    aliases.move_alias(name, cfg.alias, version, by=who, reason=f"approved: {answer.comment or deployed.reason}",
                        action="promote", client=client)
    return outcome(f"approved by {who}: {answer.comment or 'no comment'}", True, cfg.alias)
