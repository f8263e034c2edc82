"""Padding-free batches for CUDA training (`tunewright_varlen`): a batch's rows as one sequence of variable-length
segments gives the padded call's loss and gradients, with and without a shared prefix and under gradient
checkpointing. On the CPU the segments are attended one by one (the reference the CUDA kernel is checked against in
tests/test_varlen_cuda.py); the layout the kernel reads is checked here."""

from __future__ import annotations

import pytest

from tests.test_shared_prefix import _lora, assert_same_loss_and_gradients
from tests.test_unpadded import _rows


def _varlen(net):
    from tunewright.train import attention

    attention.register()
    net.get_base_model().set_attn_implementation(attention.VARLEN_NAME)  # what stage 4's load does on CUDA
    return net


def _loss_and_grads(net, batch, unpadded: bool, shared: bool):
    from tunewright.train.loss import Kernels, token_loss

    net.zero_grad(set_to_none=True)
    loss = token_loss(net, batch, kernels=Kernels(shared_prefix=shared, unpadded=unpadded))
    loss.backward()
    return float(loss), {n: p.grad.detach().clone() for n, p in net.named_parameters() if p.requires_grad}


def test_the_segments_each_row_attends_to():
    """A prefix of 3 tokens then rows of 2 and 4: the prefix is a segment of its own, each row's keys are the prefix's
    and its own, and no row's keys include another row's."""
    import torch

    from tunewright.train.attention import Unpadded

    layout = Unpadded(torch.tensor([2, 4]), prefix=3)
    index, cu_q, cu_k, max_q, max_k = layout.varlen()
    assert cu_q.tolist() == [0, 3, 5, 9] and cu_k.tolist() == [0, 3, 8, 15]
    assert index.tolist() == [0, 1, 2, 0, 1, 2, 3, 4, 0, 1, 2, 5, 6, 7, 8]
    assert (max_q, max_k) == (4, 7) and cu_q.dtype == torch.int32
    no_prefix = Unpadded(torch.tensor([2, 4]), prefix=0).varlen()
    assert no_prefix[0] is None and no_prefix[1].tolist() == no_prefix[2].tolist() == [0, 2, 6]


@pytest.mark.parametrize("shared", [True, False], ids=["shared-prefix", "plain"])
def test_padding_free_batches_give_the_padded_calls_loss_and_gradients(tiny_model_dir, monkeypatch, shared):
    import torch
    from transformers import AutoTokenizer

    from tunewright.chat import pad_batch
    from tunewright.train import attention, loss
    from tunewright.train.forward import shared_prefix_length

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    batch = pad_batch(_rows(tok), tok.pad_token_id)
    lengths = batch["attention_mask"].sum(1)
    assert float((lengths.max() - lengths).sum()) / float(lengths.max() * len(lengths)) > 0.2  # much padding
    net = _lora(tiny_model_dir)
    plain_loss, plain = _loss_and_grads(net, batch, unpadded=False, shared=False)  # sdpa, padded
    _varlen(net)
    segments = []
    real = attention.attend_segments
    monkeypatch.setattr(attention, "attend_segments", lambda q, k, v, layout, *a: segments.append(
        (q.shape[2], layout.varlen()[1].numel() - 1)) or real(q, k, v, layout, *a))
    calls = []
    decode = loss.decode_unpadded
    monkeypatch.setattr(loss, "decode_unpadded", lambda *a: calls.append(a[3]) or decode(*a))
    fast_loss, fast = _loss_and_grads(net, batch, unpadded=True, shared=shared)
    prefix = shared_prefix_length(batch) if shared else 0
    assert calls == [prefix] and (prefix > 0) == shared
    layers = net.get_base_model().config.num_hidden_layers
    # one sequence through every layer: no padded position, the prefix once, one segment per row (and the prefix)
    assert len(segments) == layers and segments[0][1] == len(lengths) + (1 if shared else 0)
    assert segments[0][0] < int(lengths.sum()) - (prefix * (len(lengths) - 1) if shared else 0) + 1
    assert_same_loss_and_gradients(plain_loss, plain, fast_loss, fast)
    assert torch.isfinite(torch.tensor(fast_loss))


def test_padding_free_batches_under_gradient_checkpointing(tiny_model_dir):
    from transformers import AutoTokenizer

    from tunewright.chat import pad_batch

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    batch = pad_batch(_rows(tok), tok.pad_token_id)
    net = _lora(tiny_model_dir)
    plain_loss, plain = _loss_and_grads(net, batch, unpadded=False, shared=False)
    _varlen(net)
    net.get_base_model().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    net.get_base_model().enable_input_require_grads()
    fast_loss, fast = _loss_and_grads(net, batch, unpadded=True, shared=True)
    assert_same_loss_and_gradients(plain_loss, plain, fast_loss, fast)


def test_calls_without_a_layout_are_sdpas(tiny_model_dir):
    """Evaluation's and the reference model's padded calls on a varlen-trained model are sdpa's, mask and all."""
    import torch
    from transformers import AutoTokenizer

    from tunewright.chat import pad_batch

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    batch = pad_batch(_rows(tok), tok.pad_token_id)
    net = _lora(tiny_model_dir).eval()
    with torch.no_grad():
        want = net(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        got = _varlen(net)(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert torch.equal(want, got)
