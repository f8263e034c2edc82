"""`tunewright serve` through the official `openai` client: answers, streaming, limits, auth, the request log,
the response cache, and a registry alias moving under load."""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import threading
import time
from pathlib import Path

import pytest
import torch

from tests.test_merge import _make_adapter, _register
from tunewright.recipe import load_recipe

USER = [{"role": "user", "content": "My Orbit Mouse will not turn on. Order A12345."}]


@pytest.fixture(scope="module")
def adapter(tiny_model_dir, tmp_path_factory) -> Path:
    return _make_adapter(tiny_model_dir, tmp_path_factory.mktemp("serve") / "lora", 11, r=4, alpha=8)


@contextlib.contextmanager
def serving(engine, **app_kw):
    """The app on a free local port in a thread; on exit the server shuts down as on Ctrl-C (lifespan included)."""
    import uvicorn

    from tunewright.serve.app import create_app

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    app = create_app(engine, **app_kw)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        thread.join(0.05)
    try:
        yield f"http://127.0.0.1:{port}", app
    finally:
        server.should_exit = True
        thread.join(30)
        engine.stop()


def _client(url: str, key: str = "none"):
    from openai import OpenAI

    return OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=60)


def _engine(specs, state, **kw):
    from tunewright.serve.wiring import open_engine

    return open_engine(specs, None, state / "adapters", log=logging.getLogger("test"), **kw)


def _read_log(path: Path) -> list[dict]:
    files = [path] if path.suffix == ".jsonl" else sorted(path.glob("*.jsonl"))
    return [json.loads(line) for f in files for line in f.read_text().splitlines() if line.strip()]


def test_the_openai_client_gets_the_same_greedy_answers_batched_streamed_and_alone(
        adapter, tiny_model_dir, state, tmp_path):
    """Eight concurrent chat requests through the batching engine, a streamed one (token by token) and a completion each equal what
    `generate` gives for that prompt alone on the adapter's model; every request is in the log with its tokens."""
    from concurrent.futures import ThreadPoolExecutor

    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunewright.chat import generate

    engine, _ = _engine([f"tickets={adapter}", f"whole={tiny_model_dir}"], state)
    assert engine.backends["tickets"].batching and engine.backends["whole"].batching
    prompts = [[{"role": "user", "content": f"Ticket {i}: my order A{1000 + i} is late."}] for i in range(9)]
    log = tmp_path / "requests.jsonl"
    with serving(engine, max_tokens=24, request_log=log) as (url, _app):
        client = _client(url)
        assert [m.id for m in client.models.list().data] == ["tickets", "whole"]
        with ThreadPoolExecutor(8) as pool:
            replies = list(pool.map(lambda m: client.chat.completions.create(model="tickets", messages=m,
                                                                             max_tokens=12), prompts[:8]))
        # a step as slow as a real model's, so that tokens are made slower than the client reads them
        slow = engine.backends["tickets"].net.register_forward_pre_hook(lambda *_: time.sleep(0.03))
        stream = client.chat.completions.create(model="tickets", messages=prompts[8], max_tokens=12, stream=True)
        streamed = [c.choices[0].delta.content or "" for c in stream]
        slow.remove()
        completion = client.completions.create(model="whole", prompt="Order A12345 is", max_tokens=6)
        import httpx

        assert httpx.get(f"{url}/ready").json()["ready"] is True
        metrics = httpx.get(f"{url}/metrics").text
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    net = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32),
                                    adapter).eval()
    alone = generate(net, tok, prompts, max_new_tokens=12, batch_size=1)
    assert [r.choices[0].message.content for r in replies] == alone[:8]
    assert all(r.usage.completion_tokens == 12 and r.choices[0].finish_reason == "length" for r in replies)
    assert len([s for s in streamed if s]) > 1 and "".join(streamed) == alone[8]  # token by token, same text
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    ids = tok("Order A12345 is", add_special_tokens=False, return_tensors="pt")
    expected = tok.decode(base.generate(**ids, max_new_tokens=6, do_sample=False)[0, ids["input_ids"].shape[1]:],
                          skip_special_tokens=True)
    assert completion.choices[0].text == expected
    assert 'tunewright_requests_total{endpoint="/v1/chat/completions",model="tickets",status="200"} 9.0' in metrics
    records = _read_log(log)  # shutdown wrote everything queued
    assert len(records) == 10 and {r["status"] for r in records} == {200}
    assert all(r["completion_tokens"] and r["latency_ms"] > 0 for r in records)
    assert sorted(r["answer"] for r in records if r["model"] == "tickets") == sorted(alone)


def test_malformed_requests_get_a_clear_4xx_and_are_logged(tiny_model_dir, state, tmp_path):
    import httpx

    engine, _ = _engine([f"m={tiny_model_dir}"], state)
    log = tmp_path / "log"
    with serving(engine, max_tokens=16, request_log=log, max_body_bytes=4000) as (url, _app):
        post = lambda path, **kw: httpx.post(f"{url}{path}", timeout=30, **kw)  # noqa: E731
        cases = {
            "not json": post("/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"}),
            "no messages": post("/v1/chat/completions", json={"model": "m"}),
            "bad role": post("/v1/chat/completions", json={"model": "m", "messages": [{"role": "bot", "content": "x"}]}),
            "unknown model": post("/v1/chat/completions", json={"model": "nope", "messages": USER}),
            "too many tokens": post("/v1/chat/completions", json={"model": "m", "messages": USER, "max_tokens": 99}),
            "temperature": post("/v1/chat/completions", json={"model": "m", "messages": USER, "temperature": 5}),
            "two prompts": post("/v1/completions", json={"model": "m", "prompt": ["a", "b"]}),
            "bad token id": post("/v1/completions", json={"model": "m", "prompt": [1, 2, 10 ** 7]}),
            # valid JSON escapes of a lone surrogate: no tokenizer or UTF-8 log can hold one
            "lone surrogate": post("/v1/chat/completions", headers={"content-type": "application/json"}, content=(
                b'{"model": "m", "messages": [{"role": "user", "content": "refund \\udc80"}]}')),
            "lone surrogate prompt": post("/v1/completions", headers={"content-type": "application/json"},
                                          content=b'{"model": "m", "prompt": "ticket \\ud800"}'),
            "huge body": post("/v1/chat/completions", json={"model": "m", "messages": [
                {"role": "user", "content": "x" * 5000}]}),
            "context": post("/v1/completions", json={"model": "m", "prompt": "word " * 600, "max_tokens": 16}),
            # sent in chunks without a Content-Length: counted as it arrives
            "huge chunked": post("/v1/chat/completions", headers={"content-type": "application/json"},
                                 content=iter([json.dumps({"model": "m", "messages": USER})[:-1].encode(),
                                               b', "user": "' + b"x" * 5000 + b'"}'])),
        }
        chunked = post("/v1/chat/completions", headers={"content-type": "application/json"}, content=iter(
            [json.dumps({"model": "m", "max_tokens": 2, "messages": USER})[:20].encode(),
             json.dumps({"model": "m", "max_tokens": 2, "messages": USER})[20:].encode()]))
        # a client that leaves a stream before reading it
        with httpx.stream("POST", f"{url}/v1/chat/completions", timeout=30,
                          json={"model": "m", "messages": [{"role": "user", "content": "leaving"}], "max_tokens": 8,
                                "stream": True}) as gone:
            assert gone.status_code == 200
        deadline = time.monotonic() + 10
        while (engine.backends["m"].in_flight or engine.waiting) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert engine.backends["m"].in_flight == 0 and engine.waiting == 0  # every refusal let go of its hold
    expected = {"not json": (400, None), "no messages": (400, "messages"), "bad role": (400, "messages.0.role"),
                "unknown model": (404, "model"), "too many tokens": (400, "max_tokens"),
                "temperature": (400, "temperature"), "two prompts": (400, "prompt"), "huge body": (413, None),
                "context": (400, "max_tokens"), "huge chunked": (413, None), "bad token id": (400, "prompt"),
                "lone surrogate": (400, "messages.0.content"), "lone surrogate prompt": (400, "prompt")}
    for name, reply in cases.items():
        status, param = expected[name]
        assert reply.status_code == status, (name, reply.text)
        error = reply.json()["error"]
        assert error["message"] and error["param"] == param, (name, error)
    assert "above the model's context of 512 tokens" in cases["context"].json()["error"]["message"]
    assert chunked.status_code == 200 and chunked.json()["usage"]["completion_tokens"] == 2  # a small one is read
    assert "more than 4000 bytes" in cases["huge chunked"].json()["error"]["message"]
    assert "token id 10000000 is outside the model's vocabulary" in cases["bad token id"].json()["error"]["message"]
    assert "lone UTF-16 surrogate (U+DC80)" in cases["lone surrogate"].json()["error"]["message"]
    statuses = sorted(r["status"] for r in _read_log(log) if "leaving" not in json.dumps(r.get("messages")))
    assert statuses == sorted([s for s, _ in expected.values()] + [200])


def test_api_keys_from_the_environment_guard_the_api_metrics_and_docs_but_not_the_probes(
        tiny_model_dir, state, monkeypatch):
    import httpx
    import openai

    monkeypatch.setenv("TUNEWRIGHT_API_KEYS", "key-one, key-two")
    engine, _ = _engine([f"m={tiny_model_dir}"], state)
    with serving(engine, max_tokens=8) as (url, _app):
        with pytest.raises(openai.AuthenticationError):
            _client(url, "wrong").chat.completions.create(model="m", messages=USER, max_tokens=2)
        assert httpx.get(f"{url}/v1/models").status_code == 401  # no key at all
        assert _client(url, "key-two").chat.completions.create(model="m", messages=USER, max_tokens=2).choices
        assert httpx.get(f"{url}/health").status_code == 200 and httpx.get(f"{url}/ready").status_code == 200
        for path in ("/metrics", "/docs", "/openapi.json"):
            assert httpx.get(f"{url}{path}").status_code == 401, path
        keyed = httpx.get(f"{url}/metrics", headers={"Authorization": "Bearer key-one"})
        assert keyed.status_code == 200 and 'status="401"' in keyed.text  # the refusals are counted
    engine, _ = _engine([f"m={tiny_model_dir}"], state)
    with serving(engine, max_tokens=8, open_metrics=True) as (url, _app):  # a scraper on a trusted network
        assert httpx.get(f"{url}/metrics").status_code == 200 and httpx.get(f"{url}/v1/models").status_code == 401


def test_keys_come_from_a_file_only_its_owner_reads_and_an_open_server_stays_on_loopback(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from tunewright.cli import app
    from tunewright.serve.keys import api_keys, check_exposure

    monkeypatch.setenv("TUNEWRIGHT_API_KEYS", "from-env")
    keys = tmp_path / "keys.txt"
    keys.write_text("# rotated monthly\nkey-one\n\n  key-two  \n")
    keys.chmod(0o644)
    with pytest.raises(ValueError, match=r"keys.txt can be read by others \(mode 0644\): `chmod 600"):
        api_keys(keys)
    keys.chmod(0o600)
    assert api_keys(keys) == ["from-env", "key-one", "key-two"]
    with pytest.raises(ValueError, match="no such file|No such file"):
        api_keys(tmp_path / "missing.txt")
    for host in ("127.0.0.1", "::1", "localhost", "127.0.0.2"):
        check_exposure(host, [], insecure=False)
    with pytest.raises(ValueError, match="--host 0.0.0.0 listens beyond this machine"):
        check_exposure("0.0.0.0", [], insecure=False)
    check_exposure("0.0.0.0", ["k"], insecure=False)
    check_exposure("0.0.0.0", [], insecure=True)
    monkeypatch.delenv("TUNEWRIGHT_API_KEYS")
    refused = CliRunner().invoke(app, ["serve", "m=/nowhere", "--host", "0.0.0.0"])
    assert refused.exit_code == 2 and "--insecure" in refused.output  # before any model is loaded


def test_a_full_queue_answers_429_and_the_admitted_requests_still_finish(tiny_model_dir, state):
    """With the engine paused and --max-queue 2 taken, a third request is refused with 429 and Retry-After; once
    the engine runs again the two admitted requests are answered."""
    from concurrent.futures import ThreadPoolExecutor

    import openai

    engine, _ = _engine([f"m={tiny_model_dir}"], state, max_queue=2)
    with serving(engine, max_tokens=8) as (url, _app):
        client = _client(url)
        pause = engine.backends["m"].manager.pause()
        pause.__enter__()
        with ThreadPoolExecutor(2) as pool:
            held = [pool.submit(client.chat.completions.create, model="m", max_tokens=4,
                                messages=[{"role": "user", "content": f"held {i}"}]) for i in range(2)]
            deadline = time.monotonic() + 20
            while engine.waiting < 2 and time.monotonic() < deadline:
                time.sleep(0.02)
            with pytest.raises(openai.RateLimitError) as refused:
                client.chat.completions.create(model="m", messages=USER, max_tokens=4)
            assert refused.value.response.headers["retry-after"] == "1"
            assert "at capacity" in refused.value.message
            pause.__exit__(None, None, None)
            assert all(f.result(timeout=60).choices[0].message.content is not None for f in held)
        assert engine.waiting == 0


def test_identical_greedy_requests_are_answered_from_the_cache(tiny_model_dir, state, tmp_path):
    import httpx

    engine, _ = _engine([f"m={tiny_model_dir}"], state)
    log = tmp_path / "requests.jsonl"
    with serving(engine, max_tokens=8, request_log=log) as (url, _app):
        client = _client(url)
        first = client.chat.completions.create(model="m", messages=USER, max_tokens=6)
        again = client.chat.completions.create(model="m", messages=USER, max_tokens=6)
        longer = client.chat.completions.create(model="m", messages=USER, max_tokens=7)
        metrics = httpx.get(f"{url}/metrics").text
    assert first.choices[0].message.content == again.choices[0].message.content
    assert 'tunewright_cache_hits_total{model="m"} 1.0' in metrics
    assert [r["cached"] for r in _read_log(log)] == [False, True, False]
    assert longer.usage.completion_tokens == 7


def test_the_request_log_rotates_by_window_and_survives_a_failing_target(s3_endpoint):
    """Records land in one file per window; with the S3 bucket missing, writes fail but nothing is lost: once the
    bucket exists the retries deliver every record, each once."""
    import boto3

    from tunewright.serve.requestlog import RequestLog, record

    s3 = boto3.client("s3")
    log = RequestLog("s3://logs/served/requests", rotate_seconds=3600, flush_seconds=0.1)
    for i in range(5):
        log.write({**record(n=i), "_ts": 1_700_000_000 + 3600 * (i // 3)})  # two windows
    deadline = time.monotonic() + 10
    while log.failures < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert log.failures >= 2 and log.written == 0
    s3.create_bucket(Bucket="logs")
    log.close()
    keys = sorted(o["Key"] for o in s3.list_objects_v2(Bucket="logs")["Contents"])
    assert len(keys) == 2 and all(k.startswith("served/requests/requests-2023111") for k in keys)
    lines = [json.loads(line) for k in keys
             for line in s3.get_object(Bucket="logs", Key=k)["Body"].read().decode().splitlines()]
    assert sorted(r["n"] for r in lines) == [0, 1, 2, 3, 4] and log.written == 5


@pytest.mark.parametrize("bad", ["\udc80", "\ud800", "tail \ud83d"], ids=["low", "high", "cut-pair"])
def test_a_lone_surrogate_costs_no_record_its_own_or_any_other(tmp_path, bad):
    """A prompt holding a lone surrogate (valid JSON, no UTF-8 form) is logged, escaped, with the 200 records after
    it; nothing waits to be retried, and a restarted log appends to the same file."""
    from tunewright.serve.requestlog import RequestLog, record

    path = tmp_path / "requests.jsonl"
    log = RequestLog(path, flush_seconds=0.05)
    log.write(record(prompt=f"refund {bad} please", status=400, error="bad prompt"))
    for i in range(200):
        log.write(record(prompt=f"ticket {i}", status=200))
    log.close()
    assert log.failures == 0 and log.written == 201
    again = RequestLog(path, flush_seconds=0.05)
    again.write(record(prompt="after the restart", status=200))
    again.close()
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert len(rows) == 202
    assert rows[0]["prompt"] == f"refund {bad} please" and rows[0]["error"] == "bad prompt"
    assert [r["prompt"] for r in rows[1:201]] == [f"ticket {i}" for i in range(200)]
    assert rows[-1]["prompt"] == "after the restart"


def test_the_server_follows_a_moved_alias_under_load_without_dropping_a_request(
        tiny_model_dir, tiny_recipe, state, tmp_path):
    """Clients keep asking `models:/swap@champion` while the alias moves from version 1 to 2: every request is
    answered, the log shows version 1's answers then version 2's, the old engine stops once idle.
    With a challenger share of 1.0 the challenger version answers for the champion name."""
    from mlflow import MlflowClient

    from tunewright.registry.tracking import pipeline_run

    one = _make_adapter(tiny_model_dir, tmp_path / "v1", 21)
    two = _make_adapter(tiny_model_dir, tmp_path / "v2", 22)
    with pipeline_run(load_recipe(tiny_recipe)) as ctx:
        v1 = _register("swap", one, tiny_model_dir, ctx.experiment_id, {})
        v2 = _register("swap", two, tiny_model_dir, ctx.experiment_id, {})
    registry = MlflowClient()
    registry.set_registered_model_alias("swap", "champion", v1)
    registry.set_registered_model_alias("swap", "challenger", v2)
    engine, watcher = _engine(["models:/swap@champion"], state, watch_interval=0.2)
    assert watcher.aliases == {"swap@champion": "models:/swap@champion"}
    log = tmp_path / "requests.jsonl"
    results, stop = [], threading.Event()
    with serving(engine, max_tokens=8, request_log=log) as (url, _app):
        client = _client(url)

        def ask(i: int) -> None:
            while not stop.is_set():
                reply = client.chat.completions.create(model="swap@champion", max_tokens=6, messages=[
                    {"role": "user", "content": f"client {i}"}])
                results.append(reply.system_fingerprint)

        clients = [threading.Thread(target=ask, args=(i,)) for i in range(4)]
        for t in clients:
            t.start()
        watcher.start()
        time.sleep(1.0)
        old = engine.backends["swap@champion"]
        registry.set_registered_model_alias("swap", "champion", v2)
        deadline = time.monotonic() + 60
        while watcher.swaps < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(1.0)
        stop.set()
        for t in clients:
            t.join(60)
        watcher.stop()
        after = client.chat.completions.create(model="swap@champion", messages=USER, max_tokens=6)
    assert watcher.swaps == 1 and not old.alive() and old.in_flight == 0
    records = [r for r in _read_log(log) if r.get("model") == "swap@champion"]
    versions = [r["version"] for r in records]
    assert {r["status"] for r in records} == {200} and len(records) == len(results) + 1
    assert versions[0] == v1 and versions[-1] == v2 and versions.count(v1) > 1 and versions.count(v2) > 1
    assert after.system_fingerprint == f"swap@champion:{engine.backends['swap@champion'].served.identity[:12]}"

    # a challenger taking the whole share answers for the champion's name
    registry.set_registered_model_alias("swap", "champion", v1)
    engine, _ = _engine(["models:/swap@champion"], state, challenger_share=1.0)
    log2 = tmp_path / "ab.jsonl"
    with serving(engine, max_tokens=8, request_log=log2) as (url, _app):
        _client(url).chat.completions.create(model="swap@champion", messages=USER, max_tokens=4)
    (rec,) = _read_log(log2)
    assert rec["served_by"] == "swap@challenger" and rec["version"] == v2 and rec["model"] == "swap@champion"


def test_the_llm_judge_grades_answers_through_tunewright_serve(tiny_model_dir, state, tmp_path, monkeypatch):
    from tunewright.recipe import JudgeConfig
    from tunewright.scoring.judge import grade, judge

    assert grade("4") == 0.75 and grade("Grade: 1.") == 0.0 and grade("five") is None
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    monkeypatch.delenv("TUNEWRIGHT_JUDGE_BASE_URL", raising=False)
    with pytest.raises(ValueError, match="TUNEWRIGHT_JUDGE_BASE_URL"):
        judge(JudgeConfig(enabled=True), ["q"], ["r"], {"tuned": ["a"]}, logging.getLogger("test"))

    monkeypatch.setenv("TUNEWRIGHT_API_KEYS", "judge-key")
    engine, _ = _engine([f"grader={tiny_model_dir}"], state)
    log = tmp_path / "judge-requests.jsonl"
    with serving(engine, max_tokens=8, request_log=log) as (url, _app):
        monkeypatch.setenv("TUNEWRIGHT_JUDGE_BASE_URL", f"{url}/v1")
        monkeypatch.setenv("TUNEWRIGHT_JUDGE_API_KEY", "judge-key")
        prompts = ["Where is order A12345?", "Refund my Orbit Mouse", "Password reset fails"]
        refs = ['{"category": "shipping"}', '{"category": "refund"}', '{"category": "account"}']
        answers = {"base": ["no idea", "ok", "hello"], "tuned": refs}
        means, grades, model = judge(JudgeConfig(enabled=True, max_examples=2), prompts, refs, answers,
                                     logging.getLogger("test"))
    assert model == "grader"  # the endpoint's first listed model when none is named
    assert set(means) == {"base", "tuned"} and all(len(g) == 3 and g[2] is None for g in grades.values())
    assert all(v is None or 0 <= v <= 1 for g in grades.values() for v in g)
    sent = _read_log(log)
    assert len(sent) == 4 and all(r["status"] == 200 and r["model"] == "grader" for r in sent)
    assert "REFERENCE" in json.dumps(sent[0])


def test_8bit_serving_quantises_the_linear_layers_and_answers_through_the_batching_engine(tiny_model_dir, state):
    """`--quantize 8bit`: every linear layer (the head too) holds int8 weights, the next-token distribution stays
    the fp32 model's, and the batching engine answers as `generate` does on the same quantised model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunewright.chat import generate

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        engine, _ = _engine([f"whole={tiny_model_dir}"], state, quantize="8bit")
        assert torch.get_num_threads() == 1  # int8 in the engine's own thread runs faster on one
    finally:
        torch.set_num_threads(threads)
    net = engine.backends["whole"].net
    quantised = [m for m in net.modules() if type(m).__name__ == "Linear" and type(m).__module__.startswith(
        "torch.ao.nn.quantized.dynamic")]
    assert len(quantised) == 7 * net.config.num_hidden_layers + 1  # and the head
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    ids = tok.apply_chat_template(USER, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    fp32 = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    with torch.inference_mode():
        p = torch.softmax(fp32(**ids).logits[0, -1], -1)
        q = torch.softmax(net(**ids).logits[0, -1], -1)
    assert 0.5 * (p - q).abs().sum() < 0.05  # total variation distance of the next-token distributions
    with serving(engine, max_tokens=8) as (url, _app):
        reply = _client(url).chat.completions.create(model="whole", messages=USER, max_tokens=8)
    assert reply.usage.completion_tokens == 8 and reply.choices[0].finish_reason == "length"
    assert reply.choices[0].message.content == generate(net, tok, [USER], max_new_tokens=8, batch_size=1)[0]


def test_a_swap_waits_for_a_request_that_picked_the_old_model_before_it_began(tiny_model_dir, state):
    """A request holds the backend it picked from the moment it picks it (a streamed answer starts generating
    only once the response begins), so a swap in that gap does not stop the engine under it."""
    import asyncio

    engine, _ = _engine([f"m={tiny_model_dir}"], state)
    replacement, _ = _engine([f"m={tiny_model_dir}"], state)
    old = engine.pick("m")
    assert old.in_flight == 1
    engine.swap("m", replacement.backends["m"])
    time.sleep(0.5)  # the retiring thread has had its chance to stop the old engine
    assert old.alive() and engine.backends["m"] is not old
    ids = old.chat_ids(USER)
    tokens, text, finish = asyncio.run(old.generate(ids, max_tokens=4))
    assert len(tokens) == 4 and finish == "length"
    old.release()
    deadline = time.monotonic() + 30
    while old.alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not old.alive() and old.in_flight == 0
    engine.stop()


def test_a_registered_full_fine_tune_and_a_runs_folder_are_served_and_compared_as_champion(
        tiny_model_dir, tiny_recipe, state, tmp_path):
    """A full fine-tune registered as stage 6 registers one (the whole model folder, no adapter) is served under
    its registered name, a run's logged model folder (`runs:/...`, as a version's merged export) is served too, and
    stage 5 compares a full fine-tune champion on the test set; each answers as `generate` does on those weights.
    Where only an adapter will do (merging), a whole model is still refused by name."""
    import mlflow
    from mlflow import MlflowClient
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tasks.artifacts import EnvironmentArtifact, ModelArtifact
    from tasks.evaluate.answers import champion_answers as _champion_answers
    from tunewright.chat import generate
    from tunewright.registry.adapters import fetch
    from tunewright.registry.pyfunc import ChatAdapterModel
    from tunewright.registry.tracking import RunContext, pipeline_run

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    net = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    torch.manual_seed(5)
    with torch.no_grad():  # "fine-tuned": every weight moved a little
        for p in net.parameters():
            p.add_(0.3 * torch.randn_like(p))
    full = tmp_path / "full"
    net.save_pretrained(full)
    tok.save_pretrained(full)
    recipe = load_recipe(tiny_recipe)
    with pipeline_run(recipe) as ctx:
        with mlflow.start_run(experiment_id=ctx.experiment_id, run_name="full", nested=True) as run:
            info = mlflow.pyfunc.log_model(name="model", python_model=ChatAdapterModel(), pip_requirements=["torch"],
                                           artifacts={"model": str(full)},
                                           model_config={"system_prompt": "Answer as JSON."})
            mlflow.log_artifacts(str(full), "exports/merged")
        version = str(mlflow.register_model(info.model_uri, "whole",
                                            tags={"tunewright.base_digest": "sha256:tiny"}).version)
    MlflowClient().set_registered_model_alias("whole", "champion", version)
    merged_uri = f"runs:/{run.info.run_id}/exports/merged"

    with pytest.raises(ValueError, match="holds a whole fine-tuned model; only adapter versions"):
        fetch("models:/whole@champion", state / "adapters", logging.getLogger("test"))
    engine, _ = _engine(["models:/whole@champion", f"merged={merged_uri}"], state)
    system = [{"role": "system", "content": "Answer as JSON."}]
    with serving(engine, max_tokens=8) as (url, _app):
        client = _client(url)
        cards = {m.id: m.model_dump() for m in client.models.list().data}
        by_name = client.chat.completions.create(model="whole@champion", messages=USER, max_tokens=8)
        by_run = client.chat.completions.create(model="merged", messages=USER, max_tokens=8)
    assert cards["whole@champion"]["model"] == f"models:/whole/{version}" and cards["whole@champion"]["adapter"] is None
    assert cards["whole@champion"]["registered_model"] == "whole" and cards["merged"]["model"] == merged_uri
    expected = generate(net, tok, [system + USER], max_new_tokens=8, batch_size=1)[0]
    # both with the training system prompt logged with the model (the export: from its run's model)
    assert by_name.choices[0].message.content == expected == by_run.choices[0].message.content
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    assert len(expected.split()) > 3 and generate(base, tok, [system + USER], max_new_tokens=8, batch_size=1)[0] != expected

    convs = [system + USER, system + [{"role": "user", "content": "Charged twice for order B777."}]]
    gen = {"max_new_tokens": 8, "batch_size": 2, "stop_after_json": False}
    model = ModelArtifact(base_dir=str(tiny_model_dir), base_source="tiny", base_digest="sha256:tiny", adapter_dir="",
                          n_params=0, n_trainable=0, resolve_seconds=0.0)
    env = EnvironmentArtifact(device="cpu", precision="fp32", cpu_cores=2, num_threads=2, bf16_supported=False,
                              cuda_devices=(), cuda_memory_gb=(), seed=0, deepspeed_config="")
    run_ctx = RunContext(parent_run_id="p", experiment_id="0", tracking_uri=mlflow.get_tracking_uri(),
                         state_dir=str(state), work_dir=str(tmp_path), recipe_name="r")
    champ = _champion_answers("models:/whole@champion", recipe.evaluate, recipe.model, model, env, run_ctx, tok,
                              convs, gen, torch.device("cpu"), None, logging.getLogger("test"))
    assert champ["resolved"] == f"models:/whole/{version}"
    assert champ["answers"] == generate(net, tok, convs, **gen) and champ["loss"] > 0


def test_sampled_requests_are_batched_by_a_sampling_engine_with_their_own_temperature_and_top_p(
        tiny_model_dir, state):
    """Requests with temperature above 0 run together in a second batching engine, each with its own settings:
    top_p so small that only the likeliest token survives gives the greedy answer, while temperature 1 draws
    differ from each other; greedy requests beside them still get exactly the greedy answer, and a seeded request
    is one draw that repeats, even while other requests draw."""
    from concurrent.futures import ThreadPoolExecutor

    engine, _ = _engine([f"m={tiny_model_dir}"], state)
    backend = engine.backends["m"]
    assert backend.sampler is None  # started only when a sampled request comes
    with serving(engine, max_tokens=8) as (url, _app):
        client = _client(url)

        def ask(**kw):
            return client.completions.create(model="m", prompt="Order A12345 arrived broken and", max_tokens=8,
                                             **kw).choices[0].text

        greedy = ask()
        with ThreadPoolExecutor(10) as pool:
            drawn = [pool.submit(ask, temperature=1.0) for _ in range(5)]
            narrow = [pool.submit(ask, temperature=1.0, top_p=1e-6) for _ in range(2)]
            seeded = [pool.submit(ask, temperature=1.0, seed=7) for _ in range(2)]  # while others draw
            beside = pool.submit(ask)
            drawn, narrow, seeded = ([f.result() for f in futures] for futures in (drawn, narrow, seeded))
            beside = beside.result()
    assert backend.sampler is not None and not backend.alive()  # stopped with the server
    assert narrow == [greedy, greedy] and beside == greedy
    assert len(set(drawn)) > 1
    assert seeded[0] == seeded[1]


def test_the_shared_system_prompt_is_computed_once_and_reused_from_the_cache(tiny_model_dir, state):
    """Requests sharing a long system prompt: after the first, each takes the prompt's full KV-cache blocks from the
    cache instead of computing them again (counted in /metrics), and the answers are still `generate`'s."""
    import httpx
    from transformers import AutoTokenizer

    from tunewright.chat import generate

    system = [{"role": "system", "content": "You sort support tickets for an electronics shop. " * 12}]
    convs = [system + [{"role": "user", "content": f"Ticket {i}: order A1234{i} has not arrived."}] for i in range(3)]
    engine, _ = _engine([f"m={tiny_model_dir}"], state)
    backend = engine.backends["m"]
    page = 32
    shared = len(backend.chat_ids(system + [{"role": "user", "content": "x"}]))
    assert shared > 3 * page
    with serving(engine, max_tokens=8) as (url, _app):
        client = _client(url)
        answers = [client.chat.completions.create(model="m", messages=c, max_tokens=6).choices[0].message.content
                   for c in convs]
        metrics = httpx.get(f"{url}/metrics").text
        ready = httpx.get(f"{url}/ready").json()
    reused = backend.prefix_tokens_reused
    assert reused >= 2 * page * ((shared - 8) // page)  # the second and third took the system prompt's blocks
    assert f'tunewright_prefix_tokens_reused{{model="m"}} {float(reused)}' in metrics
    assert ready["models"]["m"]["prefix_tokens_reused"] == reused
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert answers == generate(backend.net, tok, convs, max_new_tokens=6, batch_size=1)


def test_an_external_engine_answers_in_its_own_process_behind_tunewright(adapter, tiny_model_dir, state, tmp_path):
    """`--engine vllm` serves each model from an OpenAI-compatible engine process this server starts, merging an
    adapter into a whole folder first, and forwards prompts as token ids. vLLM needs a GPU, so the engine started
    here is another `tunewright serve` process, which speaks the same protocol: answers and streams equal the
    weights' own greedy answers, the request log is this server's, logprobs are refused with 400, and stopping
    the server stops the engines."""
    import sys

    import httpx
    import openai
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunewright.chat import generate

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    net = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    torch.manual_seed(3)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.3 * torch.randn_like(p))
    whole = tmp_path / "whole"
    net.save_pretrained(whole)
    tok.save_pretrained(whole)

    def upstream(folder, name, precision, max_len):
        return lambda port: [sys.executable, "-m", "tunewright.cli", "serve", f"{name}={folder}", "--host",
                             "127.0.0.1", "--port", str(port), "--max-tokens", "64", "--precision", precision]

    engine, _ = _engine([f"whole={whole}", f"a={adapter}"], state, engine_kind="vllm", external_command=upstream,
                        cache_size=0)  # every request reaches the engine
    backends = dict(engine.backends)
    assert all(b.alive() and b.engine_name == "vllm" for b in backends.values())
    merged = [p for p in (state / "adapters").glob("merged-*") if (p / "config.json").is_file()]
    assert len(merged) == 1 and (merged[0] / "tokenizer.json").is_file()  # the adapter, merged once
    log = tmp_path / "requests.jsonl"
    with serving(engine, max_tokens=16, request_log=log) as (url, _app):
        client = _client(url)
        answer = client.chat.completions.create(model="whole", messages=USER, max_tokens=8)
        chunks = list(client.chat.completions.create(model="whole", messages=USER, max_tokens=8, stream=True,
                                                     stream_options={"include_usage": True}))
        streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        adapted = client.chat.completions.create(model="a", messages=USER, max_tokens=8)
        with pytest.raises(openai.BadRequestError, match="logprobs are not offered"):
            client.chat.completions.create(model="whole", messages=USER, max_tokens=4, logprobs=True)
        upstream_metrics = httpx.get(f"{backends['whole'].url}/metrics").text
    expected = generate(net, tok, [USER], max_new_tokens=8, batch_size=1)[0]
    assert len(expected.split()) > 3 and answer.choices[0].message.content == expected == streamed
    assert answer.usage.completion_tokens == 8 and answer.choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 8  # include_usage: the last chunk
    lora = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32),
                                     adapter).merge_and_unload().eval()
    assert adapted.choices[0].message.content == generate(lora, tok, [USER], max_new_tokens=8, batch_size=1)[0]
    assert 'tunewright_requests_total{endpoint="/v1/completions",model="whole",status="200"} 2.0' in upstream_metrics
    records = _read_log(log)
    assert [r["status"] for r in records] == [200, 200, 200, 400] and records[0]["completion_tokens"] == 8
    assert all(b.process.poll() is not None for b in backends.values())  # the engines stopped with the server


def test_serve_engine_vllm_starts_the_command_named_and_it_dies_with_a_killed_server(tiny_model_dir, tmp_path):
    """`tunewright serve --engine vllm` runs the command TUNEWRIGHT_VLLM names with vLLM's own arguments; here a
    stand-in that accepts them and serves the folder with `tunewright serve`. The engine's environment switches
    vLLM's usage reporting off and gives it a key of its own (VLLM_API_KEY, never on its command line): it listens
    on loopback and refuses a local caller without the key. The server answers through it, and when the server is
    killed with SIGKILL the engine process goes too, leaving no file behind."""
    import os
    import signal
    import subprocess
    import sys
    import tempfile

    import httpx

    shim = tmp_path / "vllm"
    shim.write_text(f"""#!{sys.executable}
import argparse, os, sys
p = argparse.ArgumentParser()
p.add_argument("verb"); p.add_argument("folder"); p.add_argument("--host"); p.add_argument("--port")
p.add_argument("--served-model-name"); p.add_argument("--dtype"); p.add_argument("--max-model-len")
p.add_argument("--generation-config"); p.add_argument("--gpu-memory-utilization", type=float)
a = p.parse_args()
assert a.verb == "serve" and a.dtype == "float32" and a.generation_config == "vllm", sys.argv
assert 0 < a.gpu_memory_utilization <= 0.5, sys.argv
# vLLM reports usage unless VLLM_NO_USAGE_STATS or (VLLM_)DO_NOT_TRACK is exactly "1" (vllm/envs.py)
assert os.environ.get("VLLM_NO_USAGE_STATS") == "1", "vLLM would report usage"
assert a.host == "127.0.0.1" and len(os.environ.get("VLLM_API_KEY", "")) >= 32, (a.host, "no engine key")
assert os.environ["VLLM_API_KEY"] not in " ".join(sys.argv)
open({str(tmp_path / "engine.port")!r}, "w").write(a.port)
os.environ["TUNEWRIGHT_API_KEYS"] = os.environ["VLLM_API_KEY"]  # vLLM's key check, played by tunewright's
os.execv(sys.executable, [sys.executable, "-m", "tunewright.cli", "serve", a.served_model_name + "=" + a.folder,
                          "--host", a.host, "--port", a.port])
""")
    shim.chmod(0o755)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = dict(os.environ, TUNEWRIGHT_VLLM=str(shim))
    env.pop("VLLM_NO_USAGE_STATS", None)  # (this process has it from tunewright): the server must set it itself
    engine_pattern = f"tunewright.cli serve m={tiny_model_dir} --host"  # the engine's command, not the server's
    server = subprocess.Popen([sys.executable, "-m", "tunewright.cli", "serve", f"m={tiny_model_dir}", "--engine",
                               "vllm", "--port", str(port)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True)
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        ready = httpx.get(f"http://127.0.0.1:{port}/ready").json()
        assert ready["models"]["m"]["engine"] == "vllm"
        reply = _client(f"http://127.0.0.1:{port}").completions.create(model="m", prompt="Order A12345", max_tokens=4)
        assert reply.usage.completion_tokens == 4
        engines = subprocess.run(["pgrep", "-f", engine_pattern], capture_output=True, text=True).stdout.split()
        assert len(engines) == 1  # the stand-in, which replaced itself with `tunewright serve`
        engine_port = (tmp_path / "engine.port").read_text()
        sneak = httpx.post(f"http://127.0.0.1:{engine_port}/v1/completions", json={"model": "m", "prompt": "x"})
        assert sneak.status_code == 401  # a local user cannot go around the server's keys, limits and log
        leftovers = list(Path(tempfile.gettempdir()).glob("tunewright-vllm-*"))
    finally:
        server.send_signal(signal.SIGKILL)
        server.wait(30)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and subprocess.run(["pgrep", "-f", engine_pattern]).returncode == 0:
        time.sleep(0.5)
    left = subprocess.run(["pgrep", "-af", engine_pattern], capture_output=True, text=True).stdout
    assert not left, left
    assert not leftovers  # the engine's output went to the server's log, not to a file


def test_cuda_graphs_are_on_for_cuda_only_and_the_variable_turns_them_off(monkeypatch):
    from tunewright.serve.engine import cuda_graph_settings

    monkeypatch.delenv("TUNEWRIGHT_CUDA_GRAPHS", raising=False)
    assert cuda_graph_settings(torch.device("cpu")) == {}  # nothing to capture on a CPU: transformers decides
    assert cuda_graph_settings(torch.device("cuda")) == {"use_cuda_graph": True}
    monkeypatch.setenv("TUNEWRIGHT_CUDA_GRAPHS", "off")
    assert cuda_graph_settings(torch.device("cuda")) == {"use_cuda_graph": False}
    monkeypatch.setenv("TUNEWRIGHT_CUDA_GRAPHS", "sometimes")
    with pytest.raises(ValueError, match="TUNEWRIGHT_CUDA_GRAPHS"):
        cuda_graph_settings(torch.device("cpu"))


def test_cpu_attention_request_by_request_equals_transformers_masked_attention(tiny_model_dir, monkeypatch):
    """The batching engine's attention on a CPU (each request against its own keys) gives what transformers'
    masked attention over the whole batch gives, call by call, through decoding, prompts split across steps and
    prompts whose shared system prompt is already cached; the answers equal `generate`'s."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from tests.conftest import load_generator
    from tunewright.serve import attention

    monkeypatch.delenv("TUNEWRIGHT_CPU_ATTENTION", raising=False)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    net = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    rows = load_generator().generate(12, seed=5)
    prompts = [list(tok.apply_chat_template([m for m in r["messages"] if m["role"] != "assistant"],
                                           add_generation_prompt=True, return_dict=True)["input_ids"]) for r in rows]
    assert attention.install() and ALL_ATTENTION_FUNCTIONS["sdpa"] is attention.varlen_sdpa
    try:
        seen = {"calls": 0, "decoding": 0, "after_cached_keys": 0, "worst": 0.0}

        def both(module, query, key, value, attention_mask, **kw):
            if kw.get("cache") is None:
                return attention._original(module, query, key, value, attention_mask, **kw)
            plain = {k: dict(v) if isinstance(v, dict) else v for k, v in kw.items()}  # update() rewrites kwargs
            want, _ = attention._original(module, query, key, value, attention_mask, **plain)
            got, _ = attention.varlen_sdpa(module, query, key, value, attention_mask, **kw)
            n = int(kw["cu_seq_lens_q"][-1])
            cu_k = kw["cu_seq_lens_k"]
            gather, several = attention._plan_for(kw["cu_seq_lens_q"], cu_k["full_attention"] if isinstance(
                cu_k, dict) else cu_k)
            seen["calls"] += 1
            seen["decoding"] += gather is not None
            seen["after_cached_keys"] += any(k1 - k0 > q1 - q0 for q0, q1, k0, k1, _ in several)
            seen["worst"] = max(seen["worst"], float((want[:, :n] - got[:, :n]).abs().max()))
            return got, None

        ALL_ATTENTION_FUNCTIONS["sdpa"] = both
        gen = GenerationConfig(max_new_tokens=12, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                               do_sample=False)
        # 48 tokens a step: prompts are split across steps and run beside other requests' decoding
        cb = ContinuousBatchingConfig(page_size=16, num_blocks=128, max_batch_tokens=48, allow_block_sharing=True)
        out = net.generate_batch(prompts, generation_config=gen, continuous_batching_config=cb, progress_bar=False)
    finally:
        ALL_ATTENTION_FUNCTIONS["sdpa"] = attention.varlen_sdpa
    assert seen["calls"] and seen["decoding"] and seen["after_cached_keys"], seen
    assert seen["worst"] < 1e-5, seen
    answers = {o.request_id: o.generated_tokens for o in out.values()}
    assert len(answers) == len(prompts)
    with torch.no_grad():
        for i, ids in enumerate(prompts):
            ref = net.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False, eos_token_id=tok.eos_token_id,
                               pad_token_id=tok.pad_token_id)[0, len(ids):].tolist()
            assert answers[f"req_{i}"] == ref, i
    monkeypatch.setenv("TUNEWRIGHT_CPU_ATTENTION", "masked")
    assert not attention.install() and ALL_ATTENTION_FUNCTIONS["sdpa"] is not attention.varlen_sdpa
    monkeypatch.setenv("TUNEWRIGHT_CPU_ATTENTION", "sideways")
    with pytest.raises(ValueError, match="TUNEWRIGHT_CPU_ATTENTION"):
        attention.install()


@pytest.mark.parametrize("batching", [True, False])
def test_a_client_leaving_a_whole_answer_stops_its_generation_and_is_logged_499(tiny_model_dir, state, tmp_path,
                                                                                 batching):
    """A non-streamed request whose client gives up a quarter of the way through: its generation stops (the engine is
    free long before the answer would have been done) and its record says 499, not 200."""
    import httpx

    engine, _ = _engine([f"m={tiny_model_dir}"], state, batching=batching)
    log = tmp_path / "requests.jsonl"
    ask = lambda text: {"model": "m", "max_tokens": 400, "messages": [{"role": "user", "content": text}]}  # noqa: E731
    with serving(engine, max_tokens=400, request_log=log) as (url, _app):
        started = time.monotonic()
        whole = httpx.post(f"{url}/v1/chat/completions", json=ask("the whole answer"), timeout=120).json()
        full = time.monotonic() - started
        assert whole["usage"]["completion_tokens"] == 400
        # the client leaves a quarter of the way through what the whole answer took on this machine, now
        leave_after = max(0.05, full / 4)
        started = time.monotonic()
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{url}/v1/chat/completions", json=ask("leaving early"),
                       timeout=httpx.Timeout(60, read=leave_after))
        backend = engine.backends["m"]
        while backend.in_flight and time.monotonic() - started < 60:
            time.sleep(0.01)
        freed = time.monotonic() - started
        again = time.monotonic()  # the whole answer once more: a busier machine now makes every figure longer
        httpx.post(f"{url}/v1/chat/completions", json=ask("the whole answer, again"), timeout=120).raise_for_status()
        full = max(full, time.monotonic() - again)
    assert freed < 0.75 * full, (freed, leave_after, full)  # a generation left running would take about `full`
    left = [r for r in _read_log(log) if "leaving early" in json.dumps(r["messages"])]
    assert len(left) == 1 and left[0]["status"] == 499 and left[0]["completion_tokens"] == 0, left


def test_a_registered_models_bare_name_means_the_alias_served_and_both_are_listed(tiny_model_dir, state):
    """`support-ticket-json@champion` served: `support-ticket-json` is answered by it and listed beside it; with a
    challenger served for its share of the traffic the bare name still means the champion; a name with two aliases
    served (neither a challenger) means neither."""
    from tunewright.serve.engine import Engine

    engine, _ = _engine([f"support-ticket-json@champion={tiny_model_dir}"], state)
    with serving(engine, max_tokens=8) as (url, _app):
        client = _client(url)
        reply = client.chat.completions.create(model="support-ticket-json", messages=USER, max_tokens=2)
        assert reply.model == "support-ticket-json@champion"
        listed = {m.id: m for m in client.models.list().data}
        assert set(listed) == {"support-ticket-json@champion", "support-ticket-json"}
        assert listed["support-ticket-json"].model_extra["alias_of"] == "support-ticket-json@champion"
        assert client.models.retrieve("support-ticket-json").id == "support-ticket-json"
    names = {"t@champion": None, "t@challenger": None, "u@a": None, "u@b": None}
    routed = Engine(names, challenger={"t@champion": ("t@challenger", 0.1)})
    assert routed.resolve("t") == "t@champion" and routed.resolve("u") is None and routed.resolve("u@b") == "u@b"
