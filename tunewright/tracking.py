"""MLflow bookkeeping: one parent run per pipeline run, one nested run per stage."""

from __future__ import annotations

import json
import subprocess
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from tunewright import settings
from tunewright.recipe import Recipe


@dataclass(frozen=True)
class RunContext:
    """What every stage needs to find its parent MLflow run and its working folder."""

    parent_run_id: str
    experiment_id: str
    tracking_uri: str
    state_dir: str
    work_dir: str
    recipe_name: str

    def path(self, *parts: str) -> Path:
        p = Path(self.work_dir, *parts)
        p.parent.mkdir(parents=True, exist_ok=True)
        return p


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
            cwd=Path(__file__).resolve().parent,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def _experiment_id(client, name: str, state: Path, tracking_uri: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = settings.mlflow_artifact_root(state) + f"/{name}" if tracking_uri.startswith("sqlite:") else None
    return client.create_experiment(name, artifact_location=location)


@contextmanager
def pipeline_run(recipe: Recipe, flow_run_id: str | None = None) -> Iterator[RunContext]:
    """Open the parent MLflow run for a pipeline run; mark it FAILED if the block raises."""
    import mlflow
    from mlflow import MlflowClient

    state = settings.state_dir(recipe.tracking.state_dir)
    uri = settings.mlflow_tracking_uri(state, recipe.tracking.tracking_uri)
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(uri)
    exp_id = _experiment_id(client, recipe.tracking.experiment, state, uri)
    tags = {
        "tunewright.recipe_digest": recipe.digest(),
        "tunewright.recipe_name": recipe.name,
        "mlflow.note.content": recipe.description or f"tunewright recipe {recipe.name}",
    }
    if commit := git_commit():
        tags["mlflow.source.git.commit"] = commit
    if flow_run_id:
        tags["prefect.flow_run_id"] = flow_run_id
    run = client.create_run(exp_id, run_name=recipe.name, tags=tags)
    run_id = run.info.run_id
    work = state / "runs" / run_id
    work.mkdir(parents=True, exist_ok=True)
    from mlflow.entities import Param

    params = [Param(k, v[:6000]) for k, v in recipe.flat().items()]
    for i in range(0, len(params), 100):
        client.log_batch(run_id, params=params[i : i + 100])
    client.log_text(run_id, json.dumps(recipe.model_dump(mode="json"), indent=2), "recipe.json")
    ctx = RunContext(
        parent_run_id=run_id, experiment_id=exp_id, tracking_uri=uri, state_dir=str(state),
        work_dir=str(work), recipe_name=recipe.name,
    )
    try:
        yield ctx
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    client.set_terminated(run_id, "FINISHED")


@contextmanager
def stage_run(ctx: RunContext, name: str):
    """A nested MLflow run for one stage under the pipeline's parent run."""
    import mlflow

    mlflow.set_tracking_uri(ctx.tracking_uri)
    with mlflow.start_run(
        run_name=name, experiment_id=ctx.experiment_id, parent_run_id=ctx.parent_run_id,
        tags={"tunewright.stage": name},
    ) as run:
        yield run


def log_to_parent(ctx: RunContext, metrics: dict[str, float] | None = None, tags: dict[str, str] | None = None) -> None:
    """Put headline numbers on the parent run, where the experiment table shows them."""
    from mlflow import MlflowClient

    client = MlflowClient(ctx.tracking_uri)
    for key, value in (metrics or {}).items():
        client.log_metric(ctx.parent_run_id, key, float(value))
    for key, value in (tags or {}).items():
        client.set_tag(ctx.parent_run_id, key, value)
