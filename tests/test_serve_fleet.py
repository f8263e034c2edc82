"""Many adapters on one base in `tunewright serve`: one copy of the base, requests of different adapters batched
together, each answering as it does alone; the registry watcher swapping one of them; vLLM's one process."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest
import torch

from tests.test_merge import _make_adapter
from tests.test_serve import _client, _engine, serving

SYSTEM = {"role": "system", "content": "You sort support tickets for an electronics shop into JSON. " * 6}


@pytest.fixture(scope="module")
def three(tiny_model_dir, tmp_path_factory) -> dict[str, Path]:
    """Three LoRA adapters over the tiny base: different seeds, ranks and scalings (one rsLoRA)."""
    root = tmp_path_factory.mktemp("fleet")
    return {"billing": _make_adapter(tiny_model_dir, root / "billing", 31, r=4, alpha=8),
            "shipping": _make_adapter(tiny_model_dir, root / "shipping", 32, r=8, alpha=16),
            "returns": _make_adapter(tiny_model_dir, root / "returns", 33, r=2, alpha=4, use_rslora=True)}


def _alone(tiny_model_dir, adapter: Path | None, convs: list[list[dict]], max_new_tokens: int) -> list[str]:
    """Greedy answers of one adapter (or the base) loaded alone, one conversation at a time."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunewright.chat import generate

    net = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    if adapter is not None:
        net = PeftModel.from_pretrained(net, adapter)
    return generate(net.eval(), AutoTokenizer.from_pretrained(tiny_model_dir), convs,
                    max_new_tokens=max_new_tokens, batch_size=1)


def _tensor_bytes(module_or_file) -> int:
    from safetensors.torch import load_file

    if isinstance(module_or_file, Path):
        return sum(t.numel() * t.element_size() for t in load_file(module_or_file).values())
    return sum(p.numel() * p.element_size() for p in module_or_file.parameters())


def _vllm_stand_in(tmp_path: Path) -> tuple[Path, Path]:
    """A stand-in for the `vllm` command (vLLM needs a GPU): it takes `vllm serve`'s arguments and serves the
    `--lora-modules` over the base with `tunewright serve`, which speaks the same protocol, runtime LoRA endpoints
    included (on, as in vLLM, when VLLM_ALLOW_RUNTIME_LORA_UPDATING is True in its environment, which it inherits).
    Each start appends a line to the second path: its arguments and that variable."""
    import sys

    shim = tmp_path / "vllm"
    argv_file = tmp_path / "argv.jsonl"
    shim.write_text(f"""#!{sys.executable}
import argparse, json, os, sys
p = argparse.ArgumentParser()
p.add_argument("verb"); p.add_argument("folder"); p.add_argument("--host"); p.add_argument("--port")
p.add_argument("--served-model-name"); p.add_argument("--dtype"); p.add_argument("--max-model-len")
p.add_argument("--generation-config"); p.add_argument("--gpu-memory-utilization", type=float)
p.add_argument("--enable-lora", action="store_true"); p.add_argument("--max-loras", type=int)
p.add_argument("--max-lora-rank", type=int); p.add_argument("--lora-modules", nargs="+")
a = p.parse_args()
with open({str(argv_file)!r}, "a") as f:
    f.write(json.dumps([sys.argv[1:], os.environ.get("VLLM_ALLOW_RUNTIME_LORA_UPDATING")]) + "\\n")
os.environ["TUNEWRIGHT_API_KEYS"] = os.environ["VLLM_API_KEY"]  # vLLM's key check, played by tunewright's
os.execv(sys.executable, [sys.executable, "-m", "tunewright.cli", "serve", *a.lora_modules, "--base", a.folder,
                          "--host", a.host, "--port", a.port])
""")
    shim.chmod(0o755)
    return shim, argv_file


def test_three_adapters_on_one_base_answer_as_each_alone_in_mixed_batches(three, tiny_model_dir, state):
    """A server given three adapters and the base loads the base once (its parameters: the base's plus the three
    adapters' weights, nothing more); requests to all four names sent together run in the same engine steps, and
    each greedy answer equals that adapter's (or the base's) own answer alone, with a long system prompt whose
    cached blocks are reused within an adapter and never across adapters. `/v1/models` lists each with its base."""
    from concurrent.futures import ThreadPoolExecutor

    from transformers import AutoModelForCausalLM

    from tunewright.serve.shared_base import AdapterView

    engine, _ = _engine([f"{name}={path}" for name, path in three.items()], state, serve_base="base", cache_size=0)
    views = [engine.backends[n] for n in (*three, "base")]
    assert all(isinstance(v, AdapterView) for v in views)
    shared = views[0].shared
    assert all(v.shared is shared for v in views) and len(shared.adapters) == 3
    base_bytes = _tensor_bytes(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32))
    adapter_bytes = sum(_tensor_bytes(p / "adapter_model.safetensors") for p in three.values())
    assert shared.parameter_bytes == base_bytes + adapter_bytes
    assert sum(a.bytes for a in shared.adapters.values()) == adapter_bytes

    convs = [[SYSTEM, {"role": "user", "content": f"Ticket {i}: order A{2000 + i} arrived broken."}]
             for i in range(3)]
    names = [*three, "base"]
    with serving(engine, max_tokens=16) as (url, _app):
        client = _client(url)
        listed = {m.id: m.model_extra for m in client.models.list().data}
        pause = shared.manager.pause()
        pause.__enter__()
        with ThreadPoolExecutor(12) as pool:
            futures = {(n, i): pool.submit(client.chat.completions.create, model=n, messages=c, max_tokens=10)
                       for n in names for i, c in enumerate(convs)}
            deadline = time.monotonic() + 30
            while engine.waiting < len(futures) and time.monotonic() < deadline:
                time.sleep(0.02)
            pause.__exit__(None, None, None)
            answers = {k: f.result(timeout=120).choices[0].message.content for k, f in futures.items()}
    assert shared.mixed_steps > 0, "no engine step held requests of different adapters"
    for name in names:
        alone = _alone(tiny_model_dir, three.get(name), convs, 10)
        assert [answers[(name, i)] for i in range(3)] == alone, name
    assert len({answers[(n, 0)] for n in names}) == 4  # each adapter answers differently
    assert shared.prefix_tokens_reused > 0  # the system prompt's blocks, reused within an adapter
    assert {n: listed[n]["base"] for n in names} == {n: str(Path(tiny_model_dir).resolve()) for n in names}
    assert listed["billing"]["adapter"] and listed["base"]["adapter"] is None
    assert not any(v.alive() for v in views) and shared.stopped  # stopped with the server


def test_a_moved_alias_loads_only_its_new_adapter_into_the_shared_base_and_the_old_one_finishes(
        three, tiny_model_dir, state):
    """Swapping one served name to another adapter version loads just that adapter (the base's parameters stay as
    they were); a request that picked the old version before the swap still finishes on it, and only then is the
    old adapter deleted from the shared base."""
    import asyncio

    from tunewright.registry.adapters import AdapterSource, weights_digest
    from tunewright.serve.engine import ServedModel

    specs = [f"{name}={path}" for name, path in three.items()]
    engine, watcher = _engine(specs, state, cache_size=0)
    try:
        shared = engine.backends["billing"].shared
        before = shared.parameter_bytes
        old = engine.pick("billing")  # a request holding the old version
        new_dir = three["shipping"].parent / "billing-v2"
        _make_adapter(tiny_model_dir, new_dir, 41, r=4, alpha=8)
        source = AdapterSource(uri=str(new_dir), resolved=str(new_dir), local_dir=str(new_dir),
                               sha256=weights_digest(new_dir))
        new = watcher.load(ServedModel("billing", source))
        assert new.shared is shared and len(shared.adapters) == 4
        new_bytes = _tensor_bytes(new_dir / "adapter_model.safetensors")
        assert shared.parameter_bytes == before + new_bytes  # the adapter, not another base
        engine.swap("billing", new)
        time.sleep(0.3)  # the retiring thread has had its chance to remove the old adapter
        assert old.alive() and len(shared.adapters) == 4
        convs = [[{"role": "user", "content": "Refund for order A12345, please."}]]
        tokens, text, _ = asyncio.run(old.generate(old.chat_ids(convs[0]), max_tokens=8))
        assert text.strip() == _alone(tiny_model_dir, three["billing"], convs, 8)[0]
        old.release()
        deadline = time.monotonic() + 30
        while len(shared.adapters) > 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(shared.adapters) == 3 and shared.parameter_bytes == before - _tensor_bytes(
            three["billing"] / "adapter_model.safetensors") + new_bytes
        _tokens, text, _ = asyncio.run(new.generate(new.chat_ids(convs[0]), max_tokens=8))
        assert text.strip() == _alone(tiny_model_dir, new_dir, convs, 8)[0]
    finally:
        engine.stop()
    assert shared.stopped


def test_adapters_that_cannot_share_are_served_on_their_own_and_say_why(three, tiny_model_dir, state, tmp_path,
                                                                        caplog):
    """A DoRA adapter (refused by its config) and a LoRA adapter of the embeddings (refused once loaded: the shared
    base routes linear layers only, and deletes it again) beside two plain LoRA ones each get a merged base of their
    own, logged with the reason; the two plain ones share one base holding nothing else. `--no-share-base` gives
    each its own."""
    from transformers import AutoModelForCausalLM

    from tunewright.serve.shared_base import AdapterView

    dora = _make_adapter(tiny_model_dir, tmp_path / "dora", 5, method="dora")
    embeddings = _make_adapter(tiny_model_dir, tmp_path / "embeddings", 6, target_modules=["embed_tokens", "q_proj"])
    with caplog.at_level(logging.INFO, logger="test"):
        engine, _ = _engine([f"billing={three['billing']}", f"dora={dora}", f"embeddings={embeddings}",
                             f"shipping={three['shipping']}"], state)
    try:
        billing, shipping = engine.backends["billing"], engine.backends["shipping"]
        assert isinstance(billing, AdapterView) and shipping.shared is billing.shared
        for name in ("dora", "embeddings"):
            assert not isinstance(engine.backends[name], AdapterView) and engine.backends[name].base
        said = [r.getMessage() for r in caplog.records if "served with its adapter merged" in r.getMessage()]
        assert any(m.startswith("dora:") and "DoRA" in m for m in said), said
        assert any(m.startswith("embeddings:") and "Embedding" in m for m in said), said
        assert len(billing.shared.adapters) == 2
        assert billing.shared.parameter_bytes == _tensor_bytes(AutoModelForCausalLM.from_pretrained(
            tiny_model_dir, dtype=torch.float32)) + sum(_tensor_bytes(three[n] / "adapter_model.safetensors")
                                                        for n in ("billing", "shipping"))
    finally:
        engine.stop()
    engine, _ = _engine([f"billing={three['billing']}", f"shipping={three['shipping']}"], state, share_base=False)
    engine.stop()
    assert not any(isinstance(b, AdapterView) for b in engine.backends.values())


def test_engine_vllm_serves_adapters_of_one_base_from_one_process_with_lora_modules(
        three, tiny_model_dir, state, tmp_path, monkeypatch):
    """`--engine vllm` with three adapters on one base starts ONE engine process, `vllm serve BASE --enable-lora
    --max-loras 5 --max-lora-rank 8 --lora-modules NAME=FOLDER ...` with runtime LoRA loading on, and sends each
    request to it with its adapter's module name as `model`. The stand-in engine (`_vllm_stand_in`) serves those
    modules with `tunewright serve`: each name answers as its adapter alone, and the process stops with the server."""
    import json

    shim, argv_file = _vllm_stand_in(tmp_path)
    monkeypatch.setenv("TUNEWRIGHT_VLLM", str(shim))
    engine, _ = _engine([f"{name}={path}" for name, path in three.items()], state, engine_kind="vllm", cache_size=0)
    views = [engine.backends[n] for n in three]
    process = views[0].process
    try:
        assert all(v.process is process and v.engine_name == "vllm" for v in views)  # one process for the three
        argv, runtime_env = json.loads(argv_file.read_text().splitlines()[0])
        assert runtime_env == "True"  # vLLM's runtime LoRA endpoints are on
        assert argv[:2] == ["serve", str(Path(tiny_model_dir).resolve())]
        lora = argv[argv.index("--enable-lora"):]
        assert lora[:5] == ["--enable-lora", "--max-loras", "5", "--max-lora-rank", "8"]  # room for 2 swaps
        assert lora[5:] == ["--lora-modules", *(f"{n}={p}" for n, p in three.items())]
        convs = [[{"role": "user", "content": "Where is order A12345?"}]]
        with serving(engine, max_tokens=16) as (url, _app):
            client = _client(url)
            answers = {n: client.chat.completions.create(model=n, messages=convs[0], max_tokens=8)
                       .choices[0].message.content for n in three}
            listed = {m.id: m.model_extra for m in client.models.list().data}
        for name, path in three.items():
            assert answers[name] == _alone(tiny_model_dir, path, convs, 8)[0], name
        assert listed["billing"]["base"] == str(Path(tiny_model_dir).resolve())
    finally:
        engine.stop()
    assert process.poll() is not None  # the engine process stopped with the server


def test_the_registry_watcher_moves_one_alias_on_the_shared_base(tiny_model_dir, tiny_recipe, state, tmp_path):
    """`models:/fleet@champion` and `@challenger` share the base; when champion moves to version 3 the watcher loads
    only version 3's adapter into that base (its parameters grow by that adapter alone), version 1's is deleted once
    idle, and champion answers as version 3 alone while challenger still answers as version 2."""
    from mlflow import MlflowClient

    from tests.test_merge import _register
    from tunewright.recipe import load_recipe
    from tunewright.registry.tracking import pipeline_run

    folders = {v: _make_adapter(tiny_model_dir, tmp_path / f"v{v}", 50 + v) for v in (1, 2, 3)}
    with pipeline_run(load_recipe(tiny_recipe)) as ctx:
        versions = {v: _register("fleet", folders[v], tiny_model_dir, ctx.experiment_id, {}) for v in (1, 2, 3)}
    registry = MlflowClient()
    registry.set_registered_model_alias("fleet", "champion", versions[1])
    registry.set_registered_model_alias("fleet", "challenger", versions[2])
    engine, watcher = _engine(["models:/fleet@champion", "models:/fleet@challenger"], state, cache_size=0)
    try:
        shared = engine.backends["fleet@champion"].shared
        assert engine.backends["fleet@challenger"].shared is shared and len(shared.adapters) == 2
        before = shared.parameter_bytes
        registry.set_registered_model_alias("fleet", "champion", versions[3])
        assert watcher.check() == ["fleet@champion"]
        assert engine.backends["fleet@champion"].shared is shared
        deadline = time.monotonic() + 30
        while len(shared.adapters) > 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(shared.adapters) == 2 and shared.parameter_bytes == before  # v1 out, v3 (same shape) in
        conv = [{"role": "system", "content": "Answer as JSON."}, {"role": "user", "content": "Order A12345 is late."}]
        with serving(engine, max_tokens=8) as (url, _app):
            client = _client(url)
            champion = client.chat.completions.create(model="fleet@champion", messages=conv, max_tokens=8)
            challenger = client.chat.completions.create(model="fleet@challenger", messages=conv, max_tokens=8)
    finally:
        engine.stop()
    assert champion.choices[0].message.content == _alone(tiny_model_dir, folders[3], [conv], 8)[0]
    assert challenger.choices[0].message.content == _alone(tiny_model_dir, folders[2], [conv], 8)[0]


def test_sampled_requests_and_logprobs_use_each_requests_adapter(three, tiny_model_dir, state):
    """Through the shared base, the sampling engine (top_p so small only the likeliest token survives) and a seeded
    draw give each adapter's greedy answer, and `logprobs` are each adapter's own log-probabilities."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    engine, _ = _engine([f"{name}={path}" for name, path in three.items()], state, cache_size=0)
    conv = [{"role": "user", "content": "My Orbit Mouse will not turn on."}]
    with serving(engine, max_tokens=8) as (url, _app):
        client = _client(url)
        narrow = {n: client.chat.completions.create(model=n, messages=conv, max_tokens=6, temperature=1.0,
                                                    top_p=1e-6).choices[0].message.content for n in three}
        seeded = {n: client.chat.completions.create(model=n, messages=conv, max_tokens=6, temperature=1e-4,
                                                    seed=3).choices[0].message.content for n in three}
        scored = {n: client.chat.completions.create(model=n, messages=conv, max_tokens=4, logprobs=True,
                                                    top_logprobs=1) for n in three}
    for name, path in three.items():
        greedy = _alone(tiny_model_dir, path, [conv], 6)[0]
        assert narrow[name] == greedy == seeded[name], name
        ids = engine.backends[name].chat_ids(conv)
        net = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32),
                                        path).eval()
        with torch.no_grad():  # the greedy answer's tokens, scored by the adapter alone
            tokens = net.generate(torch.tensor([ids]), max_new_tokens=4, do_sample=False)[0, len(ids):].tolist()
            logits = net(torch.tensor([ids + tokens])).logits[0, len(ids) - 1:-1]
        expected = torch.log_softmax(logits, -1)[torch.arange(len(tokens)), torch.tensor(tokens)]
        got = torch.tensor([t.logprob for t in scored[name].choices[0].logprobs.content])
        assert torch.allclose(got, expected, atol=1e-4), name
