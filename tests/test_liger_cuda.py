"""Liger's kernels in stage 4: where they stand aside (checked everywhere), and on CUDA the loss and gradients of a
LoRA step with them against the model's own layers (skipped without CUDA or liger-kernel)."""

from __future__ import annotations

import pytest


def test_liger_stands_aside_on_the_cpu_and_says_why(tiny_model_dir):
    import torch
    from transformers import AutoModelForCausalLM

    from tunewright.train import liger

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert liger.use_for_training(model, torch.device("cpu")) == "Liger's kernels are Triton kernels for CUDA"
    assert not liger.applied(model)


def test_a_lora_step_with_liger_matches_the_models_own_layers(tiny_model_dir):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    pytest.importorskip("liger_kernel")
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tests.test_unpadded import _rows
    from tunewright.chat import pad_batch
    from tunewright.train import liger
    from tunewright.train.loss import token_loss

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    batch = {k: v.cuda() for k, v in pad_batch(_rows(tok), tok.pad_token_id).items()}

    def step(with_liger: bool):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).cuda()
        if with_liger:
            assert liger.use_for_training(model, torch.device("cuda")) == ""
        net = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM",
                                               init_lora_weights=False))
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = token_loss(net, batch)
        loss.backward()
        return float(loss), [p.grad.float() for p in net.parameters() if p.requires_grad]

    plain_loss, plain = step(False)
    fused_loss, fused = step(True)
    assert fused_loss == pytest.approx(plain_loss, rel=1e-2)
    for g, r in zip(fused, plain):
        assert (g - r).norm() <= 5e-2 * r.norm() + 1e-6
