"""MLflow bookkeeping: one parent run per pipeline run, one nested run per stage."""

from __future__ import annotations

import json
import subprocess
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Protocol

from tunewright.platform import settings


class TrackedRecipe(Protocol):
    """What a pipeline run reads of its recipe (a `tunewright.recipe.Recipe`): tracking needs no more of the schema."""

    @property
    def name(self) -> str: ...
    @property
    def description(self) -> str: ...
    @property
    def tracking(self) -> Any: ...  # the recipe's tracking section: experiment, tracking_uri, state_dir
    def digest(self) -> str: ...
    def flat(self) -> dict[str, str]: ...
    def model_dump(self, *, mode: str) -> dict[str, Any]: ...


@dataclass(frozen=True)
class RunContext:
    """What every stage needs to find its parent MLflow run and its working folder."""

    parent_run_id: str
    experiment_id: str
    tracking_uri: str
    state_dir: str
    work_dir: str
    recipe_name: str
    recipe_digest: str = ""
    git_commit: str | None = None
    resumed: bool = False

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


def store_client(tracking_uri: str):
    """An MLflow client on `tracking_uri`. A SQLite store that does not exist yet starts as a copy of an empty one
    MLflow has already migrated (`tunewright.platform.db_templates`), before the client's first look creates it."""
    from mlflow import MlflowClient

    from tunewright.platform import db_templates

    db_templates.seed_mlflow(tracking_uri)
    return MlflowClient(tracking_uri)


def experiment_id(client, name: str, state: Path, tracking_uri: str) -> str:
    """The MLflow experiment `name`, created (with its artifacts in the state folder on SQLite) if missing."""
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if EXPERIMENT_KIND not in (exp.tags or {}):  # made before the kind was set: MLflow would guess GenAI
            client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND, MODEL_DEVELOPMENT)
        return exp.experiment_id
    location = settings.mlflow_artifact_root(state) + f"/{name}" if tracking_uri.startswith("sqlite:") else None
    return client.create_experiment(name, artifact_location=location, tags={EXPERIMENT_KIND: MODEL_DEVELOPMENT})


# MLflow 3 opens an experiment in its GenAI view (traces) unless the experiment says it holds model training runs
EXPERIMENT_KIND, MODEL_DEVELOPMENT = "mlflow.experimentKind", "custom_model_development"


def run_link(tracking_uri: str, experiment_id: str, run_id: str) -> str:
    """A markdown link to a run in the MLflow UI when the store is a server, else the run id and how to look."""
    if tracking_uri.startswith(("http://", "https://")):
        return f"[MLflow run {run_id}]({tracking_uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id})"
    return f"MLflow run `{run_id}` (experiment {experiment_id}; open it with `mlflow ui` on {tracking_uri})"


@contextmanager
def pipeline_run(recipe: TrackedRecipe, flow_run_id: str | None = None, resume: bool = False, parent_run_id: str | None = None,
                 run_name: str | None = None, tags: dict[str, str] | None = None) -> Iterator[RunContext]:
    """Open the parent MLflow run for a pipeline run; mark it FAILED if the block raises.

    With `resume`, reopen the newest unfinished run of the same recipe (same digest) instead,
    so its stages continue in their own MLflow runs and working folder. With `parent_run_id`, the
    run is nested under that one (a search's trial), named `run_name` and carrying `tags` besides.
    """
    import mlflow

    state = settings.state_dir(recipe.tracking.state_dir)
    uri = settings.mlflow_tracking_uri(state, recipe.tracking.tracking_uri)
    client = store_client(uri)
    mlflow.set_tracking_uri(uri)
    exp_id = experiment_id(client, recipe.tracking.experiment, state, uri)
    tags = {
        **(tags or {}),
        "tunewright.recipe_digest": recipe.digest(),
        "tunewright.recipe_name": recipe.name,
        "mlflow.note.content": recipe.description or f"tunewright recipe {recipe.name}",
    }
    commit = git_commit()
    if commit:
        tags["mlflow.source.git.commit"] = commit
    tags.setdefault("mlflow.source.name", "flows/finetune.py")
    tags.setdefault("mlflow.source.type", "JOB")
    if flow_run_id:
        tags["prefect.flow_run_id"] = flow_run_id
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    if resume:
        run_id = _unfinished_run(client, exp_id, recipe)
        client.update_run(run_id, status="RUNNING")
        for key, value in tags.items():
            client.set_tag(run_id, key, value)
    else:
        run_id = client.create_run(exp_id, run_name=run_name or recipe.name, tags=tags).info.run_id
    work = state / "runs" / run_id
    work.mkdir(parents=True, exist_ok=True)
    from mlflow.entities import Param

    params = [Param(k, v[:6000]) for k, v in recipe.flat().items()]
    for i in range(0, len(params), 100):
        client.log_batch(run_id, params=params[i : i + 100])
    client.log_text(run_id, json.dumps(recipe.model_dump(mode="json"), indent=2), "recipe.json")
    ctx = RunContext(
        parent_run_id=run_id, experiment_id=exp_id, tracking_uri=uri, state_dir=str(state),
        work_dir=str(work), recipe_name=recipe.name, recipe_digest=recipe.digest(), git_commit=commit, resumed=resume,
    )
    if flow_run_id:
        _name_flow_run(flow_run_id, f"{run_name or recipe.name}-{run_id[:8]}")
    with ending(client, run_id):
        yield ctx


def _name_flow_run(flow_run_id: str, name: str) -> None:
    """Name the Prefect flow run after the recipe and its MLflow run, so the two UIs point at each other."""
    try:
        from prefect.client.orchestration import get_client

        with get_client(sync_client=True) as client:
            client.update_flow_run(flow_run_id, name=name)
            parent = client.read_flow_run(flow_run_id).parent_task_run_id
            if parent is not None:  # started by `retrain` (run-recipe, schedules, the drift trigger): name that run too
                outer = client.read_flow_run(client.read_task_run(parent).flow_run_id)
                if client.read_flow(outer.flow_id).name == "tunewright-retrain":
                    client.update_flow_run(outer.id, name=name)
    except Exception:  # noqa: BLE001  a name is a convenience: never fail a run over it
        pass


@contextmanager
def ending(client, run_id: str) -> Iterator[None]:
    """End an MLflow run FINISHED when the block completes, FAILED when anything (Ctrl-C included) escapes it."""
    try:
        yield
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    client.set_terminated(run_id, "FINISHED")


class NothingToResume(RuntimeError):
    """`--resume` found no unfinished run of this recipe."""


def _unfinished_run(client, exp_id: str, recipe: TrackedRecipe) -> str:
    runs = client.search_runs(
        [exp_id], order_by=["attributes.start_time DESC"], max_results=20,
        filter_string=f"tags.`tunewright.recipe_digest` = '{recipe.digest()}' and attributes.status != 'FINISHED'",
    )
    runs = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    if not runs:
        raise NothingToResume(
            f"--resume: no unfinished run of recipe '{recipe.name}' (digest {recipe.digest()}) in experiment "
            f"'{recipe.tracking.experiment}'; resuming needs the same recipe and overrides as the interrupted run")
    return runs[0].info.run_id


@contextmanager
def stage_run(ctx: RunContext, name: str, log_system_metrics: bool = False):
    """A nested MLflow run for one stage under the pipeline's parent run (reopened on resume)."""
    import mlflow
    from mlflow import MlflowClient

    mlflow.set_tracking_uri(ctx.tracking_uri)
    existing = None
    if ctx.resumed:
        found = MlflowClient(ctx.tracking_uri).search_runs(
            [ctx.experiment_id], max_results=1,
            filter_string=f"tags.mlflow.parentRunId = '{ctx.parent_run_id}' and tags.`tunewright.stage` = '{name}'")
        existing = found[0].info.run_id if found else None
    tags = {"tunewright.stage": name, "tunewright.recipe_digest": ctx.recipe_digest}
    if ctx.git_commit:
        tags["mlflow.source.git.commit"] = ctx.git_commit
    if existing:
        cm = mlflow.start_run(run_id=existing, log_system_metrics=log_system_metrics or None)
    else:
        cm = mlflow.start_run(run_name=name, experiment_id=ctx.experiment_id, parent_run_id=ctx.parent_run_id,
                              tags=tags, log_system_metrics=log_system_metrics or None)
    with cm as run:
        yield run
    _link_stage(ctx, name, run.info.run_id)


def _link_stage(ctx: RunContext, name: str, run_id: str) -> None:
    """After a stage: its MLflow run named on the parent run (a tag, and a line of the parent's note), and a Prefect
    markdown artifact on the task run that links to it."""
    from mlflow import MlflowClient

    client = MlflowClient(ctx.tracking_uri)
    try:
        client.set_tag(ctx.parent_run_id, f"tunewright.stage_run.{name}", run_id)
        note = client.get_run(ctx.parent_run_id).data.tags.get("mlflow.note.content", "")
        line = f"- {name}: [run {run_id[:8]}](#/experiments/{ctx.experiment_id}/runs/{run_id})"
        if line not in note:
            client.set_tag(ctx.parent_run_id, "mlflow.note.content",
                           (note + ("\n\nStages:\n" if "Stages:" not in note else "\n") + line)[:4900])
    except Exception:  # noqa: BLE001  the stage's work is done; a missing link must not fail it
        pass
    try:
        from prefect.artifacts import create_markdown_artifact
        from prefect.context import TaskRunContext

        if TaskRunContext.get() is not None:
            create_markdown_artifact(key=f"mlflow-{name.lower()}", description=f"{name} in MLflow",
                                     markdown=f"**{name}**: {run_link(ctx.tracking_uri, ctx.experiment_id, run_id)}")
    except Exception:  # noqa: BLE001  outside a Prefect run there is nowhere to put it
        pass


def log_to_parent(ctx: RunContext, metrics: dict[str, float] | None = None, tags: dict[str, str] | None = None) -> None:
    """Put headline numbers on the parent run, where the experiment table shows them."""
    from mlflow import MlflowClient

    client = MlflowClient(ctx.tracking_uri)
    for key, value in (metrics or {}).items():
        client.log_metric(ctx.parent_run_id, key, float(value))
    for key, value in (tags or {}).items():
        client.set_tag(ctx.parent_run_id, key, value)
