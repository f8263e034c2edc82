"""Two training processes under torchrun with DeepSpeed ZeRO-3 over gloo match one process."""

import json
from pathlib import Path

import pytest
from mlflow import MlflowClient

from tasks.data import prepare_data
from tasks.environment import setup_environment
from tasks.finetune import fine_tune
from tasks.model import initialise_model


def _run(run_ctx, processes: int, batch: int, stage: int):
    recipe, ctx = run_ctx
    env_cfg = recipe.environment.model_copy(update={"num_processes": processes, "deepspeed_stage": stage,
                                                    "precision": "fp32"})
    train = recipe.train.model_copy(update={"max_steps": 6, "batch_size": batch, "learning_rate": 5e-3})
    data = prepare_data.fn(recipe.data, ctx)
    model = initialise_model.fn(recipe.model, recipe.environment.seed, ctx)
    env = setup_environment.fn(env_cfg, train, recipe.model, model, ctx)
    return fine_tune.fn(train, recipe.model, data, model, env, ctx), ctx


@pytest.mark.slow
def test_two_process_zero3_trains_and_matches_one_process(run_ctx, tmp_path):
    one, _ = _run(run_ctx, processes=1, batch=4, stage=0)
    two, ctx = _run(run_ctx, processes=2, batch=2, stage=3)
    summary = json.loads((Path(two.output_dir) / "training_summary.json").read_text())
    assert summary["world_size"] == 2
    assert (Path(two.output_dir) / "adapter_model.safetensors").is_file()
    assert abs(two.final_loss - one.final_loss) < 0.02 * max(1.0, one.final_loss), (one.final_loss, two.final_loss)

    # rank 0 alone logged: one fine-tune run per training, one loss value per step
    client = MlflowClient(ctx.tracking_uri)
    runs = client.search_runs([ctx.experiment_id], filter_string="tags.`tunewright.stage` = '4-fine-tune'")
    assert len(runs) == 2
    distributed_run = next(r for r in runs if r.data.params.get("num_processes") == "2")
    history = client.get_metric_history(distributed_run.info.run_id, "train_loss")
    assert sorted(m.step for m in history) == list(range(1, 7))
