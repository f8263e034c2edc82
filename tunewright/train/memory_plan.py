"""A memory plan for stage 4: how many tokens a micro-batch holds, and how many decoder layers recompute their
activations in backward, chosen from the memory the device has rather than from the recipe's `batch_size`.

A recipe says how many rows one optimiser step learns from (`batch_size x grad_accum`): that is the effective
batch, and the plan keeps it. What it chooses is how those rows are cut into micro-batches. Stage 3's pre-flight
knows the bytes that do not grow with the batch (weights, gradients, optimiser states, one chunk of logits); what
is left of 90% of the device is the activations' budget. Each token of a micro-batch costs, per layer, about 34
bytes per hidden unit in 16-bit (Korthikanti et al.; padding-free attention keeps no score matrix), or only the
layer's 2-byte input when that layer is checkpointed (plus one layer recomputed at a time). The plan checkpoints
the fewest layers that still give a micro-batch of `target_tokens` (enough work to keep a GPU busy) or the step's
own tokens if fewer, and never fewer tokens than one row of `max_seq_len`: checkpointing every layer is the
last resort, not the default. The step's rows are then cut into micro-batches of at most that many tokens
(`split_by_tokens`), longest first, and each micro-batch's summed loss is divided by the step's answer tokens, so
the step's gradient is that of one batch of all its rows however they were cut (tests/test_memory_plan.py).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

TARGET_TOKENS = 16384       # a micro-batch this size keeps an H100's matrix units busy on an 8B model
ACTIVATION_BYTES = 34       # per token, hidden unit and layer, 16-bit (Korthikanti et al., flash attention)
CHECKPOINT_BYTES = 2        # a checkpointed layer keeps its 16-bit input


class PlanError(RuntimeError):
    """Not even one row of train.max_seq_len fits with every layer checkpointed."""


@dataclass(frozen=True)
class MemoryPlan:
    micro_batch_tokens: int      # at most this many tokens (rows x longest row) per micro-batch
    checkpointed_layers: int     # the first N decoder layers recompute their activations in backward
    layers: int
    activation_budget_gb: float
    why: str

    @property
    def gradient_checkpointing(self) -> bool:
        return self.checkpointed_layers > 0

    def as_dict(self) -> dict:
        return asdict(self)


def token_bytes(config: dict, checkpointed: int, precision: str) -> float:
    """Activation bytes one token of a micro-batch costs with the first `checkpointed` layers recomputed."""
    hidden = int(config.get("hidden_size") or config.get("n_embd") or 1024)
    layers = int(config.get("num_hidden_layers") or config.get("n_layer") or 12)
    scale = 1.0 if precision in ("bf16", "fp16") else 2.0
    full = hidden * ACTIVATION_BYTES * scale
    kept = hidden * CHECKPOINT_BYTES * scale
    return (layers - checkpointed) * full + checkpointed * kept + (full if checkpointed else 0.0)


def plan(config: dict, fixed_bytes: float, available: float, *, precision: str, max_seq_len: int, step_rows: int,
         target_tokens: int = TARGET_TOKENS) -> MemoryPlan:
    """The plan for a model of `config` whose weights, gradients, optimiser states and logits take `fixed_bytes` of
    `available` (90% of it is used), training `step_rows` rows of up to `max_seq_len` tokens per step."""
    layers = int(config.get("num_hidden_layers") or config.get("n_layer") or 12)
    budget = 0.9 * available - fixed_bytes
    if budget <= 0:
        raise PlanError(f"the weights, gradients and optimiser states (~{fixed_bytes / 2**30:.1f} GiB) leave no "
                        f"activation memory in 90% of {available / 2**30:.1f} GiB")
    need = max(max_seq_len, min(target_tokens, step_rows * max_seq_len))
    for checkpointed in range(layers + 1):
        tokens = int(budget // token_bytes(config, checkpointed, precision))
        if tokens >= need:
            why = (f"{tokens} tokens fit without checkpointing" if not checkpointed else
                   f"checkpointing {checkpointed} of {layers} layers fits {tokens} tokens (none: "
                   f"{int(budget // token_bytes(config, 0, precision))})")
            return MemoryPlan(min(tokens, step_rows * max_seq_len), checkpointed, layers, budget / 2**30, why)
    tokens = int(budget // token_bytes(config, layers, precision))
    if tokens < max_seq_len:
        raise PlanError(f"one row of train.max_seq_len {max_seq_len} tokens needs "
                        f"~{max_seq_len * token_bytes(config, layers, precision) / 2**30:.1f} GiB of activations "
                        f"with every layer checkpointed; {budget / 2**30:.1f} GiB is left")
    return MemoryPlan(tokens, layers, layers, budget / 2**30,
                      f"every layer checkpointed: {tokens} tokens fit, fewer than the {need} wanted")


def split_by_tokens(lengths: list[int], budget: int) -> list[list[int]]:
    """Row indices cut into micro-batches, longest rows first, each at most `budget` tokens padded (rows x its
    longest row); a row longer than the budget goes alone."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    groups: list[list[int]] = []
    for i in order:
        if groups and (len(groups[-1]) + 1) * lengths[groups[-1][0]] <= budget:  # its first row is its longest
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def answer_weight(example: dict) -> float:
    """What a row adds to its batch's loss denominator: its answer tokens (labels shifted by one), each weighted by
    its class weight where the row has one."""
    labels, weights = example["labels"], example.get("token_weight")
    return float(sum((weights[j] if weights else 1.0) for j in range(1, len(labels)) if labels[j] != -100))


def checkpoint_layers(model: Any, count: int) -> int:
    """Recompute the first `count` decoder layers of `model` in backward, the others keeping their activations; the
    number of layers checkpointed."""
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    if count <= 0:
        if getattr(lm, "is_gradient_checkpointing", False):
            lm.gradient_checkpointing_disable()
        return 0
    if not getattr(lm, "is_gradient_checkpointing", False):
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        lm.enable_input_require_grads()
    layers = lm.get_decoder().layers
    for i, layer in enumerate(layers):
        layer.gradient_checkpointing = i < count
    return min(count, len(layers))
