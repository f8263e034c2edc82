"""The trainer's speed-ups change no number: frozen base weights kept 16-bit under autocast, fused AdamW, the
fused vocabulary projection and cross-entropy, and the CPU training attention."""

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
    from tunewright.train.loss import token_loss

    net.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = token_loss(net, batch)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in net.named_parameters() if p.requires_grad}


def test_frozen_weights_kept_16_bit_give_autocasts_loss_and_gradients(tiny_model_dir):
    from tunewright.train.methods import frozen_linear_weights_in_autocast_dtype

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

    from tunewright.recipe import AdapterConfig, ModelConfig
    from tunewright.train.methods import build, peft_config

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
    from tunewright.train.methods import optimizer

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


def _projected(head, hidden, targets, amp, fused: bool):
    import torch.nn.functional as F

    from tunewright.train.cross_entropy import chunked_cross_entropy

    for t in [hidden, *head.parameters()]:
        t.grad = None
    with torch.autocast("cpu", dtype=amp or torch.float32, enabled=amp is not None):
        losses = (chunked_cross_entropy(head, hidden, targets, 64) if fused
                  else F.cross_entropy(head(hidden).float(), targets, reduction="none"))
    (losses * torch.linspace(0.5, 2.0, len(losses))).sum().backward()
    return [losses.detach()] + [None if t.grad is None else t.grad.clone() for t in [hidden, *head.parameters()]]


def test_the_fused_projection_and_cross_entropy_give_cross_entropys_losses_and_gradients():
    for trainable, bias in ((False, False), (True, True)):
        torch.manual_seed(0)
        head = torch.nn.Linear(32, 700, bias=bias).requires_grad_(trainable)
        hidden = torch.randn(150, 32, requires_grad=True)  # three chunks, the last one short
        targets = torch.randint(0, 700, (150,))
        exact = _projected(head, hidden, targets, None, fused=False)
        plain = _projected(head, hidden, targets, torch.bfloat16, fused=False)
        for amp in (None, torch.bfloat16):
            fused = _projected(head, hidden, targets, amp, fused=True)
            for name, a, b, c in zip(["losses", "hidden", "weight", "bias"], exact, fused, plain):
                if a is None:
                    assert b is None, name
                    continue
                if amp is None:
                    assert (a - b).abs().max() <= 1e-5 * a.abs().max(), (trainable, name)
                else:  # in bf16: as close to the fp32 values as autocast's own cross-entropy is, or closer
                    assert (a - b).abs().max() <= 2 * (a - c).abs().max() + 1e-6, (trainable, name)
    with torch.no_grad():  # evaluation: no graph, the same losses
        assert torch.allclose(_chunked_loss_no_grad(head, hidden, targets), plain[0], rtol=1e-5, atol=1e-4)


def _chunked_loss_no_grad(head, hidden, targets):
    from tunewright.train.cross_entropy import chunked_cross_entropy

    with torch.autocast("cpu", dtype=torch.bfloat16):
        return chunked_cross_entropy(head, hidden, targets, 64)


def test_a_frozen_heads_16_bit_copy_is_made_once_and_again_when_the_weight_changes():
    from tunewright.train import cross_entropy

    head = torch.nn.Linear(16, 50, bias=False).requires_grad_(False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        first = cross_entropy.frozen_head_in_autocast_dtype(head)
        assert first.dtype == torch.bfloat16 and torch.equal(first, head.weight.bfloat16())
        assert cross_entropy.frozen_head_in_autocast_dtype(head) is first
        head.weight.add_(1.0)  # a new version of the weight: a new copy
        second = cross_entropy.frozen_head_in_autocast_dtype(head)
        assert second is not first and torch.equal(second, head.weight.bfloat16())
        assert cross_entropy.frozen_head_in_autocast_dtype(head.requires_grad_(True)) is None  # trainable: autocast's own
    assert cross_entropy.frozen_head_in_autocast_dtype(head.requires_grad_(False)) is None  # no autocast


def _attend(fn, q, k, v, mask):
    class Layer(torch.nn.Module):
        is_causal = True
        num_key_value_groups = q.shape[1] // k.shape[1]

    for t in (q, k, v):
        t.grad = None
    out, _ = fn(Layer(), q, k, v, mask, scaling=0.25)
    (out * torch.arange(out.numel()).view_as(out).sin()).sum().backward()
    return [out.detach(), q.grad.clone(), k.grad.clone(), v.grad.clone()]


def test_the_cpu_training_attention_gives_sdpas_outputs_and_gradients():
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from tunewright.train.attention import attention

    torch.manual_seed(0)
    for queries, keys, padded in ((12, 12, False), (12, 12, True), (12, 30, True)):  # 30: a cached prefix
        q = torch.randn(2, 6, queries, 8, requires_grad=True)  # 6 query heads over 2 key/value heads
        k, v = torch.randn(2, 2, keys, 8, requires_grad=True), torch.randn(2, 2, keys, 8, requires_grad=True)
        mask = None
        if padded:
            mask = torch.ones(2, 1, queries, keys, dtype=torch.bool).tril(keys - queries)
            mask[1, :, :, keys - 3:] = False  # the second row's last three positions are padding
        for a, b in zip(_attend(sdpa_attention_forward, q, k, v, mask), _attend(attention, q, k, v, mask)):
            assert torch.allclose(a, b, atol=2e-6), (queries, keys, padded)


def test_training_on_the_cpu_switches_to_it_with_the_same_loss_and_gradients(tiny_model_dir, monkeypatch):
    from tunewright.recipe import ModelConfig
    from tunewright.train import attention
    from tunewright.train.methods import load_base

    batch = _batch(tiny_model_dir)
    net = _lora(tiny_model_dir)
    assert net.get_base_model().config._attn_implementation == "sdpa"
    loss, grads = _loss_and_grads(net, batch)
    calls = []
    real = attention.attention
    monkeypatch.setattr(attention, "attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    assert attention.use_for_training(net.get_base_model(), torch.device("cpu"))
    ours_loss, ours = _loss_and_grads(net, batch)
    assert calls  # the registered function ran
    assert torch.allclose(ours_loss, loss, rtol=1e-3)
    flat = torch.cat([g.flatten() for g in grads.values()])
    flat_ours = torch.cat([ours[n].flatten() for n in grads])
    assert torch.nn.functional.cosine_similarity(flat, flat_ours, dim=0) > 0.999
    cfg = ModelConfig(base="smollm2-135m-instruct")
    assert load_base(str(tiny_model_dir), cfg, torch.device("cpu")).config._attn_implementation == attention.NAME
    assert load_base(str(tiny_model_dir), cfg, torch.device("cpu"), for_training=False).config._attn_implementation == "sdpa"
