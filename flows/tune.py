"""Hyperparameter search: an Optuna study whose trials are subflows running stages 1-4 (5) of a recipe.

Run: tunewright tune recipes/demo.yaml --space recipes/search/demo-space.yaml --set train.eval_every=10
(or start the `tune` deployment of prefect.yaml on several workers: they join the same study)
"""

from __future__ import annotations

import tunewright  # noqa: F401  first: it switches library telemetry off before any library loads

from dataclasses import dataclass

from prefect import flow
from prefect.runtime import flow_run

from flows.finetune import PipelineResult, finetune
from tasks.artifacts import DataArtifact, EvalArtifact, TrainArtifact
from tasks.data import prepare_data
from tasks.environment import PreflightError, setup_environment
from tasks.evaluate import evaluate
from tasks.finetune import fine_tune
from tasks.model import initialise_model
from tunewright import pruning, search
from tunewright.recipe import Recipe, load_recipe
from tunewright.registry.tracking import RunContext


@dataclass(frozen=True)
class TrialOutcome:
    context: RunContext
    data: DataArtifact
    trained: TrainArtifact
    scores: EvalArtifact | None


@dataclass(frozen=True)
class SearchResult:
    report: search.SearchReport
    full: PipelineResult | None
    notes: tuple[str, ...] = ()


@flow(name="tunewright-trial", log_prints=True)
def trial(recipe: Recipe, ctx: RunContext, run_evaluation: bool = False) -> TrialOutcome:
    """One trial: data -> model -> environment -> fine-tune (-> evaluate); nothing is registered or deployed.

    Stage 5 runs when the search is judged by it, and not when the pruner stopped stage 4.
    """
    data = prepare_data(recipe.data, ctx, tokenizer=recipe.model.base, expect_kind=recipe.train.data_kinds())
    model = initialise_model(recipe.model, recipe.environment.seed, ctx)
    env = setup_environment(recipe.environment, recipe.train, recipe.model, model, ctx)
    trained = fine_tune.with_options(retries=recipe.train.retries)(recipe.train, recipe.model, data, model, env, ctx)
    if not run_evaluation or pruning.pruned(ctx.parent_run_id):
        return TrialOutcome(ctx, data, trained, None)
    scores = evaluate(recipe.evaluate, recipe.model, data, model, trained, env, ctx)
    return TrialOutcome(ctx, data, trained, scores)


def _run_trial(recipe: Recipe, ctx: RunContext, run_evaluation: bool, number: int) -> TrialOutcome:
    return trial.with_options(flow_run_name=f"trial-{number}")(recipe=recipe, ctx=ctx, run_evaluation=run_evaluation)


@flow(name="tunewright-tune", log_prints=True)
def tune(recipe_path: str, overrides: list[str] | None = None, space_path: str | None = None,
         trials: int | None = None, sampler: str | None = None, study: str | None = None,
         train_best: bool = False) -> SearchResult:
    """Search a recipe's hyperparameters: trials until the study holds `trials`, then the best recipe is
    written (and, with `train_best`, run through all seven stages). The study's database comes from
    TUNEWRIGHT_STUDY_STORAGE or the space's `storage` (default: SQLite in the state folder).
    """
    setup = search.prepare(recipe_path, overrides, space_path, trials=trials, sampler=sampler, study=study)
    with search.search_run(setup, flow_run_id=flow_run.id) as ctx:
        studied = search.optimize(setup, ctx, _run_trial, trial_errors=(PreflightError,))
        report = search.report(setup, ctx, studied)
    full = finetune(recipe=load_recipe(report.best_recipe)) if train_best and report.best_recipe else None
    if full is not None:
        search.link_full_run(report, ctx.tracking_uri, full.context.parent_run_id)
    return SearchResult(report, full, setup.notes)
