"""The fused RMSNorm gives the model's own norm's outputs and gradients, and stands aside where it cannot."""

from __future__ import annotations

import functools

import pytest
import torch

from tests.test_fused_lora import _loss_and_grads
from tests.test_train_speed import _batch, _lora

CPU = torch.device("cpu")


def _norm(hidden=48, trainable=True):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    torch.manual_seed(0)
    norm = LlamaRMSNorm(hidden, eps=1e-5)
    norm.weight.data = torch.rand(hidden) + 0.5
    norm.weight.requires_grad_(trainable)
    return norm


def _through(norm, x, grads, amp=None):
    """The norm's output read by len(grads) consumers (as q, k and v read one norm), and the gradients."""
    x = x.detach().requires_grad_(True)
    norm.weight.grad = None
    with torch.autocast("cpu", dtype=amp or torch.float32, enabled=amp is not None):
        y = norm(x)
        outs = [y.to(amp or torch.float32) for _ in grads]  # what each consumer's own autocast cast makes
    torch.autograd.backward(outs, grads)
    return outs[0].detach(), x.grad, norm.weight.grad


def test_fp32_outputs_and_gradients_are_the_norms_own():
    from tunewright.train import fused_rmsnorm

    norm = _norm()
    x = torch.randn(3, 17, 48) * 4
    grads = [torch.randn(3, 17, 48) for _ in range(3)]
    own = _through(norm, x, grads)
    assert fused_rmsnorm.use_for_training(norm, CPU) == 1 == fused_rmsnorm.fused_layers(norm)
    fused = _through(norm, x, grads)
    for a, b in zip(own, fused):
        assert a.dtype == b.dtype and torch.allclose(a, b, rtol=1e-5, atol=1e-6)
    fused_rmsnorm.stop_using(norm)
    assert fused_rmsnorm.fused_layers(norm) == 0


def test_under_bf16_autocast_it_writes_what_the_consumers_cast_and_sums_their_gradients_in_bf16():
    from tunewright.train import fused_rmsnorm

    norm = _norm()
    x = torch.randn(3, 17, 48) * 4
    grads = [torch.randn(3, 17, 48).bfloat16() for _ in range(3)]
    own_y, own_dx, own_dw = _through(norm, x, grads, torch.bfloat16)
    fused_rmsnorm.use_for_training(norm, CPU)
    y, dx, dw = _through(norm, x, grads, torch.bfloat16)
    assert y.dtype == torch.bfloat16 and dx.dtype == torch.float32 and dw.dtype == torch.float32
    # the same fp32 values rounded once to bf16: at most one bf16 step apart (the sum of squares is reduced in
    # another order), and nearly all equal
    assert torch.allclose(y.float(), own_y.float(), rtol=2**-7, atol=0)
    assert (y != own_y).float().mean() < 0.01
    # the three consumers' bf16 gradients are summed in bf16 before the norm reads them: within bf16's precision
    for a, b in ((dx, own_dx), (dw, own_dw)):
        assert (a - b).norm() / b.norm() < 1e-2


def test_a_model_trains_with_the_same_loss_and_gradients(tiny_model_dir):
    """fp32: the plain model's loss and gradients. bf16 autocast: as close to the fp32 values as eager bf16 is
    (here both 3.2% off in the gradients: the norm's bf16 sums change nothing at that scale)."""
    from tunewright.train import fused_rmsnorm

    batch = _batch(tiny_model_dir)
    runs = {}
    for amp in (None, torch.bfloat16):
        net = _lora(tiny_model_dir)
        runs["eager", amp] = _loss_and_grads(net, batch, amp)
        assert fused_rmsnorm.use_for_training(net.get_base_model(), CPU) == 2 * 2 + 1  # two per layer, the final one
        runs["fused", amp] = _loss_and_grads(net, batch, amp)
    (loss, grads), (fused_loss, fused_grads) = runs["eager", None], runs["fused", None]
    assert torch.allclose(fused_loss, loss, rtol=1e-5, atol=0)
    for name, g in grads.items():
        assert (fused_grads[name] - g).norm() <= 1e-5 * g.norm(), name

    def error(run):
        run_loss, run_grads = run
        return (abs(float(run_loss - loss)) / float(loss),
                max(float((run_grads[n] - g).norm() / g.norm()) for n, g in grads.items()))

    (eager_loss_err, eager_grad_err), (fused_loss_err, fused_grad_err) = (error(runs["eager", torch.bfloat16]),
                                                                          error(runs["fused", torch.bfloat16]))
    assert fused_loss_err <= 1.25 * eager_loss_err + 1e-4, (fused_loss_err, eager_loss_err)
    assert fused_grad_err <= 1.25 * eager_grad_err, (fused_grad_err, eager_grad_err)


def test_it_stands_aside_for_norms_it_does_not_reproduce_and_for_other_dtypes():
    from tunewright.train import fused_rmsnorm

    class OffsetRMSNorm(torch.nn.Module):  # Gemma's form: scaled by (1 + weight)
        def __init__(self, hidden):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(hidden))
            self.eps = 1e-6

        def forward(self, x):
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * (1.0 + self.weight)

    assert fused_rmsnorm.use_for_training(OffsetRMSNorm(16), CPU) == 0
    assert fused_rmsnorm.use_for_training(_norm(), torch.device("meta")) == 0  # not a CPU run
    norm = _norm()
    fused_rmsnorm.use_for_training(norm, CPU)
    calls = []
    real = fused_rmsnorm._function
    fused_rmsnorm._function = lambda: calls.append(1) or real()
    try:
        norm(torch.randn(2, 48, dtype=torch.bfloat16))  # a bf16 input: its own forward
        norm.weight.ds_id = 7  # a ZeRO-3-partitioned weight
        norm(torch.randn(2, 48))
        assert not calls
        del norm.weight.ds_id
        norm(torch.randn(2, 48))
        assert calls
    finally:
        fused_rmsnorm._function = real


@pytest.mark.parametrize("for_training", [True, False])
def test_load_base_fuses_the_norms_for_training_only(tiny_model_dir, for_training):
    from tunewright.recipe import ModelConfig
    from tunewright.train import fused_rmsnorm
    from tunewright.train.methods import load_base

    model = load_base(str(tiny_model_dir), ModelConfig(base="smollm2-135m-instruct"), CPU, for_training=for_training)
    assert fused_rmsnorm.fused_layers(model) == (5 if for_training else 0)
    assert all(isinstance(m.__dict__.get("forward"), functools.partial) == for_training
               for m in model.modules() if type(m).__name__ == "LlamaRMSNorm")
