"""Checkpoints: atomic, verified, pruned; a run killed with SIGKILL resumes to the same final loss."""

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tasks.finetune import checkpoints
from tests.conftest import cli_env, wait_until


class _Log:
    def __init__(self):
        self.warnings = []

    def warning(self, msg, *args):
        self.warnings.append(msg % args)


def _state():
    layer = torch.nn.Linear(4, 4)
    opt = torch.optim.AdamW(layer.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    layer(torch.ones(1, 4)).sum().backward()
    opt.step()
    sched.step()
    return layer, opt, sched


def test_save_then_load_restores_weights_optimizer_rng_and_loop_state(tmp_path):
    layer, opt, sched = _state()
    named = dict(layer.named_parameters())
    checkpoints.save(tmp_path, 3, named, opt, sched, {"tokens": 7}, keep=2)
    expected_next = torch.rand(2)
    saved = {k: v.detach().clone() for k, v in named.items()}
    with torch.no_grad():
        layer.weight.add_(1.0)
    layer2, opt2, sched2 = _state()
    loop = checkpoints.load(checkpoints.latest(tmp_path), dict(layer2.named_parameters()), opt2, sched2)
    assert loop == {"tokens": 7, "step": 3}
    assert all(torch.equal(saved[k], v) for k, v in layer2.named_parameters())
    assert torch.equal(torch.rand(2), expected_next), "torch RNG state restored"
    assert opt2.state_dict()["state"][0]["step"] == opt.state_dict()["state"][0]["step"]


def test_only_the_newest_checkpoints_are_kept_and_partial_ones_are_ignored(tmp_path):
    layer, opt, sched = _state()
    for step in (2, 4, 6):
        checkpoints.save(tmp_path, step, dict(layer.named_parameters()), opt, sched, {}, keep=2)
    (tmp_path / ".tmp-step-000008-123").mkdir()  # a crash mid-write
    (tmp_path / "step-000010").mkdir()           # renamed but no manifest: impossible, still ignored
    assert [p.name for p in checkpoints.complete(tmp_path)] == ["step-000004", "step-000006"]
    assert checkpoints.latest(tmp_path).name == "step-000006"


def test_a_corrupt_checkpoint_is_reported_and_the_previous_one_used(tmp_path):
    layer, opt, sched = _state()
    for step in (2, 4):
        checkpoints.save(tmp_path, step, dict(layer.named_parameters()), opt, sched, {}, keep=3)
    weights = tmp_path / "step-000004" / "trainable.safetensors"
    weights.write_bytes(weights.read_bytes()[:-3] + b"xyz")
    log = _Log()
    assert checkpoints.latest(tmp_path, log).name == "step-000002"
    assert "trainable.safetensors does not match its checksum" in log.warnings[0]


def _cli(recipe: Path, home: Path, *extra: str, **popen):
    env = cli_env(TUNEWRIGHT_HOME=str(home), MLFLOW_TRACKING_URI=f"sqlite:///{home}/mlflow.db")
    args = [sys.executable, "-m", "tunewright.cli", "run", str(recipe), *extra]
    return subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, **popen)


def _summary(home: Path) -> dict:
    [path] = home.glob("runs/*/finetune/adapter/training_summary.json")
    return json.loads(path.read_text())


@pytest.mark.slow
def test_sigkill_mid_training_then_resume_matches_an_uninterrupted_run(tiny_recipe, tmp_path):
    sets = ["--set", "train.max_steps=120", "--set", "train.checkpoint_every=20", "--set", "train.log_every=20",
            "--set", "evaluate.max_examples=2", "--set", "deploy.verify_samples=0"]
    killed_home = tmp_path / "killed"
    proc = _cli(tiny_recipe, killed_home, *sets)
    ckpts = killed_home / "runs"

    def step_60_saved():
        assert proc.poll() is None, proc.stdout.read()
        return list(ckpts.glob("*/finetune/checkpoints/step-000060"))

    try:
        wait_until(step_60_saved, 300, "the step-60 checkpoint", every=0.05)
    finally:
        with contextlib.suppress(ProcessLookupError):  # it exited by itself: the assertion above says how
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    [run_dir] = list(ckpts.iterdir())
    done = sorted(p.name for p in (run_dir / "finetune/checkpoints").glob("step-*"))
    assert done and "adapter" not in {p.name for p in (run_dir / "finetune").iterdir()}, "killed before the end"

    resumed = _cli(tiny_recipe, killed_home, *sets, "--resume")
    out, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, out[-3000:]
    assert "resuming from checkpoint step-" in out
    assert [p.name for p in ckpts.iterdir()] == [run_dir.name], "the same MLflow run continued"
    resumed_from = _summary(killed_home)["resumed_from"]
    assert resumed_from >= 60 and f"step-{resumed_from:06d}" in done[-1]

    straight = _cli(tiny_recipe, tmp_path / "straight", *sets)
    out2, _ = straight.communicate(timeout=600)
    assert straight.returncode == 0, out2[-3000:]
    a, b = _summary(killed_home), _summary(tmp_path / "straight")
    assert a["steps_done"] == b["steps_done"] == 120
    assert abs(a["final_train_loss"] - b["final_train_loss"]) < 1e-3 * max(1.0, abs(b["final_train_loss"]))
