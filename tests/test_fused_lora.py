"""The fused LoRA layer gives PEFT's loss and gradients, and stands aside wherever PEFT's own forward is needed."""

from __future__ import annotations

import torch

from tests.test_train_speed import _batch, _lora


def _loss_and_grads(net, batch, amp):
    from tunewright.train.loss import token_loss

    net.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=amp or torch.float32, enabled=amp is not None):
        loss = token_loss(net, batch)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in net.named_parameters() if p.requires_grad}


def _compare(net, batch, amp, rtol, atol, **expect):
    from tunewright.train import fused_lora

    loss, grads = _loss_and_grads(net, batch, amp)
    n = fused_lora.use_for_training(net, torch.device("cpu"))
    assert n == fused_lora.fused_layers(net) == expect.get("layers", 2 * 7)
    fused_loss, fused_grads = _loss_and_grads(net, batch, amp)
    assert torch.allclose(fused_loss, loss, rtol=rtol, atol=atol), (fused_loss, loss)
    assert fused_grads.keys() == grads.keys()
    for name, g in grads.items():
        assert torch.allclose(fused_grads[name], g, rtol=rtol, atol=atol * max(1.0, float(g.abs().max()))), name
        assert fused_grads[name].dtype == g.dtype
    fused_lora.stop_using(net)
    assert fused_lora.fused_layers(net) == 0
    return loss


def test_fused_lora_gives_peft_loss_and_gradients_in_fp32(tiny_model_dir):
    _compare(_lora(tiny_model_dir), _batch(tiny_model_dir), None, rtol=1e-5, atol=1e-6)


def test_fused_lora_gives_peft_loss_and_gradients_under_bf16_autocast(tiny_model_dir):
    from tunewright.train.methods import frozen_linear_weights_in_autocast_dtype, keep_adapter_inputs_in_autocast_dtype

    batch = _batch(tiny_model_dir)
    for cast in (False, True):  # fp32 base cast by autocast (ZeRO's processes), and the base kept bf16 (stage 4)
        net = _lora(tiny_model_dir)
        keep_adapter_inputs_in_autocast_dtype(net)
        if cast:
            frozen_linear_weights_in_autocast_dtype(net, "bf16")
        # bf16 rounds the adapter's product once instead of three times: agreement to bf16's precision
        _compare(net, batch, torch.bfloat16, rtol=2e-2, atol=2e-2)


def test_fused_lora_with_dropout_and_bias_gives_peft_gradients(tiny_model_dir):
    """Dropout on the adapter's input (same mask from the same seed) and a trainable bias on the base layer."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from tunewright.train import fused_lora

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    net = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.3, target_modules=["q_proj", "down_proj"],
                                           task_type="CAUSAL_LM", init_lora_weights=False)).train()
    q = net.get_base_model().model.layers[0].self_attn.q_proj
    q.base_layer.bias = torch.nn.Parameter(torch.randn(q.base_layer.out_features) * 0.1)
    batch = _batch(tiny_model_dir)

    def run():
        torch.manual_seed(7)
        return _loss_and_grads(net, batch, None)

    loss, grads = run()
    assert fused_lora.use_for_training(net, torch.device("cpu")) == 4
    fused_loss, fused_grads = run()
    assert torch.allclose(fused_loss, loss, rtol=1e-5, atol=1e-6)
    assert any("bias" in n for n in grads)
    for name, g in grads.items():
        assert torch.allclose(fused_grads[name], g, rtol=1e-4, atol=1e-6), name


def test_fused_lora_stands_aside_for_disabled_adapters_dora_and_other_devices(tiny_model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from tunewright.train import fused_lora

    net = _lora(tiny_model_dir)
    batch = _batch(tiny_model_dir)
    assert fused_lora.use_for_training(net, torch.device("meta")) == 0  # not a CPU run: PEFT's forward
    fused_lora.use_for_training(net, torch.device("cpu"))
    calls = []
    original = fused_lora._function

    def counting():
        fn = original()

        class Counted(fn):
            @staticmethod
            def forward(ctx, *args):
                calls.append(1)
                return fn.forward(ctx, *args)
        return Counted

    fused_lora._function = counting
    try:
        with torch.no_grad():
            with net.disable_adapter():  # a DPO reference: the base alone, through PEFT's forward
                ref = net(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            assert calls == []
            net(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            assert len(calls) == 14
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
        with torch.no_grad():
            plain = base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        assert torch.allclose(ref, plain, atol=1e-5)

        calls.clear()
        torch.manual_seed(0)
        dora = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32),
                              LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules="all-linear",
                                         task_type="CAUSAL_LM"))
        assert fused_lora.use_for_training(dora, torch.device("cpu")) == 14  # installed, and stands aside per call
        with torch.no_grad():
            dora(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        assert calls == []
    finally:
        fused_lora._function = original


def test_building_for_cpu_training_fuses_the_lora_layers(tiny_model_dir, tmp_path):
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from tunewright.recipe import AdapterConfig, ModelConfig
    from tunewright.train import fused_lora
    from tunewright.train.methods import build, peft_config

    cfg = ModelConfig(base=str(tiny_model_dir), adapter=AdapterConfig(method="lora", r=4, alpha=8))
    get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), peft_config(cfg.adapter)).save_pretrained(tmp_path)
    net = build(str(tiny_model_dir), str(tmp_path), cfg, torch.device("cpu"), False, "bf16")
    assert fused_lora.fused_layers(net) == 14
