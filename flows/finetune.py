"""The seven-stage fine-tuning flow.

Run: tunewright run recipes/demo.yaml   (or deploy it with prefect.yaml and trigger it from the UI)
"""

from __future__ import annotations

import tunewright  # noqa: F401  first: it switches library telemetry off before any library loads

from dataclasses import dataclass

from prefect import flow
from prefect.runtime import flow_run

from tasks.artifacts import DataArtifact, DeployArtifact, EvalArtifact, MonitorArtifact, TrainArtifact
from tasks.data import prepare_data
from tasks.deploy import await_approval, deploy, undo_registration
from tasks.environment import setup_environment
from tasks.evaluate import evaluate
from tasks.finetune import fine_tune
from tasks.model import initialise_model
from tasks.monitor import monitor_drift, with_labelled_window
from tunewright.recipe import Recipe, load_recipe
from tunewright.registry.tracking import RunContext, pipeline_run


@dataclass(frozen=True)
class PipelineResult:
    context: RunContext
    data: DataArtifact
    trained: TrainArtifact
    scores: EvalArtifact
    deployed: DeployArtifact
    drift: MonitorArtifact


@flow(name="tunewright-finetune", log_prints=True)
def finetune(recipe: Recipe, resume: bool = False) -> PipelineResult:
    """Data -> model -> environment -> fine-tune -> evaluate -> deploy -> monitor, one MLflow parent run.

    `resume` continues the newest unfinished run of the same recipe from its last checkpoint. A recipe that trains on
    a Ray cluster finds it reachable and large enough first, before any data or model is touched.
    """
    if recipe.environment.cluster is not None:
        from tasks.finetune.ray_cluster import check_cluster
        from tunewright.logs import stage_logger

        check_cluster(recipe.environment.cluster, stage_logger())
    with pipeline_run(recipe, flow_run_id=flow_run.id, resume=resume) as ctx:
        data = prepare_data(recipe.data, ctx, tokenizer=recipe.model.base, expect_kind=recipe.train.data_kinds())
        model = initialise_model(recipe.model, recipe.environment.seed, ctx)
        env = setup_environment(recipe.environment, recipe.train, recipe.model, model, ctx)
        trained = fine_tune.with_options(retries=recipe.train.retries)(recipe.train, recipe.model, data, model, env, ctx)
        scores = evaluate(recipe.evaluate, recipe.model, data, model, trained, env, ctx,
                          champion=f"models:/{recipe.deploy.registered_model}@{recipe.deploy.alias}")
        deployed = deploy(recipe.deploy, recipe.evaluate, recipe.model, scores, trained, model, data, env, ctx)
        try:
            deployed = await_approval(recipe.deploy, deployed, ctx)
            drift = monitor_drift(recipe.monitor, data, ctx)
        except BaseException as exc:  # a failed run leaves the registry as it found it
            undo_registration(deployed, ctx, exc)
            raise
        return PipelineResult(ctx, data, trained, scores, deployed, drift)


@flow(name="tunewright-retrain", log_prints=True)
def retrain(recipe_path: str = "recipes/demo.yaml", overrides: list[str] | str | None = None,
            window: str | None = None, window_export: str | None = None) -> PipelineResult | None:
    """Re-run a recipe file (what schedules start), or, started by the drift trigger for a window of served traffic,
    train on the recipe's data plus that window once it is labelled; an unlabelled window trains nothing."""
    recipe_path = recipe_path or "recipes/demo.yaml"
    overrides = with_labelled_window(recipe_path, overrides, window, window_export)
    if overrides is None:
        return None
    return finetune(load_recipe(recipe_path, overrides))
