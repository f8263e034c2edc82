"""Stage 5, evaluation and validation: the Prefect tasks that score base vs fine-tuned on the held-out split."""

from __future__ import annotations

from pathlib import Path

from prefect import task
from tunewright.logs import stage_logger

from tasks.artifacts import DataArtifact, EnvironmentArtifact, EvalArtifact, ModelArtifact, TrainArtifact
from tasks.evaluate.answers import Answers, answer_test_set, load_full, start_point_answers
from tasks.evaluate.report import log_report, log_tables, write_predictions, write_report
from tasks.evaluate.reward_model import reward_model_scores
from tasks.evaluate.scoring import on_policy_accuracy, score_models
from tunewright import preference
from tunewright.chat import autocast_dtype
from tunewright.recipe import EvaluateConfig, ModelConfig
from tunewright.registry.tracking import RunContext, log_to_parent, stage_run
from tunewright.scoring import rewards
from tunewright.scoring.metrics import score
from tunewright.seeding import seed_everything
from tunewright.splits import read_split


@task(name="5-evaluate")
def evaluate(cfg: EvaluateConfig, model_cfg: ModelConfig, data: DataArtifact, model: ModelArtifact,
             trained: TrainArtifact, env: EnvironmentArtifact, ctx: RunContext,
             champion: str | None = None) -> EvalArtifact:
    """Score the base, the fine-tuned model and the registry's `champion` (a `models:/NAME@ALIAS` reference, when
    given and registered) on the test split with every metric the recipe names; report them side by side."""
    import torch

    log = stage_logger()
    seed_everything(env.seed)
    device = torch.device("cuda" if env.device == "cuda" else "cpu")
    amp = autocast_dtype(env.precision)
    with stage_run(ctx, "5-evaluate"):
        records = read_split(data.test_path)[: cfg.max_examples]
        if not records:
            raise ValueError(f"{data.test_path}: the test split is empty; raise data.split.test_fraction")
        if trained.objective == "reward":
            return reward_model_scores(cfg, records, model, trained, env, ctx, device, amp, log)
        # preference pairs and feedback are scored by the task metric on their good answers
        test = [r for r in records if "messages" in r or "chosen" in r or r.get("label") is True]
        ans = answer_test_set(cfg, model_cfg, test, model, trained, env, ctx, champion, device, amp, log)
        pref, start_score, start_out = _preference_and_start(cfg, records, test, ans, trained, model, device, amp, log)
        mean_reward = _mean_reward(trained, ans, start_out, device, log)
        if pref:
            log.info("held-out preference accuracy (chosen more likely than rejected) on %d pairs: %s",
                     sum("chosen" in r for r in records),
                     ", ".join(f"{k} {v:.1%}" for k, v in pref.items()))
        scores, rows = _scored_rows(cfg, test, ans, log)
        out = Path(ctx.work_dir, "evaluate")
        out.mkdir(parents=True, exist_ok=True)
        predictions = write_predictions(out, rows)
        base_score, base_fields, _ = score(cfg.metric, ans.outs["base"], ans.refs)
        tuned_score, tuned_fields, _ = score(cfg.metric, ans.outs["tuned"], ans.refs)
        champ = ans.champion
        art = EvalArtifact(metric=cfg.metric, base_score=base_score, tuned_score=tuned_score,
                           base_loss=ans.losses["base"], tuned_loss=ans.losses["tuned"], n_examples=len(test),
                           base_fields=base_fields, tuned_fields=tuned_fields, predictions_path=str(predictions),
                           report_path=str(out / "evaluation.html"), start_score=start_score,
                           preference_accuracy=pref, mean_reward=mean_reward, scores=scores,
                           champion=champ["resolved"] if champ else None,
                           champion_note=champ["note"] if champ else ("no champion compared" if not champion else
                                                                      "evaluate.champion is off"))
        write_report(out, art, rows, list(tuned_fields))
        _log_figures(cfg, art, rows, out, ctx, log)
        return art


def _preference_and_start(cfg: EvaluateConfig, records: list[dict], test: list[dict], ans: Answers,
                          trained: TrainArtifact, model: ModelArtifact, device, amp,
                          log) -> tuple[dict[str, float], float | None, list[str]]:
    """Held-out preference accuracy of the base and the fine-tuned model (when the test split holds pairs), and the
    starting point's answers, score and accuracies (when alignment started from supervised steps)."""
    def accuracy(m, pairs=records) -> float:
        return preference.preference_accuracy(m, ans.tokenizer, pairs, 1024, cfg.batch_size, amp)[0]

    pref: dict[str, float] = {}
    if any("chosen" in r for r in records):
        pref["tuned"] = accuracy(ans.net)
        if trained.kind == "adapter":
            with ans.net.disable_adapter():
                pref["base"] = accuracy(ans.net)
        else:
            pref["base"] = accuracy(load_full(model.base_dir, device))
    if not trained.start_dir:
        return pref, None, []
    start, start_out = start_point_answers(trained, ans, device, log)
    start_score = score(cfg.metric, start_out, ans.refs)[0]
    if pref:
        pref["start"] = accuracy(start)
        pref.update(on_policy_accuracy(accuracy, test, start_out, ans.net, start, trained, model, device, log))
    return pref, start_score, start_out


def _mean_reward(trained: TrainArtifact, ans: Answers, start_out: list[str], device, log) -> dict[str, float]:
    """The mean reward of the greedy answers under the objective's reward, when the model was trained on one."""
    if not trained.reward:
        return {}
    fn = rewards.scorer(trained.reward, device)
    rewarded = {"base": ans.outs["base"], "tuned": ans.outs["tuned"]} | (
        {"start": start_out} if trained.start_dir else {})
    mean_reward = {k: sum(fn([c[:-1] for c in ans.convs], v, ans.refs)) / len(ans.refs) for k, v in rewarded.items()}
    log.info("mean %s reward of greedy answers to %d held-out prompts: %s", trained.reward, len(ans.refs),
             ", ".join(f"{k} {v:.3f}" for k, v in mean_reward.items()))
    return mean_reward


def _scored_rows(cfg: EvaluateConfig, test: list[dict], ans: Answers,
                 log) -> tuple[dict[str, dict[str, float]], list[dict]]:
    """Every model's figures, and one prediction row per test example: prompt, reference, and each model's answer,
    whether it is right and its per-example scores."""
    prompts = ["\n".join(m["content"] for m in c[:-1] if m["role"] == "user") for c in ans.convs]
    scores, per_example = score_models(cfg, ans.outs, ans.losses, ans.refs, prompts, log)
    hits = {who: score(cfg.metric, answers, ans.refs)[2] for who, answers in ans.outs.items()}
    rows = []
    for i, (r, ref) in enumerate(zip(test, ans.refs)):
        row = {"id": r["id"], "prompt": prompts[i], "reference": ref}
        if ans.settings.get("tools"):  # what the registered model is asked in the fresh-process check
            row |= {"messages": ans.convs[i][:-1], "tools": ans.settings["tools"][i]}
        for who, answers in ans.outs.items():
            row[who] = answers[i]
            row[f"{who}_correct"] = hits[who][i]
            row.update({f"{who}_{k}": v[i] for k, v in per_example[who].items()})
        rows.append(row)
    return scores, rows


def _log_figures(cfg: EvaluateConfig, art: EvalArtifact, rows: list[dict], out: Path, ctx: RunContext,
                 log) -> None:
    """Every model's figures to the stage's MLflow run (the headline ones to the parent run too), with the report,
    the per-example table and the Prefect table."""
    import mlflow

    scores = art.scores
    metrics = {f"{who}_{k}": v for who, figures in scores.items() for k, v in figures.items()}
    metrics["improvement"] = art.tuned_score - art.base_score
    metrics.update({f"{k}_preference_accuracy": v for k, v in art.preference_accuracy.items()})
    metrics.update({f"{k}_mean_reward": v for k, v in art.mean_reward.items()})
    if art.start_score is not None:
        metrics[f"start_{cfg.metric}"] = art.start_score
    mlflow.log_metrics(metrics)
    log_report(out)
    log_tables(rows, scores, art, ctx, log)
    log_to_parent(ctx, {k: metrics[k] for k in (f"base_{cfg.metric}", f"tuned_{cfg.metric}", "improvement",
                                                 "tuned_answer_loss")}
                  | {k: v for k, v in metrics.items()
                     if k.endswith(("preference_accuracy", "mean_reward")) or k.startswith(("start_", "champion_"))})
    log.info("%s on %d test examples: base %.1f%% -> fine-tuned %.1f%% (answer loss %.3f -> %.3f)%s",
             cfg.metric, art.n_examples, 100 * art.base_score, 100 * art.tuned_score, art.base_loss, art.tuned_loss,
             f"; champion {art.champion} {100 * scores['champion'][cfg.metric]:.1f}%" if art.champion else "")


@task(name="5-summarise-folds")
def summarise_folds(folds: list[EvalArtifact], ctx: RunContext) -> dict:
    """Mean, spread and range of every model's figures across the folds of a cross-validation, on the parent run
    (`cv_<model>_<metric>_mean` / `_std`), as a JSON artifact and a Prefect table."""
    import statistics

    from mlflow import MlflowClient

    log = stage_logger()
    summary: dict[str, dict[str, dict[str, float]]] = {}
    for who in folds[0].scores:
        for metric in folds[0].scores[who]:
            values = [f.scores[who][metric] for f in folds if metric in f.scores.get(who, {})]
            summary.setdefault(who, {})[metric] = {
                "mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                "min": min(values), "max": max(values), "folds": len(values)}
    client = MlflowClient(ctx.tracking_uri)
    for who, figures in summary.items():
        for metric, stats in figures.items():
            client.log_metric(ctx.parent_run_id, f"cv_{who}_{metric}_mean", stats["mean"])
            client.log_metric(ctx.parent_run_id, f"cv_{who}_{metric}_std", stats["std"])
    client.log_dict(ctx.parent_run_id, {"folds": [f.scores for f in folds], "summary": summary},
                    "crossvalidation/summary.json")
    table = [{"metric": m} | {f"{who} mean": round(summary[who][m]["mean"], 4) for who in summary}
             | {f"{who} std": round(summary[who][m]["std"], 4) for who in summary} for m in summary["tuned"]]
    try:
        from prefect.artifacts import create_table_artifact

        create_table_artifact(table=table, key="crossvalidation",
                              description=f"{len(folds)}-fold cross-validation, MLflow run {ctx.parent_run_id}")
    except Exception as exc:  # outside a Prefect run there is nowhere to put it
        log.debug("no Prefect artifact: %s", exc)
    main = folds[0].metric
    log.info("%d-fold cross-validation: %s base %.3f ± %.3f -> fine-tuned %.3f ± %.3f", len(folds), main,
             summary["base"][main]["mean"], summary["base"][main]["std"], summary["tuned"][main]["mean"],
             summary["tuned"][main]["std"])
    return summary
