"""The recipe: the YAML a run is made from, one pydantic model per stage section, validated once at the edge.

One module per section: `data`, `model`, `environment`, `train`, `evaluate`, `deploy`, `monitor`, `search`
(the parts of a search), and `pipeline` (the whole `Recipe`, with tracking and the search section). `names` holds
the lists of names a recipe chooses from; `loading` reads a file, with errors that name file, line and key.
Everything other code uses is importable from here.
"""

from tunewright.recipe.data import BalanceConfig, CleanConfig, DataConfig, GateConfig, SourceConfig, SplitConfig
from tunewright.recipe.deploy import CanaryConfig, DeployConfig
from tunewright.recipe.environment import EnvironmentConfig
from tunewright.recipe.evaluate import EvaluateConfig, JudgeConfig
from tunewright.recipe.loading import RecipeError, load_recipe, load_space
from tunewright.recipe.model import EMBEDDED_BASE, AdapterConfig, MergeConfig, ModelConfig, QuantizationConfig
from tunewright.recipe.monitor import MonitorConfig
from tunewright.recipe.names import (
    COMBINATIONS,
    DATA_FORMATS,
    DATA_KINDS,
    EVAL_METRICS,
    METHODS,
    OBJECTIVES,
    ON_POLICY,
    PEFT_METHODS,
    PII_KINDS,
    REWARDS,
    SEARCH_METRICS,
)
from tunewright.recipe.pipeline import Recipe, SearchConfig, TrackingConfig
from tunewright.recipe.search import ParamSpace, PrunerConfig
from tunewright.recipe.section import Section
from tunewright.recipe.train import TrainConfig

__all__ = [
    "AdapterConfig", "BalanceConfig", "CanaryConfig", "CleanConfig", "DataConfig", "DeployConfig", "EnvironmentConfig",
    "EvaluateConfig", "GateConfig", "JudgeConfig", "MergeConfig", "ModelConfig", "MonitorConfig", "ParamSpace",
    "PrunerConfig", "QuantizationConfig", "Recipe", "RecipeError", "SearchConfig", "Section", "SourceConfig",
    "SplitConfig", "TrackingConfig", "TrainConfig", "load_recipe", "load_space",
    "COMBINATIONS", "DATA_FORMATS", "DATA_KINDS", "EMBEDDED_BASE", "EVAL_METRICS", "METHODS", "OBJECTIVES",
    "ON_POLICY", "PEFT_METHODS", "PII_KINDS", "REWARDS", "SEARCH_METRICS",
]
