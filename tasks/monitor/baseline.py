"""Stage 7 in the fine-tuning flow: a baseline drift report between the training prompts and production requests.

It emits no event: the same file would show the same drift after every retrain. Windows of served traffic
(`tasks.monitor.window`) are what start retraining.
"""

from __future__ import annotations

import json
from pathlib import Path

from prefect import task
from tunewright.logs import stage_logger

from tasks.artifacts import DataArtifact, MonitorArtifact
from tasks.monitor.drift import drift_report
from tasks.monitor.traffic import read_requests, split_prompt
from tunewright.recipe import MonitorConfig
from tunewright.registry.tracking import RunContext, log_to_parent, stage_run
from tunewright.splits import read_split


@task(name="7-monitor-drift")
def monitor_drift(cfg: MonitorConfig, data: DataArtifact, ctx: RunContext) -> MonitorArtifact:
    """Compare training prompts with production requests: a baseline report, with no event."""
    import mlflow

    log = stage_logger()
    with stage_run(ctx, "7-monitor"):
        reference = [split_prompt(r) for r in read_split(data.train_path)]
        if cfg.production_path is not None:
            current, source = read_requests(cfg.production_path), str(cfg.production_path)
        else:
            current, source = [split_prompt(r) for r in read_split(data.test_path)], "test split"
        if not current:
            raise ValueError(f"monitor: no production requests in {source}")
        out = Path(ctx.work_dir, "monitor")
        out.mkdir(parents=True, exist_ok=True)
        html_path = out / "drift_report.html"
        summary = drift_report(reference, current, cfg.drift_share, html_path)
        (out / "drift_summary.json").write_text(json.dumps(summary, indent=2))
        mlflow.log_artifact(str(html_path), "monitor")
        mlflow.log_artifact(str(out / "drift_summary.json"), "monitor")
        metrics = {"drifted_share": summary.get("drifted_share", 0.0), "dataset_drift": float(summary["dataset_drift"])}
        metrics.update({f"drift_score_{c}": v["score"] for c, v in summary["columns"].items()})
        mlflow.log_metrics(metrics)
        mlflow.log_param("current_source", source)
        log_to_parent(ctx, {"drifted_share": metrics["drifted_share"]})
        drifted = [c for c, v in summary["columns"].items() if v["drift_detected"]]
        log.info("drift: %d/%d columns drifted (%s) between %d training prompts and %d requests from %s",
                 len(drifted), len(summary["columns"]), ", ".join(drifted) or "none", len(reference), len(current), source)
        if summary["dataset_drift"]:
            # a baseline against a fixed file: the same file would show the same drift after every retrain, so no
            # event comes from here; `flows/monitor.py` judges windows of served traffic and emits them
            log.warning("dataset drift between the training prompts and %s (a baseline report; retraining is "
                        "triggered by the monitoring flow on served traffic)", source)
        return MonitorArtifact(report_path=str(html_path), drift_detected=bool(summary["dataset_drift"]),
                               drifted_share=metrics["drifted_share"], n_reference=len(reference),
                               n_current=len(current), columns=summary["columns"])
