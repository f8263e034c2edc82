"""What was asked and how it was answered: the user text of training records and logged requests, windows of the
request log `tunewright serve` writes, and the service levels of a window."""

from __future__ import annotations

import re
from pathlib import Path

from tunewright.files import jsonl_lines


def user_text(messages: list[dict]) -> str:
    """The user turns of a conversation, one per line."""
    return "\n".join(m["content"] for m in messages if m["role"] == "user")


def split_prompt(record: dict) -> str:
    """The user text of a split record: its chat `messages`, or the `prompt` of a preference pair or feedback row."""
    return user_text(record["messages"] if "messages" in record else record["prompt"])


def request_prompt(rec: dict) -> str | None:
    """The user text of a logged request: its `prompt` (completions), or the user turns of its `messages` (chat)."""
    if "prompt" in rec:
        return str(rec["prompt"])
    if "messages" in rec:
        return user_text(rec["messages"])
    return None


def read_requests(path: Path) -> list[str]:
    """User prompts from a JSONL of production requests (`prompt` or `messages` per line); requests the server
    refused (a `status` other than 200 in `tunewright serve`'s log) are not traffic the model answered."""
    prompts = []
    with path.open(encoding="utf-8") as fh:
        for lineno, rec in jsonl_lines(fh, str(path)):
            if rec.get("status", 200) != 200:
                continue
            prompt = request_prompt(rec)
            if prompt is None:
                raise ValueError(f"{path} line {lineno}: expected a 'prompt' or 'messages' field")
            prompts.append(prompt)
    return prompts


def _window_files(names: list[str], start: float, end: float) -> list[str]:
    """Rotated log files whose window could hold records in [start, end): named by their window start (UTC)."""
    from datetime import datetime, timezone

    keep = []
    for name in names:
        m = re.search(r"requests-(\d{8}T\d{6}Z)", name)
        if m is None:
            continue
        t = datetime.strptime(m.group(1), "%Y%m%dT%H%M%SZ").replace(tzinfo=timezone.utc).timestamp()
        if start - 86400 <= t < end:
            keep.append(name)
    return sorted(keep)


def read_window(source: str, start: float, end: float) -> list[dict]:
    """Request-log records with a timestamp in [start, end): from a .jsonl file, a folder of rotated files, or an
    s3:// prefix (`tunewright serve --request-log`)."""
    texts: list[tuple[str, str]] = []
    if source.startswith("s3://"):
        import boto3

        bucket, _, prefix = source[5:].partition("/")
        s3 = boto3.client("s3")
        names = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
                 for o in page.get("Contents", [])]
        texts = [(f"s3://{bucket}/{k}", s3.get_object(Bucket=bucket, Key=k)["Body"].read().decode("utf-8"))
                 for k in _window_files(names, start, end)]
    else:
        path = Path(source)
        if path.is_dir():
            texts = [(str(path / n), (path / n).read_text(encoding="utf-8"))
                     for n in _window_files([p.name for p in path.glob("requests-*.jsonl")], start, end)]
        elif path.is_file():
            texts = [(str(path), path.read_text(encoding="utf-8"))]
        else:
            raise FileNotFoundError(f"monitor.request_log: {source} not found")
    # a line a server killed mid-write left unfinished costs only itself (the log starts the next on a new line)
    return [rec for where, text in texts for lineno, rec in jsonl_lines(text.splitlines(), where, skip_bad=True)
            if start <= _record_time(rec, where, lineno) < end]


def _record_time(rec: dict, where: str, lineno: int) -> float:
    """When a logged request was answered: its ISO `time` as `tunewright serve` writes it (or epoch `_ts`)."""
    from datetime import datetime, timezone

    if "time" in rec:
        try:
            when = datetime.fromisoformat(str(rec["time"]).replace("Z", "+00:00"))
        except ValueError:
            raise ValueError(f"{where} line {lineno}: time {rec['time']!r} is not an ISO 8601 timestamp") from None
        return (when if when.tzinfo else when.replace(tzinfo=timezone.utc)).timestamp()
    if "_ts" in rec:
        return float(rec["_ts"])
    raise ValueError(f"{where} line {lineno}: no `time` field")


def service_figures(records: list[dict]) -> dict:
    """Latency percentiles of answered requests, the server-error rate, and refusals by status."""
    import numpy as np

    answered = [r for r in records if r.get("status") == 200]
    latencies = np.array([float(r["latency_ms"]) / 1000 for r in answered if r.get("latency_ms") is not None])
    statuses = [int(r.get("status") or 0) for r in records]
    return {"requests": len(records), "answered": len(answered),
            "p50_seconds": float(np.percentile(latencies, 50)) if len(latencies) else 0.0,
            "p95_seconds": float(np.percentile(latencies, 95)) if len(latencies) else 0.0,
            "error_rate": sum(s >= 500 for s in statuses) / max(len(statuses), 1),
            "refused_429": sum(s == 429 for s in statuses), "client_errors": sum(400 <= s < 500 and s != 429
                                                                                 for s in statuses)}
