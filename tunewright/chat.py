"""Chat formatting shared by training, evaluation and serving: one prompt layout everywhere, encoding of
answer-only training rows, and generation."""

from __future__ import annotations

from typing import Any


def prompt_messages(messages: list[dict[str, str]]) -> list[dict[str, str]]:
    """Every turn before the final assistant answer."""
    return messages[:-1] if messages and messages[-1]["role"] == "assistant" else messages


def prompt_ids(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of the prompt, ending with the assistant header, as generation sees it."""
    out = tokenizer.apply_chat_template(
        prompt_messages(messages), add_generation_prompt=True, tokenize=True, return_dict=True
    )
    return list(out["input_ids"])


def answer_suffix(tokenizer: Any) -> str:
    """What closes an assistant turn in the chat template (the end-of-turn token)."""
    return tokenizer.eos_token or ""


def encode_example(tokenizer: Any, messages: list[dict[str, str]], max_len: int) -> dict[str, list[int]]:
    """Input ids and labels with the loss on the assistant answer only (prompt tokens are -100).

    A too-long example loses the end of its prompt's middle, never the answer: the answer and
    the last prompt tokens (the assistant header) are kept, the prompt's start is kept too.
    """
    prompt = prompt_ids(tokenizer, messages)
    answer = tokenizer(messages[-1]["content"] + answer_suffix(tokenizer), add_special_tokens=False)["input_ids"]
    answer = answer[: max_len - 8]
    room = max_len - len(answer)
    if len(prompt) > room:
        head = room // 2
        prompt = prompt[:head] + prompt[len(prompt) - (room - head):]
    return {"input_ids": prompt + answer, "labels": [-100] * len(prompt) + answer}


def pad_batch(batch: list[dict[str, list]], pad_id: int) -> dict[str, Any]:
    """Right-pad encoded examples (or packed rows) into tensors.

    Rows with `position_ids` are packed: they get no attention mask, which makes transformers
    build a block-diagonal causal mask from the restarting positions, so packed examples never
    attend to each other. Rows with `token_weight` carry per-token loss weights.
    """
    import torch

    width = max(len(x["input_ids"]) for x in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), -100, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    packed = "position_ids" in batch[0]
    positions = torch.zeros((len(batch), width), dtype=torch.long)
    weighted = "token_weight" in batch[0]
    weights = torch.zeros((len(batch), width), dtype=torch.float32)
    for i, x in enumerate(batch):
        n = len(x["input_ids"])
        ids[i, :n] = torch.tensor(x["input_ids"])
        labels[i, :n] = torch.tensor(x["labels"])
        mask[i, :n] = 1
        if packed:
            positions[i, :n] = torch.tensor(x["position_ids"])
            positions[i, n:] = torch.arange(width - n)  # padding forms its own (masked-out) sequence
        if weighted:
            weights[i, :n] = torch.tensor(x["token_weight"])
    out = {"input_ids": ids, "labels": labels, "attention_mask": mask}
    if packed:
        out["position_ids"] = positions
    if weighted:
        out["token_weight"] = weights
    return out


def pack(encoded: list[dict[str, list]], max_len: int) -> list[dict[str, list]]:
    """Greedily concatenate examples into rows of at most `max_len` tokens, positions restarting per example."""
    rows: list[dict[str, list]] = []
    current: dict[str, list] = {}
    for ex in encoded:
        n = len(ex["input_ids"])
        if current and len(current["input_ids"]) + n > max_len:
            rows.append(current)
            current = {}
        if not current:
            current = {k: [] for k in ex} | {"position_ids": []}
        for key, values in ex.items():
            current[key].extend(values)
        current["position_ids"].extend(range(n))
    if current:
        rows.append(current)
    return rows


def json_object_closed(text: str) -> bool:
    """Whether the first JSON object in `text` has been closed (its braces balance, strings aside): text after it
    cannot change what `tunewright.scoring.metrics.parse_json_answer` reads."""
    start = text.find("{")
    if start < 0:
        return False
    depth, in_string, escaped = 0, False, False
    for ch in text[start:]:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return True
    return False


def _stop_when(tokenizer: Any, width: int, done: Any):
    """A stopping criterion that ends each row once `done(decoded answer so far)` holds (all rows: generation ends)."""
    import torch
    from transformers import StoppingCriteria

    class Stop(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return torch.tensor([done(tokenizer.decode(row[width:], skip_special_tokens=True)) for row in input_ids],
                                dtype=torch.bool, device=input_ids.device)

    return Stop()


def generate(model: Any, tokenizer: Any, conversations: list[list[dict[str, str]]], *,
             max_new_tokens: int, batch_size: int, autocast_dtype: Any = None,
             progress: Any = None, stop_after_json: bool = False) -> list[str]:
    """Greedy answers for many prompts, left-padded in batches, prompts of similar length batched together.

    `stop_after_json`: a row stops once its first JSON object has closed (for metrics that read only that
    object); a model that never closes one still stops at `max_new_tokens`.
    """
    import torch

    tokenizer.padding_side = "left"
    device = next(model.parameters()).device
    answers: dict[int, str] = {}
    prompts = [prompt_messages(c) for c in conversations]
    # batch by prompt length: less left padding to run through the model (answers return in the given order)
    order = sorted(range(len(prompts)), key=lambda i: sum(len(m["content"]) for m in prompts[i]))
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        enc = tokenizer.apply_chat_template(
            [prompts[i] for i in idx], add_generation_prompt=True, return_tensors="pt", return_dict=True, padding=True
        ).to(device)
        width = enc["input_ids"].shape[1]
        extra = {"stopping_criteria": [_stop_when(tokenizer, width, json_object_closed)]} if stop_after_json else {}
        with torch.no_grad(), torch.autocast(
            device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None
        ):
            out = model.generate(
                **enc, max_new_tokens=max_new_tokens, do_sample=False,
                pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, **extra,
            )
        for i, row in zip(idx, out):
            answers[i] = tokenizer.decode(row[width:], skip_special_tokens=True).strip()
        if progress:
            progress(min(start + batch_size, len(order)), len(order))
    return [answers[i] for i in range(len(prompts))]


def autocast_dtype(precision: str) -> Any:
    """The autocast dtype for a precision name, or None for full fp32."""
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
