"""Stage 5's figures: every metric the recipe names for each model's answers, and held-out preference accuracy."""

from __future__ import annotations

import json
import math

from tasks.artifacts import ModelArtifact, TrainArtifact
from tasks.evaluate.answers import load_full
from tunewright import preference
from tunewright.recipe import EvaluateConfig
from tunewright.scoring.metrics import score, text_scores
from tunewright.scoring.safety import safety_scores


def perplexity(loss: float) -> float:
    """exp(mean cross-entropy per answer token): the perplexity of the reference answers under the model."""
    return math.exp(min(loss, 700.0))


def score_models(cfg: EvaluateConfig, outs: dict[str, list[str]], losses: dict[str, float], refs: list[str],
                 prompts: list[str], log) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, list]]]:
    """(model -> metric -> figure, model -> per-example values) for every model's answers to the same test set."""
    schema = json.loads(cfg.json_schema.read_text(encoding="utf-8")) if cfg.json_schema else None
    scores: dict[str, dict[str, float]] = {}
    per_example: dict[str, dict[str, list]] = {}
    for who, answers in outs.items():
        main, fields, _ = score(cfg.metric, answers, refs)
        text, text_rows = text_scores(cfg.metrics, answers, refs, label_field=cfg.label_field, schema=schema)
        safe, safe_rows = safety_scores(cfg.safety, answers, prompts, cfg.toxic_threshold)
        scores[who] = ({cfg.metric: main, "answer_loss": losses[who], "perplexity": perplexity(losses[who])}
                       | {f"field_{k}": v for k, v in fields.items()} | text | safe)
        per_example[who] = text_rows | safe_rows
    if cfg.judge.enabled:
        from tunewright.scoring.judge import judge

        means, grades, judge_model = judge(cfg.judge, prompts, refs, outs, log)
        for who in outs:
            scores[who]["judge_score"] = means[who]
            per_example[who]["judge_score"] = grades[who]
    for who, figures in scores.items():
        log.info("%s: %s", who, ", ".join(f"{k} {v:.3f}" for k, v in figures.items() if not k.startswith("field_")))
    return scores, per_example


def on_policy_accuracy(accuracy, test: list[dict], start_out: list[str], net, start, trained: TrainArtifact,
                       model: ModelArtifact, device, log) -> dict[str, float]:
    """Held-out preference accuracy on the starting point's own mistakes: each pair's rejected answer replaced by the
    starting model's greedy answer wherever that is wrong (what `train.rejected: on_policy` trains on), for the
    base, the starting point and the aligned model. Empty when the starting point answered every pair right."""
    pairs, changed = preference.with_own_mistakes(test, dict(enumerate(start_out)))
    if not changed:
        return {}
    out = {"start_on_policy": accuracy(start, pairs)}
    if trained.kind == "adapter":
        net.set_adapter("default")
        out["tuned_on_policy"] = accuracy(net, pairs)
        with net.disable_adapter():
            out["base_on_policy"] = accuracy(net, pairs)
    else:
        out["tuned_on_policy"] = accuracy(net, pairs)
        out["base_on_policy"] = accuracy(load_full(model.base_dir, device), pairs)
    log.info("held-out preference accuracy on the starting point's own mistakes (%d of %d pairs take its wrong answer "
             "as the rejected one): base %.1f%%, start %.1f%%, aligned %.1f%%", changed, len(pairs),
             100 * out["base_on_policy"], 100 * out["start_on_policy"], 100 * out["tuned_on_policy"])
    return out
