"""Many adapters over one base: merging by PEFT's formulas, stage 2 merging with lineage, the flow registering
a merged version, and a server switching adapters per request."""

from __future__ import annotations

import json
import time
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tunewright.recipe import AdapterConfig, MergeConfig, ModelConfig, load_recipe
from tunewright.registry.merging import check_sources


def _make_adapter(base_dir: Path, out: Path, seed: int, r: int = 4, alpha: float = 8, **extra) -> Path:
    """A LoRA adapter over the tiny base as stage 2 configures one, with B set non-zero (as if trained)."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from tunewright.train.methods import peft_config

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    net = get_peft_model(base, peft_config(AdapterConfig(r=r, alpha=alpha, **extra)))
    with torch.no_grad():
        for name, p in net.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn_like(p) * 0.5)
    net.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def adapters(tiny_model_dir, tmp_path_factory) -> dict[str, Path]:
    """Adapters over the tiny base: a and b (rank 4, different alphas), c (rank 2, rsLoRA), a DoRA one."""
    root = tmp_path_factory.mktemp("adapters")
    return {"a": _make_adapter(tiny_model_dir, root / "a", 1, r=4, alpha=8),
            "b": _make_adapter(tiny_model_dir, root / "b", 2, r=4, alpha=16),
            "c": _make_adapter(tiny_model_dir, root / "c", 3, r=2, alpha=4, use_rslora=True),
            "dora": _make_adapter(tiny_model_dir, root / "dora", 4, method="dora")}


def _lora(folder: Path) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], float]:
    """Per adapted module: (A, B) from the saved weights, and the adapter's scale as PEFT computes it."""
    cfg = json.loads((folder / "adapter_config.json").read_text())
    weights = load_file(folder / "adapter_model.safetensors")
    mods = {k.removesuffix(".lora_A.weight"): (v, weights[k.replace("lora_A", "lora_B")])
            for k, v in weights.items() if k.endswith("lora_A.weight")}
    scale = cfg["lora_alpha"] / (math.sqrt(cfg["r"]) if cfg.get("use_rslora") else cfg["r"])
    return mods, scale


def _merge(tiny_model_dir, sources: list[Path], weights: list[float], combination: str, out: Path, **kw) -> Path:
    from transformers import AutoModelForCausalLM

    from tunewright.registry.merging import merge_adapters

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    merge_adapters(base, [str(s) for s in sources], weights, combination, out, **kw)
    return out


def _ties_by_hand(tensors: list[torch.Tensor], coeffs: list[float], density: float) -> torch.Tensor:
    """TIES as the paper defines it: keep each tensor's top-density entries by magnitude, elect each entry's sign
    by the sum of the kept values, average the weighted values that agree with it."""
    kept = []
    for t in tensors:
        k = int(density * t.numel())
        threshold = t.abs().flatten().topk(k).values.min()
        kept.append(torch.where(t.abs() >= threshold, t, torch.zeros_like(t)))
    elected = torch.where(sum(kept) >= 0, 1.0, -1.0)
    agree = [(t.sign() == elected).float() for t in kept]
    total = sum(c * t * m for c, t, m in zip(coeffs, kept, agree))
    return total / torch.clamp(sum(agree), min=1.0)


# --- the formulas ----------------------------------------------------------------------------


def test_cat_merge_update_is_exactly_the_weighted_sum_of_the_adapters_updates(tiny_model_dir, adapters, tmp_path):
    """cat: B'A' * s' = sum_i w_i * s_i * B_i A_i, at the sum of the ranks, rsLoRA sources included (merged scale 1)."""
    w = [0.6, -0.3, 0.5]
    out = _merge(tiny_model_dir, [adapters["a"], adapters["b"], adapters["c"]], w, "cat", tmp_path / "m")
    merged, s = _lora(out)
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["r"] == 4 + 4 + 2 and s == 1.0 and not cfg["use_rslora"]
    sources = [_lora(adapters[k]) for k in ("a", "b", "c")]
    assert set(merged) == set(sources[0][0]) and len(merged) == 14  # every linear layer of both blocks
    for name, (A, B) in merged.items():
        expected = sum(wi * si * mods[name][1] @ mods[name][0] for wi, (mods, si) in zip(w, sources))
        torch.testing.assert_close(s * B @ A, expected, rtol=1e-5, atol=1e-6)


def test_linear_merge_combines_a_and_b_with_square_roots_of_the_weighted_scales(tiny_model_dir, adapters, tmp_path):
    """linear: A' = sum_i sign(w_i s_i) sqrt|w_i s_i| A_i and B' = sum_i sqrt|w_i s_i| B_i (a negative weight
    flips A only), so B'A' holds cross terms and is not the weighted sum of updates."""
    w = [0.7, -0.4]
    out = _merge(tiny_model_dir, [adapters["a"], adapters["b"]], w, "linear", tmp_path / "m")
    merged, s = _lora(out)
    (ma, sa), (mb, sb) = _lora(adapters["a"]), _lora(adapters["b"])
    ca, cb = w[0] * sa, w[1] * sb
    for name, (A, B) in merged.items():
        (Aa, Ba), (Ab, Bb) = ma[name], mb[name]
        torch.testing.assert_close(A, math.copysign(math.sqrt(abs(ca)), ca) * Aa
                                   + math.copysign(math.sqrt(abs(cb)), cb) * Ab)
        torch.testing.assert_close(B, math.sqrt(abs(ca)) * Ba + math.sqrt(abs(cb)) * Bb)
    name = next(iter(merged))
    exact = ca * ma[name][1] @ ma[name][0] + cb * mb[name][1] @ mb[name][0]
    assert not torch.allclose(s * merged[name][1] @ merged[name][0], exact, atol=1e-4)


def test_svd_merge_at_full_rank_reproduces_the_weighted_sum(tiny_model_dir, adapters, tmp_path):
    w = [0.5, 0.5]
    out = _merge(tiny_model_dir, [adapters["a"], adapters["c"]], w, "svd", tmp_path / "m", svd_rank=6)
    merged, s = _lora(out)
    (ma, sa), (mc, sc) = _lora(adapters["a"]), _lora(adapters["c"])
    for name, (A, B) in merged.items():
        expected = w[0] * sa * ma[name][1] @ ma[name][0] + w[1] * sc * mc[name][1] @ mc[name][0]
        torch.testing.assert_close(s * B @ A, expected, rtol=1e-4, atol=1e-5)


def test_ties_merge_matches_trim_elect_sign_and_disjoint_mean_computed_by_hand(tiny_model_dir, adapters, tmp_path):
    w, density = [1.0, 0.5], 0.4
    out = _merge(tiny_model_dir, [adapters["a"], adapters["b"]], w, "ties", tmp_path / "m", density=density)
    merged, _ = _lora(out)
    (ma, sa), (mb, sb) = _lora(adapters["a"]), _lora(adapters["b"])
    ca, cb = w[0] * sa, w[1] * sb
    for name, (A, B) in merged.items():
        torch.testing.assert_close(A, _ties_by_hand([ma[name][0], mb[name][0]], [math.sqrt(ca), math.sqrt(cb)], density))
        torch.testing.assert_close(B, _ties_by_hand([ma[name][1], mb[name][1]], [math.sqrt(ca), math.sqrt(cb)], density))


def test_dare_merge_rescales_a_seeded_random_subset_of_entries(tiny_model_dir, adapters, tmp_path):
    """dare_linear: every merged entry is sum_i m_i c_i x_i / density for some keep-mask m in {0,1}^n, about
    `density` of the entries are kept, and the same seed gives the same merge."""
    w, density = [1.0, 1.0], 0.5
    pair = [adapters["a"], adapters["b"]]
    out = _merge(tiny_model_dir, pair, w, "dare_linear", tmp_path / "m", density=density, seed=7)
    again = _merge(tiny_model_dir, pair, w, "dare_linear", tmp_path / "m2", density=density, seed=7)
    other = _merge(tiny_model_dir, pair, w, "dare_linear", tmp_path / "m3", density=density, seed=8)
    merged, _ = _lora(out)
    (ma, sa), (mb, sb) = _lora(adapters["a"]), _lora(adapters["b"])
    ca, cb = math.sqrt(w[0] * sa), math.sqrt(w[1] * sb)
    kept = total = 0
    for name, (A, _) in merged.items():
        xa, xb = ca * ma[name][0] / density, cb * mb[name][0] / density
        candidates = torch.stack([torch.zeros_like(xa), xa, xb, xa + xb])
        assert torch.all((candidates - A).abs().min(dim=0).values < 1e-5)
        kept += int(((A - xa).abs() < 1e-6).sum() + ((A - xa - xb).abs() < 1e-6).sum())
        total += A.numel()
    assert abs(kept / total - density) < 0.02
    assert _lora(again)[0][name][0].equal(merged[name][0])
    assert not _lora(other)[0][name][0].equal(merged[name][0])


# --- the recipe's checks -----------------------------------------------------------------------


def test_merge_recipes_are_checked_before_anything_runs(adapters, tmp_path):
    a, b, c, dora = (str(adapters[k]) for k in ("a", "b", "c", "dora"))
    with pytest.raises(ValueError, match="weights: 1 given for 2 adapters"):
        MergeConfig(adapters=[a, b], weights=[1.0])
    with pytest.raises(ValueError, match="combination 'ties' needs density"):
        MergeConfig(adapters=[a, b], weights=[1, 1], combination="ties")
    with pytest.raises(ValueError, match="less than or equal to 1"):
        MergeConfig(adapters=[a, b], weights=[1, 1], combination="dare_ties", density=1.5)
    with pytest.raises(ValueError, match="density applies to"):
        MergeConfig(adapters=[a, b], weights=[1, 1], combination="cat", density=0.5)
    with pytest.raises(ValueError, match="majority_sign_method applies to"):
        MergeConfig(adapters=[a, b], weights=[1, 1], combination="linear", majority_sign_method="frequency")
    # what the adapter folders hold is checked where the merge is set up (the CLI before any work, and stage 2)
    with pytest.raises(ValueError, match="needs adapters of one rank"):
        check_sources(MergeConfig(adapters=[a, c], weights=[1, 1], combination="linear"))
    check_sources(MergeConfig(adapters=[a, c], weights=[1, 1], combination="cat"))
    with pytest.raises(ValueError, match="DoRA adapter"):
        check_sources(MergeConfig(adapters=[a, dora], weights=[1, 1]))
    with pytest.raises(ValueError, match="adapter folder not found"):
        check_sources(MergeConfig(adapters=[a, str(tmp_path / "nowhere")], weights=[1, 1]))
    moved = tmp_path / "other-base"
    moved.mkdir()
    cfg = json.loads((adapters["b"] / "adapter_config.json").read_text())
    (moved / "adapter_config.json").write_text(json.dumps({**cfg, "base_model_name_or_path": "/models/another"}))
    with pytest.raises(ValueError, match="trained over different bases"):
        check_sources(MergeConfig(adapters=[a, str(moved)], weights=[1, 1]))
    with pytest.raises(ValueError, match="merging makes a LoRA adapter"):
        ModelConfig(adapter=AdapterConfig(method="ia3"), merge={"adapters": [a, b], "weights": [1, 1]})
    with pytest.raises(ValueError, match="expected models:/NAME/VERSION or models:/NAME@ALIAS"):
        MergeConfig(adapters=[a, "models:/tickets"], weights=[1, 1])
    # registered and S3 adapters are checked by stage 2, once fetched
    check_sources(MergeConfig(adapters=[a, "models:/tickets@champion", "s3://bucket/adapter"], weights=[1, 1, 1]))


def test_a_missing_merge_adapter_folder_stops_the_command_before_any_work(tiny_recipe, adapters, tmp_path):
    from typer.testing import CliRunner

    from tunewright.cli import app

    merge = f"model.merge={{adapters: [{adapters['a']}, {tmp_path / 'nowhere'}], weights: [1, 1]}}"
    out = CliRunner().invoke(app, ["validate", str(tiny_recipe), "--set", merge])
    assert out.exit_code == 2
    assert f"{tiny_recipe}: model.merge.adapters: adapter folder not found: {tmp_path / 'nowhere'}" in out.output


def test_zero_training_steps_only_with_a_merge(tiny_recipe, adapters):
    with pytest.raises(ValueError, match="train.max_steps: 0 trains nothing"):
        load_recipe(tiny_recipe, ["train.max_steps=0"])
    recipe = load_recipe(tiny_recipe, ["train.max_steps=0", f"model.merge={{adapters: [{adapters['a']}, "
                                       f"{adapters['b']}], weights: [0.5, 0.5]}}"])
    assert recipe.model.merge.combination == "cat" and recipe.train.max_steps == 0


# --- stage 2 and the flow --------------------------------------------------------------------


def _register(name: str, adapter_dir: Path, base_dir: Path, experiment_id: str, tags: dict) -> str:
    """Log and register an adapter as stage 6 does (pyfunc with base and adapter); returns the version."""
    import mlflow

    from tunewright.registry.pyfunc import ChatAdapterModel

    with mlflow.start_run(experiment_id=experiment_id, run_name=f"earlier-{name}"):
        info = mlflow.pyfunc.log_model(name="model", python_model=ChatAdapterModel(), pip_requirements=["torch"],
                                       artifacts={"base_model": str(base_dir), "adapter": str(adapter_dir)},
                                       model_config={"system_prompt": "Answer as JSON."})
    return str(mlflow.register_model(info.model_uri, name, tags=tags).version)


def _with_merge(model_cfg: ModelConfig, merge: dict) -> ModelConfig:
    return ModelConfig.model_validate({**model_cfg.model_dump(), "merge": merge})


def test_stage_2_merges_a_folder_and_a_registered_version_and_records_where_they_came_from(
        run_ctx, adapters, tiny_model_dir):
    from mlflow import MlflowClient

    from tasks.model import initialise_model
    from tunewright.registry.adapters import weights_digest

    recipe, ctx = run_ctx
    from tasks.model import folder_digest

    digest = folder_digest(tiny_model_dir, Path(ctx.state_dir, "digests.json"))  # what stage 2 names a base folder
    version = _register("earlier", adapters["b"], tiny_model_dir, ctx.experiment_id, {
        "tunewright.base_digest": digest, "tunewright.parent_run_id": "run-b", "tunewright.dataset_digest": "data-b"})
    client = MlflowClient()
    client.set_registered_model_alias("earlier", "champion", version)
    cfg = _with_merge(recipe.model, {"adapters": [str(adapters["a"]), "models:/earlier@champion"],
                                     "weights": [0.5, 0.5], "combination": "dare_ties", "density": 0.5})
    art = initialise_model.fn(cfg, 42, ctx)

    lineage = art.lineage
    assert (lineage["kind"], lineage["combination"], lineage["weights"], lineage["density"], lineage["seed"],
            lineage["majority_sign_method"], lineage["r"]) == ("merge", "dare_ties", [0.5, 0.5], 0.5, 42, "total", 4)
    local, registered = lineage["sources"]
    assert local["resolved"] == str(adapters["a"]) and local["sha256"] == weights_digest(adapters["a"])
    assert registered["uri"] == "models:/earlier@champion" and registered["resolved"] == f"models:/earlier/{version}"
    assert (registered["parent_run_id"], registered["dataset_digest"], registered["base_digest"]) == (
        "run-b", "data-b", digest)
    assert registered["run_id"] == client.get_model_version("earlier", version).run_id
    assert registered["sha256"] == weights_digest(adapters["b"])  # the registered adapter's exact weights
    assert lineage["sha256"] == weights_digest(art.adapter_dir)
    assert json.loads(Path(art.adapter_dir, "adapter_config.json").read_text())["base_model_name_or_path"] == str(
        tiny_model_dir)
    assert art.n_trainable == sum(t.numel() for t in load_file(Path(art.adapter_dir, "adapter_model.safetensors")).values())

    stage = client.search_runs([ctx.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{ctx.parent_run_id}' "
                               "and tags.`tunewright.stage` = '2-model'")[0]
    assert stage.data.params["merge.combination"] == "dare_ties"
    assert json.loads(stage.data.params["merge.sources"]) == [str(adapters["a"]), f"models:/earlier/{version}"]
    logged = json.loads(Path(client.download_artifacts(stage.info.run_id, "lineage.json")).read_text())
    assert logged == lineage

    # an adapter registered over another base is refused, naming both digests
    other = _register("elsewhere", adapters["b"], tiny_model_dir, ctx.experiment_id,
                      {"tunewright.base_digest": "sha256:0123"})
    with pytest.raises(ValueError, match=f"models:/elsewhere/{other}.*sha256:0123, not this recipe's base"):
        initialise_model.fn(_with_merge(recipe.model, {"adapters": [str(adapters["a"]), f"models:/elsewhere/{other}"],
                                                       "weights": [1, 1]}), 42, ctx)


def test_a_merged_adapter_is_evaluated_gated_and_registered_with_its_lineage(prefect_server, tiny_recipe, adapters,
                                                                              tiny_model_dir, state):
    """train.max_steps 0: stage 4 hands on the merged adapter unchanged, stage 5 scores it against the base, and
    the registered version names the adapters it came from."""
    import mlflow
    from mlflow import MlflowClient

    from flows.finetune import finetune
    from tasks.model import folder_digest
    from tunewright.registry.tracking import pipeline_run

    recipe = load_recipe(tiny_recipe)
    with pipeline_run(recipe) as ctx:  # an earlier run's registered adapter
        version = _register("tiny-tickets", adapters["b"], tiny_model_dir, ctx.experiment_id,
                            {"tunewright.base_digest": folder_digest(tiny_model_dir, Path(ctx.state_dir, "d.json")),
                             "tunewright.parent_run_id": ctx.parent_run_id})
    merge = (f"model.merge={{adapters: [{adapters['a']}, 'models:/tiny-tickets/{version}'], weights: [0.7, 0.3], "
             "combination: ties, density: 0.8}")
    recipe = load_recipe(tiny_recipe, ["train.max_steps=0", merge])
    result = finetune(recipe=recipe)

    assert result.trained.steps == 0 and result.trained.kind == "adapter"
    start = load_file(Path(result.context.work_dir, "model", "adapter_init", "adapter_model.safetensors"))
    handed = load_file(Path(result.trained.output_dir, "adapter_model.safetensors"))
    assert start.keys() == handed.keys() and all(start[k].equal(handed[k]) for k in start)
    assert result.scores.tuned_loss != result.scores.base_loss  # stage 5 scored the merge, not the base

    client = MlflowClient()
    mv = client.get_model_version("tiny-tickets", result.deployed.version)
    tags = mv.tags
    assert result.deployed.version == str(int(version) + 1)
    assert tags["tunewright.origin"] == "merged"
    assert tags["tunewright.merge.combination"] == "ties" and json.loads(tags["tunewright.merge.weights"]) == [0.7, 0.3]
    assert tags["tunewright.merge.density"] == "0.8" and tags["tunewright.merge.majority_sign_method"] == "total"
    assert json.loads(tags["tunewright.merge.sources"]) == [str(adapters["a"]), f"models:/tiny-tickets/{version}"]
    assert tags["tunewright.merge.source_versions"] == f"tiny-tickets/{version}"
    assert tags["tunewright.merge.source_runs"].split(",")[1] == ctx.parent_run_id
    assert json.loads(tags["tunewright.merge.source.1"])["version"] == version
    assert tags["tunewright.recipe_digest"] == recipe.digest()
    assert tags["tunewright.promotion"].startswith("promoted")  # the tiny recipe's gate: min_improvement -1
    assert str(client.get_model_version_by_alias("tiny-tickets", "champion").version) == result.deployed.version
    deploy_run = mlflow.get_run(mv.run_id)
    assert json.loads(Path(client.download_artifacts(deploy_run.info.run_id, "deploy/lineage.json")).read_text())[
        "sources"][1]["resolved"] == f"models:/tiny-tickets/{version}"


# --- serving several adapters ----------------------------------------------------------------


@pytest.fixture()
def served(adapters, tiny_model_dir, tiny_recipe, state, tmp_path):
    """An OpenAI-compatible server on a free port: adapter `a` as `first`, a registered copy of `b` (with a
    system prompt) under its registry name, and the base; yields (url, engine, request log)."""
    import logging
    import socket
    import threading

    import uvicorn

    from tunewright.registry.tracking import pipeline_run
    from tunewright.serve.app import create_app
    from tunewright.serve.wiring import open_engine

    with pipeline_run(load_recipe(tiny_recipe)) as ctx:
        _register("served", adapters["b"], tiny_model_dir, ctx.experiment_id, {})
    engine, _ = open_engine([f"first={adapters['a']}", "models:/served/1"], None, state / "adapters",
                            serve_base="base", log=logging.getLogger("test"))
    log = tmp_path / "requests.jsonl"
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(engine, max_tokens=16, request_log=log), host="127.0.0.1",
                                           port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        thread.join(0.05)
    yield f"http://127.0.0.1:{port}", log
    server.should_exit = True
    thread.join(10)
    engine.stop()


def test_one_server_switches_adapters_per_request_by_model_name(served, adapters, tiny_model_dir):
    """Over HTTP, each request's `model` picks its adapter: answers and log-probabilities are exactly what that
    adapter gives on its own, they differ between adapters, and switching back gives the first again."""
    import httpx
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tasks.monitor import read_requests
    from tunewright.chat import generate

    url, log = served
    user = [{"role": "user", "content": "My Orbit Mouse will not turn on. Order A12345."}]
    with httpx.Client(base_url=url, timeout=60) as client:
        listed = client.get("/v1/models").json()["data"]
        assert [m["id"] for m in listed] == ["first", "served/1", "base"]
        assert listed[1]["registered_model"] == "served" and listed[1]["version"] == "1"

        def ask(model: str) -> dict:
            reply = client.post("/v1/chat/completions", json={"model": model, "messages": user, "max_tokens": 8,
                                                              "logprobs": True, "top_logprobs": 3})
            assert reply.status_code == 200, reply.text
            return reply.json()["choices"][0]

        first, second, base, first_again = ask("first"), ask("served/1"), ask("base"), ask("first")
        missing = client.post("/v1/chat/completions", json={"model": "nope", "messages": user})
        stream = client.post("/v1/chat/completions", json={"model": "served/1", "messages": user, "max_tokens": 8,
                                                           "stream": True})
    events = [json.loads(line[6:]) for line in stream.text.splitlines() if line.startswith("data: {")]
    assert stream.text.rstrip().endswith("data: [DONE]")
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events) == second["message"]["content"]
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"
    assert first == first_again
    assert len({first["message"]["content"], second["message"]["content"], base["message"]["content"]}) == 3

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    for name, choice, system in (("a", first, None), ("b", second, "Answer as JSON.")):
        net = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32),
                                        adapters[name]).eval()
        conv = ([{"role": "system", "content": system}] if system else []) + user
        assert generate(net, tok, [conv], max_new_tokens=8, batch_size=1) == [choice["message"]["content"]]
        ids = tok.apply_chat_template(conv, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        with torch.no_grad():
            logp = torch.log_softmax(net(**ids).logits[0, -1], dim=-1)
        served_first = choice["logprobs"]["content"][0]
        assert served_first["logprob"] == pytest.approx(float(logp.max()), abs=1e-4)
        assert [t["logprob"] for t in served_first["top_logprobs"]] == pytest.approx(logp.topk(3).values.tolist(),
                                                                                      abs=1e-4)
    assert first["logprobs"]["content"][0]["logprob"] != second["logprobs"]["content"][0]["logprob"]
    # every answered request went to the log stage 7 reads as production traffic (written off the request path)
    deadline = time.monotonic() + 10
    while (not log.is_file() or len(read_requests(log)) < 5) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert read_requests(log) == [user[0]["content"]] * 5
