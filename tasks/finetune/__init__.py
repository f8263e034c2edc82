"""Stage 4, fine-tuning: methods, checkpoints and the training loop.

`stage.fine_tune` is the Prefect task; `tunewright.train.methods` builds what is trained (full, Half
Fine-Tuning, or a PEFT adapter over a possibly quantised base); `checkpoints` writes and finds
resumable states; `perf` measures throughput against the device's peak.
"""

from tasks.artifacts import TrainArtifact
from tasks.finetune.stage import fine_tune

__all__ = ["TrainArtifact", "fine_tune"]
