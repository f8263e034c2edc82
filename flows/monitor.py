"""Stage 7 on served traffic: judge a window of `tunewright serve`'s request log and, on drift or a service-level
breach, emit one `tunewright.drift.detected` event that the `retrain-on-drift` deployment is triggered by; where a
challenger meets live traffic (a canary or a shadow), promote it or roll it back on what it served.

Run: prefect deployment run 'tunewright-monitor/monitor-hourly'   (or call `monitor()` from Python)
"""

from __future__ import annotations

import dataclasses

import tunewright  # noqa: F401  first: it switches library telemetry off before any library loads

from prefect import flow
from prefect.runtime import flow_run

from tasks.data import prepare_data
from tasks.model import resolve_base_model
from tasks.monitor import WindowVerdict, decide_canary, labelled_path, monitor_traffic
from tunewright.recipe import load_recipe
from tunewright.registry.tracking import pipeline_run


@flow(name="tunewright-monitor", log_prints=True)
def monitor(recipe_path: str = "recipes/demo.yaml", overrides: list[str] | None = None,
            request_log: str | None = None, window_end: float | None = None) -> WindowVerdict:
    """The recipe's training data (stage 1, cached) as reference -> its base model (stage 2, cached) to embed prompts
    -> one window of served traffic judged -> the canary, if one runs, decided on the same traffic."""
    recipe = load_recipe(recipe_path, overrides)
    with pipeline_run(recipe, flow_run_id=flow_run.id, run_name=f"monitor {recipe.deploy.registered_model}",
                      tags={"tunewright.kind": "monitoring"}) as ctx:
        data = prepare_data(recipe.data, ctx, tokenizer=recipe.model.base, expect_kind=recipe.train.data_kinds())
        base_dir = resolve_base_model(recipe.model, ctx)
        verdict = monitor_traffic(recipe.monitor, recipe.deploy.registered_model, data, ctx, request_log=request_log,
                                  window_end=window_end, recipe_path=recipe_path, overrides=overrides,
                                  embed_model=base_dir)
        canary = decide_canary(recipe.deploy.canary, recipe.deploy.registered_model,
                               request_log or recipe.monitor.request_log, verdict.end, ctx,
                               labelled_export=str(labelled_path(verdict.window_path)), metric=recipe.evaluate.metric)
        return dataclasses.replace(verdict, canary=canary)
