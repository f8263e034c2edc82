"""Unpadded decoding (a batch's real tokens after the shared prefix as one sequence, apart only in attention) gives
the loss and gradients of the padded call, keeps every answer token in its place for per-token weights and
per-row log-probabilities, and stands aside where it cannot apply."""

from __future__ import annotations

import pytest

from tunewright.train import forward
from tunewright.train.loss import Kernels, sequence_logps, token_loss

from tests.test_shared_prefix import _lora as _sdpa_lora
from tests.test_shared_prefix import assert_same_loss_and_gradients
from tests.test_shared_prefix import _rows as _shared_prompt_rows


def _rows(tokenizer) -> list[dict]:
    """Rows of very different lengths: most of the padded batch is padding."""
    return _shared_prompt_rows(tokenizer, 7, spread=6)


def _lora(tiny_model_dir, checkpointing: bool = False):
    import torch

    from tunewright.train import attention

    net = _sdpa_lora(tiny_model_dir)
    assert attention.use_for_training(net.get_base_model(), torch.device("cpu"))  # what stage 4's load does
    if checkpointing:
        net.get_base_model().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        net.get_base_model().enable_input_require_grads()
    return net


def _loss_and_grads(net, batch, unpadded: bool, shared: bool = True, focal_gamma: float = 0.0,
                    last_layer_rows: bool = True):
    net.zero_grad(set_to_none=True)
    kernels = Kernels(shared_prefix=shared, unpadded=unpadded, last_layer_rows=last_layer_rows)
    loss = token_loss(net, batch, focal_gamma=focal_gamma, kernels=kernels)
    loss.backward()
    return float(loss), {n: p.grad.detach().clone() for n, p in net.named_parameters() if p.requires_grad}


def _spy(monkeypatch):
    """The shared prefix of every unpadded decoder call the loss makes."""
    from tunewright.train import loss

    calls = []
    real = loss.decode_unpadded
    monkeypatch.setattr(loss, "decode_unpadded", lambda *a: calls.append(a[3]) or real(*a))
    return calls


@pytest.mark.parametrize("shared", [True, False], ids=["shared-prefix", "plain"])
def test_unpadded_gives_the_padded_calls_loss_and_gradients(tiny_model_dir, monkeypatch, shared):
    from transformers import AutoTokenizer

    from tunewright.chat import pad_batch
    from tunewright.train.forward import shared_prefix_length

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    batch = pad_batch(_rows(tok), tok.pad_token_id)
    prefix = shared_prefix_length(batch)
    assert prefix > 0
    lengths = batch["attention_mask"].sum(1)
    assert float((lengths.max() - lengths).sum()) / float(lengths.max() - prefix) / len(lengths) > 0.25  # padding
    net = _lora(tiny_model_dir)
    plain_loss, plain = _loss_and_grads(net, batch, False, shared)
    calls = _spy(monkeypatch)
    loss, grads = _loss_and_grads(net, batch, True, shared)
    assert calls == [prefix if shared else 0]
    assert_same_loss_and_gradients(plain_loss, plain, loss, grads)


@pytest.mark.parametrize("shared", [True, False], ids=["shared-prefix", "plain"])
def test_tokens_after_a_rows_last_label_are_left_out_with_the_same_loss_and_gradients(tiny_model_dir, monkeypatch,
                                                                                       shared):
    """A position after a row's last answer token reaches no loss: the unpadded call leaves it out (a row's closing
    token, a tail without labels, a row without any), and the prefix and every row go through one decoder call."""
    import torch
    from transformers import AutoTokenizer

    from tunewright.chat import pad_batch
    from tunewright.train import fused_lora
    from tunewright.train.forward import shared_prefix_length

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    rows = _rows(tok)
    rows[1]["labels"] = rows[1]["labels"][:-6] + [-100] * 6  # the answer's last tokens unlabelled
    rows[2]["labels"] = [-100] * len(rows[2]["labels"])  # nothing to learn in this row
    batch = pad_batch(rows, tok.pad_token_id)
    prefix = shared_prefix_length(batch) if shared else 0
    assert prefix > 0 or not shared
    net = _lora(tiny_model_dir)
    assert fused_lora.use_for_training(net, torch.device("cpu"))  # as stage 4 routes them on the CPU
    plain_loss, plain = _loss_and_grads(net, batch, False, shared)
    decoded = []
    hook = net.get_base_model().get_decoder().register_forward_hook(
        lambda module, args, kwargs, out: decoded.append(kwargs["input_ids"].shape), with_kwargs=True)
    last = net.get_base_model().get_decoder().layers[-1]
    routed = {name: m.__dict__.get("forward") for name, m in last.named_modules() if "forward" in m.__dict__}
    assert "self_attn.q_proj" in routed  # the fused LoRA layers' routes
    down_rows = []
    hook2 = last.mlp.down_proj.register_forward_hook(lambda module, args, out: down_rows.append(args[0].shape[1]))
    calls = _spy(monkeypatch)
    loss, grads = _loss_and_grads(net, batch, True, shared)
    hook.remove()
    hook2.remove()
    assert calls == [prefix]
    real = int(batch["attention_mask"].sum()) - prefix * (len(rows) - 1)  # the prefix once
    left_out = (len(rows) - 1) + 6 + (len(rows[2]["input_ids"]) - prefix)  # closing tokens, the tail, the empty row
    assert decoded == [torch.Size([1, real - left_out])]
    answers = int((batch["labels"] != -100).sum())
    assert down_rows == [answers] and answers < real - left_out  # the last layer's MLP on answer positions alone
    assert {name: m.__dict__.get("forward") for name, m in last.named_modules() if "forward" in m.__dict__} == routed
    assert_same_loss_and_gradients(plain_loss, plain, loss, grads)


def test_the_last_layer_computes_only_the_positions_that_reach_the_loss(tiny_model_dir, monkeypatch):
    """The same loss and gradients with and without the last layer's read-positions-only parts, and a mixture of
    experts keeps its full call."""
    from types import SimpleNamespace

    import torch
    from transformers import AutoTokenizer

    from tunewright import chat

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    batch = chat.pad_batch(_rows(tok), tok.pad_token_id)
    net = _lora(tiny_model_dir)
    full_loss, full = _loss_and_grads(net, batch, True, last_layer_rows=False)
    loss, grads = _loss_and_grads(net, batch, True)
    assert_same_loss_and_gradients(full_loss, full, loss, grads)
    decoder = net.get_base_model().get_decoder()
    with forward.last_layer_rows_only(decoder, torch.arange(3)) as applies:
        assert applies
        with forward.last_layer_rows_only(decoder, torch.arange(2)) as again:
            assert not again  # never wrapped twice
    with pytest.raises(RuntimeError), forward.last_layer_rows_only(decoder, torch.arange(3)):
        raise RuntimeError("a failed forward")
    last = decoder.layers[-1]
    assert not any("forward" in m.__dict__ for m in (last.self_attn.q_proj, last.self_attn.o_proj, last.mlp))
    assert not forward.rope_reads_length(decoder.config)  # plain RoPE: trailing tokens may go
    assert forward.rope_reads_length(SimpleNamespace(rope_parameters={"rope_type": "longrope", "factor": 2.0}))
    assert forward.rope_reads_length(SimpleNamespace(rope_parameters={"full_attention": {"rope_type": "dynamic"}}))
    decoder.layers[-1].mlp.experts = torch.nn.ModuleList()  # as a mixture-of-experts MLP has
    with forward.last_layer_rows_only(decoder, torch.arange(3)) as applies:
        assert not applies


def test_unpadded_with_gradient_checkpointing(tiny_model_dir, monkeypatch):
    from transformers import AutoTokenizer

    from tunewright.chat import pad_batch

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    batch = pad_batch(_rows(tok), tok.pad_token_id)
    net = _lora(tiny_model_dir, checkpointing=True)
    plain_loss, plain = _loss_and_grads(net, batch, False)
    calls = _spy(monkeypatch)
    loss, grads = _loss_and_grads(net, batch, True)
    assert calls == [0]  # no shared prefix under checkpointing (no cache there)
    assert_same_loss_and_gradients(plain_loss, plain, loss, grads)


def test_per_token_weights_and_focal_loss_stay_on_their_own_tokens(tiny_model_dir, monkeypatch):
    import torch
    from transformers import AutoTokenizer

    from tunewright.chat import pad_batch

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    batch = pad_batch(_rows(tok), tok.pad_token_id)
    batch["token_weight"] = torch.rand(batch["input_ids"].shape, generator=torch.Generator().manual_seed(1)) * 3
    net = _lora(tiny_model_dir)
    plain_loss, plain = _loss_and_grads(net, batch, False, focal_gamma=2.0)
    loss, grads = _loss_and_grads(net, batch, True, focal_gamma=2.0)
    assert_same_loss_and_gradients(plain_loss, plain, loss, grads)


def test_each_rows_log_probability_is_its_own(tiny_model_dir, monkeypatch):
    import torch
    from transformers import AutoTokenizer

    from tunewright import chat

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    rows = _rows(tok)
    batch = chat.pad_batch(rows, tok.pad_token_id)
    net = _lora(tiny_model_dir).eval()
    calls = _spy(monkeypatch)
    with torch.no_grad():
        unpadded, n_unpadded = sequence_logps(net, batch)
        plain, n_plain = sequence_logps(net, batch, Kernels(unpadded=False))
        alone = torch.cat([sequence_logps(net, chat.pad_batch([r], tok.pad_token_id))[0] for r in rows])
    assert len(calls) == 1
    assert torch.equal(n_unpadded, n_plain)
    assert torch.allclose(unpadded, plain, rtol=1e-5, atol=1e-4)
    assert torch.allclose(unpadded, alone, rtol=1e-5, atol=1e-4)  # each row as if it were decoded on its own


def test_unpadded_stands_aside_for_packed_left_padded_and_sdpa_models(tiny_model_dir, monkeypatch):
    import torch
    from transformers import AutoTokenizer

    from tunewright import chat

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    rows = _rows(tok)
    calls = _spy(monkeypatch)
    net = _lora(tiny_model_dir)
    token_loss(net, chat.pad_batch(chat.pack(rows, 512), tok.pad_token_id))  # packed: no padding to drop
    left = chat.pad_batch(rows, tok.pad_token_id)
    for k in ("input_ids", "labels", "attention_mask"):  # the same rows padded on the left
        left[k] = torch.stack([torch.roll(r, int((m == 0).sum())) for r, m in zip(left[k], left["attention_mask"])])
    token_loss(net, left)
    token_loss(_sdpa_lora(tiny_model_dir), chat.pad_batch(rows, tok.pad_token_id))  # not tunewright_cpu
    assert calls == []
    token_loss(net, chat.pad_batch(rows, tok.pad_token_id))
    assert len(calls) == 1
