"""The trainer's speed-ups change no number: frozen base weights kept 16-bit under autocast, and fused AdamW."""

from __future__ import annotations

import json

import torch


def _lora(tiny_model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    net = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM",
                                           init_lora_weights=False))
    return net.train()


def _batch(tiny_model_dir):
    from transformers import AutoTokenizer

    from tunewright.chat import encode_example, pad_batch

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    rows = [encode_example(tok, [{"role": "user", "content": f"ticket {i} " + "late parcel " * i},
                                 {"role": "assistant", "content": json.dumps({"category": "shipping", "n": i})}], 128)
            for i in range(4)]
    return pad_batch(rows, tok.pad_token_id)


def _loss_and_grads(net, batch):
    from tunewright.chat import token_loss

    net.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = token_loss(net, batch)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in net.named_parameters() if p.requires_grad}


def test_frozen_weights_kept_16_bit_give_autocasts_loss_and_gradients(tiny_model_dir):
    from tunewright.methods import frozen_linear_weights_in_autocast_dtype

    batch = _batch(tiny_model_dir)
    net = _lora(tiny_model_dir)
    loss, grads = _loss_and_grads(net, batch)
    n = frozen_linear_weights_in_autocast_dtype(net, "bf16")
    assert n == 2 * 7  # every adapted projection's base layer in both layers
    cast_loss, cast_grads = _loss_and_grads(net, batch)
    assert torch.equal(cast_loss, loss)
    for name, g in grads.items():
        assert torch.allclose(cast_grads[name], g, rtol=1e-5, atol=1e-7), name
    emb = net.get_input_embeddings().weight
    assert emb.dtype == torch.float32 and net.get_output_embeddings().weight.dtype == torch.float32  # tied: left
    assert all(p.dtype == torch.float32 for p in net.parameters() if p.requires_grad)
    assert all(m.weight.dtype == torch.float32 for n, m in net.named_modules() if n.endswith("norm"))


def test_build_casts_the_frozen_base_only_for_16_bit_lora(tiny_model_dir, tmp_path):
    from peft import get_peft_model

    from tunewright.methods import build, peft_config
    from tunewright.recipe import AdapterConfig, ModelConfig

    def dtypes(cfg, precision, **kw):
        from transformers import AutoModelForCausalLM

        adapter = tmp_path / cfg.adapter.method
        if not adapter.exists():
            get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), peft_config(cfg.adapter)).save_pretrained(adapter)
        net = build(str(tiny_model_dir), str(adapter), cfg, torch.device("cpu"), False, precision, **kw)
        return {p.dtype for p in net.parameters() if not p.requires_grad}

    lora = ModelConfig(base=str(tiny_model_dir), adapter=AdapterConfig(method="lora", r=4, alpha=8))
    assert dtypes(lora, "bf16") == {torch.bfloat16, torch.float32}  # linears 16-bit; norms, embeddings fp32
    assert dtypes(lora, "fp32") == {torch.float32}
    assert dtypes(lora, "bf16", cast_frozen=False) == {torch.float32}  # DeepSpeed's processes
    dora = ModelConfig(base=str(tiny_model_dir), adapter=AdapterConfig(method="dora", r=4, alpha=8))
    assert dtypes(dora, "bf16") == {torch.float32}  # DoRA reads the base weight's norm: left as it is


def test_fused_adamw_makes_the_same_update_as_adamw():
    from tunewright.methods import optimizer

    torch.manual_seed(0)
    a = [torch.randn(16, 8, requires_grad=True), torch.randn(8, requires_grad=True)]
    b = [p.detach().clone().requires_grad_(True) for p in a]
    fused, plain = optimizer(a, 1e-2, 0.01), torch.optim.AdamW(b, lr=1e-2, weight_decay=0.01)
    assert fused.defaults["fused"]
    for step in range(5):
        g = [torch.randn_like(p) for p in a]
        for p, q, gi in zip(a, b, g):
            p.grad, q.grad = gi.clone(), gi.clone()
        fused.step()
        plain.step()
    for p, q in zip(a, b):
        assert torch.allclose(p, q, rtol=1e-5, atol=1e-6)
