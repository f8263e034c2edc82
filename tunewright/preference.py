"""Scoring answers to a prompt by their log-probability: shared by training (stage 4) and evaluation (stage 5).

Preference pairs (`prompt`, `chosen`, `rejected`, each a message list) and unpaired feedback
(`prompt`, `completion`, `label`) as stage 1 writes them, encoded with the loss mask of
`tunewright.chat.encode_example` so only answer tokens are scored.
"""

from __future__ import annotations

from typing import Any

from tunewright.chat import encode_example, pad_batch
from tunewright.train.loss import Kernels, sequence_logps


def _conversation(prompt: list[dict], answer: list[dict]) -> list[dict]:
    return list(prompt) + list(answer)


def sft_conversations(records: list[dict]) -> list[list[dict]]:
    """What supervised steps train on: chat records as they are, preference pairs' chosen answers,
    feedback rows' desirable answers."""
    return [c for c, _ in sft_with_tools(records)]


def sft_with_tools(records: list[dict]) -> list[tuple[list[dict], list[dict] | None]]:
    """`sft_conversations` with each conversation's declared tools (a chat record's `tools`, else None)."""
    out = []
    for r in records:
        if "messages" in r:
            out.append((r["messages"], r.get("tools")))
        elif "chosen" in r:
            out.append((_conversation(r["prompt"], r["chosen"]), None))
        elif r.get("label") is True:
            out.append((_conversation(r["prompt"], r["completion"]), None))
    return out


def unpaired(records: list[dict]) -> list[dict]:
    """Feedback rows (prompt, completion, label): as they are, or two per preference pair (chosen good, rejected bad)."""
    out = []
    for r in records:
        if "chosen" in r:
            out.append({"id": f"{r['id']}:chosen", "prompt": r["prompt"], "completion": r["chosen"], "label": True})
            out.append({"id": f"{r['id']}:rejected", "prompt": r["prompt"], "completion": r["rejected"], "label": False})
        else:
            out.append(r)
    return out


def encode_rows(objective: str, tokenizer: Any, records: list[dict], max_len: int) -> list[dict]:
    """Token ids of every row the objective scores.

    Preference objectives: `chosen` and `rejected`, each the prompt plus that answer. KTO: `answer`
    (prompt plus its completion), `desirable`, and `kl` (the prompt with another row's completion,
    for the batch KL estimate; partner i + 2 so a pair's own two rows never meet).
    """
    if objective in ("dpo", "orpo", "reward"):
        return [{"chosen": encode_example(tokenizer, _conversation(r["prompt"], r["chosen"]), max_len),
                 "rejected": encode_example(tokenizer, _conversation(r["prompt"], r["rejected"]), max_len)}
                for r in records]
    if objective == "kto":
        rows = unpaired(records)
        n = len(rows)
        return [{"answer": encode_example(tokenizer, _conversation(r["prompt"], r["completion"]), max_len),
                 "kl": encode_example(tokenizer, _conversation(r["prompt"], rows[(i + 2) % n]["completion"]), max_len),
                 "desirable": bool(r["label"])} for i, r in enumerate(rows)]
    if objective in ("grpo", "ppo"):  # prompts and their reference answers; the answers scored are sampled during training
        return [{"prompt": c[:-1], "reference": c[-1]["content"]} for c in sft_conversations(records)]
    raise ValueError(f"train.objective '{objective}' has no preference rows")


def _parts(objective: str) -> tuple[str, str]:
    return ("chosen", "rejected") if objective in ("dpo", "orpo") else ("answer", "kl")


def part_logps(model: Any, rows: list[dict], part: str, pad_id: int, kernels: Kernels = Kernels()):
    """Summed answer log-probabilities of one part (`chosen`, `rejected`, `answer`, `kl`) of each row, and token counts."""
    batch = pad_batch([r[part] for r in rows], pad_id)
    device = next(model.parameters()).device
    return sequence_logps(model, {k: v.to(device) for k, v in batch.items()}, kernels)


def row_logps(model: Any, rows: list[dict], objective: str, pad_id: int, kernels: Kernels = Kernels()):
    """Summed answer log-probabilities of a batch of rows' two parts, in one forward: two (batch,) tensors and their
    token counts."""
    import torch

    first, second = _parts(objective)
    batch = pad_batch([r[first] for r in rows] + [r[second] for r in rows], pad_id)
    device = next(model.parameters()).device
    logps, counts = sequence_logps(model, {k: v.to(device) for k, v in batch.items()}, kernels)
    n = len(rows)
    return logps[:n], logps[n:], counts[:n].to(torch.float32), counts[n:].to(torch.float32)


def preference_accuracy(model: Any, tokenizer: Any, records: list[dict], max_len: int, batch_size: int,
                        autocast: Any = None) -> tuple[float, float]:
    """Share of held-out pairs whose chosen answer the model finds more likely than the rejected one, and the mean margin."""
    import torch

    pairs = [r for r in records if "chosen" in r]
    if not pairs:
        return float("nan"), float("nan")
    rows = encode_rows("dpo", tokenizer, pairs, max_len)
    device = next(model.parameters()).device
    wins, margins = 0, 0.0
    with torch.no_grad(), torch.autocast(device.type, dtype=autocast or torch.float32, enabled=autocast is not None):
        for start in range(0, len(rows), batch_size):
            a, b, _, _ = row_logps(model, rows[start:start + batch_size], "dpo", tokenizer.pad_token_id,
                                   Kernels().in_one_head_call())
            wins += int((a > b).sum())
            margins += float((a - b).sum())
    return wins / len(rows), margins / len(rows)


def with_own_mistakes(records: list[dict], answers: dict[int, str]) -> tuple[list[dict], int]:
    """Preference pairs whose rejected answer is the model's own answer to the prompt wherever that answer is wrong.

    `answers` maps a record's index to the model's answer; a right answer (the chosen one, see
    `tunewright.scoring.metrics.same_answer`) leaves the pair as it is. Returns the new records and how many changed.
    """
    from tunewright.scoring.metrics import same_answer

    out, changed = [], 0
    for i, r in enumerate(records):
        answer = answers.get(i)
        if "chosen" not in r or answer is None or same_answer(answer, r["chosen"][-1]["content"]):
            out.append(r)
            continue
        out.append({**r, "rejected": [{"role": "assistant", "content": answer}]})
        changed += 1
    return out, changed


def records_of_rows(objective: str, records: list[dict], rows: list[int]) -> list[int]:
    """The records whose rejected answers encoded rows `rows` of `encode_rows(objective, ...)` use. KTO splits pair k
    into rows 2k (chosen) and 2k + 1 (rejected) and scores every row against the completion two rows on, which has
    the row's parity: only odd rows use rejected answers, their own and pair k + 1's."""
    if objective != "kto":
        return sorted(set(rows))
    n = 2 * len(records)
    return sorted({j // 2 for i in rows if i % 2 for j in (i, (i + 2) % n)})
