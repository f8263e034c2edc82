"""LLM-as-judge: an OpenAI-compatible model grades answers against the reference (off by default).

The endpoint and key come from the environment (TUNEWRIGHT_JUDGE_BASE_URL / TUNEWRIGHT_JUDGE_API_KEY, else
OPENAI_BASE_URL / OPENAI_API_KEY), never from the recipe; `tunewright serve` is one such endpoint.
"""

from __future__ import annotations

import os
import re

from tunewright.recipe import JudgeConfig

_GRADE = re.compile(r"[1-5]")


def endpoint() -> tuple[str, str]:
    """(base URL, API key) of the judge; ValueError naming the variables when no endpoint is set."""
    url = os.environ.get("TUNEWRIGHT_JUDGE_BASE_URL") or os.environ.get("OPENAI_BASE_URL")
    if not url:
        raise ValueError("evaluate.judge.enabled: set TUNEWRIGHT_JUDGE_BASE_URL (or OPENAI_BASE_URL) to the judge's "
                         "OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1")
    return url, os.environ.get("TUNEWRIGHT_JUDGE_API_KEY") or os.environ.get("OPENAI_API_KEY") or "unused"


def grade(text: str) -> float | None:
    """A 1-5 grade read from the judge's reply, as 0-1; None when the reply holds no grade."""
    m = _GRADE.search(text or "")
    return None if m is None else (int(m.group(0)) - 1) / 4


def judge(cfg: JudgeConfig, prompts: list[str], references: list[str], answers: dict[str, list[str]],
          log) -> tuple[dict[str, float], dict[str, list[float | None]], str]:
    """(mean grade per model over the graded answers, per-example grades, the judge's model name)."""
    from openai import OpenAI

    url, key = endpoint()
    client = OpenAI(base_url=url, api_key=key, timeout=120.0, max_retries=2)
    model = cfg.model or os.environ.get("TUNEWRIGHT_JUDGE_MODEL") or client.models.list().data[0].id
    n = min(cfg.max_examples, len(prompts))
    grades: dict[str, list[float | None]] = {}
    for who, outs in answers.items():
        got: list[float | None] = []
        for i in range(n):
            reply = client.chat.completions.create(
                model=model, temperature=0, max_tokens=4,
                messages=[{"role": "system", "content": cfg.rubric},
                          {"role": "user", "content": f"REQUEST:\n{prompts[i]}\n\nREFERENCE:\n{references[i]}\n\n"
                                                      f"ANSWER:\n{outs[i]}"}])
            got.append(grade(reply.choices[0].message.content))
        grades[who] = got + [None] * (len(prompts) - n)
        read = [g for g in got if g is not None]
        log.info("judge %s at %s graded %d of %d %s answers (%d replies held no grade)", model, url, len(read), n,
                 who, n - len(read))
    means = {who: sum(g for g in gs if g is not None) / max(1, sum(g is not None for g in gs))
             for who, gs in grades.items()}
    return means, grades, model
