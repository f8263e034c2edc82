"""`tunewright serve` as its own process under hostile input: a corpus of malformed bodies and field values answered
in OpenAI's error shape, counted and logged while `/health` stays quick; long prompts that cannot starve other
endpoints; and what the request log keeps when the server is killed mid-traffic."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
USER = [{"role": "user", "content": "My Orbit Mouse will not turn on. Order A12345."}]


@contextlib.contextmanager
def served(model_dir: Path, log: Path, *extra: str, env: dict | None = None):
    """`tunewright serve m=<model_dir>` in a process of its own on a free port, ready; killed on exit if still up."""
    import httpx

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "tunewright.cli", "serve", f"m={model_dir}", "--port", str(port),
                             "--request-log", str(log), *extra], env={**os.environ, **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and proc.poll() is None:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                break
        time.sleep(0.3)
    else:
        proc.kill()
        raise AssertionError(f"the server did not start:\n{proc.communicate()[0][-3000:]}")
    try:
        yield url, proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)  # as Ctrl-C: the request log writes what is queued
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()


def _records(log: Path) -> list[dict]:
    """The log's records; a last line cut short by a kill is not one."""
    out = []
    for line in log.read_text(encoding="utf-8").splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            out.append(json.loads(line))
    return out


def _corpus() -> list[tuple[str, str, bytes | None, dict]]:
    """(name, path, raw body or None for a JSON-encoded one in `fields`, fields): at least 200 malformed requests."""
    chat = {"model": "m", "messages": USER, "max_tokens": 1}
    comp = {"model": "m", "prompt": "Order A12345", "max_tokens": 1}
    cases: list[tuple[str, str, bytes | None, dict]] = []

    def raw(name, body: bytes, path=CHAT):
        cases.append((name, path, body, {}))

    def field(name, base, path, key, value):
        cases.append((f"{name} {key}={str(value)[:40]}", path, None, {**base, key: value}))

    # bodies that are not a JSON object, or not text
    for i, body in enumerate([b"", b"{", b"}", b"[]", b"null", b"42", b'"text"', b"{not json", b"{'model': 'm'}",
                              b'{"model": "m",}', b'{"model": "m" "messages": []}', b"\xff\xfe\xfd",
                              b'{"model": "m", "messages": [{"role": "user", "content": "\xc3\x28"}]}',
                              b'{"model": "\xed\xa0\x80"}', b"\x00" * 64, b"\xef\xbb\xbf{}", b"[" * 50_000 + b"]" * 50_000,
                              b'{"a":' * 50_000 + b"1" + b"}" * 50_000, b'{"model": "m", "messages": ' + b"[" * 10_000,
                              b'{"model": 1e999999}', b'{"model": "m", "messages": [], "max_tokens": 1e999999}',
                              b'{"model": "m", "temperature": NaN, "messages": []}',
                              b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "temperature": NaN}',
                              b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "top_p": Infinity}',
                              b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "temperature": -Infinity}',
                              b'{"model": "m", "messages": [{"role": "user", "content": "refund \\udc80"}]}',
                              b'{"model": "m", "messages": [{"role": "user", "content": "\\ud800\\ud800"}]}',
                              b'{"model": "m", "messages": [{"role": "user", "content": [{"type": "text", '
                              b'"text": "\\udfff"}]}]}']):
        raw(f"raw {i}", body)
        raw(f"raw {i} (completions)", body, COMPLETIONS)
    raw("completion prompt surrogate", b'{"model": "m", "prompt": "ticket \\ud800"}', COMPLETIONS)
    raw("completion prompt list surrogate", b'{"model": "m", "prompt": ["\\udc80"]}', COMPLETIONS)
    # every field of a chat request, with values of the wrong kind or out of range
    bad = {
        "model": [None, 1, [], {}, "", "nope", "m@nope", "../m", "m" * 10_000],
        "messages": [None, "hi", {}, [], [1], [[]], ["user"], [{}], [{"role": "user"}, 3],
                     [{"role": "bot", "content": "x"}], [{"role": None, "content": "x"}],
                     [{"role": "user", "content": 5}], [{"role": "user", "content": {"text": "x"}}],
                     [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/a.png"}}]}],
                     [{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": "AAAA"}}]}],
                     [{"role": "user", "content": [{"type": "text", "text": "x"}, {"type": "file", "file": {}}]}],
                     [{"role": "user", "content": [{"type": "text"}]}], [{"role": "user", "content": [{"text": "x"}]}],
                     [{"role": "user", "content": [{"type": "text", "text": 7}]}], [{"role": "user", "content": ["x"]}],
                     [{"role": "assistant", "content": "x"}, {"role": "assistant", "content": "y"},
                      {"role": "system", "content": "z"}]],
        "temperature": [-1, 2.5, 1e300, "hot", [], {}, "true"],
        "top_p": [0, -0.5, 1.5, "all", []],
        "max_tokens": [0, -1, 99, 10 ** 12, 2 ** 70, 1.5, "many", []],
        "max_completion_tokens": [0, -3, 500, "x"],
        "n": [0, 2, 100, -1, "one"],
        "seed": [2 ** 70, -(2 ** 70), 2 ** 64, 1.5, "seed", [], {}],
        "stop": [1, [1, 2], {"a": 1}, [[]]],
        "stream": ["maybe", [], {}, 2],
        "stream_options": ["x", 1, []],
        "logprobs": ["sure", [], 2],
        "top_logprobs": [-1, 21, 1000, "x"],
    }
    for key, values in bad.items():
        for value in values:
            field("chat", chat, CHAT, key, value)
            if key in ("temperature", "top_p", "n", "seed", "stop", "stream", "stream_options"):  # shared fields
                field("completion", comp, COMPLETIONS, key, value)
    bad_comp = {
        "prompt": [None, 1, {}, [], [[]], ["a", "b"], [-1], [10 ** 7], [2 ** 70], [1.5], [[1], [2]], [None], [{}],
                   [True, "x"], "", [[1, -5]]],
        "echo": ["yes", [], {}],
        "max_tokens": [0, -1, 10 ** 9, "x"],
    }
    for key, values in bad_comp.items():
        for value in values:
            field("completion", comp, COMPLETIONS, key, value)
    # a long prompt past the model's context
    cases.append(("context", COMPLETIONS, None, {**comp, "prompt": "word " * 5000}))
    return cases


def _metric_total(text: str, name: str) -> dict[str, float]:
    """Prometheus counter `name`'s samples, summed by HTTP status."""
    totals: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith(name + "_total{"):
            labels, value = line[len(name) + 7:].rsplit("} ", 1)
            status = next(p.split("=")[1].strip('"') for p in labels.split(",") if p.startswith("status="))
            totals[status] = totals.get(status, 0.0) + float(value)
    return totals


_POLL = """
import http.client, json, sys, threading, time
host, port = sys.argv[1], int(sys.argv[2])
stop = threading.Event()
threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
seconds, failures = [], []
while not stop.is_set():
    start = time.perf_counter()
    try:
        conn = http.client.HTTPConnection(host, port, timeout=5)
        conn.request("GET", "/health")
        status = conn.getresponse().status
        conn.close()
        if status != 200:
            failures.append(status)
    except Exception as exc:
        failures.append(repr(exc))
    seconds.append(time.perf_counter() - start)
    time.sleep(0.02)
print(json.dumps({"seconds": seconds, "failures": failures}))
"""


class _HealthWatch:
    """Poll `/health` from a process of its own (so that the test's own threads cannot delay it) while requests are
    sent; keep every answer's time."""

    def __init__(self, url: str):
        host, port = url.removeprefix("http://").split(":")
        self.proc = subprocess.Popen([sys.executable, "-c", _POLL, host, port], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        self.seconds: list[float] = []
        self.failures: list = []

    def __enter__(self):
        time.sleep(0.5)  # its first polls are under way
        return self

    def __exit__(self, *exc):
        out, _ = self.proc.communicate("", timeout=30)
        found = json.loads(out)
        self.seconds, self.failures = found["seconds"], found["failures"]


@pytest.mark.slow
def test_a_corpus_of_malformed_requests_gets_openai_errors_counted_and_logged_while_health_stays_quick(
        tiny_model_dir, state, tmp_path):
    """Over 200 malformed bodies and field values (not JSON, not UTF-8, 50k-deep nesting, NaN, seeds past 64 bits,
    image parts, lone surrogates, unknown paths and methods) against a running server: no 5xx, every error in OpenAI's
    shape with a message, every one counted in /metrics and written to the request log, and /health answering in
    under 100 ms meanwhile."""
    import httpx

    corpus = _corpus()
    assert len(corpus) >= 200
    log = tmp_path / "requests.jsonl"
    replies: list[tuple[str, int, dict | None]] = []
    with served(tiny_model_dir, log, "--max-tokens", "16") as (url, _proc), httpx.Client(base_url=url, timeout=60) as c:
        with _HealthWatch(url) as health:
            for name, path, body, fields in corpus:
                if body is not None:
                    r = c.post(path, content=body, headers={"content-type": "application/json"})
                else:
                    r = c.post(path, json=fields)
                replies.append((name, r.status_code, r.json() if r.headers.get("content-type", "").startswith(
                    "application/json") else None))
            for method, path in [("GET", CHAT), ("PUT", COMPLETIONS), ("DELETE", "/v1/models"), ("GET", "/v1/nope"),
                                 ("POST", "/v2/chat/completions"), ("GET", "/v1/models/nope"), ("POST", "/health")]:
                r = c.request(method, path)
                replies.append((f"{method} {path}", r.status_code, r.json()))
        metrics = c.get("/metrics").text
    five = [(n, s, b) for n, s, b in replies if s >= 500]
    assert not five, five[:5]
    errors = [(n, s, b) for n, s, b in replies if s >= 400]
    assert len(errors) >= 200, [(n, s) for n, s, _ in replies if s < 400]
    for name, status, body in errors:
        assert body is not None and set(body) == {"error"}, (name, status, body)
        assert set(body["error"]) == {"message", "type", "param", "code"} and body["error"]["message"], (name, body)
    by_name = {n: (s, b) for n, s, b in replies}
    assert by_name["raw 12"][1]["error"]["message"].startswith("the request body is not valid UTF-8")
    assert "too deeply" in by_name["raw 16"][1]["error"]["message"]
    assert by_name["chat seed=1180591620717411303424"][1]["error"]["param"] == "seed"
    nan = by_name["raw 22"][1]["error"]
    assert nan["param"] == "temperature" and "finite number" in nan["message"], nan
    image = next(b["error"] for _n, _s, b in replies if b and "image_url" in b.get("error", {}).get("message", ""))
    assert image["param"] == "messages.0.content.0" and "'image_url' cannot be read" in image["message"], image
    number = next(b["error"] for n, _s, b in replies if n == "chat messages=[{'role': 'user', 'content': 5}]")
    assert number["param"] == "messages.0.content", number  # not pydantic's union member ("content.str")
    # every reply, refusals included, is counted by status and has its record in the request log
    counted = _metric_total(metrics, "tunewright_requests")
    sent: dict[str, int] = {}
    for _n, status, _b in replies:
        sent[str(status)] = sent.get(str(status), 0) + 1
    assert {s: int(v) for s, v in counted.items()} == sent
    logged = _records(log)
    assert len(logged) == len(replies)
    assert sorted(r["status"] for r in logged) == sorted(s for _n, s, _b in replies)
    assert not health.failures, health.failures[:3]
    slow = sorted(health.seconds)[-3:]
    assert len(health.seconds) > 10 and slow[-1] < 0.1, (len(health.seconds), slow)


@pytest.mark.slow
def test_long_prompts_cannot_hold_up_health_or_get_past_the_queue_limit(tiny_model_dir, state, tmp_path):
    """Twenty concurrent prompts of 1 MB: each is parsed off the event loop and refused for the model's context from
    its length alone (a megabyte takes over a second to tokenise), and /health stays quick meanwhile. With every queue place taken, a request is refused (429) before its prompt is tokenised."""
    from concurrent.futures import ThreadPoolExecutor

    import httpx

    from tests.test_serve import _engine, serving

    log = tmp_path / "requests.jsonl"
    prompt = ("Order A12345 will not ship. " * 40_000)[:1_000_000]
    bodies = [json.dumps({"model": "m", "messages": [{"role": "user", "content": f"{i} {prompt}"}],
                          "max_tokens": 1}).encode() for i in range(20)]  # encoded before the clock starts
    with served(tiny_model_dir, log, "--max-body-bytes", str(1 << 21)) as (url, _proc):
        def send(body):
            return httpx.post(f"{url}{CHAT}", content=body, headers={"content-type": "application/json"}, timeout=120)

        with _HealthWatch(url) as health, ThreadPoolExecutor(20) as pool:
            started = time.perf_counter()
            replies = list(pool.map(send, bodies))
            took = time.perf_counter() - started
    assert [r.status_code for r in replies] == [400] * 20
    assert all(r.json()["error"]["code"] == "context_length_exceeded" for r in replies)
    assert "the prompt is at least" in replies[0].json()["error"]["message"]
    assert not health.failures, health.failures[:3]
    # alone on the machine every answer takes under 100 ms; beside a parallel test run on two cores, the OS leaves
    # the server waiting for a core now and then, so the bound here is the median and a quarter second
    seconds = sorted(health.seconds)
    assert seconds[len(seconds) // 2] < 0.02 and seconds[-1] < 0.25, (seconds[len(seconds) // 2], seconds[-3:])
    assert took < 20, took  # tokenising them would take over a second each on two cores
    assert len(_records(log)) == 20

    engine, _ = _engine([f"m={tiny_model_dir}"], state, max_queue=1)
    with serving(engine, max_tokens=8) as (url, _app):
        with engine.admitted():  # the one place is taken
            full = httpx.post(f"{url}{COMPLETIONS}", json={"model": "m", "prompt": [1, 2, 10 ** 7], "max_tokens": 2}, timeout=30)
        bad = httpx.post(f"{url}{COMPLETIONS}", json={"model": "m", "prompt": [1, 2, 10 ** 7], "max_tokens": 2}, timeout=30)
    assert full.status_code == 429, full.text  # not 400: the queue is asked before the prompt is encoded
    assert bad.status_code == 400 and "outside the model's vocabulary" in bad.json()["error"]["message"]


@pytest.mark.slow
def test_a_server_killed_mid_traffic_keeps_every_record_acknowledged_before_its_last_flush(
        tiny_model_dir, state, tmp_path):
    """Four clients send requests until the server is killed with SIGKILL (no shutdown, nothing flushed). Every
    request answered more than one flush interval (1 s) plus a margin before the kill is in the log: the writer
    thread writes and fsyncs what is queued once a second, so at most the last second's answers can be lost (the
    test reports how many were). A restart appends to the same log."""
    import httpx

    log = tmp_path / "requests.jsonl"
    acked: list[tuple[str, float]] = []
    stop = threading.Event()

    with served(tiny_model_dir, log, "--max-tokens", "4") as (url, proc):
        def client(k):
            i = 0
            with httpx.Client(base_url=url, timeout=30) as c:
                while not stop.is_set():
                    i += 1
                    try:
                        r = c.post(CHAT, json={"model": "m", "max_tokens": 2, "messages": [
                            {"role": "user", "content": f"client {k} request {i}: where is order A{i:05d}?"}]})
                    except httpx.HTTPError:
                        return
                    if r.status_code == 200:
                        acked.append((r.json()["id"], time.monotonic()))

        threads = [threading.Thread(target=client, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        time.sleep(6)
        killed_at = time.monotonic()
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        stop.set()
        for t in threads:
            t.join(30)
    kept = {r.get("request_id") for r in _records(log)}
    assert len(acked) >= 20, len(acked)
    settled = [rid for rid, at in acked if at < killed_at - 1.5]
    missing = [rid for rid in settled if rid not in kept]
    assert not missing, f"{len(missing)} of {len(settled)} settled records lost"
    lost = [rid for rid, _at in acked if rid not in kept]
    print(f"SIGKILL after {len(acked)} answered requests: {len(acked) - len(lost)} records kept, {len(lost)} lost "
          "(answered within the last flush interval)")
    assert len(lost) <= len(acked) - len(settled)
    before = len(_records(log))
    with served(tiny_model_dir, log) as (url, _proc):
        assert httpx.post(f"{url}{CHAT}", json={"model": "m", "messages": USER, "max_tokens": 1}, timeout=60
                          ).status_code == 200
    assert len(_records(log)) == before + 1
