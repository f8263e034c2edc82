"""Cross-validation splits from the folds stage 1 assigns (`data.balance.kfolds`).

The training split is divided by each example's fold: fold i is held out and the others train. The
validation split stays as it is (validation loss during training), and the test split is not touched,
so a cross-validation never sees the examples the final evaluation scores.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from prefect import task

from tasks.artifacts import DataArtifact
from tunewright.logs import stage_logger
from tunewright.registry.tracking import RunContext


@task(name="1-fold-splits")
def fold_splits(data: DataArtifact, k: int, ctx: RunContext) -> list[DataArtifact]:
    """One DataArtifact per fold: training rows of the other folds, and this fold's rows as its test split."""
    log = stage_logger()
    if k < 2:
        raise ValueError("cross-validation needs data.balance.kfolds of at least 2 (stage 1 assigns the folds)")
    lines = [line for line in open(data.train_path, encoding="utf-8") if line.strip()]
    folds = []
    for n, line in enumerate(lines, 1):
        fold = json.loads(line).get("fold")
        if fold is None:
            raise ValueError(f"{data.train_path}:{n}: no fold; stage 1 assigns them with data.balance.kfolds")
        folds.append(int(fold))
    out = []
    for i in range(k):
        folder = Path(ctx.work_dir, "folds", f"fold-{i}")
        folder.mkdir(parents=True, exist_ok=True)
        train = [line for line, f in zip(lines, folds) if f != i]
        held = [line for line, f in zip(lines, folds) if f == i]
        if not held or not train:
            raise ValueError(f"fold {i} of {k} has {len(held)} held-out and {len(train)} training rows; "
                             "use fewer folds or more data")
        (folder / "train.jsonl").write_text("".join(train), encoding="utf-8")
        (folder / "test.jsonl").write_text("".join(held), encoding="utf-8")
        out.append(replace(data, train_path=str(folder / "train.jsonl"), test_path=str(folder / "test.jsonl"),
                           n_train=len(train), n_test=len(held), digest=f"{data.digest}-fold{i}of{k}"))
        log.info("fold %d of %d: %d training rows, %d held out", i, k, len(train), len(held))
    return out
