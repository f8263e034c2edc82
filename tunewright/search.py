"""Hyperparameter search: an Optuna study whose trials run a recipe's stages with sampled values.

Run: tunewright tune recipes/demo.yaml --space recipes/search/demo-space.yaml

Every trial sets its values as `--set path=value` overrides of the recipe file, so a value the
schema refuses fails as a bad recipe does. A trial is a Prefect subflow (flows/tune.py) and an
MLflow run nested under the search's run; stage 4 reports its validation loss every
`train.eval_every` steps and the pruner may stop it there (`tunewright.pruning`). The study lives
in an SQLAlchemy database (SQLite in the state folder unless configured), so workers that run the
same search join the same study. When it ends, the search logs the optimisation history, the
parallel coordinates and the validation curves, prints the trials, and writes the best trial's
recipe as YAML.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import random
import re
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
import yaml
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState
from pydantic import ValidationError

from tunewright import pruning
from tunewright.files import write_atomic
from tunewright.logs import stage_logger
from tunewright.platform import settings
from tunewright.registry import tracking
from tunewright.recipe import (
    ParamSpace,
    Recipe,
    RecipeError,
    SearchConfig,
    load_recipe,
    load_space,
)
from tunewright.registry.tracking import RunContext


class SearchError(RuntimeError):
    """A search that cannot go on (every trial would meet the same problem)."""


@dataclass(frozen=True)
class SearchSetup:
    """A validated search: the recipe it starts from, the space, and where its study lives."""

    recipe_path: str
    overrides: tuple[str, ...]
    recipe: Recipe
    space: SearchConfig
    space_source: str
    study_name: str
    storage: str
    state_dir: str
    seed: int
    notes: tuple[str, ...] = ()

    @property
    def direction(self) -> str:
        return self.space.goal()

    @property
    def n_trials(self) -> int:
        return self.space.trials()

    def folder(self) -> Path:
        path = Path(self.state_dir, "search", re.sub(r"[^A-Za-z0-9._-]+", "-", self.study_name))
        path.mkdir(parents=True, exist_ok=True)
        return path


@dataclass(frozen=True)
class SearchReport:
    """What a search left behind: the trials, the best recipe, the plots, the MLflow run."""

    study_name: str
    storage: str                      # password hidden
    metric: str
    direction: str
    search_run_id: str
    experiment_id: str
    counts: dict[str, int]
    table: str
    best_trial: int | None = None
    best_value: float | None = None
    best_params: dict[str, Any] = field(default_factory=dict)
    best_run_id: str | None = None
    best_recipe: str | None = None
    plots: dict[str, str] = field(default_factory=dict)


# --- setup ---------------------------------------------------------------------------------------

def prepare(recipe_path: str | Path, overrides: list[str] | tuple[str, ...] | None = None,
            space_path: str | Path | None = None, *, trials: int | None = None, sampler: str | None = None,
            storage: str | None = None, study: str | None = None) -> SearchSetup:
    """Load the recipe and the space, apply the command line's choices, and check every value the
    space can take against the recipe schema; raise RecipeError naming the problem before any work."""
    overrides = tuple(overrides or ())
    recipe = load_recipe(recipe_path, list(overrides))
    if space_path is not None:
        space, source = load_space(space_path), str(space_path)
    elif recipe.search is not None:
        space, source = recipe.search, f"{recipe_path} (search section)"
    else:
        raise RecipeError(f"{recipe_path}: no search space: give --space FILE or a `search` section in the recipe")
    given = {k: v for k, v in {"n_trials": trials, "sampler": sampler, "study": study}.items() if v is not None}
    if given:
        try:
            space = SearchConfig.model_validate({**space.model_dump(exclude_unset=True), **given})
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg'].removeprefix('Value error, ')}"
                                 for e in exc.errors())
            raise RecipeError(f"{source} with --{'/--'.join(k.replace('n_trials', 'trials') for k in given)}: "
                              f"{problems}") from None
    for path, param in space.params.items():
        for value in _bounds(param):
            try:
                load_recipe(recipe_path, [*overrides, override(path, value)])
            except RecipeError as exc:
                reason = exc.args[0].splitlines()[-1].split(": ", 2)[-1]
                raise RecipeError(f"{source}: params.{path}: the recipe refuses {value!r}: {reason}") from None
    notes = _check_fit(recipe, space, source)
    state = settings.state_dir(recipe.tracking.state_dir)
    return SearchSetup(
        recipe_path=str(recipe_path), overrides=overrides, recipe=recipe, space=space, space_source=source,
        study_name=space.study or default_study_name(recipe, space),
        storage=storage or settings.study_storage(state, space.storage), state_dir=str(state),
        seed=space.seed if space.seed is not None else recipe.environment.seed, notes=tuple(notes))


def _bounds(param: ParamSpace) -> list:
    """The values of a parameter worth checking against the schema: every choice, or both ends."""
    if param.choices is not None:
        return list(param.choices)
    if param.type == "int":
        return [int(param.low), int(param.high)]
    return [param.low, param.high]


def _check_fit(recipe: Recipe, space: SearchConfig, source: str) -> list[str]:
    """Refuse a space the recipe cannot serve; return notes worth printing."""
    searched = set(space.params)
    needs_val = space.metric == "val_loss" or space.pruner.type != "none"
    if needs_val and recipe.data.split.val_fraction == 0 and "data.split.val_fraction" not in searched:
        raise RecipeError(f"{source}: metric {space.metric} with pruner {space.pruner.type} needs a validation "
                          "split: set data.split.val_fraction above 0")
    if space.pruner.type != "none" and not recipe.train.eval_every and "train.eval_every" not in searched:
        raise RecipeError(f"{source}: pruner '{space.pruner.type}' judges the validation loss stage 4 reports every "
                          "train.eval_every steps, and the recipe has none: add --set train.eval_every=N, or "
                          "`pruner: {type: none}`")
    notes = []
    if space.pruner.type != "none" and recipe.environment.processes > 1:
        notes.append("pruning applies to one-process training: trials with environment.num_processes > 1 run to "
                     "their last step")
    return notes


def default_study_name(recipe: Recipe, space: SearchConfig) -> str:
    """The recipe's name and a digest of what the trials depend on, so the same search is the same study."""
    what = space.model_dump(mode="json", exclude={"n_trials", "study", "storage", "seed"})
    blob = json.dumps({"recipe": recipe.digest(), "space": what}, sort_keys=True).encode()
    return f"{recipe.name}-{hashlib.sha256(blob).hexdigest()[:8]}"


def display_url(url: str) -> str:
    """A database URL fit for logs and MLflow: the password hidden."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return re.sub(r"://([^/@:]*):[^/@]*@", r"://\1:***@", url)


# --- values -> recipes ---------------------------------------------------------------------------

def override(path: str, value: Any) -> str:
    """`path=value` in the --set syntax (the value as YAML, so `yes` stays a string and 1e-05 a number)."""
    text = yaml.safe_dump(value, default_flow_style=True, width=10**9).strip()
    return f"{path}={text.removesuffix('...').strip()}"


def _encoded(choice: Any) -> Any:
    """A choice as Optuna stores it: plain values as they are, lists and mappings as their YAML text."""
    if choice is None or isinstance(choice, (bool, int, float, str)):
        return choice
    return yaml.safe_dump(choice, default_flow_style=True, width=10**9).strip()


def decode(space: SearchConfig, params: dict[str, Any]) -> dict[str, Any]:
    """A trial's stored parameters as recipe values."""
    out = {}
    for path, value in params.items():
        choices = (space.params[path].choices or []) if path in space.params else []
        out[path] = next((c for c in choices if _encoded(c) == value and not isinstance(c, (bool, int, float, str))),
                         value)
    return out


def sample(trial: optuna.Trial, space: SearchConfig) -> dict[str, Any]:
    """Draw this trial's values (recipe path -> value)."""
    values = {}
    for path, p in space.params.items():
        if p.choices is not None:
            values[path] = trial.suggest_categorical(path, [_encoded(c) for c in p.choices])
        elif p.type == "int":
            values[path] = trial.suggest_int(path, int(p.low), int(p.high), step=int(p.step or 1), log=p.log)
        else:
            values[path] = trial.suggest_float(path, p.low, p.high, step=p.step, log=p.log)
    return decode(space, values)


def trial_recipe(setup: SearchSetup, values: dict[str, Any]) -> Recipe:
    """The recipe with a trial's values, loaded as `--set` would load it."""
    return load_recipe(setup.recipe_path, [*setup.overrides, *(override(p, v) for p, v in values.items())])


def metric_value(metric: str, outcome: Any) -> float:
    """The number a trial is judged by, from its stage 4 and stage 5 artifacts (`outcome.trained`, `.scores`)."""
    trained, scores = outcome.trained, outcome.scores
    if metric == "val_loss":
        value = trained.val_loss
    elif scores is None:
        raise SearchError(f"metric {metric} comes from stage 5, which this trial did not run")
    else:
        value = {"answer_loss": lambda: scores.tuned_loss, "score": lambda: scores.tuned_score,
                 "improvement": lambda: scores.tuned_score - scores.base_score,
                 "preference_accuracy": lambda: scores.preference_accuracy.get("tuned"),
                 "mean_reward": lambda: scores.mean_reward.get("tuned")}[metric]()
    if value is None:
        raise SearchError(f"metric {metric}: the trial's stages reported none for this recipe"
                          + (" (is there a validation split?)" if metric == "val_loss" else
                             " (preference_accuracy needs preference pairs, mean_reward a grpo or ppo objective)"))
    if not math.isfinite(value):
        raise FloatingPointError(f"metric {metric} is {value}")  # fails this trial alone
    return float(value)


# --- the study -----------------------------------------------------------------------------------

class _LowerLossIsBetter(optuna.pruners.BasePruner):
    """Judge the reported validation losses as losses even when the study maximises a score."""

    def __init__(self, inner: optuna.pruners.BasePruner):
        self._inner = inner

    def prune(self, study: optuna.Study, trial: FrozenTrial) -> bool:
        return self._inner.prune(study if study.direction == StudyDirection.MINIMIZE else _Minimising(study), trial)


class _Minimising:
    """A study seen as minimising (what percentile pruners read of it)."""

    direction = StudyDirection.MINIMIZE

    def __init__(self, study: optuna.Study):
        self._study = study

    def __getattr__(self, name: str) -> Any:
        return getattr(self._study, name)


def _pruner(setup: SearchSetup) -> optuna.pruners.BasePruner:
    p = setup.space.pruner
    if p.type == "none":
        return optuna.pruners.NopPruner()
    if p.type == "threshold":
        inner = optuna.pruners.ThresholdPruner(upper=p.upper, n_warmup_steps=p.n_warmup_steps,
                                               interval_steps=p.interval_steps)
    else:
        inner = optuna.pruners.PercentilePruner(50.0 if p.type == "median" else p.percentile,
                                                n_startup_trials=p.n_startup_trials, n_warmup_steps=p.n_warmup_steps,
                                                interval_steps=p.interval_steps)
    return _LowerLossIsBetter(inner)


def _sampler(setup: SearchSetup, seed: int) -> optuna.samplers.BaseSampler:
    space = setup.space
    if space.sampler == "grid":
        grid = {path: [_encoded(v) for v in p.grid()] for path, p in space.params.items()}
        return optuna.samplers.GridSampler(grid, seed=seed)
    if space.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        # constant_liar: a running trial counts as a poor one, so parallel workers spread out
        return optuna.samplers.TPESampler(seed=seed, constant_liar=True,
                                          n_startup_trials=min(10, max(2, setup.n_trials // 4)))


def storage(url: str) -> optuna.storages.RDBStorage:
    """Optuna's RDB storage on `url` (tables created on first use)."""
    kwargs: dict[str, Any] = {"pool_pre_ping": True}
    if url.startswith("sqlite"):
        kwargs = {"connect_args": {"timeout": 60}}  # workers on one machine wait for each other's writes
    # SQLAlchemy 2.1 reads a bare postgresql:// as psycopg 3; the installed driver is psycopg2
    url = re.sub(r"^postgres(ql)?://", "postgresql+psycopg2://", url)
    from sqlalchemy import exc

    for attempt in range(6):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                # heartbeats: a trial whose worker died without a word (killed, lost) is failed by the next
                # worker to start one, and no longer counts towards n_trials
                return optuna.storages.RDBStorage(url, engine_kwargs=kwargs, heartbeat_interval=60,
                                                  grace_period=300)
        except (exc.IntegrityError, exc.ProgrammingError, exc.OperationalError):
            # workers starting together on a fresh database race to create the tables: the losers try again
            if attempt == 5:
                raise
            time.sleep(0.5 + random.random())
    raise AssertionError("unreachable")


def open_study(setup: SearchSetup) -> optuna.Study:
    """Create the study, or join it when another worker (or an earlier run) made it."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name=setup.study_name, storage=storage(setup.storage),
                                direction=setup.direction, pruner=_pruner(setup), load_if_exists=True)
    if study.direction.name.lower() != setup.direction:
        raise SearchError(f"study '{setup.study_name}' in {display_url(setup.storage)} was created to "
                          f"{study.direction.name.lower()}, not {setup.direction}; name another with --study")
    # a worker joining a study with trials draws from another point of the seed's sequence
    study.sampler = _sampler(setup, setup.seed + len(study.trials))
    attrs = study.user_attrs
    for key, value in {"recipe_name": setup.recipe.name, "metric": setup.space.metric,
                       "space": setup.space.model_dump(mode="json", exclude={"storage"})}.items():
        if key not in attrs:
            study.set_user_attr(key, value)
    return study


@contextmanager
def search_run(setup: SearchSetup, flow_run_id: str | None = None) -> Iterator[RunContext]:
    """The search's parent MLflow run; the trials' runs nest under it. FAILED if the block raises."""
    from mlflow.entities import Param

    state = Path(setup.state_dir)
    uri = settings.mlflow_tracking_uri(state, setup.recipe.tracking.tracking_uri)
    client = tracking.store_client(uri)
    exp_id = tracking.experiment_id(client, setup.recipe.tracking.experiment, state, uri)
    tags = {"tunewright.search": setup.study_name, "tunewright.recipe_name": setup.recipe.name,
            "optuna.storage": display_url(setup.storage),
            "mlflow.note.content": f"Hyperparameter search over recipe '{setup.recipe.name}' ({setup.space_source})"}
    commit = tracking.git_commit()
    if commit:
        tags["mlflow.source.git.commit"] = commit
    if flow_run_id:
        tags["prefect.flow_run_id"] = flow_run_id
    run_id = client.create_run(exp_id, run_name=f"search-{setup.study_name}", tags=tags).info.run_id
    s = setup.space
    params = {"study": setup.study_name, "sampler": s.sampler, "n_trials": setup.n_trials, "metric": s.metric,
              "direction": setup.direction, "seed": setup.seed, "evaluate": s.runs_evaluation(),
              "pruner": json.dumps(s.pruner.model_dump(exclude_unset=True) | {"type": s.pruner.type}),
              "recipe": setup.recipe_path, "recipe_digest": setup.recipe.digest(),
              **{f"space.{path}": json.dumps(p.model_dump(exclude_defaults=True)) for path, p in s.params.items()}}
    client.log_batch(run_id, params=[Param(f"search.{k}" if not k.startswith("space.") else k, str(v)[:6000])
                                     for k, v in params.items()])
    client.log_text(run_id, yaml.safe_dump(s.model_dump(mode="json", exclude={"storage"}), sort_keys=False),
                    "search/space.yaml")
    client.log_text(run_id, json.dumps(setup.recipe.model_dump(mode="json"), indent=2), "search/recipe.json")
    ctx = RunContext(parent_run_id=run_id, experiment_id=exp_id, tracking_uri=uri, state_dir=str(state),
                     work_dir=str(setup.folder()), recipe_name=setup.recipe.name,
                     recipe_digest=setup.recipe.digest(), git_commit=commit)
    with tracking.ending(client, run_id):
        yield ctx


# the trials n_trials counts: a failed one told nothing, so another takes its place (at most n_trials tries a run)
COUNTED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)

# what fails one trial without stopping the study: values that diverge, or that the recipe or the
# hardware refuses in combination (the flow adds its stages' own such errors)
TRIAL_ERRORS: tuple[type[Exception], ...] = (FloatingPointError, RecipeError)


def optimize(setup: SearchSetup, ctx: RunContext, run_trial: Callable[[Recipe, RunContext, bool, int], Any],
             trial_errors: tuple[type[Exception], ...] = ()) -> optuna.Study:
    """Run trials until the study holds `n_trials` (counting other workers' and earlier runs' trials).

    `run_trial(recipe, trial_ctx, evaluate, number)` runs the stages of one trial (a Prefect subflow)
    and returns an object with `.trained` and `.scores`.
    """
    import torch
    from mlflow import MlflowClient

    log = stage_logger()
    study = open_study(setup)
    client = MlflowClient(ctx.tracking_uri)
    remaining = setup.n_trials - len(study.get_trials(deepcopy=False, states=COUNTED))
    log.info("study '%s' in %s: %d trials there, %d to run (%s sampler, %s %s, pruner %s)", setup.study_name,
             display_url(setup.storage), setup.n_trials - remaining, max(remaining, 0), setup.space.sampler,
             setup.direction, setup.space.metric, setup.space.pruner.type)
    if remaining <= 0:
        return study
    objective = functools.partial(_one_trial, setup=setup, ctx=ctx, client=client, run_trial=run_trial, log=log)
    progress = functools.partial(_log_trial, setup=setup, ctx=ctx, client=client, log=log)
    oom = (torch.OutOfMemoryError,) if hasattr(torch, "OutOfMemoryError") else ()
    study.optimize(objective, n_trials=remaining, catch=TRIAL_ERRORS + oom + tuple(trial_errors),
                   callbacks=[optuna.study.MaxTrialsCallback(setup.n_trials, states=COUNTED), progress],
                   gc_after_trial=True)
    return study


def _one_trial(trial: optuna.Trial, *, setup: SearchSetup, ctx: RunContext, client, run_trial: Callable, log) -> float:
    """The study's objective: sample values, run the trial's stages in a nested MLflow run, and return its metric,
    or raise TrialPruned when the pruner stopped it."""
    values = sample(trial, setup.space)
    log.info("trial %d: %s", trial.number, ", ".join(override(p, v) for p, v in values.items()))
    recipe = trial_recipe(setup, values)
    tags = {"optuna.study": setup.study_name, "optuna.trial_number": str(trial.number),
            "tunewright.trial_params": json.dumps(values, default=str)}

    def judge(step: int, value: float) -> bool:
        trial.report(value, step)
        return trial.should_prune()

    with tracking.pipeline_run(recipe, parent_run_id=ctx.parent_run_id, run_name=f"trial-{trial.number}",
                               tags=tags) as trial_ctx:
        run_id = trial_ctx.parent_run_id
        trial.set_user_attr("mlflow_run_id", run_id)
        try:
            with pruning.watching(run_id, judge) as watch:
                outcome = run_trial(recipe, trial_ctx, setup.space.runs_evaluation(), trial.number)
            value = None if watch.pruned_at is not None else metric_value(setup.space.metric, outcome)
        except BaseException as exc:
            client.set_tag(run_id, "optuna.trial_state", "FAIL")
            client.set_tag(run_id, "tunewright.trial_error", f"{type(exc).__name__}: {exc}"[:5000])
            raise
        if value is not None:
            client.log_metric(run_id, f"search_{setup.space.metric}", value)
            client.set_tag(run_id, "optuna.trial_state", "COMPLETE")
    if watch.pruned_at is not None:
        client.set_tag(run_id, "optuna.trial_state", "PRUNED")
        client.set_tag(run_id, "tunewright.pruned_at_step", str(watch.pruned_at))
        client.set_terminated(run_id, "KILLED")  # stopped on purpose: neither finished nor failed
        raise optuna.TrialPruned(f"val loss {watch.pruned_value:.4f} at step {watch.pruned_at}")
    return value


def _log_trial(study: optuna.Study, frozen: FrozenTrial, *, setup: SearchSetup, ctx: RunContext, client, log) -> None:
    """After each trial: its metric and the best so far on the search run, and a line in the log."""
    metric = setup.space.metric
    if frozen.state == TrialState.COMPLETE:
        best = study.best_trial
        client.log_metric(ctx.parent_run_id, metric, frozen.value, step=frozen.number)
        client.log_metric(ctx.parent_run_id, f"best_{metric}", best.value, step=frozen.number)
        log.info("trial %d: %s %.4f (best: trial %d, %.4f)", frozen.number, metric, frozen.value, best.number,
                 best.value)
    elif frozen.state == TrialState.PRUNED:
        step = frozen.last_step
        log.info("trial %d: pruned at step %s (val loss %.4f)", frozen.number, step,
                 frozen.intermediate_values.get(step, math.nan) if step is not None else math.nan)
    else:
        log.warning("trial %d: %s", frozen.number, frozen.state.name.lower())


# --- after the study -----------------------------------------------------------------------------

def report(setup: SearchSetup, ctx: RunContext, study: optuna.Study) -> SearchReport:
    """Log the plots and the trials to the search run, write the best recipe, and say what happened."""
    from mlflow import MlflowClient

    client = MlflowClient(ctx.tracking_uri)
    trials = study.get_trials(deepcopy=False)
    counts = {name: sum(t.state == state for t in trials) for name, state in (
        ("complete", TrialState.COMPLETE), ("pruned", TrialState.PRUNED), ("failed", TrialState.FAIL),
        ("running", TrialState.RUNNING))}
    for key, n in counts.items():
        client.log_metric(ctx.parent_run_id, f"trials_{key}", n)
    folder = Path(ctx.work_dir)
    table = trials_table(setup, trials)
    (folder / "trials.txt").write_text(table + "\n", encoding="utf-8")
    client.log_artifact(ctx.parent_run_id, str(folder / "trials.txt"), "search")
    study.trials_dataframe().to_csv(folder / "trials.csv", index=False)
    client.log_artifact(ctx.parent_run_id, str(folder / "trials.csv"), "search")
    plots = _plots(setup, study, folder) if counts["complete"] else {}
    for path in plots.values():
        client.log_artifact(ctx.parent_run_id, path, "plots")
    base = {"study_name": setup.study_name, "storage": display_url(setup.storage), "metric": setup.space.metric,
            "direction": setup.direction, "search_run_id": ctx.parent_run_id, "experiment_id": ctx.experiment_id,
            "counts": counts, "table": table, "plots": plots}
    if not counts["complete"]:
        return SearchReport(**base)
    best = study.best_trial
    values = decode(setup.space, best.params)
    best_path = write_best(setup, best, values, folder / "best.yaml")
    client.log_artifact(ctx.parent_run_id, str(best_path), "search")
    client.log_metric(ctx.parent_run_id, f"best_{setup.space.metric}", best.value,
                      step=max(t.number for t in trials))  # the study's best, other workers' trials included
    client.set_tag(ctx.parent_run_id, "tunewright.best_trial", str(best.number))
    if run_id := best.user_attrs.get("mlflow_run_id"):
        client.set_tag(ctx.parent_run_id, "tunewright.best_trial_run_id", run_id)
    return SearchReport(**base, best_trial=best.number, best_value=best.value, best_params=values,
                        best_run_id=best.user_attrs.get("mlflow_run_id"), best_recipe=str(best_path))


def write_best(setup: SearchSetup, best: FrozenTrial, values: dict[str, Any], path: Path) -> Path:
    """The best trial's recipe as a YAML recipe file that `tunewright run` takes as it is."""
    recipe = trial_recipe(setup, values)
    body = recipe.model_dump(mode="json", exclude_unset=True, exclude={"search"})
    header = [f"# tunewright run {path}", "#",
              (f"# The best trial ({best.number}) of hyperparameter search '{setup.study_name}' over "
               f"{setup.recipe_path}: {setup.space.metric} {best.value:.6g}."),
              *(f"#   {override(p, v)}" for p, v in values.items())]
    # workers finishing together never leave half a file
    write_atomic(path, "\n".join(header) + "\n" + yaml.safe_dump(body, sort_keys=False, allow_unicode=True))
    return path


def trials_table(setup: SearchSetup, trials: list[FrozenTrial]) -> str:
    """The study's trials, one a line: number, state, metric, values, where it stopped, its MLflow run."""
    paths = list(setup.space.params)
    head = ["trial", "state", setup.space.metric, *paths, "stopped", "MLflow run"]
    rows = []
    for t in sorted(trials, key=lambda t: t.number):
        values = decode(setup.space, t.params)
        rows.append([str(t.number), t.state.name.lower(), f"{t.value:.4f}" if t.value is not None else "-",
                     *(_short(values[p]) if p in values else "-" for p in paths),
                     f"step {t.last_step}" if t.state == TrialState.PRUNED else "",
                     t.user_attrs.get("mlflow_run_id", "")[:12]])
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [head, *rows])


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _plots(setup: SearchSetup, study: optuna.Study, folder: Path) -> dict[str, str]:
    """Optuna's optimisation history, parallel coordinates and validation curves: a PNG of each, and one
    interactive page holding all three (plotly, its script inlined once so the page opens without a network)."""
    import html

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna import visualization as vis
    from optuna.visualization import matplotlib as vis_png

    target = f"{setup.space.metric} ({'lower' if setup.direction == 'minimize' else 'higher'} is better)"
    params = list(setup.space.params)
    kinds = {"optimization_history": ("optimisation history", lambda v: v.plot_optimization_history(
                 study, target_name=target)),
             "parallel_coordinate": ("parallel coordinates", lambda v: v.plot_parallel_coordinate(
                 study, params=params, target_name=target)),
             "intermediate_values": ("validation loss per trial", lambda v: v.plot_intermediate_values(study))}
    out, sections = {}, []
    for key, (title, draw) in kinds.items():
        with warnings.catch_warnings(), matplotlib.rc_context():  # Optuna's plots set a style of their own
            warnings.simplefilter("ignore")  # the matplotlib plots are marked experimental
            try:
                axes = draw(vis_png)
                axes = axes if hasattr(axes, "set_title") else axes.flat[0]
                if key == "intermediate_values":
                    axes.set_ylabel("validation loss")
                axes.set_title(f"{title}\nstudy {setup.study_name}", fontsize=11)
                figure = axes.figure
                figure.savefig(folder / f"{key}.png", dpi=110, bbox_inches="tight")
                plt.close(figure)
                out[key] = str(folder / f"{key}.png")
                page = draw(vis)
            except (ValueError, RuntimeError) as exc:
                stage_logger().warning("plot %s not drawn: %s", key, exc)
                continue
        page.update_layout(title=f"{title} - study {setup.study_name}")
        if key == "intermediate_values":
            page.update_yaxes(title_text="validation loss")
        sections.append(page.to_html(full_html=False, include_plotlyjs=not sections))
    if sections:
        path = folder / "search_plots.html"
        path.write_text(f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(setup.study_name)}"
                        f"</title></head><body>{''.join(sections)}</body></html>", encoding="utf-8")
        out["interactive"] = str(path)
    return out


def link_full_run(report: SearchReport, tracking_uri: str, run_id: str) -> None:
    """Note on the search's run which pipeline run trained the best recipe in full."""
    from mlflow import MlflowClient

    MlflowClient(tracking_uri).set_tag(report.search_run_id, "tunewright.best_recipe_run_id", run_id)
