"""Stage 7, monitoring and maintenance: drift between training prompts and production requests.

An evidently report compares the prompts the model was trained on (reference) with a batch of
production requests (current). When the share of drifted columns reaches the recipe's
threshold, the stage emits the Prefect event `tunewright.drift.detected`, which the `retrain`
deployment in prefect.yaml is triggered by.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from pathlib import Path

from prefect import task
from tunewright.logs import stage_logger

from tasks.artifacts import DataArtifact, MonitorArtifact
from tunewright.splits import read_split
from tunewright.recipe import MonitorConfig
from tunewright.tracking import RunContext, log_to_parent, stage_run

DRIFT_EVENT = "tunewright.drift.detected"


def _prompt(record: dict) -> list[dict]:
    """The turns of a split record: chat `messages`, or the `prompt` of a preference pair or feedback row."""
    return record["messages"] if "messages" in record else record["prompt"]


def _user_text(messages: list[dict]) -> str:
    return "\n".join(m["content"] for m in messages if m["role"] == "user")


def read_requests(path: Path) -> list[str]:
    """User prompts from a JSONL of production requests (`prompt` or `messages` per line); requests the server
    refused (a `status` other than 200 in `tunewright serve`'s log) are not traffic the model answered."""
    prompts = []
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path} line {lineno}: invalid JSON: {exc}") from exc
            if rec.get("status", 200) != 200:
                continue
            if "prompt" in rec:
                prompts.append(str(rec["prompt"]))
            elif "messages" in rec:
                prompts.append(_user_text(rec["messages"]))
            else:
                raise ValueError(f"{path} line {lineno}: expected a 'prompt' or 'messages' field")
    return prompts


def _features(prompts: list[str]):
    import pandas as pd

    return pd.DataFrame({
        "prompt": prompts,
        "chars": [len(p) for p in prompts],
        "words": [len(p.split()) for p in prompts],
        "sentences": [max(1, len(re.findall(r"[.!?]+", p))) for p in prompts],
        "digits_share": [sum(ch.isdigit() for ch in p) / max(len(p), 1) for p in prompts],
        "upper_share": [sum(ch.isupper() for ch in p) / max(len(p), 1) for p in prompts],
    })


def drift_report(reference: list[str], current: list[str], drift_share: float, html_path: Path) -> dict:
    """Run the evidently drift preset; save HTML; return per-column and dataset drift."""
    os.environ.setdefault("DO_NOT_TRACK", "1")
    from evidently import DataDefinition, Dataset, Report
    from evidently.presets import DataDriftPreset
    from sklearn.exceptions import ConvergenceWarning

    ref, cur = _features(reference), _features(current)
    definition = DataDefinition(text_columns=["prompt"],
                                numerical_columns=["chars", "words", "sentences", "digits_share", "upper_share"])
    report = Report([DataDriftPreset(drift_share=drift_share, text_method="abs_text_content_drift")],
                    include_tests=True)
    with warnings.catch_warnings():
        # the text domain classifier fails to converge exactly when the sets are alike
        warnings.simplefilter("ignore", ConvergenceWarning)
        snapshot = report.run(current_data=Dataset.from_pandas(cur, data_definition=definition),
                              reference_data=Dataset.from_pandas(ref, data_definition=definition))
    snapshot.save_html(str(html_path))
    d = snapshot.dict()
    status = {t["metric_config"]["metric_id"]: t["status"] for t in d.get("tests", [])}
    summary: dict = {"columns": {}}
    for m in d["metrics"]:
        cfg = m["config"]
        if cfg["type"].endswith("ValueDrift"):
            summary["columns"][cfg["column"]] = {"drift_detected": status.get(m["id"]) == "FAIL",
                                                 "score": float(m["value"]), "method": cfg["method"]}
        elif cfg["type"].endswith("DriftedColumnsCount"):
            summary["drifted_share"] = float(m["value"]["share"])
            summary["n_drifted"] = int(m["value"]["count"])
    summary["dataset_drift"] = summary.get("drifted_share", 0.0) >= drift_share
    return summary


@task(name="7-monitor-drift")
def monitor_drift(cfg: MonitorConfig, data: DataArtifact, ctx: RunContext) -> MonitorArtifact:
    """Compare training prompts with production requests; emit a drift event when they part ways."""
    import mlflow

    log = stage_logger()
    with stage_run(ctx, "7-monitor"):
        reference = [_user_text(_prompt(r)) for r in read_split(data.train_path)]
        if cfg.production_path is not None:
            current, source = read_requests(cfg.production_path), str(cfg.production_path)
        else:
            current, source = [_user_text(_prompt(r)) for r in read_split(data.test_path)], "test split"
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
            from prefect.events import emit_event

            emit_event(event=DRIFT_EVENT, resource={"prefect.resource.id": f"tunewright.recipe.{ctx.recipe_name}"},
                       payload={"drifted_share": metrics["drifted_share"], "columns": drifted,
                                "mlflow_run_id": ctx.parent_run_id, "report": str(html_path)})
            log.warning("dataset drift detected: emitted %s (the retrain deployment listens for it)", DRIFT_EVENT)
        return MonitorArtifact(report_path=str(html_path), drift_detected=bool(summary["dataset_drift"]),
                               drifted_share=metrics["drifted_share"], n_reference=len(reference),
                               n_current=len(current), columns=summary["columns"])
