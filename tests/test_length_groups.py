"""Length groups (a batch's rows decoded in groups of similar length, each padded only to its own longest row)
give the loss and gradients of one padded call, keep every answer token in its place for per-token weights and
per-row log-probabilities, and stand aside where they cannot apply."""

from __future__ import annotations

import pytest

from tests.test_shared_prefix import _lora
from tests.test_shared_prefix import _rows as _shared_prompt_rows


def _rows(tokenizer) -> list[dict]:
    """Rows of very different lengths, so that grouping pays even on a tiny model."""
    return _shared_prompt_rows(tokenizer, 7, spread=6)


def _loss_and_grads(net, batch, grouped: bool, monkeypatch, shared: bool = True, focal_gamma: float = 0.0):
    from tunewright import chat

    monkeypatch.setitem(chat.LENGTH_GROUPS, "enabled", grouped)
    monkeypatch.setattr(chat, "GROUP_CALL_TOKENS", 0)  # every distinct length its own group
    net.zero_grad(set_to_none=True)
    loss = chat.token_loss(net, batch, shared_prefix=shared, focal_gamma=focal_gamma)
    loss.backward()
    return float(loss), {n: p.grad.detach().clone() for n, p in net.named_parameters() if p.requires_grad}


def test_rows_are_grouped_by_length_to_save_padding_against_the_cost_of_a_call():
    from tunewright.chat import length_groups

    lengths = [100, 60, 98, 62, 61, 99]
    assert length_groups(lengths, call_tokens=10) == [[1, 3, 4], [0, 2, 5]]
    assert length_groups(lengths, prefix=50, call_tokens=10) == [[1, 3, 4], [0, 2, 5]]
    assert length_groups(lengths, call_tokens=1000) is None  # a call costs more than the padding it saves
    assert length_groups([80] * 8, call_tokens=0) is None  # nothing to save
    assert length_groups([80], call_tokens=0) is None
    assert length_groups([3, 1, 2], call_tokens=0) == [[1], [2], [0]]


@pytest.mark.parametrize("shared", [True, False], ids=["shared-prefix", "plain"])
def test_groups_give_the_padded_calls_loss_and_gradients(tiny_model_dir, monkeypatch, shared):
    from transformers import AutoTokenizer

    from tunewright.chat import length_groups, pad_batch, shared_prefix_length

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    batch = pad_batch(_rows(tok), tok.pad_token_id)
    assert shared_prefix_length(batch) > 0
    assert len(length_groups(batch["attention_mask"].sum(1).tolist(), call_tokens=0)) == 3
    net = _lora(tiny_model_dir)
    plain_loss, plain = _loss_and_grads(net, batch, False, monkeypatch, shared)
    loss, grads = _loss_and_grads(net, batch, True, monkeypatch, shared)
    assert loss == pytest.approx(plain_loss, rel=1e-5)
    assert plain.keys() == grads.keys()
    for name, g in plain.items():
        assert g.abs().sum() > 0, name
        assert (grads[name] - g).abs().max() <= 1e-5 + 1e-4 * g.abs().max(), name


def test_per_token_weights_and_focal_loss_stay_on_their_own_tokens(tiny_model_dir, monkeypatch):
    import torch
    from transformers import AutoTokenizer

    from tunewright.chat import pad_batch

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    batch = pad_batch(_rows(tok), tok.pad_token_id)
    batch["token_weight"] = torch.rand(batch["input_ids"].shape, generator=torch.Generator().manual_seed(1)) * 3
    net = _lora(tiny_model_dir)
    plain_loss, plain = _loss_and_grads(net, batch, False, monkeypatch, focal_gamma=2.0)
    loss, grads = _loss_and_grads(net, batch, True, monkeypatch, focal_gamma=2.0)
    assert loss == pytest.approx(plain_loss, rel=1e-5)
    for name, g in plain.items():
        assert (grads[name] - g).abs().max() <= 1e-5 + 1e-4 * g.abs().max(), name


def test_each_rows_log_probability_is_its_own(tiny_model_dir, monkeypatch):
    import torch
    from transformers import AutoTokenizer

    from tunewright import chat

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    batch = chat.pad_batch(_rows(tok), tok.pad_token_id)
    net = _lora(tiny_model_dir).eval()
    monkeypatch.setattr(chat, "GROUP_CALL_TOKENS", 0)
    with torch.no_grad():
        grouped, n_grouped = chat.sequence_logps(net, batch)
        monkeypatch.setitem(chat.LENGTH_GROUPS, "enabled", False)
        plain, n_plain = chat.sequence_logps(net, batch)
    assert torch.equal(n_grouped, n_plain)
    assert torch.allclose(grouped, plain, rtol=1e-5, atol=1e-4)


def test_groups_stand_aside_for_packed_rows_and_when_switched_off(tiny_model_dir, monkeypatch):
    from transformers import AutoTokenizer

    from tunewright import chat

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    rows = _rows(tok)
    calls = []
    real = chat._decode_by_length
    monkeypatch.setattr(chat, "_decode_by_length", lambda *a: calls.append(len(a[-1])) or real(*a))
    monkeypatch.setattr(chat, "GROUP_CALL_TOKENS", 0)
    net = _lora(tiny_model_dir)
    chat.token_loss(net, chat.pad_batch(rows, tok.pad_token_id))
    assert calls == [3]
    chat.token_loss(net, chat.pad_batch(chat.pack(rows, 512), tok.pad_token_id))  # packed: one row per pack
    chat.disable_length_groups("ZeRO-3")  # what ZeRO-3 ranks set
    try:
        chat.token_loss(net, chat.pad_batch(rows, tok.pad_token_id))
    finally:
        chat.LENGTH_GROUPS.update(enabled=True, why_not="")
    assert calls == [3]
