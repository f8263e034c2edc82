"""Replay recorded requests against an OpenAI-compatible server with the official `openai` client.

The demo's production traffic (`data/support_tickets/production.jsonl`) sent to `tunewright serve`, so that the
request log holds a real window of served, drifted traffic for the monitoring flow to judge.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

from tunewright.files import jsonl_lines


class ReplayError(ValueError):
    """A request file or server that cannot be replayed, named with the file and line."""


def _records(path: Path):
    """(line number, record) of a JSONL file, blank lines skipped; a line that is not JSON is named."""
    with path.open(encoding="utf-8") as fh:
        try:
            yield from jsonl_lines(fh, str(path))
        except UnicodeDecodeError:
            raise
        except ValueError as exc:  # a line that is not JSON: the reader's error names the file and line
            raise ReplayError(str(exc)) from None


def _system_prompt(path: Path) -> str:
    for _, rec in _records(path):
        for m in rec.get("messages") or []:
            if isinstance(m, dict) and m.get("role") == "system":
                return str(m.get("content") or "")
    raise ReplayError(f"{path}: no system message in any record")


def load_requests(path: Path, system: str | None = None, limit: int | None = None) -> list[list[dict]]:
    """Chat messages per request: a record's `messages` without its final assistant answer, or its `prompt` as the
    user message after `system`."""
    if not path.is_file():
        raise ReplayError(f"{path}: file not found")
    requests = []
    for lineno, rec in _records(path):
        if isinstance(rec.get("messages"), list) and rec["messages"]:
            messages = [m for m in rec["messages"] if isinstance(m, dict)]
            if messages and messages[-1].get("role") == "assistant":
                messages = messages[:-1]
        elif isinstance(rec.get("prompt"), str):
            messages = ([{"role": "system", "content": system}] if system else []) + [
                {"role": "user", "content": rec["prompt"]}]
        else:
            raise ReplayError(f"{path} line {lineno}: expected `messages` or `prompt`")
        requests.append(messages)
        if limit and len(requests) >= limit:
            break
    if not requests:
        raise ReplayError(f"{path}: no requests")
    return requests


def replay(path: Path, *, url: str, model: str | None = None, concurrency: int = 4, limit: int | None = None,
           max_tokens: int = 64, system_from: Path | None = None,
           progress: Callable[[str], None] | None = None) -> dict:
    """Send every request (greedy, at most `max_tokens`), `concurrency` at a time; return the figures."""
    import numpy as np
    import openai

    system = _system_prompt(system_from) if system_from else None
    requests = load_requests(path, system, limit)
    client = openai.OpenAI(base_url=url, api_key=os.environ.get("TUNEWRIGHT_API_KEY") or "none", max_retries=0,
                           timeout=600)
    if model is None:
        try:
            served = [m.id for m in client.models.list().data]
        except openai.APIError as exc:
            raise ReplayError(f"{url}: cannot list the served models ({exc})") from None
        if not served:
            raise ReplayError(f"{url}: serves no model")
        model = served[0]
    latencies: list[float] = []
    errors: list[str] = []
    done = 0

    def one(messages: list[dict]) -> None:
        nonlocal done
        t0 = time.perf_counter()
        try:
            client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens, temperature=0)
            latencies.append(time.perf_counter() - t0)
        except openai.APIError as exc:
            errors.append(f"{type(exc).__name__}: {exc}")
        done += 1
        if progress and (done % 25 == 0 or done == len(requests)):
            progress(f"  {done}/{len(requests)} sent, {len(errors)} failed")

    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        list(pool.map(one, requests))
    seconds = time.perf_counter() - start
    lat = np.array(latencies) if latencies else np.zeros(1)
    return {"model": model, "sent": len(requests), "ok": len(latencies), "errors": len(errors),
            "first_errors": errors[:3], "seconds": seconds, "req_per_s": len(requests) / max(seconds, 1e-9),
            "p50_seconds": float(np.percentile(lat, 50)), "p95_seconds": float(np.percentile(lat, 95))}
