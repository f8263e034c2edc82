"""k-fold cross-validation of a recipe: stages 2-5 once per fold of stage 1's training split.

Run: tunewright crossvalidate recipes/demo.yaml --set data.balance.kfolds=5
Nothing is registered; the parent MLflow run holds each model's mean and spread per metric across folds.
"""

from __future__ import annotations

import tunewright  # noqa: F401  first: it switches library telemetry off before any library loads

from dataclasses import dataclass

from prefect import flow
from prefect.runtime import flow_run

from tasks.artifacts import EvalArtifact
from tasks.data import prepare_data
from tasks.data.folds import fold_splits
from tasks.environment import setup_environment
from tasks.evaluate import evaluate, summarise_folds
from tasks.finetune import fine_tune
from tasks.model import initialise_model
from tunewright.recipe import Recipe
from tunewright.registry.tracking import RunContext, pipeline_run


@dataclass(frozen=True)
class CrossValidation:
    context: RunContext
    folds: list[EvalArtifact]
    summary: dict          # model -> metric -> {mean, std, min, max}


@flow(name="tunewright-crossvalidate", log_prints=True)
def crossvalidate(recipe: Recipe) -> CrossValidation:
    """Data once -> per fold: model -> environment -> fine-tune -> evaluate on the held-out fold -> summary."""
    with pipeline_run(recipe, flow_run_id=flow_run.id, run_name=f"{recipe.name} ({recipe.data.balance.kfolds}-fold)",
                      tags={"tunewright.kind": "crossvalidation"}) as ctx:
        data = prepare_data(recipe.data, ctx, tokenizer=recipe.model.base, expect_kind=recipe.train.data_kinds())
        scores = []
        for i, fold in enumerate(fold_splits(data, recipe.data.balance.kfolds, ctx)):
            with pipeline_run(recipe, parent_run_id=ctx.parent_run_id, run_name=f"fold-{i}",
                              tags={"tunewright.fold": str(i)}) as fold_ctx:
                model = initialise_model(recipe.model, recipe.environment.seed, fold_ctx)
                env = setup_environment(recipe.environment, recipe.train, recipe.model, model, fold_ctx)
                trained = fine_tune(recipe.train, recipe.model, fold, model, env, fold_ctx)
                scores.append(evaluate(recipe.evaluate, recipe.model, fold, model, trained, env, fold_ctx))
        summary = summarise_folds(scores, ctx)
        return CrossValidation(ctx, scores, summary)
