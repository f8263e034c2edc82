"""The stage 1 Prefect task: `prepare` (tasks/data/prepare.py) inside the run's MLflow stage run.

The gate runs before any model is loaded. Rows it rejects are kept in `quarantine.jsonl` with
their reasons; the report, the summary and the counts go to MLflow and a markdown summary to the
Prefect UI.
"""

from __future__ import annotations

import json
from pathlib import Path

from prefect import task

from tasks.artifacts import DataArtifact
from tasks.data import gate
from tasks.data.prepare import DataGateError, prepare
from tunewright.files import read_jsonl
from tunewright.logs import stage_logger, transient_io_error
from tunewright.recipe import DataConfig
from tunewright.registry.tracking import RunContext, stage_run


def _metrics(summary: dict) -> dict[str, float]:
    keys = ("rows_read", "rows_in", "rows_kept", "rows_quarantined", "duplicates_removed", "near_duplicates_removed")
    m = {k: float(summary[k]) for k in keys}
    m["rejected_fraction"] = summary["rows_quarantined"] / max(summary["rows_in"], 1)
    m["rows_rejected"] = float(summary["rows_quarantined"])
    for name, src in summary["sources"].items():
        safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in name)
        for k in keys[1:]:
            m[f"source.{safe}.{k}"] = float(src[k])
    for kind, n in summary["redactions"].items():
        m[f"redactions.{kind}"] = float(n)
    for step, n in summary["cleaning"].items():
        m[f"cleaned.{step}"] = float(n)
    m["contaminated"] = float(summary["contaminated"])
    m.update({f"n_{k}": float(v) for k, v in summary["splits"].items()})
    return m


def _publish(summary: dict, ctx: RunContext, log) -> None:
    import shutil

    import mlflow

    run_dir = Path(ctx.work_dir, "data")  # the run keeps its own copy of the account beside the other stages' reports
    run_dir.mkdir(parents=True, exist_ok=True)
    for key in ("report", "summary", "quarantine", "duplicates"):
        shutil.copy2(summary["paths"][key], run_dir / Path(summary["paths"][key]).name)

    mlflow.log_metrics(_metrics(summary))
    for key in ("report", "summary", "quarantine", "duplicates"):
        mlflow.log_artifact(summary["paths"][key], "data_gate")
    try:
        from prefect.artifacts import create_markdown_artifact

        create_markdown_artifact(key="data-gate", markdown=gate.markdown(summary), description="Stage 1 data gate")
    except Exception as exc:  # outside a Prefect run (a task called with .fn) there is nowhere to put it
        log.debug("no Prefect artifact: %s", exc)


@task(name="1-prepare-data", retries=2, retry_delay_seconds=10, retry_condition_fn=transient_io_error)
def prepare_data(cfg: DataConfig, ctx: RunContext, tokenizer: str | None = None,
                 expect_kind: str | tuple[str, ...] | None = "sft") -> DataArtifact:
    """Read, clean, de-duplicate and gate the dataset, then split it deterministically."""
    import mlflow
    import pandas as pd

    log = stage_logger()
    with stage_run(ctx, "1-data"):
        state = Path(ctx.state_dir)
        try:
            summary = prepare(cfg, state, tokenizer=tokenizer, expect_kind=expect_kind, log=log)
        except DataGateError as exc:
            if exc.summary:
                _publish(exc.summary, ctx, log)
            raise
        _publish(summary, ctx, log)
        paths = summary["paths"]
        for name, context in (("train", "training"), ("test", "evaluation")):
            frame = pd.DataFrame([{"id": r["id"], "record": json.dumps({k: v for k, v in r.items() if k != "id"})}
                                  for r in read_jsonl(paths[name])])
            dataset = mlflow.data.from_pandas(frame, source=", ".join(s["path"] for s in summary["sources"].values()),
                                              name=f"{_dataset_name(summary)}-{name}",
                                              digest=f"{summary['digest']}-{name}"[:36])
            mlflow.log_input(dataset, context=context)
            _log_input_on_parent(ctx, dataset, context)
        mlflow.set_tag("tunewright.dataset_digest", summary["digest"])
        mlflow.set_tag("tunewright.dataset_format", summary["format"])
        mlflow.set_tag("tunewright.dataset_cached", str(summary["cached"]).lower())
        log.info("data gate passed: %d in, %d kept (train=%d val=%d test=%d), %d quarantined, %d duplicates, "
                 "%d near duplicates", summary["rows_in"], summary["rows_kept"], summary["splits"]["train"],
                 summary["splits"]["val"], summary["splits"]["test"], summary["rows_quarantined"],
                 summary["duplicates_removed"], summary["near_duplicates_removed"])
        return DataArtifact(
            train_path=paths["train"], val_path=paths["val"], test_path=paths["test"],
            quarantine_path=str(Path(ctx.work_dir, "data", "quarantine.jsonl")),
            report_path=str(Path(ctx.work_dir, "data", "data_gate.html")),
            n_train=summary["splits"]["train"], n_val=summary["splits"]["val"], n_test=summary["splits"]["test"],
            n_rejected=summary["rows_quarantined"], digest=summary["digest"], system_prompt=summary["system_prompt"],
            kind=summary["kind"], format=summary["format"], summary_path=paths["summary"],
            n_duplicates=summary["duplicates_removed"] + summary["near_duplicates_removed"], cached=summary["cached"],
        )


def _dataset_name(summary: dict) -> str:
    names = list(summary["sources"])
    return Path(names[0]).stem if len(names) == 1 else "mix"


def _log_input_on_parent(ctx: RunContext, dataset, context: str) -> None:
    """The parent run lists its datasets too, so the experiment table shows them."""
    from mlflow import MlflowClient
    from mlflow.entities import DatasetInput, InputTag

    tag = InputTag(key="mlflow.data.context", value=context)
    MlflowClient(ctx.tracking_uri).log_inputs(
        ctx.parent_run_id, datasets=[DatasetInput(dataset._to_mlflow_entity(), tags=[tag])]
    )
