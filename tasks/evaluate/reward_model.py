"""Stage 5 for a reward model: judged by how often it scores the held-out chosen answer above the rejected one,
beside the base model's own log-probabilities ranking the same pairs."""

from __future__ import annotations

import math
from pathlib import Path

from tasks.artifacts import EnvironmentArtifact, EvalArtifact, ModelArtifact, TrainArtifact
from tasks.evaluate.answers import load_full
from tasks.evaluate.report import log_report, write_predictions, write_report
from tunewright import preference
from tunewright.recipe import EvaluateConfig
from tunewright.registry.tracking import RunContext, log_to_parent
from tunewright.train.loss import Kernels


def reward_model_scores(cfg: EvaluateConfig, records: list[dict], model: ModelArtifact, trained: TrainArtifact,
                        env: EnvironmentArtifact, ctx: RunContext, device, amp, log) -> EvalArtifact:
    """A reward model on held-out pairs: the share it scores chosen above rejected (`preference_accuracy`), beside
    the base model's log-probabilities ranking the same pairs; the losses are the pairs' Bradley-Terry losses."""
    import mlflow

    from tunewright.scoring.reward_model import RewardScorer

    pairs = [r for r in records if "chosen" in r]
    if not pairs:
        raise ValueError("a reward model is evaluated on held-out preference pairs; the test split has none")
    scorer = RewardScorer(model.base_dir, trained.output_dir, device, batch_size=cfg.batch_size)
    chosen, rejected = scorer.score_pairs(pairs)
    tokenizer = scorer.tokenizer
    del scorer
    base_margin = _base_margins(model, tokenizer, pairs, cfg.batch_size, device, amp)
    margin = [c - r for c, r in zip(chosen, rejected)]
    base_score = sum(m > 0 for m in base_margin) / len(pairs)
    tuned_score = sum(m > 0 for m in margin) / len(pairs)
    out = Path(ctx.work_dir, "evaluate")
    out.mkdir(parents=True, exist_ok=True)
    rows = _pair_rows(pairs, base_margin, chosen, rejected)
    predictions = write_predictions(out, rows)
    metric = "preference_accuracy"
    art = EvalArtifact(metric=metric, base_score=base_score, tuned_score=tuned_score, base_loss=_bt(base_margin),
                       tuned_loss=_bt(margin), n_examples=len(pairs), predictions_path=str(predictions),
                       report_path=str(out / "evaluation.html"),
                       preference_accuracy={"base": base_score, "tuned": tuned_score},
                       scores={"base": {metric: base_score, "answer_loss": _bt(base_margin)},
                               "tuned": {metric: tuned_score, "answer_loss": _bt(margin)}})
    write_report(out, art, rows, [])
    metrics = {f"base_{metric}": base_score, f"tuned_{metric}": tuned_score, "improvement": tuned_score - base_score,
               "base_pairwise_loss": art.base_loss, "tuned_pairwise_loss": art.tuned_loss,
               "tuned_reward_margin": sum(margin) / len(margin),
               "tuned_reward_chosen": sum(chosen) / len(chosen), "tuned_reward_rejected": sum(rejected) / len(rejected)}
    mlflow.log_metrics(metrics)
    log_report(out)
    log_to_parent(ctx, {k: metrics[k] for k in (f"base_{metric}", f"tuned_{metric}", "improvement",
                                                 "tuned_reward_margin")})
    log.info("reward model on %d held-out pairs: chosen scored above rejected %.1f%% (the base's log-probabilities: "
             "%.1f%%), mean margin %.3f", len(pairs), 100 * tuned_score, 100 * base_score, metrics["tuned_reward_margin"])
    return art


def _base_margins(model: ModelArtifact, tokenizer, pairs: list[dict], batch_size: int, device, amp) -> list[float]:
    """The base model's log-probability of each chosen answer minus the rejected one's."""
    import torch

    base_net = load_full(model.base_dir, device)
    tokenizer_rows = preference.encode_rows("dpo", tokenizer, pairs, 1024)
    base_margin: list[float] = []
    with torch.no_grad(), torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
        for start in range(0, len(tokenizer_rows), batch_size):
            a, b, _, _ = preference.row_logps(base_net, tokenizer_rows[start:start + batch_size], "dpo",
                                              tokenizer.pad_token_id, Kernels().in_one_head_call())
            base_margin.extend((a - b).float().cpu().tolist())
    return base_margin


def _bt(margins: list[float]) -> float:
    """The Bradley-Terry loss of the pairs' score margins."""
    import torch
    import torch.nn.functional as F

    return float(-F.logsigmoid(torch.tensor(margins)).mean()) if margins else math.nan


def _pair_rows(pairs: list[dict], base_margin: list[float], chosen: list[float], rejected: list[float]) -> list[dict]:
    """One prediction row per held-out pair: its prompt and answers, the base's margin and the reward model's scores."""
    return [{"id": str(r["id"]), "prompt": "\n".join(m["content"] for m in r["prompt"] if m["role"] == "user"),
             "messages": r["prompt"], "reference": r["chosen"][-1]["content"],
             "rejected": r["rejected"][-1]["content"],
             "base": f"log-prob margin {bm:+.2f}", "tuned": f"chosen {c:+.3f}, rejected {rj:+.3f}",
             "chosen_score": c, "rejected_score": rj, "base_correct": bm > 0, "tuned_correct": c > rj}
            for r, bm, c, rj in zip(pairs, base_margin, chosen, rejected)]
