"""The CUDA side of padding-free training: torch's variable-length kernel against the segment-by-segment reference
the CPU tests check (tests/test_varlen.py), and a bf16 step against the padded sdpa step. Skipped without CUDA."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("prefix", [0, 24])
def test_the_kernel_attends_each_segment_as_the_reference_does(prefix):
    from tunewright.train import attention

    assert attention.varlen_kernel() is not None
    torch.manual_seed(0)
    lengths = torch.tensor([37, 5, 128, 64], device="cuda")
    total = prefix + int(lengths.sum())
    layout = attention.Unpadded(lengths, prefix)
    q = torch.randn(1, 8, total, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(1, 2, total, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(1, 2, total, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    fast, _ = attention.attend_segments(q, k, v, layout)
    grads = torch.autograd.grad(fast.float().square().sum(), (q, k, v))
    # the reference: the same segments through sdpa with an explicit mask (what the CPU runs)
    real = attention.varlen_applies
    attention.varlen_applies = lambda *a: False
    try:
        ref, _ = attention.attend_segments(q, k, v, layout)
    finally:
        attention.varlen_applies = real
    ref_grads = torch.autograd.grad(ref.float().square().sum(), (q, k, v))
    assert (fast.float() - ref.float()).abs().max() < 2e-2
    for g, r in zip(grads, ref_grads):
        assert (g.float() - r.float()).abs().max() <= 2e-2 * r.float().abs().max() + 1e-2


def test_a_bf16_step_matches_the_padded_step(tiny_model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tests.test_unpadded import _rows
    from tunewright.chat import pad_batch
    from tunewright.train import attention
    from tunewright.train.loss import Kernels, token_loss

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    batch = {k: v.cuda() for k, v in pad_batch(_rows(tok), tok.pad_token_id).items()}
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).cuda()
    net = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM",
                                           init_lora_weights=False))

    def step(unpadded: bool):
        net.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = token_loss(net, batch, kernels=Kernels(unpadded=unpadded))
        loss.backward()
        return float(loss), [p.grad.float().clone() for p in net.parameters() if p.requires_grad]

    plain_loss, plain = step(False)
    assert attention.use_for_training(net.get_base_model(), torch.device("cuda"))
    fast_loss, fast = step(True)
    assert fast_loss == pytest.approx(plain_loss, rel=1e-2)
    for g, r in zip(fast, plain):
        assert (g - r).norm() <= 5e-2 * r.norm() + 1e-6
