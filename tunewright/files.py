"""File helpers every stage shares: a file's SHA-256, JSON-lines records, and writes no reader sees half done.

A reader that opens a file (or a folder) written here either finds it whole or does not find it:
the content goes to a temporary name beside it, which is renamed over the target once complete.
The temporary name carries the process and thread, so writers of the same target do not clash.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

BLOCK = 1 << 20  # bytes read at a time when hashing


def hash_file_into(h, path: str | Path) -> None:
    """Feed a file's bytes into the hash object `h` (hashlib's), a block at a time."""
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(BLOCK), b""):
            h.update(block)


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    import hashlib

    h = hashlib.sha256()
    hash_file_into(h, path)
    return h.hexdigest()


def jsonl_lines(lines: Iterable[str], where: str, skip_bad: bool = False) -> Iterator[tuple[int, Any]]:
    """(line number, record) of each non-blank line; a line that is not JSON is an error naming `where` and the line,
    or with `skip_bad` a warning, and the line is skipped (a log a killed process left a line of unfinished)."""
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            yield lineno, json.loads(line)
        except json.JSONDecodeError as exc:
            if not skip_bad:
                raise ValueError(f"{where} line {lineno}: invalid JSON: {exc}") from None
            logging.getLogger("tunewright").warning("%s line %d: skipped, not a whole record (%s)", where, lineno, exc)


def read_jsonl(path: str | Path) -> list:
    """The records of a JSON-lines file, blank lines skipped; a line that is not JSON names the file and line."""
    with open(path, encoding="utf-8") as fh:
        return [rec for _, rec in jsonl_lines(fh, str(path))]


def _temporary(path: Path) -> Path:
    return path.with_name(f"{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")


def save_atomic(path: str | Path, save: Callable[[Path], None]) -> None:
    """`save(temporary path)` writes the content (e.g. `lambda p: torch.save(obj, p)`); it then becomes `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary(path)
    try:
        save(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_atomic(path: str | Path, content: str | bytes) -> None:
    """Write text (UTF-8) or bytes to `path` through a temporary file beside it."""
    if isinstance(content, str):
        save_atomic(path, lambda tmp: tmp.write_text(content, encoding="utf-8"))
    else:
        save_atomic(path, lambda tmp: tmp.write_bytes(content))


@contextmanager
def atomic_folder(target: str | Path) -> Iterator[Path]:
    """A fresh temporary folder beside `target` to fill; it becomes `target` when the block ends without error.

    When another process made `target` meanwhile, theirs is kept and this copy removed; when the block
    raises, the temporary folder is removed.
    """
    target = Path(target)
    tmp = _temporary(target)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if target.exists():
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        os.replace(tmp, target)
