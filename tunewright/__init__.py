"""tunewright: the seven-stage fine-tuning lifecycle as Prefect flows, tracked in MLflow.

The shared library the stages (`tasks/`) and flows (`flows/`) use: `recipe` (the recipe's schema, a module per
section), `train` (what is trained and what makes a step fast), `registry` (MLflow runs, the registered model,
bases, adapters, exports, promotion), `scoring` (metrics, safety, detectors, judge, rewards), `serve` (the
OpenAI-compatible server), `platform` (the state folder and the local Prefect and MLflow services), `chat`
(prompt layout, encoding and generation) and `cli` (the `tunewright` command).
"""

import os as _os

__version__ = "0.1.0"

# Nothing leaves the machine unasked: every library the CLI, a Prefect worker running a flow, and the
# server load is told not to report usage, before any of them is imported (Hugging Face Hub reads its
# switch at import). Each value is what that library's own check accepts: MLflow honours only
# MLFLOW_DISABLE_TELEMETRY or DO_NOT_TRACK=true, Hugging Face Hub (and TRL's trainers, which report
# through it) HF_HUB_DISABLE_TELEMETRY or DO_NOT_TRACK, evidently any DO_NOT_TRACK, Prefect's server
# PREFECT_SERVER_ANALYTICS_ENABLED, great-expectations GX_ANALYTICS_ENABLED, and vLLM (the engine
# `tunewright serve --engine vllm` starts with this environment) VLLM_NO_USAGE_STATS=1: its DO_NOT_TRACK
# check accepts only "1", not the "true" MLflow needs; Ray (stage 4 on a cluster, and `tunewright cluster up`)
# RAY_USAGE_STATS_ENABLED=0. A variable the user has set is left as it is.
TELEMETRY_OFF = {
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "DO_NOT_TRACK": "true",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "GX_ANALYTICS_ENABLED": "False",
    "VLLM_NO_USAGE_STATS": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
}
for _key, _value in TELEMETRY_OFF.items():
    _os.environ.setdefault(_key, _value)

# A process that has loaded torch, transformers, MLflow, Prefect, great-expectations and evidently holds
# millions of objects, and the interpreter's last garbage collections over them make every command slow to exit.
# Freezing the heap once every other exit handler has run (they run last-registered first, so this one runs
# after those registered later) leaves those collections almost nothing to walk: objects are still released
# as their modules are cleared, and output is flushed as before.
import atexit as _atexit
import gc as _gc

_atexit.register(_gc.freeze)
