"""The records stage 1 writes: each example's line in a split file, quarantine entries, and the JSON-lines writers.

An example is light while stage 1 works on it (see rowwork.Chunk): its output record is already
serialised by the row work, and the optional fields this stage decides (fold, contamination) are
inserted into that text rather than parsing it again. Copies made by balancing are serialised here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# what an example's output record holds besides its id, label and origin, in order (see `split_record`); an sft
# example with tool calls has its `tools` too, where its row declares any
KIND_FIELDS = {"sft": ("messages",), "preference": ("prompt", "chosen", "rejected", "score_chosen", "score_rejected"),
               "feedback": ("prompt", "completion", "label"), "text": ("text",)}


def write_jsonl(path: Path, records) -> None:
    with path.open("w", encoding="utf-8") as fh:
        for rec in records:
            fh.write(json.dumps(rec, ensure_ascii=False, default=str) + "\n")


def write_examples(path: Path, examples: list[dict]) -> None:
    """Each example's output record, a line each."""
    with path.open("w", encoding="utf-8") as fh:
        for i in range(0, len(examples), 4096):
            fh.write("\n".join(map(record_json, examples[i:i + 4096])) + "\n")


def record_json(ex: dict) -> str:
    """`split_record(ex)` as JSON: from the record the row work serialised, with this stage's optional fields."""
    if "json" not in ex or "copy_of" in ex or "augmented_from" in ex:  # copies made here are serialised here
        return json.dumps(split_record(ex), ensure_ascii=False, default=str)
    text = ex["json"]
    fold, seen = ex.get("fold"), ex.get("contaminated")
    if fold is None and seen is None:
        return text
    cut = ex["cut"]
    extra = (f', "fold": {json.dumps(fold)}' if fold is not None else "") + (
        f', "contaminated": {json.dumps(seen, ensure_ascii=False, default=str)}' if seen is not None else "")
    return text[:cut] + extra + text[cut:]


def full(ex: dict) -> dict:
    """A light example with its turns or text as well, read back from its record."""
    if "json" in ex and KIND_FIELDS[ex["kind"]][0] not in ex:
        rec = json.loads(ex["json"])
        for key in KIND_FIELDS[ex["kind"]]:
            ex[key] = rec[key]
        if "tools" in rec:
            ex["tools"] = rec["tools"]
    return ex


def split_record(ex: dict) -> dict:
    """An example's record in a split file: its content, label, fold and origin."""
    if "json" in ex and "copy_of" not in ex and "augmented_from" not in ex:
        return json.loads(record_json(ex))
    full(ex)
    rec: dict[str, Any] = {"id": ex["id"]}
    for key in KIND_FIELDS[ex["kind"]]:
        rec[key] = ex[key]
    if ex.get("tools"):
        rec["tools"] = ex["tools"]
    if ex.get("class") is not None and ex["kind"] != "feedback":
        rec["label"] = ex["class"]
    for key in ("fold", "copy_of", "augmented_from", "contaminated"):
        if ex.get(key) is not None:
            rec[key] = ex[key]
    rec["source"], rec["where"] = ex["source"], ex["where"]
    return rec


def quarantined(ex: dict, reasons: list[str]) -> dict:
    """The quarantine entry of an example the gate rejects: where it came from, why, and its record."""
    rec = split_record(ex)
    return {"source": ex["source"], "row": ex["row"], "where": ex["where"], "id": ex["id"],
            "reasons": [f"{ex['where']}: {r}" for r in reasons], "record": rec}
