"""Two training processes under torchrun with DeepSpeed ZeRO-3 over gloo match one process."""

import json
from pathlib import Path

import pytest
from mlflow import MlflowClient

from tasks.data import prepare_data
from tasks.environment import setup_environment
from tasks.finetune import fine_tune
from tasks.model import initialise_model
from tests.conftest import cli_env


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


def _servers(home: Path) -> list:
    """Prefect temporary servers started for runs under `home`."""
    import psutil

    found = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if "create_app" in " ".join(proc.info["cmdline"] or []) and \
                    proc.environ().get("PREFECT_HOME", "").startswith(str(home)):
                found.append(proc)
        except psutil.Error:
            pass
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
    env = cli_env(TUNEWRIGHT_HOME=str(home), MLFLOW_TRACKING_URI=f"sqlite:///{home}/mlflow.db")
    args = [sys.executable, "-m", "tunewright.cli", "run", str(tiny_recipe), *sets]
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and not list(home.glob("runs/*/finetune/distributed/checkpoints/step-000010")):
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        time.sleep(0.1)
    assert _workers(home), "no training processes found"
    assert _servers(home), "no temporary Prefect server found"
    os.kill(proc.pid, signal.SIGKILL)  # the task process only: its children are not signalled by us
    proc.wait()
    deadline = time.time() + 60
    while (_workers(home) or _servers(home)) and time.time() < deadline:
        time.sleep(0.5)
    assert not _workers(home), "training processes outlived the task process"
    assert not _servers(home), "Prefect's temporary server outlived the task process"

    [run_dir] = list((home / "runs").iterdir())
    done = sorted(p.name for p in (run_dir / "finetune/distributed/checkpoints").glob("step-*"))
    resumed = subprocess.run(args + ["--resume"], env=env, capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, (resumed.stdout + resumed.stderr)[-3000:]
    assert [p.name for p in (home / "runs").iterdir()] == [run_dir.name], "the same MLflow run continued"
    summary = json.loads((run_dir / "finetune/adapter/training_summary.json").read_text())
    assert summary["steps_done"] == 60 and f"step-{summary['resumed_from']:06d}" == done[-1]


# --- preference alignment under ZeRO ---------------------------------------------------------------

def test_every_objective_loads_with_two_processes_and_on_policy_ones_are_refused_under_zero3(tmp_path, ticket_files):
    import re

    from tunewright.recipe import RecipeError, load_recipe

    def recipe(objective: str) -> Path:
        path = tmp_path / f"{objective}.yaml"
        path.write_text(f"name: x\ndata:\n  path: {ticket_files['tickets']}\nenvironment:\n  num_processes: 2\n"
                        f"train:\n  objective: {objective}\n  sft_steps: {0 if objective == 'reward' else 2}\n")
        return path

    for objective in ("dpo", "orpo", "kto", "reward", "grpo", "ppo"):
        assert load_recipe(recipe(objective), ["environment.deepspeed_stage=2"]).environment.num_processes == 2
    for objective in ("dpo", "orpo", "kto", "reward"):
        assert load_recipe(recipe(objective), ["environment.deepspeed_stage=3"]).environment.deepspeed_stage == 3
    for objective in ("grpo", "ppo"):
        with pytest.raises(RecipeError, match=re.escape("environment.deepspeed_stage 3 with num_processes > 1 and "
                                                        f"train.objective '{objective}'")):
            load_recipe(recipe(objective), ["environment.deepspeed_stage=3"])


def _two_processes(recipe, ctx, model, name: str, stage: int, **train):
    """A second run folder under the same pipeline run, with two processes under ZeRO `stage`."""
    import dataclasses

    two = dataclasses.replace(ctx, work_dir=str(Path(ctx.work_dir).with_name(name)))
    env_cfg = recipe.environment.model_copy(update={"num_processes": 2, "deepspeed_stage": stage})
    cfg = recipe.train.model_copy(update=train)
    return cfg, two, setup_environment.fn(env_cfg, cfg, recipe.model, model, two)


def _stage_runs(ctx) -> dict[str, object]:
    client = MlflowClient(ctx.tracking_uri)
    runs = client.search_runs([ctx.experiment_id], filter_string=f"tags.`tunewright.stage` = '4-fine-tune' and "
                                                                 f"tags.`mlflow.parentRunId` = '{ctx.parent_run_id}'")
    return {r.data.params.get("num_processes", "1"): r for r in runs}


def _history(ctx, run, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in MlflowClient(ctx.tracking_uri).get_metric_history(run.info.run_id, key))


@pytest.mark.slow
def test_two_process_zero3_dpo_after_supervised_steps_matches_one_process(aligned):
    """2 SFT + 4 DPO steps: two ZeRO-3 processes of 4 pairs score the same reference rows, keep the starting adapter
    and end with the loss and DPO metrics of one process of 8 pairs; rank 0 alone logged them."""
    import torch
    from safetensors.torch import load_file

    recipe, ctx, data, model, env = aligned(objective="dpo", sft_steps=2, max_steps=6, batch_size=8, beta=0.5)
    one = fine_tune.fn(recipe.train, recipe.model, data, model, env, ctx)
    cfg, two_ctx, two_env = _two_processes(recipe, ctx, model, "two", 3, batch_size=4)
    two = fine_tune.fn(cfg, recipe.model, data, model, two_env, two_ctx)

    assert two.objective == "dpo" and Path(two.start_dir, "adapter_model.safetensors").is_file()
    ref = [torch.load(Path(c.work_dir, "finetune", "reference_logps.pt")) for c in (ctx, two_ctx)]
    assert torch.equal(ref[0].isnan(), ref[1].isnan()), "the same global rows are scored"
    # from starting adapters as close as two supervised steps of per-rank token means allow (Adam's first steps
    # move every weight by about the learning rate, whatever the size of its gradient)
    assert torch.allclose(ref[0].nan_to_num(), ref[1].nan_to_num(), rtol=2e-4)
    runs = _stage_runs(ctx)
    assert set(runs) == {"1", "2"}, "one stage run per training: rank 0 alone logged"
    assert [s for s, _ in _history(ctx, runs["2"], "train_loss")] == list(range(1, 7))
    for key in ("dpo_reward_margin", "dpo_rewards_chosen", "dpo_preference_accuracy"):
        got, want = _history(ctx, runs["2"], key), _history(ctx, runs["1"], key)
        assert [s for s, _ in got] == [3, 4, 5, 6], key
        assert all(abs(a - b) < 0.02 + 0.05 * abs(b) for (_, a), (_, b) in zip(got, want)), (key, got, want)
    assert abs(two.final_loss - one.final_loss) < 0.02 * max(1.0, one.final_loss), (one.final_loss, two.final_loss)
    for folder in ("start_dir", "output_dir"):
        a, b = [load_file(Path(getattr(t, folder)) / "adapter_model.safetensors") for t in (one, two)]
        apart = sum(float((a[k] - b[k]).pow(2).sum()) for k in a) ** 0.5
        assert apart < 0.03 * sum(float(a[k].pow(2).sum()) for k in a) ** 0.5, folder


@pytest.mark.slow
def test_two_process_zero2_kto_killed_mid_alignment_resumes_to_where_an_uninterrupted_run_ends(aligned):
    """SIGKILL to the training processes after the first alignment checkpoint: the rerun resumes from it, reads the
    kept reference log-probabilities and ends with the uninterrupted run's weights and metrics."""
    import signal
    import threading
    import time

    import torch
    from safetensors.torch import load_file

    recipe, ctx, data, model, env = aligned(objective="kto", sft_steps=2, max_steps=8, checkpoint_every=2, beta=0.5)
    cfg, straight_ctx, two_env = _two_processes(recipe, ctx, model, "straight", 2)
    straight = fine_tune.fn(cfg, recipe.model, data, model, two_env, straight_ctx)

    _, crashed_ctx, crashed_env = _two_processes(recipe, ctx, model, "crashed", 2)
    sealed = Path(crashed_ctx.work_dir, "finetune", "distributed", "checkpoints", "step-000004")
    done = threading.Event()

    def kill_at_checkpoint():
        while not done.is_set():
            if sealed.is_dir():
                for proc in _workers(Path(crashed_ctx.work_dir)):
                    proc.send_signal(signal.SIGKILL)
                return
            time.sleep(0.02)

    killer = threading.Thread(target=kill_at_checkpoint, daemon=True)
    killer.start()
    try:
        with pytest.raises(RuntimeError, match="distributed training failed"):
            fine_tune.fn(cfg, recipe.model, data, model, crashed_env, crashed_ctx)
    finally:
        done.set()
        killer.join()
    ref_path = Path(crashed_ctx.work_dir, "finetune", "reference_logps.pt")
    kept = ref_path.read_bytes()
    resumed = fine_tune.fn(cfg, recipe.model, data, model, crashed_env, crashed_ctx)
    assert resumed.resumed_from in (4, 6), resumed.resumed_from  # past the 2 supervised steps
    assert ref_path.read_bytes() == kept, "the resumed run read the reference, it did not score the rows again"
    assert abs(resumed.final_loss - straight.final_loss) < 1e-4 * max(1.0, abs(straight.final_loss))
    expected = load_file(Path(straight.output_dir) / "adapter_model.safetensors")
    got = load_file(Path(resumed.output_dir) / "adapter_model.safetensors")
    assert all(torch.allclose(expected[k], got[k], atol=1e-5) for k in expected)
    assert json.loads(Path(resumed.start_dir, "training_summary.json").read_text()) == {"sft_steps": 2}


@pytest.mark.slow
@pytest.mark.parametrize("objective,stage", [("ppo", 2), ("grpo", 0)])
def test_two_process_on_policy_alignment_samples_on_each_rank_from_the_frozen_starting_adapter(aligned, objective,
                                                                                                stage):
    """GRPO or PPO after supervised steps in two processes: the KL to the frozen starting adapter starts at 0 on every
    rank, rank 0 logs the method's metrics once per step, and PPO keeps each rank's rollouts and its value head."""
    from tunewright.scoring import reward_model

    recipe, ctx, data, model, env = aligned(objective=objective, sft_steps=2, max_steps=5, beta=0.1, ppo_epochs=2,
                                            num_generations=2, max_new_tokens=6, reward="json_valid")
    cfg, two_ctx, two_env = _two_processes(recipe, ctx, model, "two", stage)
    trained = fine_tune.fn(cfg, recipe.model, data, model, two_env, two_ctx)
    assert trained.objective == objective and trained.reward == "json_valid"
    run = _stage_runs(ctx)["2"]
    kl = _history(ctx, run, f"{objective}_kl")
    assert [s for s, _ in kl] == [3, 4, 5] and abs(kl[0][1]) < 1e-4, kl
    assert [s for s, _ in _history(ctx, run, f"{objective}_reward_mean")] == [3, 4, 5]
    if objective == "ppo":
        assert (Path(trained.output_dir) / reward_model.VALUE_HEAD_FILE).is_file()
        rollouts = Path(two_ctx.work_dir, "finetune", "distributed", "ppo_rollouts")
        assert sorted(str(p.relative_to(rollouts)) for p in rollouts.rglob("*.pt")) == [
            "rank0/rollout-000000.pt", "rank0/rollout-000001.pt", "rank1/rollout-000000.pt", "rank1/rollout-000001.pt"]
