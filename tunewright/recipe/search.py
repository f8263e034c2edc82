"""The search section's parts: each searched value's space, and the pruner that stops unpromising trials.

`SearchConfig`, the section itself, sits beside `Recipe` (tunewright.recipe.pipeline): the paths it searches are
checked against the recipe's own fields.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import Field, model_validator

from tunewright.recipe.section import Section


class ParamSpace(Section):
    type: Literal["float", "int", "categorical"] = Field(
        description="`float` and `int` are drawn from `low`..`high` (or from `choices`); `categorical` from `choices`.")
    low: float | None = Field(None, description="Smallest value (float and int).")
    high: float | None = Field(None, description="Largest value, included (float and int).")
    log: bool = Field(False, description="Draw on a log scale (needs low > 0; not with step).")
    step: float | None = Field(None, gt=0, description="Spacing of the values from `low` (int: default 1; float: "
                               "continuous unless given).")
    choices: list[Any] | None = Field(None, min_length=1, description="The values to try, of any YAML type (lists "
                                      "too, e.g. target_modules).")

    @model_validator(mode="before")
    @classmethod
    def _numbers_from_yaml(cls, data: Any) -> Any:
        # YAML reads `1e-5` (no dot) as a string; numeric choices of a float or int parameter are numbers
        if isinstance(data, dict) and data.get("type") in ("float", "int") and isinstance(data.get("choices"), list):
            def number(c: Any) -> Any:
                try:
                    return float(c) if isinstance(c, str) else c
                except ValueError:
                    return c
            data = {**data, "choices": [number(c) for c in data["choices"]]}
        return data

    @model_validator(mode="after")
    def _shape(self) -> "ParamSpace":
        if self.choices is not None:
            if self.low is not None or self.high is not None or self.step is not None or self.log:
                raise ValueError("give either choices or low/high (with step or log), not both")
            numbers = [c for c in self.choices if isinstance(c, (int, float)) and not isinstance(c, bool)]
            if self.type == "float" and len(numbers) != len(self.choices):
                raise ValueError(f"float choices must be numbers, got {self.choices}")
            if self.type == "int" and (len(numbers) != len(self.choices) or any(float(c) != int(c) for c in numbers)):
                raise ValueError(f"int choices must be whole numbers, got {self.choices}")
            if len({json.dumps(c, sort_keys=True) for c in self.choices}) != len(self.choices):
                raise ValueError(f"choices repeat a value: {self.choices}")
            return self
        if self.type == "categorical":
            raise ValueError("categorical needs choices")
        if self.low is None or self.high is None:
            raise ValueError(f"{self.type} needs low and high (or choices)")
        if self.low > self.high:
            raise ValueError(f"low ({self.low}) is above high ({self.high})")
        if self.log and self.low <= 0:
            raise ValueError("a log scale needs low > 0")
        if self.log and self.step is not None:
            raise ValueError("log and step cannot be combined")
        if self.type == "int" and any(v is not None and not float(v).is_integer() for v in (self.low, self.high, self.step)):
            raise ValueError("int low, high and step must be whole numbers")
        return self

    def grid(self) -> list | None:
        """Every value this parameter can take, or None when it is continuous (a float without step)."""
        if self.choices is not None:
            return list(self.choices)
        if self.type == "int":
            return list(range(int(self.low), int(self.high) + 1, int(self.step or 1)))
        if self.step is not None:
            n = int((self.high - self.low) / self.step + 1e-9)
            return [round(self.low + i * self.step, 12) for i in range(n + 1)]
        return None


class PrunerConfig(Section):
    type: Literal["median", "percentile", "threshold", "none"] = Field(
        "median", description="What stops an unpromising trial early, judged on the validation loss stage 4 reports "
        "every `train.eval_every` steps (lower is better, whatever the metric): `median` (worse than the median of "
        "the completed trials at the same step), `percentile`, `threshold` (above `upper`), or `none`.")
    n_startup_trials: int = Field(2, ge=0, description="median, percentile: completed trials before any is pruned.")
    n_warmup_steps: int = Field(0, ge=0, description="Optimiser steps a trial runs before it can be pruned.")
    interval_steps: int = Field(1, ge=1, description="Judge a trial at most once per this many optimiser steps.")
    percentile: float | None = Field(None, gt=0, lt=100, description="percentile: prune a trial whose best "
                                     "validation loss so far is worse than this percentile of the completed "
                                     "trials' at the same step (25 prunes more than the median, 50).")
    upper: float | None = Field(None, description="threshold: prune a trial whose validation loss is above this "
                                "(or not a number).")

    @model_validator(mode="after")
    def _fields_fit_the_type(self) -> "PrunerConfig":
        fits = {"median": {"n_startup_trials", "n_warmup_steps", "interval_steps"},
                "percentile": {"n_startup_trials", "n_warmup_steps", "interval_steps", "percentile"},
                "threshold": {"n_warmup_steps", "interval_steps", "upper"}, "none": set()}[self.type]
        if extra := sorted(self.model_fields_set - fits - {"type"}):
            raise ValueError(f"{', '.join(extra)} do{'es' if len(extra) == 1 else ''} not apply to pruner "
                             f"'{self.type}'" + (f" (it takes {', '.join(sorted(fits))})" if fits else ""))
        if self.type == "percentile" and self.percentile is None:
            raise ValueError("pruner 'percentile' needs percentile")
        if self.type == "threshold" and self.upper is None:
            raise ValueError("pruner 'threshold' needs upper (the validation loss above which a trial stops)")
        return self
