"""Every fine-tuning method trains a tiny model: what should move moves, what is frozen stays put."""

from pathlib import Path

import pytest
import torch

from tasks.data import prepare_data
from tasks.environment import setup_environment
from tasks.finetune import fine_tune
from tunewright.train import methods
from tasks.model import initialise_model

STEPS = 3


@pytest.fixture()
def spy_build(monkeypatch):
    """Record the network the fine-tune task builds, and a copy of its weights before training."""
    seen = {}
    real = methods.build

    def build(*args, **kwargs):
        net = real(*args, **kwargs)
        seen["net"] = net
        seen["before"] = {n: p.detach().clone() for n, p in net.named_parameters()}
        return net

    monkeypatch.setattr(methods, "build", build)
    return seen


def _train(run_ctx, adapter: dict, quantization: dict | None = None, train: dict | None = None,
           environment: dict | None = None):
    recipe, ctx = run_ctx
    model_cfg = recipe.model.model_copy(update={
        "adapter": recipe.model.adapter.model_copy(update=adapter),
        "quantization": recipe.model.quantization.model_copy(update=quantization or {}),
    })
    train_cfg = recipe.train.model_copy(update={"max_steps": STEPS, "learning_rate": 1e-2, **(train or {})})
    data = prepare_data.fn(recipe.data, ctx)
    model = initialise_model.fn(model_cfg, recipe.environment.seed, ctx)
    env_cfg = recipe.environment.model_copy(update=environment or {})
    env = setup_environment.fn(env_cfg, train_cfg, model_cfg, model, ctx)
    return fine_tune.fn(train_cfg, model_cfg, data, model, env, ctx)


def _moved(seen) -> tuple[set[str], set[str]]:
    moved, still = set(), set()
    for name, param in seen["net"].named_parameters():
        (still if torch.equal(seen["before"][name], param.detach()) else moved).add(name)
    return moved, still


def _trainable(seen) -> set[str]:
    return {n for n, p in seen["net"].named_parameters() if p.requires_grad}


@pytest.mark.parametrize("adapter,marker", [
    ({"method": "lora"}, "lora_"),
    ({"method": "lora", "use_rslora": True}, "lora_"),
    ({"method": "dora"}, "lora_"),
    ({"method": "ia3"}, "ia3_"),
    ({"method": "prompt_tuning", "num_virtual_tokens": 4}, "prompt_encoder"),
    ({"method": "prefix_tuning", "num_virtual_tokens": 4}, "prompt_encoder"),
])
def test_adapter_methods_move_only_adapter_weights(run_ctx, spy_build, adapter, marker):
    trained = _train(run_ctx, adapter)
    moved, still = _moved(spy_build)
    assert moved, "nothing trained"
    assert all(marker in n for n in moved), f"non-adapter weights moved: {sorted(n for n in moved if marker not in n)[:3]}"
    assert any(marker not in n for n in still), "the frozen base should be untouched"
    assert trained.kind == "adapter" and (Path(trained.output_dir) / "adapter_config.json").is_file()
    if adapter.get("method") == "dora":
        assert any("lora_magnitude_vector" in n for n in moved)
    if adapter.get("use_rslora"):
        layer = next(m for m in spy_build["net"].modules() if hasattr(m, "scaling") and isinstance(m.scaling, dict))
        assert abs(layer.scaling["default"] - 8 / 4 ** 0.5) < 1e-6  # alpha / sqrt(r)


def test_full_fine_tuning_moves_every_weight_and_saves_a_whole_model(run_ctx, spy_build):
    trained = _train(run_ctx, {"method": "full"})
    moved, still = _moved(spy_build)
    assert not still, f"frozen under full fine-tuning: {sorted(still)[:3]}"
    assert trained.kind == "full" and (Path(trained.output_dir) / "config.json").is_file()


def test_half_fine_tuning_trains_exactly_half_of_the_layer_groups_per_round(run_ctx, spy_build):
    _train(run_ctx, {"method": "hft", "hft_round_steps": 100})
    moved, still = _moved(spy_build)
    groups = {n.rsplit(".", 1)[0] for n in spy_build["before"] if ".layers." in n}
    moved_groups = {n.rsplit(".", 1)[0] for n in moved}
    assert moved_groups <= groups and len(moved_groups) == len(groups) // 2
    assert not any(".layers." not in n for n in moved), "embeddings, final norm and head stay frozen"


def test_half_fine_tuning_picks_a_new_half_each_round(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    hft = methods.HalfFineTuning(AutoModelForCausalLM.from_pretrained(tiny_model_dir), seed=1, round_steps=2)
    first, same, second = hft.select(1), hft.select(2), hft.select(3)
    assert first == same and first != second and len(first) == len(hft.names) // 2


def test_qlora_base_layers_are_4bit_and_stay_frozen(run_ctx, spy_build):
    import bitsandbytes as bnb

    _train(run_ctx, {"method": "qlora"}, {"quant_type": "nf4", "double_quant": True, "compute_dtype": "bf16"})
    net = spy_build["net"]
    four_bit = [m for m in net.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert four_bit, "no 4-bit layers in the QLoRA base"
    assert all(m.weight.quant_type == "nf4" and m.weight.dtype == torch.uint8 for m in four_bit)
    moved, still = _moved(spy_build)
    assert moved and all("lora_" in n for n in moved)


@pytest.mark.parametrize("precision,embedding_dtype", [("bf16", torch.bfloat16), ("fp32", torch.float32)])
def test_qlora_keeps_unquantised_embeddings_in_the_autocast_dtype(run_ctx, spy_build, precision, embedding_dtype):
    """Under bf16 autocast the embeddings, tied head and norms sit in bf16 (half the memory, a bf16
    residual stream); without autocast they stay fp32. The adapter itself always trains in fp32."""
    from tasks.environment import detect_hardware

    if precision == "bf16" and not detect_hardware()["bf16_supported"]:
        pytest.skip("no bf16 on this CPU")
    _train(run_ctx, {"method": "qlora"}, {"compute_dtype": "bf16"}, environment={"precision": precision})
    base = spy_build["net"].get_base_model()
    assert base.get_input_embeddings().weight.dtype == embedding_dtype
    assert base.get_output_embeddings().weight.dtype == embedding_dtype
    norms = [p for n, p in base.named_parameters() if "norm" in n]
    assert norms and all(p.dtype == embedding_dtype for p in norms)
    assert all(p.dtype == torch.float32 for n, p in base.named_parameters() if "lora_" in n)
    moved, _ = _moved(spy_build)
    assert moved and all("lora_" in n for n in moved)


def test_qlora_with_dora_trains_magnitudes_and_low_rank_weights_over_a_4bit_base(run_ctx, spy_build):
    import bitsandbytes as bnb

    _train(run_ctx, {"method": "qlora", "use_dora": True}, {"compute_dtype": "bf16"})
    net = spy_build["net"]
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in net.modules())
    moved, _ = _moved(spy_build)
    assert any("lora_magnitude_vector" in n for n in moved) and any("lora_A" in n for n in moved)
    assert all("lora_" in n for n in moved)


def test_fp4_and_8bit_bases_train_lora(run_ctx, spy_build):
    import bitsandbytes as bnb

    _train(run_ctx, {"method": "qlora"}, {"quant_type": "fp4", "double_quant": False, "compute_dtype": "fp32"})
    assert any(isinstance(m, bnb.nn.Linear4bit) and m.weight.quant_type == "fp4" for m in spy_build["net"].modules())
    _train(run_ctx, {"method": "lora"}, {"bits": 8})
    assert any(isinstance(m, bnb.nn.Linear8bitLt) for m in spy_build["net"].modules())
    moved, _ = _moved(spy_build)
    assert moved and all("lora_" in n for n in moved)


def test_gradient_checkpointing_trains_the_same_adapter(run_ctx, spy_build):
    _train(run_ctx, {"method": "lora"}, train={"gradient_checkpointing": True})
    assert spy_build["net"].get_base_model().is_gradient_checkpointing
    moved, _ = _moved(spy_build)
    assert moved and all("lora_" in n for n in moved)


def test_mixture_of_experts_base_trains_lora_on_attention_and_expert_weights(run_ctx, spy_build, tiny_moe_dir):
    recipe, ctx = run_ctx
    moe_recipe = recipe.model_copy(update={"model": recipe.model.model_copy(update={"base": str(tiny_moe_dir)})})
    _train((moe_recipe, ctx), {
        "method": "lora", "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
        "target_parameters": ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
    })
    moved, still = _moved(spy_build)
    assert all("lora_" in n for n in moved)
    assert any("experts" in n for n in moved), "expert weights got no adapter"
    assert any("self_attn" in n for n in moved), "attention got no adapter"
    assert any(n.endswith("mlp.experts.gate_up_proj") or "experts.base_layer" in n for n in still)
