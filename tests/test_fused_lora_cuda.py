"""The fused LoRA layer on CUDA: PEFT's loss and gradients under bf16 autocast. Skipped without CUDA."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_fused_lora_on_cuda_gives_peft_loss_and_gradients(tiny_model_dir):
    from tests.test_train_speed import _batch, _lora
    from tunewright.train import fused_lora
    from tunewright.train.loss import token_loss

    net = _lora(tiny_model_dir).cuda()
    batch = {k: v.cuda() for k, v in _batch(tiny_model_dir).items()}

    def step():
        net.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = token_loss(net, batch)
        loss.backward()
        return float(loss), {n: p.grad.float().clone() for n, p in net.named_parameters() if p.requires_grad}

    loss, grads = step()
    assert fused_lora.use_for_training(net, torch.device("cuda")) == fused_lora.fused_layers(net) > 0
    fused_loss, fused = step()
    assert fused_loss == pytest.approx(loss, rel=1e-2)
    for name, g in grads.items():
        assert (fused[name] - g).norm() <= 2e-2 * g.norm() + 1e-6, name
