"""Reading the split files stage 1 writes (every later stage reads them)."""

from __future__ import annotations

from tunewright.files import read_jsonl


def read_split(path: str) -> list[dict]:
    """Records of one split file written by `prepare_data`."""
    return read_jsonl(path)
