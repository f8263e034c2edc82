"""Deployment exports: the merged and the 8-bit model load from their folders and answer as the adapter does."""

import json

import pytest

from tests.test_merge import _make_adapter

PROMPTS = [[{"role": "user", "content": f"Ticket {i}: my order A{1000 + i} is late, I want a refund."}]
           for i in range(6)]


def test_merged_and_int8_exports_load_and_answer_as_the_adapter(tiny_model_dir, tmp_path):
    import logging

    import torch
    from transformers import AutoModelForCausalLM

    from tunewright.registry.exports import export_adapter

    adapter = _make_adapter(tiny_model_dir, tmp_path / "lora", 5, r=4, alpha=8)
    exports = export_adapter(["merged", "int8"], str(tiny_model_dir), str(adapter), tmp_path / "out", PROMPTS,
                             max_new_tokens=8, batch_size=3, log=logging.getLogger("test"))
    merged, int8 = exports
    assert (merged.kind, int8.kind) == ("merged", "int8")
    assert merged.agreement == 1.0  # fp32: folding the adapter in changes rounding, not greedy answers here
    # a random tiny model's answers are long runs of near-tied tokens, so whole answers drift apart in 8 bits;
    # what 8-bit weights must keep is the next-token distribution
    assert 0 <= int8.agreement <= 1 and int8.bytes > 0
    folder = tmp_path / "out" / "int8"
    assert json.loads((folder / "config.json").read_text())["quantization_config"]["load_in_8bit"] is True
    loaded = AutoModelForCausalLM.from_pretrained(folder, device_map={"": "cpu"}).eval()
    assert any(p.dtype == torch.int8 for p in loaded.parameters())  # loaded back in 8 bits, not dequantised
    full = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "merged", dtype=torch.float32).eval()
    ids = torch.tensor([[1, 520, 2093, 314, 1090, 30, 506, 1482, 9015, 2]])
    with torch.no_grad():
        a, b = full(ids).logits[0].float(), loaded(ids).logits[0].float()
    cos = torch.nn.functional.cosine_similarity(a, b, dim=-1)
    assert cos.min() > 0.98, cos
    assert not (tmp_path / "out" / "merged" / "adapter_config.json").exists()


def test_a_prompt_learning_adapter_has_nothing_to_fold_in(tiny_model_dir, tmp_path):
    import logging

    from peft import PromptTuningConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from tunewright.registry.exports import export_adapter

    net = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                         PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    net.save_pretrained(tmp_path / "prompt")
    with pytest.raises(ValueError, match="no weights to fold"):
        export_adapter(["merged"], str(tiny_model_dir), str(tmp_path / "prompt"), tmp_path / "out", PROMPTS,
                       max_new_tokens=4, batch_size=3, log=logging.getLogger("test"))
