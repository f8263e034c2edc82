"""Programmatic rewards: how good an answer is against the reference, as a number in [0, 1].

GRPO and PPO train on them (`train.reward`), or on a trained reward model (`train.reward_model`), and
stage 5 reports the same reward's mean on held-out prompts, so an alignment run is judged by the
reward it was trained for.
"""

from __future__ import annotations

import json
from typing import Callable

from tunewright.recipe.names import REWARDS
from tunewright.scoring.metrics import parse_json_answer


def _whole_json(text: str) -> dict | None:
    try:
        value = json.loads(text.strip())
    except json.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


def json_match(answer: str, reference: str) -> float:
    """Share of the reference's JSON fields the answer gets right; halved when the JSON sits inside other text, 0 when
    there is no JSON object."""
    gold = parse_json_answer(reference)
    if gold is None:
        raise ValueError(f"train.reward json_match: a reference answer is not JSON: {reference[:80]!r}")
    whole = _whole_json(answer)
    pred = whole if whole is not None else parse_json_answer(answer)
    if pred is None:
        return 0.0
    share = sum(pred.get(k) == v for k, v in gold.items()) / max(len(gold), 1)
    if set(pred) - set(gold):  # invented fields cost like wrong ones
        share *= len(gold) / len(set(pred) | set(gold))
    return share if whole is not None else share / 2


def json_valid(answer: str, reference: str) -> float:
    """1 when the whole answer is one JSON object, else 0."""
    return float(_whole_json(answer) is not None)


def exact_match(answer: str, reference: str) -> float:
    return float(answer.strip() == reference.strip())


def get(name: str) -> Callable[[str, str], float]:
    try:
        return {"json_match": json_match, "json_valid": json_valid, "exact_match": exact_match}[name]
    except KeyError:
        raise ValueError(f"unknown reward '{name}' (known: {', '.join(REWARDS)})") from None


def scorer(reward: str, device=None) -> Callable[[list, list[str], list[str]], list[float]]:
    """`score(prompts, answers, references)`: one reward per answer, from a programmatic reward by name, or from a
    reward model (an MLflow model URI or a reward run's stage-4 folder; `tunewright.scoring.reward_model`)."""
    if reward in REWARDS:
        fn = get(reward)
        return lambda prompts, answers, refs: [fn(a, r) for a, r in zip(answers, refs)]
    from tunewright.scoring.reward_model import load_scorer

    model = load_scorer(reward, device)
    return lambda prompts, answers, refs: model.score(prompts, answers)
