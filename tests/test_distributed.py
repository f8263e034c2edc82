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


@pytest.mark.slow
def test_two_process_run_resumes_from_its_newest_sound_checkpoint_with_packing_and_focal_loss(run_ctx):
    """ZeRO-2 over gloo with packed rows and the focal loss writes sealed checkpoints; a rerun skips a
    corrupted newest one, loads every rank's partition of the one before and ends where the first run did."""
    recipe, ctx = run_ctx
    env_cfg = recipe.environment.model_copy(update={"num_processes": 2, "deepspeed_stage": 2, "precision": "fp32"})
    train = recipe.train.model_copy(update={"max_steps": 6, "batch_size": 2, "learning_rate": 5e-3,
                                            "checkpoint_every": 2, "keep_checkpoints": 3, "packing": True,
                                            "loss": "focal"})
    data = prepare_data.fn(recipe.data, ctx)
    model = initialise_model.fn(recipe.model, recipe.environment.seed, ctx)
    env = setup_environment.fn(env_cfg, train, recipe.model, model, ctx)
    first = fine_tune.fn(train, recipe.model, data, model, env, ctx)
    root = Path(ctx.work_dir, "finetune", "distributed", "checkpoints")
    assert sorted(p.name for p in root.iterdir()) == ["step-000002", "step-000004"]
    manifest = json.loads((root / "step-000004" / "manifest.json").read_text())
    assert {"rng-rank0.pt", "rng-rank1.pt", "loop_state.json"} <= set(manifest["files"])
    partitions = [f for f in manifest["files"] if f.startswith("deepspeed/") and "optim_states" in f]
    assert len(partitions) == 2, manifest["files"]  # one ZeRO optimiser partition per rank

    victim = root / "step-000004" / partitions[0]
    victim.write_bytes(victim.read_bytes()[:100])  # a torn write: the manifest no longer matches
    second = fine_tune.fn(train, recipe.model, data, model, env, ctx)
    assert second.resumed_from == 2
    assert abs(second.final_loss - first.final_loss) < 1e-3 * max(1.0, first.final_loss), (first.final_loss,
                                                                                           second.final_loss)
