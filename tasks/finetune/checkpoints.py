"""Resumable training states, written atomically and verified before use.

A checkpoint is a folder `step-NNNNNN/` holding the trainable weights, optimiser, scheduler and
RNG states, the data position and loop state, and a `manifest.json` (written last) with the
SHA-256 of every file. It is built in a temporary folder and renamed into place, so a crash
leaves either a complete checkpoint or a `.tmp-*` folder that is ignored; a checkpoint whose
files no longer match its manifest is skipped with a warning.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

from tunewright.files import sha256_file

MANIFEST = "manifest.json"


def rng_state() -> dict:
    import numpy as np
    import torch

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    import numpy as np
    import torch

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(root: Path, step: int, params: dict[str, Any], optimizer: Any, scheduler: Any, loop_state: dict,
         keep: int) -> Path:
    """Write the checkpoint for `step` atomically and prune all but the newest `keep`."""
    import torch
    from safetensors.torch import save_file

    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:06d}"
    tmp = root / f".tmp-step-{step:06d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file({k: v.detach().contiguous().cpu() for k, v in params.items()}, tmp / "trainable.safetensors")
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng_state()},
               tmp / "trainer_state.pt")
    return seal(tmp, final, step, loop_state, keep)


def seal(tmp: Path, final: Path, step: int, loop_state: dict, keep: int) -> Path:
    """Finish a checkpoint written into `tmp`: loop state, manifest last, rename to `final`, prune old ones."""
    (tmp / "loop_state.json").write_text(json.dumps({**loop_state, "step": step}, indent=2))
    files = {str(f.relative_to(tmp)): sha256_file(f) for f in sorted(tmp.rglob("*")) if f.is_file()}
    (tmp / MANIFEST).write_text(json.dumps({"step": step, "files": files}, indent=2))
    with open(tmp / MANIFEST) as fh:
        os.fsync(fh.fileno())
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in complete(final.parent)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def complete(root: Path) -> list[Path]:
    """Checkpoint folders that finished writing (have a manifest), oldest first."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step-*") if (p / MANIFEST).is_file())


def verify(path: Path) -> str | None:
    """None if the checkpoint's files match its manifest, else what is wrong."""
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        return f"unreadable manifest: {exc}"
    for name, digest in manifest["files"].items():
        f = path / name
        if not f.is_file():
            return f"missing {name}"
        if sha256_file(f) != digest:
            return f"{name} does not match its checksum"
    return None


def latest(root: Path, log: Any = None) -> Path | None:
    """The newest checkpoint that verifies; corrupt or partial ones are reported and skipped."""
    for path in reversed(complete(root)):
        problem = verify(path)
        if problem is None:
            return path
        if log is not None:
            log.warning("skipping checkpoint %s: %s", path.name, problem)
    return None


def load(path: Path, params: dict[str, Any], optimizer: Any, scheduler: Any) -> dict:
    """Restore weights, optimiser, scheduler and RNG; return the loop state."""
    import torch
    from safetensors.torch import load_file

    tensors = load_file(path / "trainable.safetensors")
    missing = set(params) - set(tensors)
    if missing:
        raise ValueError(f"checkpoint {path} lacks {len(missing)} trainable tensors, e.g. {sorted(missing)[0]}")
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(tensors[name].to(param.device, param.dtype))
    state = torch.load(path / "trainer_state.pt", weights_only=False)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    return json.loads((path / "loop_state.json").read_text())
