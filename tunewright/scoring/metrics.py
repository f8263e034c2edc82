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
    if metric == "tool_call_accuracy":
        return tool_call_scores(predictions, references)
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


def _sorted_calls(calls: list[dict]) -> list[dict]:
    return sorted(calls, key=lambda c: (c["name"], json.dumps(c["arguments"], sort_keys=True, default=str)))


def tool_call_scores(predictions: list[str], references: list[str]) -> tuple[float, dict[str, float], list[bool]]:
    """(tool-call accuracy, per-field accuracy, per-example correctness) of answers against reference answers.

    Calls are read from both with `tunewright.chat.parse_tool_calls`. An example is right when it calls the same
    tools with arguments equal as JSON (key order and spacing aside; parallel calls in any order), or, where the
    reference calls no tool, when the answer calls none. Fields: `tool` (the right tools called, or none) and
    `arg_<name>` for each argument a reference call passes (equal value in the same-named call).
    """
    from tunewright.chat import parse_tool_calls

    hits: list[bool] = []
    field_hits: dict[str, int] = {}
    field_total: dict[str, int] = {}

    def count(key: str, right: bool) -> None:
        field_total[key] = field_total.get(key, 0) + 1
        field_hits[key] = field_hits.get(key, 0) + right

    for p, r in zip(predictions, references):
        gold = _sorted_calls(parse_tool_calls(r)[1] or [])
        pred = _sorted_calls(parse_tool_calls(p)[1] or [])
        hits.append([(c["name"], c["arguments"]) for c in pred] == [(c["name"], c["arguments"]) for c in gold])
        count("tool", sorted(c["name"] for c in pred) == sorted(c["name"] for c in gold))
        for call in gold:
            match = next((c for c in pred if c["name"] == call["name"]), {"arguments": {}})
            for key, value in call["arguments"].items():
                count(f"arg_{key}", key in match["arguments"] and match["arguments"][key] == value)
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


# ---- the metrics a recipe can choose for stage 5 (evaluate.metrics), scored per model on the same test set ----
TEXT_METRICS = ("token_f1", "rouge_l", "bleu", "chrf")
LABEL_METRICS = ("accuracy", "macro_f1")
STRUCTURE_METRICS = ("json_valid", "schema_valid")
_PUNCT = str.maketrans({c: " " for c in "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~"})


def _tokens(text: str) -> list[str]:
    return text.lower().translate(_PUNCT).split()


def token_f1(prediction: str, reference: str) -> float:
    """Harmonic mean of token precision and recall (lower-cased, punctuation dropped; SQuAD style)."""
    from collections import Counter

    pred, gold = _tokens(prediction), _tokens(reference)
    if not pred or not gold:
        return float(pred == gold)
    common = sum((Counter(pred) & Counter(gold)).values())
    if not common:
        return 0.0
    precision, recall = common / len(pred), common / len(gold)
    return 2 * precision * recall / (precision + recall)


def answer_label(text: str, field: str | None) -> str:
    """The label an answer gives: its JSON field `field`, or the stripped text when no field is named."""
    if field is None:
        return text.strip()
    parsed = parse_json_answer(text)
    value = None if parsed is None else parsed.get(field)
    return "<none>" if value is None else str(value)


def macro_f1(predicted: list[str], gold: list[str]) -> float:
    """F1 per reference class, averaged with equal weight (a class never predicted scores 0)."""
    classes = sorted(set(gold))
    f1s = []
    for c in classes:
        tp = sum(p == c and g == c for p, g in zip(predicted, gold))
        fp = sum(p == c and g != c for p, g in zip(predicted, gold))
        fn = sum(p != c and g == c for p, g in zip(predicted, gold))
        f1s.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    return sum(f1s) / len(f1s) if f1s else 0.0


def json_valid(text: str) -> bool:
    """The whole answer is one JSON object (whitespace aside)."""
    try:
        return isinstance(json.loads(text.strip()), dict)
    except json.JSONDecodeError:
        return False


def schema_validator(schema: dict):
    """A validator for a JSON schema; a schema that is not valid itself raises naming the problem."""
    from jsonschema import validators

    cls = validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


def text_scores(metrics: list[str], predictions: list[str], references: list[str], *, label_field: str | None = None,
                schema: dict | None = None) -> tuple[dict[str, float], dict[str, list]]:
    """(corpus score per metric, per-example score per metric where one exists) for one model's answers.

    BLEU and chrF are sacrebleu's corpus scores (0-1 here), with sentence scores per example for the table;
    ROUGE-L is rouge-score's F-measure; accuracy and macro-F1 compare `answer_label`s; `schema_valid` is the share
    of answers that are JSON and conform to `schema`.
    """
    summary: dict[str, float] = {}
    rows: dict[str, list] = {}
    n = max(len(references), 1)
    if "token_f1" in metrics:
        rows["token_f1"] = [token_f1(p, r) for p, r in zip(predictions, references)]
    if "rouge_l" in metrics:
        from rouge_score import rouge_scorer

        scorer = rouge_scorer.RougeScorer(["rougeL"])
        rows["rouge_l"] = [scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(predictions, references)]
    if "bleu" in metrics or "chrf" in metrics:
        import sacrebleu

        if "bleu" in metrics:
            summary["bleu"] = sacrebleu.corpus_bleu(predictions, [references]).score / 100
            rows["bleu"] = [sacrebleu.sentence_bleu(p, [r]).score / 100 for p, r in zip(predictions, references)]
        if "chrf" in metrics:
            summary["chrf"] = sacrebleu.corpus_chrf(predictions, [references]).score / 100
            rows["chrf"] = [sacrebleu.sentence_chrf(p, [r]).score / 100 for p, r in zip(predictions, references)]
    if "accuracy" in metrics or "macro_f1" in metrics:
        pred = [answer_label(p, label_field) for p in predictions]
        gold = [answer_label(r, label_field) for r in references]
        rows["label"] = pred
        if "accuracy" in metrics:
            summary["accuracy"] = sum(p == g for p, g in zip(pred, gold)) / n
        if "macro_f1" in metrics:
            summary["macro_f1"] = macro_f1(pred, gold)
    if "json_valid" in metrics:
        rows["json_valid"] = [json_valid(p) for p in predictions]
    if "schema_valid" in metrics:
        if schema is None:
            raise ValueError("evaluate.metrics schema_valid needs evaluate.json_schema")
        validator = schema_validator(schema)
        rows["schema_valid"] = [json_valid(p) and validator.is_valid(json.loads(p)) for p in predictions]
    for key, values in rows.items():
        if key != "label" and key not in summary:
            summary[key] = sum(float(v) for v in values) / n
    return summary, rows
