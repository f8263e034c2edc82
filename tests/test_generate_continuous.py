"""Stage 5's generation through transformers' continuous batching (the default on CUDA) gives the padded batches'
greedy answers, for plain prompts, prompts with tools, and answers cut where their first JSON object closed."""

from __future__ import annotations

import pytest


def test_continuous_batching_gives_the_padded_batches_answers(tiny_model_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunewright.chat import generate

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    torch.manual_seed(0)
    with torch.no_grad():  # weights far from the untrained ones, whose greedy answer is blank lines
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    convs = [[{"role": "system", "content": "Answer in JSON."}, {"role": "user", "content": f"ticket {i} " + "x " * i}]
             for i in range(7)]
    tool = {"type": "function", "function": {"name": "lookup_order", "description": "Find an order",
                                             "parameters": {"type": "object",
                                                            "properties": {"order_id": {"type": "string"}}}}}
    tools = [[tool] if i % 2 else None for i in range(7)]
    seen = []
    for stop in (False, True):
        padded = generate(model, tok, convs, max_new_tokens=16, batch_size=3, stop_after_json=stop, tools=tools,
                          engine="padded")
        continuous = generate(model, tok, convs, max_new_tokens=16, batch_size=3, stop_after_json=stop, tools=tools,
                              engine="continuous", kv_cache_tokens=4096, progress=lambda n, total: seen.append(n))
        assert continuous == padded
    assert seen == [7, 7] and all(padded) and len(set(padded)) > 3
    with pytest.raises(ValueError, match="engine 'vllm'"):
        generate(model, tok, convs, max_new_tokens=4, batch_size=3, engine="vllm")


def test_the_continuous_path_cuts_an_answer_at_its_first_closed_json_object(tokenizer_dir):
    """The cut the padded path's stopping criterion makes: after the token that closed the object."""
    from types import SimpleNamespace

    from transformers import AutoTokenizer

    from tunewright import chat

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    text = '{"category": "billing"} and more words {"x": 1}'
    tokens = tok(text, add_special_tokens=False)["input_ids"]

    class Model:
        def generate_batch(self, inputs, **kwargs):
            return {str(i): SimpleNamespace(error=None, generated_tokens=tokens) for i in range(len(inputs))}

    cut = chat._generate_continuous(Model(), tok, [[1], [2]], 64, True, None)
    assert cut == ['{"category": "billing"}'] * 2
    assert chat._generate_continuous(Model(), tok, [[1]], 64, False, None) == [text]
