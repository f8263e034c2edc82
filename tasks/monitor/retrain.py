"""The retrain trigger: the event a drifted window emits, the labelling job run before it, and the overrides a
retrain started by it trains with.

`tunewright.drift.detected` goes out at most once per window and not within `monitor.cooldown_minutes` of the last
for the same model; the `retrain-on-drift` deployment in prefect.yaml is triggered by it.
"""

from __future__ import annotations

import json
from pathlib import Path

from tunewright.recipe import MonitorConfig
from tunewright.registry.tracking import RunContext

DRIFT_EVENT = "tunewright.drift.detected"


def emit_drift_event(cfg: MonitorConfig, key: str, model: str, summary: dict, window_path: Path, versions: list[str],
                     recipe_path: str, overrides: list[str] | None, ctx: RunContext, client, log) -> None:
    """Label the window when the recipe has a labelling job, then emit DRIFT_EVENT for it with what a retrain needs;
    the event's id comes from the window's key, and the parent run is tagged as the one that emitted it."""
    import uuid

    import mlflow
    from prefect.events import emit_event

    labelled = label_window(cfg.label_command, window_path, log) if cfg.label_command else ""
    if labelled:
        mlflow.log_artifact(labelled, "monitor")

    emit_event(event=DRIFT_EVENT, id=uuid.uuid5(uuid.NAMESPACE_URL, f"tunewright:{key}"),
               resource={"prefect.resource.id": f"tunewright.model.{model}", "prefect.resource.name": model},
               payload={"window": key, "reasons": summary["reasons"], "versions": versions,
                        "service": summary["service"], "outputs": summary.get("outputs"),
                        "window_export": str(window_path), "labelled_export": labelled, "recipe_path": recipe_path,
                        "overrides": list(overrides or []), "mlflow_run_id": ctx.parent_run_id})
    client.set_tag(ctx.parent_run_id, "tunewright.emitted", "true")
    log.warning("window %s: %s; emitted %s", key, "; ".join(summary["reasons"]), DRIFT_EVENT)


def suppressed(client, ctx: RunContext, key: str, model: str, cooldown_minutes: int) -> str:
    """Why a triggering window must not emit: its event was sent already, or the model's last one is too recent."""
    import time

    same = client.search_runs([ctx.experiment_id], max_results=1, filter_string=(
        f"tags.`tunewright.window_key` = '{key}' and tags.`tunewright.emitted` = 'true'"))
    if same:
        return f"the event for window {key} was emitted already (MLflow run {same[0].info.run_id})"
    last = client.search_runs([ctx.experiment_id], max_results=1, order_by=["attributes.start_time DESC"],
                              filter_string=(f"tags.`tunewright.monitored_model` = '{model}' and "
                                             "tags.`tunewright.emitted` = 'true'"))
    if last and cooldown_minutes:
        age = time.time() - last[0].info.start_time / 1000
        if age < cooldown_minutes * 60:
            return (f"cooldown: the last event for {model} was {age / 60:.0f} min ago (monitor.cooldown_minutes "
                    f"{cooldown_minutes})")
    return ""


def label_window(command: str, window_path: Path, log) -> str:
    """Run the recipe's labelling job on an exported window; return the labelled file, or "" when it failed (the
    event still goes out: the retrain then waits for a person to write the file)."""
    import shlex
    import subprocess
    import sys

    labelled = labelled_path(str(window_path))
    args = [a.format(python=sys.executable, window=str(window_path), labelled=str(labelled))
            for a in shlex.split(command)]
    try:
        done = subprocess.run(args, capture_output=True, text=True, timeout=1800)
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.warning("monitor.label_command %r did not run: %s", command, exc)
        return ""
    if done.returncode != 0 or not labelled.is_file():
        log.warning("monitor.label_command exited with %d and %s: %s", done.returncode,
                    "wrote the labels" if labelled.is_file() else f"no {labelled}",
                    (done.stderr or done.stdout).strip()[-2000:])
        return ""
    log.info("monitor.label_command: %s", done.stdout.strip()[-500:] or f"wrote {labelled}")
    return str(labelled)


def labelled_path(window_export: str) -> Path:
    """Where the reviewed answers of an exported window go: `window.jsonl` -> `window.labelled.jsonl`."""
    path = Path(window_export)
    return path.with_name(path.stem + ".labelled.jsonl")


def with_labelled_window(recipe_path: str, overrides: list[str] | str | None, window: str | None,
                         window_export: str | None) -> list[str] | None:
    """The overrides a retrain runs with: as given for a scheduled run; for a drifted window, the recipe's sources
    plus the window's labelled export, or None (train nothing) while nobody has labelled it.

    Retraining on the window's own served answers would teach the model what it already says, and retraining on the
    recipe's data alone would find the same drift again, so a window counts only once a person (or a labelling job)
    has written `<window>.labelled.jsonl` in the training data's format beside the export.
    """
    import logging

    from tunewright.recipe import load_recipe

    if isinstance(overrides, str):  # the trigger renders the event's list as JSON
        overrides = json.loads(overrides) if overrides.strip() else []
    overrides = list(overrides or [])
    log = logging.getLogger("tunewright.retrain")
    try:
        from prefect.logging import get_run_logger

        log = get_run_logger()
    except Exception:  # noqa: BLE001  outside a flow run
        pass
    if not window_export:
        return overrides
    labelled = labelled_path(window_export)
    if not labelled.is_file():
        log.warning("window %s: no labelled export at %s yet; nothing is trained (label the exported requests in "
                    "%s and write them there, then start this deployment again)", window, labelled, window_export)
        return None
    recipe = load_recipe(recipe_path, overrides)
    sources = [s.model_dump(mode="json", exclude_defaults=True) for s in recipe.data.sources] or [
        {"path": recipe.data.path, "format": recipe.data.format}]
    sources.append({"path": str(labelled), "name": f"window {window}"})
    log.info("window %s: training on %s plus its %d labelled requests", window,
             ", ".join(str(s["path"]) for s in sources[:-1]),
             sum(1 for line in labelled.open(encoding="utf-8") if line.strip()))
    return overrides + ["data.path=null", f"data.sources={json.dumps(sources)}"]
