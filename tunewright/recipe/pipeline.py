"""The whole recipe: one section per stage, tracking, an optional search, and the checks that span sections.

The search section lives here, beside `Recipe`, because every path it searches must name one value of a recipe.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import re
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, Field, field_validator, model_validator

from tunewright.recipe.data import DataConfig
from tunewright.recipe.deploy import DeployConfig
from tunewright.recipe.environment import EnvironmentConfig
from tunewright.recipe.evaluate import EvaluateConfig
from tunewright.recipe.model import ModelConfig
from tunewright.recipe.monitor import MonitorConfig
from tunewright.recipe.names import LOSSES, ON_POLICY, PEFT_METHODS, SearchMetric
from tunewright.recipe.search import ParamSpace, PrunerConfig
from tunewright.recipe.section import Section, section_of
from tunewright.recipe.train import TrainConfig

# the correctness metrics that also score each field (`field_NAME` in gate rules)
FIELD_METRICS = ("json_exact_match", "tool_call_accuracy")


class TrackingConfig(Section):
    experiment: str = Field("tunewright", description="MLflow experiment name.")
    tracking_uri: str | None = Field(None, description="MLflow tracking URI (default: SQLite in the state folder; MLFLOW_TRACKING_URI wins).")
    state_dir: str | None = Field(None, description="State folder (default ./.tunewright; TUNEWRIGHT_HOME wins).")


# what a run is called and where it is tracked, and the search itself, are not searched
_NOT_SEARCHABLE = ("name", "description", "tracking", "search")


def _recipe_field(path: str) -> str | None:
    """Why `path` does not name one value of a recipe, or None when it does."""
    parts = path.split(".")
    if parts[0] in _NOT_SEARCHABLE:
        return f"'{parts[0]}' is not searched"
    model: Any = Recipe
    for i, part in enumerate(parts):
        model = section_of(model)
        fields = model.model_fields if isinstance(model, type) and issubclass(model, BaseModel) else None
        if fields is None:
            return f"'{'.'.join(parts[:i])}' is a value, not a section"
        if part not in fields:
            near = difflib.get_close_matches(part, list(fields), n=3)
            where = ".".join(parts[:i]) or "a recipe"
            return (f"not a recipe value (did you mean {' or '.join('.'.join(parts[:i] + [n]) for n in near)}?)" if near
                    else f"not a recipe value ({where} has: {', '.join(fields)})")
        model = fields[part].annotation
    model = section_of(model)
    if isinstance(model, type) and issubclass(model, BaseModel):
        return f"is a section; name one of its keys ({', '.join(model.model_fields)})"
    return None


def _searchable(path: str) -> str:
    if why := _recipe_field(path):
        raise ValueError(why)
    return path


class SearchConfig(Section):
    """A hyperparameter search over a recipe (`tunewright tune`): a `search` section, or a file of its own."""

    sampler: Literal["grid", "random", "tpe"] = Field(
        "tpe", description="`grid` tries every combination (every parameter needs choices, int bounds or a step), "
        "`random` draws independently, `tpe` (Optuna's Tree-structured Parzen Estimator) draws near the best trials "
        "so far.")
    params: dict[Annotated[str, AfterValidator(_searchable)], ParamSpace] = Field(
        min_length=1, description="The recipe values to search, by path (`train.learning_rate`, `model.adapter.r`), "
        "each with its space; every trial sets them as `--set path=value` would.")
    n_trials: int | None = Field(
        None, ge=1, description="Complete and pruned trials in the study, counted over every worker that joins it "
        "and every re-run (default: the whole grid for `grid`, else 20); a failed trial is replaced. Raise it to "
        "continue a study.")
    metric: SearchMetric = Field(
        "val_loss", description="What a trial is judged by: `val_loss` (stage 4's final validation loss; trials "
        "then run stages 1-4), or a stage 5 result on the held-out split: `answer_loss`, `score` (evaluate.metric), "
        "`improvement` (score over the base's), `preference_accuracy`, `mean_reward`.")
    direction: Literal["minimize", "maximize"] | None = Field(
        None, description="Default: minimize losses, maximize scores.")
    pruner: PrunerConfig = PrunerConfig()
    seed: int | None = Field(None, description="Sampler seed (default: environment.seed). A worker joining a study "
                             "that already has trials shifts it by their number, so workers do not repeat each other.")
    evaluate: bool | None = Field(None, description="Run stage 5 in every trial (default: only when the metric "
                                  "comes from it).")
    study: str | None = Field(None, description="Optuna study name (default: the recipe name and a digest of recipe "
                              "and search, so every worker running the same search joins the same study).")
    storage: str | None = Field(
        None, description="SQLAlchemy URL of the study database, e.g. `postgresql://tunewright@db/optuna` (default: "
        "SQLite in the state folder; TUNEWRIGHT_STUDY_STORAGE wins). Passwords belong in that variable, not here.")

    @field_validator("params")
    @classmethod
    def _grid_is_finite(cls, v: dict[str, ParamSpace], info) -> dict[str, ParamSpace]:
        continuous = [path for path, space in v.items() if space.grid() is None]
        if info.data.get("sampler") == "grid" and continuous:
            raise ValueError(f"sampler 'grid' needs a finite set of values: give {', '.join(continuous)} choices or "
                             "a step")
        return v

    @field_validator("storage")
    @classmethod
    def _no_password(cls, v: str | None) -> str | None:
        if v and re.search(r"://[^/@]*:[^/@]*@", v):
            raise ValueError("holds a password; give the URL in TUNEWRIGHT_STUDY_STORAGE (or --storage) instead")
        return v

    def goal(self) -> str:
        return self.direction or ("minimize" if self.metric in LOSSES else "maximize")

    def grid_size(self) -> int | None:
        if self.sampler != "grid":
            return None
        size = 1
        for space in self.params.values():
            size *= len(space.grid())
        return size

    def trials(self) -> int:
        """Trials the study holds when the search is done."""
        size = self.grid_size()
        if size is not None:
            return min(self.n_trials or size, size)
        return self.n_trials or 20

    def runs_evaluation(self) -> bool:
        return self.evaluate if self.evaluate is not None else self.metric != "val_loss"


class Recipe(Section):
    """A whole fine-tuning run: one section per stage plus tracking."""

    name: str = Field(description="Run name shown in Prefect and MLflow.")
    description: str = ""
    data: DataConfig
    model: ModelConfig = ModelConfig()
    environment: EnvironmentConfig = EnvironmentConfig()
    train: TrainConfig = TrainConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    deploy: DeployConfig = DeployConfig()
    monitor: MonitorConfig = MonitorConfig()
    tracking: TrackingConfig = TrackingConfig()
    search: SearchConfig | None = Field(
        None, description="Hyperparameter search for `tunewright tune` (instead of --space); `run` ignores it.")

    @field_validator("name")
    @classmethod
    def _name_not_blank(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must not be empty")
        return v

    @field_validator("environment")
    @classmethod
    def _one_process_methods(cls, v: EnvironmentConfig, info) -> EnvironmentConfig:
        model = info.data.get("model")
        if v.processes > 1 and model is not None and model.adapter.method == "hft":
            raise ValueError("num_processes > 1 with model.adapter.method 'hft': Half Fine-Tuning runs in one "
                             "process (its per-round freezing is not ZeRO-partition-aware)")
        return v

    @model_validator(mode="after")
    def _gate_names_what_stage_5_scores(self) -> "Recipe":
        from tunewright.registry.promotion_rules import parse_rule

        known = self.evaluate.metric_names()
        for rule in self.deploy.gate:
            unknown = sorted(m for m in parse_rule(rule).metrics()
                             if m not in known and not (m.startswith("field_") and self.evaluate.metric in FIELD_METRICS))
            if unknown:
                raise ValueError(f"deploy.gate {rule!r} names {', '.join(unknown)}, which stage 5 does not score "
                                 f"with this recipe (it scores {', '.join(sorted(known))}, and field_NAME per field of its metric; add it to "
                                 "evaluate.metrics or evaluate.safety)")
        return self

    @model_validator(mode="after")
    def _steps_or_merge(self) -> "Recipe":
        if self.train.max_steps == 0 and self.model.merge is None:
            raise ValueError("train.max_steps: 0 trains nothing; it is for evaluating a merged adapter as it is "
                             "(model.merge)")
        if self.train.max_steps == 0 and self.environment.processes > 1:
            raise ValueError("environment.num_processes > 1 with train.max_steps 0: there is no training to share")
        return self

    @model_validator(mode="after")
    def _alignment_processes(self) -> "Recipe":
        if (self.environment.processes > 1 and self.environment.deepspeed_stage == 3
                and self.train.objective in ON_POLICY):
            raise ValueError(f"environment.deepspeed_stage 3 with num_processes > 1 and train.objective "
                             f"'{self.train.objective}': GRPO and PPO sample answers during training, which ZeRO-3 "
                             "cannot share out (every rank would gather the weights for every generated token); "
                             "use deepspeed_stage 0-2 (sft, dpo, orpo, kto and reward run under all four)")
        if self.environment.processes > 1 and getattr(self.train, "rejected", "dataset") == "on_policy":
            raise ValueError("environment.num_processes > 1 with train.rejected: on_policy: the starting model's own "
                             "answers are generated in one process (set num_processes: 1, or rejected: dataset)")
        if (self.train.objective in ON_POLICY and self.train.beta > 0
                and self.model.adapter.method not in PEFT_METHODS):
            raise ValueError(f"train.beta > 0 with {self.train.objective.upper()} measures the KL to the base with the adapter switched off; "
                             f"model.adapter.method '{self.model.adapter.method}' has no adapter (set beta: 0)")
        return self

    def flat(self) -> dict[str, str]:
        """The recipe as `section.key: value` strings, for MLflow params."""
        out: dict[str, str] = {}

        def walk(prefix: str, value: Any) -> None:
            if isinstance(value, dict):
                for k, v in value.items():
                    walk(f"{prefix}.{k}" if prefix else k, v)
            else:
                out[prefix] = str(value)

        walk("", self.model_dump(mode="json", exclude={"search"}))
        return out

    def digest(self) -> str:
        # the search section says how to look for values, not what a run trains: it leaves the digest alone
        blob = json.dumps(self.model_dump(mode="json", exclude={"search"}), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]
