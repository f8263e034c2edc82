"""Stage 4, fine-tuning: one training loop and the launchers that run it.

`loop` is the loop (batches, schedules, rollouts, the step for every objective); `objectives` holds each
alignment objective's loss; `stage.fine_tune` is the Prefect task, running the loop in its own process or
handing it to torchrun ranks (`distributed`); `checkpoints` writes and finds resumable states; `perf` measures
throughput against the device's peak; `kernels` says which of the step's speed-ups a run uses. What gets trained
(full, Half Fine-Tuning, or a PEFT adapter over a possibly quantised base) is `tunewright.train.methods`.
"""

from tasks.artifacts import TrainArtifact
from tasks.finetune.stage import fine_tune

__all__ = ["TrainArtifact", "fine_tune"]
