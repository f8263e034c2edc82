"""bench/gpu_scale.py at toy shapes on this machine: each arm in its own process, the figures written, and
stage 4's step agreeing with the Trainer's loss on the first steps."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_gpu_scale_bench_runs_its_arms_and_compares_them(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_scale.py"), "--tiny", "--steps", "3",
                           "--arms", "tw-1b-lora-b8,hf-1b-lora-b8,hf-liger-1b-lora-b8", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = json.loads((tmp_path / "gpu-scale-tiny-cpu.json").read_text())
    arms = {r["arm"]: r for r in info["results"]}
    assert info["matmul_peak_tflops"] > 0
    tw, hf = arms["tw-1b-lora-b8"], arms["hf-1b-lora-b8"]
    assert tw["tokens_per_second"] > 0 and hf["tokens_per_second"] > 0 and 0 < tw["mfu"] < 1
    assert tw["loss_gap_first_steps"] < 0.01  # the same loss as the Trainer's step on the same rows
    assert tw["micro_batch_tokens"] > 0 and "vs_hf" in tw
    assert arms["hf-liger-1b-lora-b8"]["skipped"]  # no CUDA here: said, not run
    assert "| tw-1b-lora-b8 |" in (tmp_path / "gpu-scale-tiny-cpu.md").read_text()
