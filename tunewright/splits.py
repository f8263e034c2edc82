"""Reading the split files stage 1 writes (every later stage reads them)."""

from __future__ import annotations

import json


def read_split(path: str) -> list[dict]:
    """Records of one split file written by `prepare_data`."""
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]
