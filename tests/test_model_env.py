"""Stages 2 and 3: base resolution and caching, adapter attachment, hardware and DeepSpeed config."""

import json
from pathlib import Path

import pytest

from tasks.environment import deepspeed_config, pick_precision, setup_environment
from tasks.model import file_sha256, initialise_model, resolve_base
from tunewright.recipe import EnvironmentConfig, ModelConfig, TrainConfig

ROOT = Path(__file__).resolve().parents[1]


def test_initialise_model_saves_an_adapter_with_only_lora_trainable(run_ctx):
    from peft import PeftConfig

    recipe, ctx = run_ctx
    art = initialise_model.fn(recipe.model, recipe.environment.seed, ctx)
    assert Path(art.base_dir) == Path(recipe.model.base).resolve()
    assert 0 < art.n_trainable < art.n_params * 0.5
    cfg = PeftConfig.from_pretrained(art.adapter_dir)
    assert cfg.peft_type.value == "LORA" and cfg.r == 4


def test_a_folder_without_config_is_rejected_with_the_key_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="model.base: .* has no config.json"):
        resolve_base(ModelConfig(base=str(tmp_path)), tmp_path, None)


def test_unreachable_hub_id_says_what_base_accepts(tmp_path):
    with pytest.raises(FileNotFoundError, match="not the embedded model, a folder or a .gguf file"):
        resolve_base(ModelConfig(base="nobody/no-such-model"), tmp_path, None)


def test_file_hash_is_remembered_and_recomputed_when_the_file_changes(tmp_path):
    f = tmp_path / "w.bin"
    f.write_bytes(b"a" * 100)
    index = tmp_path / "index.json"
    first = file_sha256(f, index)
    assert file_sha256(f, index) == first and len(json.loads(index.read_text())) == 1
    f.write_bytes(b"b" * 101)
    assert file_sha256(f, index) != first


@pytest.mark.slow
def test_embedded_gguf_is_converted_once_and_cached_by_hash(tmp_path, monkeypatch):
    """First resolve converts the GGUF; the second finds the safetensors cache instead of converting again."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tasks import model as stage2

    conversions, convert = [], stage2._convert_gguf

    def counted(gguf, *args):
        conversions.append(gguf)
        return convert(gguf, *args)

    monkeypatch.setattr(stage2, "_convert_gguf", counted)
    cfg = ModelConfig()
    base_dir, digest = resolve_base(cfg, tmp_path, _Log())
    assert digest.startswith("sha256:") and (base_dir / "model.safetensors").is_file()
    assert len(conversions) == 1
    again, _ = resolve_base(cfg, tmp_path, _Log())
    assert again == base_dir and len(conversions) == 1, "converted again"
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    tok = AutoTokenizer.from_pretrained(base_dir)
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tok.decode(out[0][ids["input_ids"].shape[1]:])


class _Log:
    def info(self, *args):
        pass


def test_precision_auto_follows_hardware_and_impossible_requests_fail():
    cpu_bf16 = {"device": "cpu", "bf16_supported": True}
    cpu_plain = {"device": "cpu", "bf16_supported": False}
    assert pick_precision("auto", cpu_bf16) == "bf16"
    assert pick_precision("auto", cpu_plain) == "fp32"
    assert pick_precision("auto", {"device": "cuda", "bf16_supported": False}) == "fp16"
    with pytest.raises(RuntimeError, match="fp16 needs a CUDA device"):
        pick_precision("fp16", cpu_bf16)
    with pytest.raises(RuntimeError, match="no bf16 support"):
        pick_precision("bf16", cpu_plain)


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_reference_deepspeed_configs_match_the_generator(stage):
    env = EnvironmentConfig(deepspeed_stage=stage, offload_optimizer=stage >= 2, offload_params=stage == 3)
    expected = deepspeed_config(env, TrainConfig(batch_size=4, grad_accum=4), "bf16")
    shipped = json.loads((ROOT / f"infra/deepspeed/zero{stage}.json").read_text())
    assert shipped == expected
    assert shipped["zero_optimization"]["stage"] == stage


def test_setup_environment_writes_the_deepspeed_config_and_seeds(run_ctx):
    import torch

    recipe, ctx = run_ctx
    model = initialise_model.fn(recipe.model, 0, ctx)
    env_cfg = recipe.environment.model_copy(update={"deepspeed_stage": 3, "offload_params": True})
    art = setup_environment.fn(env_cfg, recipe.train, recipe.model, model, ctx)
    ds = json.loads(Path(art.deepspeed_config).read_text())
    assert ds["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert ds["train_micro_batch_size_per_gpu"] == recipe.train.batch_size
    a = torch.rand(3)
    setup_environment.fn(env_cfg, recipe.train, recipe.model, model, ctx)
    assert torch.equal(a, torch.rand(3))
    assert 0 < art.memory_estimate_gb < art.memory_available_gb


def test_preflight_refuses_a_recipe_that_cannot_fit_and_names_what_would(run_ctx):
    from tasks.environment import PreflightError

    recipe, ctx = run_ctx
    model = initialise_model.fn(recipe.model, 0, ctx)
    train = recipe.train.model_copy(update={"batch_size": 64, "max_seq_len": 512})
    with pytest.raises(PreflightError) as err:
        setup_environment.fn(recipe.environment, train, recipe.model, model, ctx, available_bytes=0.4 * 2**30)
    msg = str(err.value)
    assert "only 0.4 GiB is available" in msg and "would fit" in msg
    assert "train.batch_size" in msg


def test_memory_estimate_orders_fp32_lora_above_qlora_and_zero3_divides_weights():
    from tasks.environment import estimate_memory

    cfg = {"hidden_size": 576, "num_hidden_layers": 30, "num_attention_heads": 9, "vocab_size": 49152}
    kw = dict(batch_size=8, seq_len=256, precision="bf16", gradient_checkpointing=False)
    lora = estimate_memory(cfg, 135_000_000, 5_000_000, bits=None, **kw)
    qlora = estimate_memory(cfg, 135_000_000, 5_000_000, bits=4, **kw)
    # 4-bit linear layers plus the tied 49152 x 576 embedding in bf16, as load_base places them
    assert qlora["weights"] == pytest.approx((135e6 - 49152 * 576) * 0.5625 + 49152 * 576 * 2)
    assert qlora["weights"] < 0.25 * lora["weights"]
    full = estimate_memory(cfg, 135_000_000, 135_000_000, bits=None, **kw)
    zero3 = estimate_memory(cfg, 135_000_000, 135_000_000, bits=None, zero_stage=3, world_size=4, **kw)
    assert zero3["weights"] == full["weights"] / 4 and zero3["optimizer"] == full["optimizer"] / 4
    ckpt = estimate_memory(cfg, 135_000_000, 5_000_000, bits=None, **{**kw, "gradient_checkpointing": True})
    assert ckpt["activations"] < lora["activations"]


def test_base_model_from_s3_is_downloaded_once_and_loads(tiny_model_dir, s3_endpoint, tmp_path):
    import boto3
    from transformers import AutoModelForCausalLM

    s3 = boto3.client("s3")
    s3.create_bucket(Bucket="models")
    for f in Path(tiny_model_dir).iterdir():
        s3.upload_file(str(f), "models", f"tiny/v1/{f.name}")
    cfg = ModelConfig(base="s3://models/tiny/v1")
    local, digest = resolve_base(cfg, tmp_path, _Log())
    assert digest.startswith("s3://models/tiny/v1@") and (local / "config.json").is_file()
    AutoModelForCausalLM.from_pretrained(local)
    s3.delete_object(Bucket="models", Key="tiny/v1/config.json")  # unchanged listing -> cache; changed -> refetch
    with pytest.raises(FileNotFoundError, match="holds no config.json"):
        resolve_base(cfg, tmp_path, _Log())
    with pytest.raises(FileNotFoundError, match="nothing at s3://models/absent"):
        resolve_base(ModelConfig(base="s3://models/absent"), tmp_path, _Log())
