"""Adapters loaded while a server runs: vLLM's runtime LoRA API, used by `--engine vllm` to swap a moved alias's new
version into the running engine process, and offered by `tunewright serve --allow-runtime-adapters` itself."""

from __future__ import annotations

import asyncio
import json
import re
import time
from pathlib import Path

import httpx
import pytest

from tests.test_merge import _make_adapter
from tests.test_serve import _engine, serving
from tests.test_serve_fleet import _alone, _vllm_stand_in


@pytest.fixture(scope="module")
def two(tiny_model_dir, tmp_path_factory) -> dict[str, Path]:
    """Two LoRA adapters over the tiny base, and a second version of the first (`billing-v2`)."""
    root = tmp_path_factory.mktemp("runtime")
    return {"billing": _make_adapter(tiny_model_dir, root / "billing", 31, r=4, alpha=8),
            "shipping": _make_adapter(tiny_model_dir, root / "shipping", 32, r=8, alpha=16),
            "billing-v2": _make_adapter(tiny_model_dir, root / "billing-v2", 41, r=4, alpha=8)}


def _source(folder: Path):
    from tunewright.registry.adapters import AdapterSource, weights_digest

    return AdapterSource(uri=str(folder), resolved=str(folder), local_dir=str(folder), sha256=weights_digest(folder))


def _modules(backend) -> set[str]:
    """The models the engine process behind `backend` lists (its base and LoRA modules), asked with its own key."""
    reply = httpx.get(f"{backend.url}/v1/models", headers={"Authorization": f"Bearer {backend._key}"}, timeout=30,
                      trust_env=False)
    reply.raise_for_status()
    return {m["id"] for m in reply.json()["data"]}


def _wait_for(condition, timeout: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.05)
    return condition()


def test_engine_vllm_loads_a_new_version_into_the_running_process_and_unloads_the_old_module_once_idle(
        two, tiny_model_dir, state, tmp_path, monkeypatch):
    """With `--engine vllm` (the stand-in engine), a new version of `billing` loaded as the registry watcher loads it
    goes into the SAME engine process (no second start, same pid) as a module of its own; a version the engine
    refuses (corrupt weights) fails with an error naming the adapter and the engine's answer and leaves the old one
    serving; a request that picked the old version before the swap still answers as it, the old module is unloaded
    only once that request is done, and `billing` then answers as the new version alone."""
    from tunewright.serve.engine import EngineFailed, ServedModel
    from tunewright.serve.external import LoraView

    shim, starts = _vllm_stand_in(tmp_path)
    monkeypatch.setenv("TUNEWRIGHT_VLLM", str(shim))
    engine, watcher = _engine([f"{n}={two[n]}" for n in ("billing", "shipping")], state, engine_kind="vllm",
                              cache_size=0)
    old = engine.backends["billing"]
    process, pid = old.process, old.process.pid
    conv = [{"role": "user", "content": "Refund for order A12345, please."}]
    try:
        broken = tmp_path / "billing-broken"
        _make_adapter(tiny_model_dir, broken, 42, r=4, alpha=8)
        (broken / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
        refused = re.escape(f"billing: vllm did not load the adapter {broken}: it answered 500: ") + ".*did not load"
        with pytest.raises(EngineFailed, match=refused):
            watcher.load(ServedModel("billing", _source(broken)))
        assert {"billing", "shipping"} <= _modules(old) and not any(m.startswith("billing-") for m in _modules(old))

        held = engine.pick("billing")  # a request holding the old version
        source = _source(two["billing-v2"])
        new = watcher.load(ServedModel("billing", source))
        module = f"billing-{source.sha256[:12]}"
        assert isinstance(new, LoraView) and new.upstream_model == module
        assert new.process is process and process.pid == pid and process.poll() is None
        assert len(starts.read_text().splitlines()) == 1  # no second engine was started
        engine.swap("billing", new)
        time.sleep(0.3)  # the retiring thread has had its chance to unload the old module
        assert {"billing", module} <= _modules(new)  # old and new side by side while the old one is in use
        _tokens, text, _ = asyncio.run(held.generate(held.chat_ids(conv), max_tokens=8))
        assert text.strip() == _alone(tiny_model_dir, two["billing"], [conv], 8)[0]
        held.release()
        assert _wait_for(lambda: "billing" not in _modules(new)), _modules(new)
        assert module in _modules(new) and "shipping" in _modules(new)
        with serving(engine, max_tokens=8) as (url, _app):
            answers = {n: httpx.post(f"{url}/v1/chat/completions", json={"model": n, "messages": conv,
                                                                         "max_tokens": 8}, timeout=60)
                       .json()["choices"][0]["message"]["content"] for n in ("billing", "shipping")}
            assert process.pid == pid and process.poll() is None
    finally:
        engine.stop()
    assert answers["billing"] == _alone(tiny_model_dir, two["billing-v2"], [conv], 8)[0]
    assert answers["shipping"] == _alone(tiny_model_dir, two["shipping"], [conv], 8)[0]
    assert process.poll() is not None


def test_tunewright_serve_loads_and_unloads_adapters_at_runtime_only_when_allowed(two, tiny_model_dir, state, tmp_path):
    """Without runtime adapters on, both endpoints answer 404 saying how to turn them on. With them on (and an API
    key), a request without the key is refused (401), a folder that is not a PEFT adapter and a missing one are
    refused with 400 naming the path, a served name with 400; an adapter folder is loaded into the shared base and
    answers as that adapter alone, and unloading it deletes it from the base once idle (an unknown name: 404)."""
    from tunewright.serve.wiring import RuntimeAdapters

    engine, _ = _engine([f"{n}={two[n]}" for n in ("billing", "shipping")], state, cache_size=0)
    with serving(engine, max_tokens=8) as (url, _app):
        for path, body in (("load", {"lora_name": "x", "lora_path": str(two["billing-v2"])}),
                           ("unload", {"lora_name": "billing"})):
            reply = httpx.post(f"{url}/v1/{path}_lora_adapter", json=body, timeout=30)
            assert reply.status_code == 404 and "--allow-runtime-adapters" in reply.json()["error"]["message"]
    assert "x" not in engine.backends

    engine, watcher = _engine([f"{n}={two[n]}" for n in ("billing", "shipping")], state, cache_size=0)
    shared = engine.backends["billing"].shared
    not_adapter = tmp_path / "notes"
    not_adapter.mkdir()
    (not_adapter / "README.md").write_text("no adapter here")
    missing = tmp_path / "missing"
    key = {"Authorization": "Bearer k1"}
    conv = [{"role": "user", "content": "My Orbit Mouse will not turn on."}]
    with serving(engine, max_tokens=8, api_keys=["k1"], runtime_adapters=RuntimeAdapters(watcher.load)) as (url, _):
        load = f"{url}/v1/load_lora_adapter"
        v2 = {"lora_name": "billing-v2", "lora_path": str(two["billing-v2"])}
        assert httpx.post(load, json=v2, timeout=30).status_code == 401
        for bad in (not_adapter, missing):
            reply = httpx.post(load, json={"lora_name": "b", "lora_path": str(bad)}, headers=key, timeout=30)
            assert reply.status_code == 400 and str(bad) in reply.json()["error"]["message"], reply.text
        reply = httpx.post(load, json={"lora_name": "billing", "lora_path": str(two["billing-v2"])}, headers=key,
                           timeout=30)
        assert reply.status_code == 400 and "already been loaded" in reply.json()["error"]["message"]
        reply = httpx.post(load, json=v2, headers=key, timeout=120)
        assert reply.status_code == 200 and reply.text == "Success: LoRA adapter 'billing-v2' added successfully."
        assert engine.backends["billing-v2"].shared is shared and len(shared.adapters) == 3
        answer = httpx.post(f"{url}/v1/chat/completions", headers=key, timeout=60,
                            json={"model": "billing-v2", "messages": conv, "max_tokens": 8}).json()
        unload = f"{url}/v1/unload_lora_adapter"
        reply = httpx.post(unload, json={"lora_name": "billing-v2"}, headers=key, timeout=30)
        assert reply.status_code == 200 and "removed successfully" in reply.text
        assert httpx.post(unload, json={"lora_name": "billing-v2"}, headers=key, timeout=30).status_code == 404
        assert _wait_for(lambda: len(shared.adapters) == 2)
        listed = json.loads(httpx.get(f"{url}/v1/models", headers=key, timeout=30).text)
    assert answer["choices"][0]["message"]["content"] == _alone(tiny_model_dir, two["billing-v2"], [conv], 8)[0]
    assert {m["id"] for m in listed["data"]} == {"billing", "shipping"}
