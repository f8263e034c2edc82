"""The shared-prefix forward (a batch's common prompt tokens through the decoder once) gives the plain forward's
loss and gradients, for supervised rows and for preference pairs, and stands aside where it cannot apply."""

from __future__ import annotations

import json

import pytest

SYSTEM = ("You turn customer support tickets into JSON with the fields category, priority and order_id. "
          "Answer with the JSON object only.")


def _rows(tokenizer, n: int = 6, spread: int = 1) -> list[dict]:
    """Tickets sharing the system prompt; `spread` widens the differences in length between them."""
    from tunewright.chat import encode_example

    out = []
    for i in range(n):
        ticket = f"Ticket {i}: my order #{1000 + 37 * i} " + "arrived late and damaged " * (1 + spread * (i % 3))
        answer = json.dumps({"category": ["shipping", "refund", "billing"][i % 3], "priority": "high",
                             "order_id": str(1000 + 37 * i)})
        out.append(encode_example(tokenizer, [{"role": "system", "content": SYSTEM},
                                              {"role": "user", "content": ticket},
                                              {"role": "assistant", "content": answer}], 256))
    return out


def _lora(tiny_model_dir, dtype=None):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    net = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM",
                                           init_lora_weights=False))  # non-zero B: every adapter matters
    net.train()
    return net


def _loss_and_grads(net, batch, shared: bool, amp=None):
    import torch

    from tunewright.train.loss import Kernels, token_loss

    net.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=amp or torch.float32, enabled=amp is not None):
        loss = token_loss(net, batch, kernels=Kernels(shared_prefix=shared))
    loss.backward()
    return float(loss), {n: p.grad.detach().clone() for n, p in net.named_parameters() if p.requires_grad}


def test_the_shared_prefix_is_the_common_prompt_and_stops_before_any_answer(tokenizer_dir):
    from transformers import AutoTokenizer

    from tunewright.chat import pad_batch
    from tunewright.train.forward import shared_prefix_length

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    rows = _rows(tok)
    batch = pad_batch(rows, tok.pad_token_id)
    n = shared_prefix_length(batch)
    common = next(i for i in range(len(rows[0]["input_ids"])) if len({r["input_ids"][i] for r in rows}) > 1)
    assert n == common - 1 and n >= 16  # the system prompt and the user header, less the last shared token
    assert all(all(label == -100 for label in r["labels"][: n + 1]) for r in rows)
    assert shared_prefix_length(pad_batch(rows[:1], tok.pad_token_id)) == 0  # one row: nothing to share
    same = pad_batch([rows[0], rows[0]], tok.pad_token_id)  # identical rows: stop before the answer
    first_answer = next(i for i, v in enumerate(rows[0]["labels"]) if v != -100)
    assert shared_prefix_length(same) == first_answer - 1


def test_shared_prefix_gives_the_plain_forwards_loss_and_gradients(tiny_model_dir):
    from transformers import AutoTokenizer

    from tunewright.chat import pad_batch
    from tunewright.train.forward import shared_prefix_length

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    batch = pad_batch(_rows(tok), tok.pad_token_id)
    assert shared_prefix_length(batch) > 0
    net = _lora(tiny_model_dir)
    plain_loss, plain = _loss_and_grads(net, batch, shared=False)
    loss, grads = _loss_and_grads(net, batch, shared=True)
    assert_same_loss_and_gradients(plain_loss, plain, loss, grads)


def assert_same_loss_and_gradients(plain_loss, plain, loss, grads):
    """The fast path's loss and every gradient equal the plain path's (and no gradient is all zero)."""
    assert loss == pytest.approx(plain_loss, rel=1e-5)
    assert plain.keys() == grads.keys()
    for name, g in plain.items():
        assert g.abs().sum() > 0, name
        assert (grads[name] - g).abs().max() <= 1e-5 + 1e-4 * g.abs().max(), name


def test_shared_prefix_under_bf16_autocast_stays_within_rounding(tiny_model_dir):
    import torch
    from transformers import AutoTokenizer

    from tunewright.chat import pad_batch

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    batch = pad_batch(_rows(tok), tok.pad_token_id)
    net = _lora(tiny_model_dir)
    plain_loss, plain = _loss_and_grads(net, batch, shared=False, amp=torch.bfloat16)
    loss, grads = _loss_and_grads(net, batch, shared=True, amp=torch.bfloat16)
    assert loss == pytest.approx(plain_loss, rel=2e-2)
    flat_plain = torch.cat([g.flatten() for g in plain.values()])
    flat = torch.cat([grads[n].flatten() for n in plain])
    assert torch.nn.functional.cosine_similarity(flat, flat_plain, dim=0) > 0.99


def test_preference_log_probabilities_are_the_same_with_the_shared_prefix(tiny_model_dir):
    import torch
    from transformers import AutoTokenizer

    from tunewright.chat import pad_batch
    from tunewright.train.loss import Kernels, sequence_logps

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    rows = _rows(tok, 4)
    net = _lora(tiny_model_dir).eval()
    batch = pad_batch(rows, tok.pad_token_id)
    with torch.no_grad():
        a, n_a = sequence_logps(net, batch, Kernels(shared_prefix=False))
        b, n_b = sequence_logps(net, batch)
    assert torch.equal(n_a, n_b)
    assert torch.allclose(a, b, rtol=1e-5, atol=1e-4)


def test_it_stands_aside_for_packed_rows_checkpointing_and_when_switched_off(tiny_model_dir, monkeypatch):
    from transformers import AutoTokenizer

    from tunewright import chat
    from tunewright.train import loss
    from tunewright.train.loss import Kernels, token_loss

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    rows = _rows(tok)
    batch = chat.pad_batch(rows, tok.pad_token_id)
    calls = []
    real = loss.decode_after_shared_prefix
    monkeypatch.setattr(loss, "decode_after_shared_prefix", lambda *a: calls.append(1) or real(*a))
    net = _lora(tiny_model_dir)
    token_loss(net, batch)
    assert calls == [1]
    token_loss(net, chat.pad_batch(chat.pack(rows, 512), tok.pad_token_id))  # packed: positions restart
    net.base_model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    token_loss(net, batch)
    net.base_model.model.gradient_checkpointing_disable()
    token_loss(net, batch, kernels=Kernels(shared_prefix=False))  # what ZeRO-3 ranks pass
    assert calls == [1]
