"""Stage 6, deployment: log the model to MLflow, prove it loads, register it, gate the promotion.

The logged model (an MLflow pyfunc holding base weights and adapter) is loaded in a fresh
process and must answer test prompts correctly before a version is registered; the alias
(`champion` by default) moves to the new version only when the promotion gate passes,
otherwise the version gets `challenger`. A failure before registration leaves the registry as
it was.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from prefect import task
from tunewright.logs import stage_logger

from tasks.artifacts import DataArtifact, DeployArtifact, EnvironmentArtifact, EvalArtifact, ModelArtifact, TrainArtifact
from tunewright.adapters import lineage_tags
from tunewright.chat import autocast_dtype
from tunewright.metrics import score
from tunewright.recipe import DeployConfig, EvaluateConfig, ModelConfig
from tunewright.tracking import RunContext, log_to_parent, stage_run

CHALLENGER = "challenger"


class VerificationError(RuntimeError):
    """The logged model did not load back or did not answer as it did in evaluation."""


def promotion_decision(cfg: DeployConfig, scores: EvalArtifact) -> tuple[bool, str]:
    """Whether the fine-tuned model earns the alias, and why (in words for the version's tags)."""
    gain = scores.tuned_score - scores.base_score
    if scores.tuned_score < cfg.min_score:
        return False, f"{scores.metric} {scores.tuned_score:.3f} is below deploy.min_score {cfg.min_score}"
    if gain < cfg.min_improvement:
        return False, f"gain over base {gain:+.3f} is below deploy.min_improvement {cfg.min_improvement}"
    return True, f"{scores.metric} {scores.base_score:.3f} -> {scores.tuned_score:.3f} (gain {gain:+.3f})"


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
    prompts.write_text(json.dumps([r["prompt"] for r in picked]))
    env = dict(os.environ, MLFLOW_TRACKING_URI=ctx.tracking_uri)
    proc = subprocess.run([sys.executable, "-m", "tunewright.verify", model_uri, str(prompts), str(answers)],
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
    proc = subprocess.run([sys.executable, "-m", "tunewright.verify", model_uri, str(inputs), str(outputs)],
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
    import pandas as pd
    from mlflow import MlflowClient
    from mlflow.models import infer_signature

    from tunewright.serving import ChatAdapterModel, RewardScorerModel

    log = stage_logger()
    with stage_run(ctx, "6-deploy"):
        example = pd.DataFrame({"prompt": ["My order A12345 has not arrived."]})
        scorer = trained.objective == "reward"
        if scorer:  # a reward model scores (prompt, answer) rows; GRPO and PPO load it by this URI
            example["answer"] = ['{"category": "shipping"}']
            info = mlflow.pyfunc.log_model(
                name="model", python_model=RewardScorerModel(),
                artifacts={"base_model": model.base_dir, "reward_model": trained.output_dir},
                model_config={"system_prompt": data.system_prompt, "batch_size": eval_cfg.batch_size},
                signature=infer_signature(example, [0.0]), pip_requirements=_requirements())
        else:
            info = mlflow.pyfunc.log_model(
                name="model",
                python_model=ChatAdapterModel(),
                artifacts=({"base_model": model.base_dir, "adapter": trained.output_dir} if trained.kind == "adapter"
                           else {"model": trained.output_dir}),
                model_config={"system_prompt": data.system_prompt, "max_new_tokens": eval_cfg.max_new_tokens,
                              "batch_size": eval_cfg.batch_size, "precision": env.precision,
                              "quantization": ({**model_cfg.quantization.model_dump(), "bits": model_cfg.load_bits()}
                                               if model_cfg.load_bits() else None)},
                signature=infer_signature(example, ["answer"], params={"max_new_tokens": eval_cfg.max_new_tokens}),
                pip_requirements=_requirements(quantised=bool(model_cfg.load_bits())),
            )
        log.info("logged model %s; checking it in a fresh process", info.model_uri)
        checked = (_verify_reward_model(info.model_uri, scores, data.system_prompt, cfg.verify_samples, ctx, log)
                   if scorer else
                   _verify(info.model_uri, scores, eval_cfg.metric, cfg.verify_samples, ctx, log,
                           autocast_dtype(env.precision) is not None))
        mlflow.log_dict({"checked": checked}, "deploy/verification.json")
        if model.lineage:
            mlflow.log_dict(model.lineage, "deploy/lineage.json")

        promoted, reason = promotion_decision(cfg, scores)
        client = MlflowClient(ctx.tracking_uri)
        version = mlflow.register_model(info.model_uri, cfg.registered_model, tags={
            "tunewright.parent_run_id": ctx.parent_run_id, "tunewright.base_digest": model.base_digest,
            "tunewright.dataset_digest": data.digest, f"tunewright.{scores.metric}": f"{scores.tuned_score:.4f}",
            "tunewright.promotion": ("promoted: " if promoted else "rejected: ") + reason,
            **lineage_tags(model.lineage, ctx.recipe_digest, trained.output_dir if trained.kind == "adapter" else None,
                           trained.steps),
            "tunewright.kind": "reward_model" if scorer else "chat_model",
        }).version
        alias = cfg.alias if promoted else CHALLENGER
        client.set_registered_model_alias(cfg.registered_model, alias, version)
        client.update_model_version(cfg.registered_model, version,
                                    description=f"{ctx.recipe_name}: {reason}. Parent run {ctx.parent_run_id}.")
        mlflow.log_params({"registered_model": cfg.registered_model, "version": version, "alias": alias})
        mlflow.set_tag("tunewright.promotion", reason)
        log_to_parent(ctx, {"promoted": float(promoted)},
                      {"tunewright.registered_model": f"{cfg.registered_model}/{version}@{alias}"})
        log.info("registered %s version %s with alias '%s': %s", cfg.registered_model, version, alias, reason)
        return DeployArtifact(model_uri=info.model_uri, registered_model=cfg.registered_model, version=str(version),
                              alias=alias, promoted=promoted, reason=reason)
