"""Stage 4's intermediate validation losses, handed to whoever watches the run: a search's trial.

Stage 4 calls `should_stop(run_id, step, val_loss)` after every `train.eval_every` validation. A
hyperparameter search registers a judge for its trial's MLflow run with `watching`; the judge
records the value (Optuna's `trial.report`) and says whether the trial is pruned. Outside a
search nobody watches and training runs to the end.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass


@dataclass
class Watch:
    """One watched run: the judge, and where it stopped the run (None while it runs on)."""

    judge: Callable[[int, float], bool]
    pruned_at: int | None = None
    pruned_value: float | None = None


_watches: dict[str, Watch] = {}
_lock = threading.Lock()


@contextmanager
def watching(run_id: str, judge: Callable[[int, float], bool]) -> Iterator[Watch]:
    """Let `judge(step, value)` see the validation losses of the pipeline run `run_id` and stop it."""
    watch = Watch(judge)
    with _lock:
        _watches[run_id] = watch
    try:
        yield watch
    finally:
        with _lock:
            _watches.pop(run_id, None)


def should_stop(run_id: str, step: int, value: float) -> bool:
    """Report a validation loss of run `run_id` at optimiser step `step`; True when its watcher prunes it."""
    watch = _watches.get(run_id)
    if watch is None or not watch.judge(step, value):
        return False
    watch.pruned_at, watch.pruned_value = step, value
    return True


def pruned(run_id: str) -> bool:
    """Whether the watcher of run `run_id` stopped it."""
    watch = _watches.get(run_id)
    return watch is not None and watch.pruned_at is not None
