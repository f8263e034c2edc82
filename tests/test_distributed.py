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
    # 4 examples per rank: more answer tokens than one loss chunk, and a different count on each rank
    one, _ = _run(run_ctx, processes=1, batch=8, stage=0)
    two, ctx = _run(run_ctx, processes=2, batch=4, stage=3)
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
    for key in ("learning_rate", "grad_norm", "tokens_per_second", "mfu"):
        assert len(client.get_metric_history(distributed_run.info.run_id, key)) == 6, key
    assert all(0 < m.value < 1 for m in client.get_metric_history(distributed_run.info.run_id, "mfu"))


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


@pytest.mark.slow
def test_zero3_with_optimiser_and_parameter_offload_trains(run_ctx):
    """ZeRO-3 with optimiser states and parameters offloaded to CPU memory (the config stage 3 writes)."""
    recipe, ctx = run_ctx
    env_cfg = recipe.environment.model_copy(update={"num_processes": 2, "deepspeed_stage": 3, "precision": "fp32",
                                                    "offload_optimizer": True, "offload_params": True})
    train = recipe.train.model_copy(update={"max_steps": 4, "batch_size": 2, "learning_rate": 5e-3})
    data = prepare_data.fn(recipe.data, ctx)
    model = initialise_model.fn(recipe.model, recipe.environment.seed, ctx)
    env = setup_environment.fn(env_cfg, train, recipe.model, model, ctx)
    config = json.loads(Path(env.deepspeed_config).read_text())["zero_optimization"]
    assert config["offload_optimizer"]["device"] == config["offload_param"]["device"] == "cpu"
    trained = fine_tune.fn(train, recipe.model, data, model, env, ctx)
    assert trained.steps == 4 and trained.final_loss == trained.final_loss  # finite, not NaN
    assert (Path(trained.output_dir) / "adapter_model.safetensors").is_file()


def _workers(home: Path) -> list:
    import psutil

    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmd = " ".join(proc.info["cmdline"] or [])
        if "tasks.finetune.distributed" in cmd and str(home) in cmd:
            found.append(proc)
    return found


@pytest.mark.slow
def test_killing_the_task_process_stops_its_training_processes_and_resume_continues(tiny_recipe, tmp_path):
    """SIGKILL to the process running the flow (not its group): torchrun and both ranks stop with it,
    and `--resume` picks up the two-process run from its last sealed checkpoint in the same MLflow run."""
    import os
    import signal
    import subprocess
    import sys
    import time

    home = tmp_path / "home"
    sets = ["--set", "environment.num_processes=2", "--set", "environment.deepspeed_stage=3",
            "--set", "environment.precision=fp32", "--set", "train.batch_size=2", "--set", "train.max_steps=60",
            "--set", "train.checkpoint_every=5", "--set", "evaluate.max_examples=2", "--set", "deploy.verify_samples=0"]
    env = dict(os.environ, TUNEWRIGHT_HOME=str(home), MLFLOW_TRACKING_URI=f"sqlite:///{home}/mlflow.db")
    env.pop("PREFECT_API_URL", None)
    args = [sys.executable, "-m", "tunewright.cli", "run", str(tiny_recipe), *sets]
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and not list(home.glob("runs/*/finetune/distributed/checkpoints/step-000010")):
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        time.sleep(0.1)
    assert _workers(home), "no training processes found"
    os.kill(proc.pid, signal.SIGKILL)  # the task process only: its children are not signalled by us
    proc.wait()
    deadline = time.time() + 60
    while _workers(home) and time.time() < deadline:
        time.sleep(0.5)
    assert not _workers(home), "training processes outlived the task process"

    [run_dir] = list((home / "runs").iterdir())
    done = sorted(p.name for p in (run_dir / "finetune/distributed/checkpoints").glob("step-*"))
    resumed = subprocess.run(args + ["--resume"], env=env, capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, (resumed.stdout + resumed.stderr)[-3000:]
    assert [p.name for p in (home / "runs").iterdir()] == [run_dir.name], "the same MLflow run continued"
    summary = json.loads((run_dir / "finetune/adapter/training_summary.json").read_text())
    assert summary["steps_done"] == 60 and f"step-{summary['resumed_from']:06d}" == done[-1]
