"""Chat formatting shared by training, evaluation and serving: one prompt layout everywhere."""

from __future__ import annotations

import contextlib
import functools
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


def token_loss(model: Any, batch: dict[str, Any], reduction: str = "mean", focal_gamma: float = 0.0,
               logit_chunk: int | None = None, shared_prefix: bool = True) -> Any:
    """Cross-entropy over answer tokens, optionally focal and weighted per token.

    Prompt positions never reach the vocabulary projection, which on SmolLM2's large vocabulary
    saves about a third of a training step. Models whose head is not a plain projection
    (soft-capped or scaled logits) and prompt-learning adapters go through the full forward.
    `focal_gamma` > 0 down-weights tokens the model already predicts well, (1 - p)^gamma;
    a `token_weight` tensor in the batch (class weights) scales each token's loss.
    `logit_chunk` positions are projected onto the vocabulary at a time (default
    LOGIT_CHUNK_TOKENS); 0 projects them all at once, which ZeRO-3 needs: there every head call
    gathers the head's weights across ranks, so all ranks must make the same number of calls.
    """
    import torch

    losses, selected = token_losses(model, batch, logit_chunk, shared_prefix)
    if focal_gamma:
        losses = (1 - torch.exp(-losses)).pow(focal_gamma) * losses
    weights = batch["token_weight"][:, 1:][selected] if "token_weight" in batch else torch.ones_like(losses)
    total = (losses * weights).sum()
    return total if reduction == "sum" else total / weights.sum().clamp_min(1e-12)


def token_losses(model: Any, batch: dict[str, Any], logit_chunk: int | None = None,
                 shared_prefix: bool = True) -> tuple[Any, Any]:
    """Cross-entropy of every answer token (labels != -100), flat, and the (rows, width - 1) mask that selected them.

    `shared_prefix`: run the prompt tokens every row shares through the decoder once (see
    `shared_prefix_length`); False forces the plain forward."""
    import torch.nn.functional as F

    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    peft_cfg = getattr(model, "active_peft_config", None)
    decoder = lm.get_decoder() if hasattr(lm, "get_decoder") else None
    head = lm.get_output_embeddings()
    special_head = any(getattr(lm.config, k, None) for k in ("final_logit_softcapping", "logit_scale"))
    labels = batch["labels"][:, 1:]
    selected = labels != -100
    packed = "position_ids" in batch
    inputs = {"input_ids": batch["input_ids"], "use_cache": False,
              "attention_mask": None if packed else batch["attention_mask"]}
    if packed:
        inputs["position_ids"] = batch["position_ids"]
    if getattr(peft_cfg, "is_prompt_learning", False) or decoder is None or head is None or special_head:
        if packed:
            raise ValueError("train.packing needs a LoRA-family, IA3, full or hft method (soft prompts cannot be packed)")
        logits = model(**inputs).logits
        logits = logits[:, -batch["input_ids"].shape[1]:][:, :-1][selected]  # drop soft-prompt positions
        losses = F.cross_entropy(logits.float(), labels[selected], reduction="none")
    else:
        prefix = 0 if packed or not shared_prefix or _checkpointing(lm) else shared_prefix_length(batch)
        if not packed and unpadded_applies(lm, batch["attention_mask"]):
            hidden = _decode_unpadded(decoder, batch, selected, prefix)
        elif prefix:
            hidden = _decode_after_shared_prefix(decoder, batch, prefix)[:, :-1][selected[:, prefix:]]
        else:
            hidden = decoder(**inputs).last_hidden_state[:, :-1][selected]
        losses = _chunked_cross_entropy(head, hidden, labels[selected],
                                        LOGIT_CHUNK_TOKENS if logit_chunk is None else logit_chunk)
    return losses, selected


# A batch whose rows all begin with the same prompt tokens (the demo's system prompt is about half of
# every example) runs those tokens through the decoder once, not once per row: the shared prefix's keys
# and values, computed for one row, are expanded (a view) to every row, and the rest of each row attends
# to them as to a KV cache. Autograd sums the rows' gradients back through the expansion, so loss and
# gradients are those of the plain forward (tests/test_shared_prefix.py). Used only where the prefix's
# own positions need no logits (it ends before any row's first answer token) and it is at least
# MIN_SHARED_PREFIX tokens; not with packed rows (their positions restart), gradient checkpointing (no
# cache there), soft prompts, or under ZeRO-3 (`SHARED_PREFIX` off: ranks must make the same calls).
MIN_SHARED_PREFIX = 16
SHARED_PREFIX = {"enabled": True, "why_not": ""}


def disable_shared_prefix(why: str) -> None:
    """Turn the shared-prefix forward off for this process (ZeRO-3 ranks, or a recipe that asks)."""
    SHARED_PREFIX.update(enabled=False, why_not=why)


def shared_prefix_length(batch: dict[str, Any]) -> int:
    """How many leading positions every row shares, with no answer label on them or right after them; 0 if
    too few to be worth a second decoder call."""
    import torch

    ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
    if ids.shape[0] < 2 or not SHARED_PREFIX["enabled"]:
        return 0
    same = (ids == ids[:1]).all(0) & (labels == -100).all(0) & (mask == 1).all(0)
    run = int(torch.cumprod(same.int(), 0).sum())
    prefix = run - 1  # the last shared position's label is the next token's: it must be a prompt token too
    return prefix if prefix >= MIN_SHARED_PREFIX and prefix < ids.shape[1] - 1 else 0


def _checkpointing(lm: Any) -> bool:
    return bool(getattr(lm, "is_gradient_checkpointing", False)) and lm.training


def _decode_after_shared_prefix(decoder: Any, batch: dict[str, Any], prefix: int) -> Any:
    """Last hidden states of positions `prefix`.. of every row, the first `prefix` computed once for all rows: their
    keys and values, one row's, expanded (views) to every row as its cache."""
    import torch

    ids, mask = batch["input_ids"], batch["attention_mask"]
    rows, width = ids.shape
    cache = decoder(input_ids=ids[:1, :prefix], use_cache=True).past_key_values
    for layer in cache.layers:
        layer.keys = layer.keys.expand(rows, -1, -1, -1)
        layer.values = layer.values.expand(rows, -1, -1, -1)
    positions = torch.arange(prefix, width, device=ids.device)
    out = decoder(input_ids=ids[:, prefix:], attention_mask=mask, past_key_values=cache,
                  position_ids=positions.unsqueeze(0).expand(rows, -1), cache_position=positions, use_cache=True)
    return out.last_hidden_state


# On the CPU a batch's padding costs as much as real tokens in every linear layer: after the shared prefix the
# demo's rows are about a fifth padding. With the `tunewright_cpu` attention the decoder runs the batch unpadded:
# its rows' real tokens after the prefix concatenated into one sequence (positions kept), so the linear layers,
# norms and MLPs see no padding, and only the attention puts the rows back apart (`attention.Unpadded`). Loss and
# gradients are those of the padded call (tests/test_unpadded.py). Not for packed rows (no padding), left-padded
# batches, or models with sliding-window or other per-layer attention patterns.
UNPADDED = {"enabled": True}


def unpadded_applies(lm: Any, mask: Any) -> bool:
    from tunewright.train import attention

    config = lm.config
    if not UNPADDED["enabled"] or getattr(config, "_attn_implementation", None) != attention.NAME:
        return False
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
        return False
    if any(t != "full_attention" for t in (getattr(config, "layer_types", None) or [])):
        return False
    return mask.shape[0] > 1 and bool((mask[:, 1:] <= mask[:, :-1]).all()) and bool(mask[:, 0].all())


def _decode_unpadded(decoder: Any, batch: dict[str, Any], selected: Any, prefix: int) -> Any:
    """Last hidden states at the selected (answer-predicting) positions, in the row-major order of `selected`, from
    one decoder call over one sequence: the shared `prefix` once, then each row's real tokens after it up to its
    last selected position (a later token reaches no loss, attention being causal: a row's closing token is only
    a label)."""
    import torch
    import torch.nn.functional as F

    from tunewright.train import attention

    ids, mask = batch["input_ids"], batch["attention_mask"]
    width = ids.shape[1]
    predicts = F.pad(selected, (0, 1))  # (rows, width): position j predicts token j + 1
    trim = bool(predicts.any()) and not _rope_reads_length(decoder.config)
    needed = predicts.flip(1).cumsum(1).flip(1) > 0 if trim else torch.ones_like(predicts)
    real = (mask.bool() & needed)[:, prefix:]
    tokens = ids[:, prefix:][real]
    positions = torch.arange(prefix, width, device=ids.device).expand_as(ids[:, prefix:])[real]
    if prefix:  # the prefix's tokens lead the sequence, decoded once for all rows
        tokens = torch.cat([ids[0, :prefix], tokens])
        positions = torch.cat([torch.arange(prefix, device=ids.device), positions])
    layout = attention.Unpadded(real.sum(1), prefix)
    used = predicts[:, prefix:][real].nonzero().squeeze(1) + prefix  # the positions whose last hidden state is read
    with last_layer_rows_only(decoder, used):
        # an all-ones mask: the model builds no mask of its own (the layout is the mask), and does not read the
        # positions restarting at each row as packed sequences
        hidden = decoder(input_ids=tokens[None], position_ids=positions[None], use_cache=False,
                         attention_mask=torch.ones_like(tokens, dtype=torch.bool)[None],
                         **{attention.UNPADDED_KWARG: layout}).last_hidden_state[0]
    return hidden[used]


def _rope_reads_length(config: Any) -> bool:
    """Whether the model's rotary embedding depends on the longest position in the call (dynamic NTK, LongRoPE):
    there the rows keep their trailing tokens, so that the call's longest position is the padded batch's."""
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    found = [params] + [v for v in params.values() if isinstance(v, dict)] if isinstance(params, dict) else []
    return any(p.get("rope_type", p.get("type")) in ("dynamic", "longrope") for p in found)


# In the decoder's last layer a position whose hidden state is not read (a prompt token) is needed only for its key
# and value: there the query projection, the attention's output projection and the MLP run on the read positions
# alone, the others getting zeros that nothing reads (the same loss and gradients: tests/test_unpadded.py). For
# layers of the Llama form (self_attn.q_proj and o_proj, a dense gate/up/down MLP; each works position by position);
# a mixture-of-experts MLP (its routing and auxiliary loss see every token), any other form, or gradient
# checkpointing (backward recomputes the layer) keeps the full call.
LAST_LAYER_ROWS = {"enabled": True}


def last_layer_rows_why_not(decoder: Any) -> str:
    """Why `decoder`'s last layer cannot compute its per-position parts at the read positions alone; '' if it can."""
    layers = getattr(decoder, "layers", None)
    n_layers = getattr(getattr(decoder, "config", None), "num_hidden_layers", None)
    layer = layers[-1] if layers is not None and len(layers) and n_layers == len(layers) else None
    attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
    if not LAST_LAYER_ROWS["enabled"]:
        return "switched off"
    if _checkpointing(decoder):
        return "gradient checkpointing recomputes the layer in backward"
    if layer is None or any(getattr(attn, name, None) is None for name in ("q_proj", "o_proj")) or mlp is None:
        return "the layer is not of the Llama form"
    if any(hasattr(mlp, name) for name in ("experts", "router", "gate")):
        return "a mixture-of-experts MLP routes every token"
    if not all(hasattr(mlp, name) for name in ("gate_proj", "up_proj", "down_proj")):
        return "the MLP is not a dense gate/up/down one"
    return ""


@contextlib.contextmanager
def last_layer_rows_only(decoder: Any, index: Any) -> Any:
    """While open, `decoder`'s last layer computes its per-position parts at sequence positions `index` only
    (one sequence: hidden states of shape (1, positions, width)). Yields whether it applies."""
    if last_layer_rows_why_not(decoder):
        yield False
        return
    from tunewright.train.fused_lora import routed

    layer = decoder.layers[-1]
    modules = [layer.self_attn.q_proj, layer.self_attn.o_proj, layer.mlp]
    if any(routed(m, _rows_only) for m in modules):  # already open
        yield False
        return
    own = []
    try:
        for m in modules:
            own.append(m.__dict__.get("forward"))
            m.forward = functools.partial(_rows_only, m.forward, index)
        yield True
    finally:
        for m, forward in zip(modules, own):
            if forward is None:
                m.__dict__.pop("forward", None)
            else:
                m.forward = forward


def _rows_only(forward: Any, index: Any, x: Any, *args: Any, **kwargs: Any) -> Any:
    if args or kwargs or x.dim() != 3 or x.shape[0] != 1:
        return forward(x, *args, **kwargs)
    y = forward(x.index_select(1, index))
    return y.new_zeros(*x.shape[:-1], y.shape[-1]).index_copy(1, index, y)


def sequence_logps(model: Any, batch: dict[str, Any], logit_chunk: int | None = None,
                   shared_prefix: bool = True) -> tuple[Any, Any]:
    """Summed log-probability of each row's answer tokens, and how many answer tokens each row has."""
    import torch

    losses, selected = token_losses(model, batch, logit_chunk, shared_prefix)
    rows = torch.arange(selected.shape[0], device=selected.device).unsqueeze(1).expand_as(selected)[selected]
    logps = torch.zeros(selected.shape[0], dtype=losses.dtype, device=losses.device).index_add(0, rows, -losses)
    return logps, selected.sum(dim=1)


LOGIT_CHUNK_TOKENS = 128


def _chunked_cross_entropy(head: Any, hidden: Any, targets: Any, chunk: int) -> Any:
    """Per-token cross-entropy of `head(hidden)`, never holding more than one chunk of logits.

    A vocabulary of 49k makes the logits (and their fp32 copy and gradient) the largest activation of a
    small model. Each chunk of `chunk` positions is projected, scored and dropped. A plain Linear head
    goes through `_projected_cross_entropy()`, which keeps only each position's log-sum-exp and in backward
    recomputes the chunk's logits once, turning them into their gradient in place (softmax minus the
    one-hot target); other heads, and a head sharded by ZeRO-3 (called as a module, which gathers its
    weights), go through cross-entropy on `head(h)` with activation checkpointing per chunk. `chunk` 0:
    all positions at once (ZeRO-3: one head call per micro-batch on every rank).
    """
    import torch
    import torch.nn.functional as F
    from torch.utils.checkpoint import checkpoint

    weight = getattr(head, "weight", None)
    if type(head) is torch.nn.Linear and not hasattr(weight, "ds_id") and hidden.shape[0]:
        device = hidden.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype
        low = _frozen_head_in_autocast_dtype(head)
        return _projected_cross_entropy().apply(hidden, weight if low is None else low, head.bias, targets,
                                                chunk or hidden.shape[0], dtype)

    def score(h: Any, y: Any) -> Any:
        return F.cross_entropy(head(h).float(), y, reduction="none")

    if not chunk or hidden.shape[0] <= chunk or not torch.is_grad_enabled():
        return score(hidden, targets)
    return torch.cat([checkpoint(score, hidden[i : i + chunk], targets[i : i + chunk], use_reentrant=False)
                      for i in range(0, hidden.shape[0], chunk)])


@functools.cache
def _projected_cross_entropy() -> Any:
    """The autograd Function, built on first use (this module imports without torch)."""
    import torch

    class ProjectedCrossEntropy(torch.autograd.Function):
        """losses[i] = logsumexp(z_i) - z_i[y_i] with z = hidden @ weight.T + bias in `dtype`, scored in fp32,
        `chunk` rows at a time: the cross-entropy of the head's logits, with what autocast would compute
        (16-bit matmul, fp32 softmax). Backward recomputes each chunk's logits and makes them their own
        gradient in place, exp(z - lse) - onehot(y), so no logits, log-probabilities or zero-filled gradient
        buffers outlive a chunk; the head's weight and bias get gradients when they need them. Where only the
        hidden states need one, forward makes it per unit of loss instead (see `forward`)."""

        @staticmethod
        def forward(ctx, hidden, weight, bias, targets, chunk, dtype):
            # only the hidden states need a gradient (a frozen head, as with every adapter method): each
            # position's is its loss's gradient times (softmax - onehot) @ weight, a row of `d` values that
            # forward makes while it holds the chunk's logits, so backward projects nothing
            early = ctx.needs_input_grad[0] and not any(ctx.needs_input_grad[1:3])
            with torch.autocast(hidden.device.type, enabled=False):
                h, w = hidden.to(dtype), weight.to(dtype)
                b = None if bias is None else bias.to(dtype)
                lse = torch.empty(h.shape[0], dtype=torch.float32, device=h.device)
                losses = torch.empty_like(lse)
                per_loss = torch.empty_like(h) if early else None
                rows = torch.arange(min(chunk, h.shape[0]), device=h.device)
                for i in range(0, h.shape[0], chunk):
                    z = _logits(h[i : i + chunk], w, b)
                    n = z.shape[0]
                    target = z.gather(1, targets[i : i + n, None]).squeeze(1)
                    top = z.amax(-1)
                    total = z.sub_(top[:, None]).exp_().sum(-1)
                    lse[i : i + n] = total.log().add_(top)
                    losses[i : i + n] = lse[i : i + n] - target
                    if early:
                        z.div_(total[:, None])  # softmax
                        z[rows[:n], targets[i : i + n]] -= 1
                        g = _buffer(z.shape, dtype, z.device, "low").copy_(z) if dtype != z.dtype else z
                        torch.mm(g, w, out=per_loss[i : i + n])
            ctx.save_for_backward(*((per_loss,) if early else (hidden, weight, bias, targets, lse)))
            ctx.chunk, ctx.dtype, ctx.early, ctx.hidden_dtype = chunk, dtype, early, hidden.dtype
            return losses

        @staticmethod
        def backward(ctx, grad):
            if ctx.early:
                (per_loss,) = ctx.saved_tensors
                return (per_loss * grad[:, None]).to(ctx.hidden_dtype), None, None, None, None, None
            hidden, weight, bias, targets, lse = ctx.saved_tensors
            need_h, need_w, need_b = ctx.needs_input_grad[:3]
            dtype, chunk = ctx.dtype, ctx.chunk
            with torch.autocast(hidden.device.type, enabled=False):
                h, w = hidden.to(dtype), weight.to(dtype)
                b = None if bias is None else bias.to(dtype)
                grad_h = torch.empty_like(h) if need_h else None
                grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=w.device) if need_w else None
                grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=w.device) if need_b else None
                rows = torch.arange(min(chunk, h.shape[0]), device=h.device)
                for i in range(0, h.shape[0], chunk):
                    z = _logits(h[i : i + chunk], w, b)
                    n = z.shape[0]
                    z.sub_(lse[i : i + n, None]).exp_()  # softmax
                    z[rows[:n], targets[i : i + n]] -= 1
                    z.mul_(grad[i : i + n, None])
                    if need_b:
                        grad_b += z.sum(0)
                    g = _buffer(z.shape, dtype, z.device, "low").copy_(z) if dtype != z.dtype else z
                    if need_h:
                        grad_h[i : i + n] = g @ w
                    if need_w:
                        grad_w += g.t().float() @ h[i : i + n].float()
            return (None if grad_h is None else grad_h.to(hidden.dtype), None if grad_w is None else grad_w.to(weight.dtype),
                    None if grad_b is None else grad_b.to(bias.dtype), None, None, None)

    def _logits(h, w, b):
        """fp32 logits of one chunk, in a buffer reused from chunk to chunk: each new 25 MB tensor costs more
        in page faults than the arithmetic on it."""
        low = _buffer((h.shape[0], w.shape[0]), h.dtype, h.device, "low")
        torch.mm(h, w.t(), out=low) if b is None else torch.addmm(b, h, w.t(), out=low)
        return low if h.dtype == torch.float32 else _buffer(low.shape, torch.float32, h.device, "fp32").copy_(low)

    return ProjectedCrossEntropy


_BUFFERS: dict[tuple, Any] = {}


def _buffer(shape: tuple, dtype: Any, device: Any, role: str) -> Any:
    """A scratch tensor of `shape`, the same storage on every call for one role (the projected cross-entropy's
    chunks); views of the full chunk's buffer serve a shorter last chunk."""
    import torch

    key = (role, dtype, str(device), shape[1:])
    have = _BUFFERS.get(key)
    if have is None or have.shape[0] < shape[0]:
        have = _BUFFERS[key] = torch.empty(shape, dtype=dtype, device=device)
    return have[: shape[0]]


_HEAD_CASTS: dict[int, tuple] = {}


def _frozen_head_in_autocast_dtype(head: Any) -> Any:
    """Under 16-bit autocast, a frozen fp32 head's weight in the autocast dtype, cast once and kept until the
    weight changes; None where the head's weight is trainable, not fp32, sharded or autocast is off.

    SmolLM2's head is its (fp32, frozen) embedding matrix: autocast would copy its 28M values afresh on every
    chunk of every step (about 7% of a demo step). The matmul reads the same 16-bit values either way."""
    import torch

    w = getattr(head, "weight", None)
    device = w.device.type if w is not None else "cpu"
    if w is None or w.requires_grad or w.dtype != torch.float32 or hasattr(w, "ds_id") or not torch.is_autocast_enabled(device):
        return None
    dtype = torch.get_autocast_dtype(device)
    key = (w.data_ptr(), w._version, dtype)
    cached = _HEAD_CASTS.get(id(w))
    if cached is None or cached[0] != key:
        _HEAD_CASTS.clear()  # one head at a time: a second model's would only double the memory
        cached = _HEAD_CASTS[id(w)] = (key, w.detach().to(dtype))
    return cached[1]


def answer_loss(model: Any, tokenizer: Any, conversations: list[list[dict[str, str]]], *,
                max_len: int, batch_size: int, autocast_dtype: Any = None) -> float:
    """Mean cross-entropy per answer token (teacher forcing), the loss training minimises."""
    import torch

    device = next(model.parameters()).device
    total, count = 0.0, 0
    encoded = [encode_example(tokenizer, c, max_len) for c in conversations]
    for start in range(0, len(encoded), batch_size):
        batch = {k: v.to(device) for k, v in pad_batch(encoded[start : start + batch_size], tokenizer.pad_token_id).items()}
        with torch.no_grad(), torch.autocast(
            device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None
        ):
            total += float(token_loss(model, batch, reduction="sum"))
        count += int((batch["labels"][:, 1:] != -100).sum())
    return total / max(count, 1)


def autocast_dtype(precision: str) -> Any:
    """The autocast dtype for a precision name, or None for full fp32."""
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
