"""Task metrics shared by evaluation and deployment checks."""

from __future__ import annotations

import json


def parse_json_answer(text: str):
    """The first JSON object in a model's answer, or None."""
    start = text.find("{")
    if start < 0:
        return None
    try:
        value, _ = json.JSONDecoder().raw_decode(text[start:])
    except json.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


def score(metric: str, predictions: list[str], references: list[str]) -> tuple[float, dict[str, float], list[bool]]:
    """(overall score, per-field accuracy, per-example correctness) for a metric."""
    if metric == "exact_match":
        hits = [p.strip() == r.strip() for p, r in zip(predictions, references)]
        return sum(hits) / max(len(hits), 1), {}, hits
    hits, field_hits, field_total = [], {}, {}
    for p, r in zip(predictions, references):
        gold = parse_json_answer(r)
        if gold is None:
            raise ValueError(f"evaluate.metric json_exact_match: a reference answer is not JSON: {r[:80]!r}")
        pred = parse_json_answer(p) or {}
        hits.append(pred == gold)
        for key, value in gold.items():
            field_total[key] = field_total.get(key, 0) + 1
            field_hits[key] = field_hits.get(key, 0) + (pred.get(key) == value)
    fields = {k: field_hits[k] / field_total[k] for k in field_total}
    return sum(hits) / max(len(hits), 1), fields, hits


def same_answer(prediction: str, reference: str) -> bool:
    """Whether an answer is the reference: when the reference is JSON, the answer is that JSON object and nothing
    else (key order and spacing aside); otherwise the stripped texts are equal."""
    gold = parse_json_answer(reference)
    if gold is None:
        return prediction.strip() == reference.strip()
    try:
        return json.loads(prediction) == gold
    except json.JSONDecodeError:
        return False
