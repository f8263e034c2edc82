"""Chat formatting shared by training, evaluation and serving: one prompt layout everywhere, encoding of
answer-only training rows, tool calls, and generation.

Tool calling: a conversation's `tools` ([{"type": "function", "function": {name, description, parameters}}]),
assistant turns with `tool_calls` and `tool` turns are rendered by the tokenizer's own chat template when it
renders tools (`apply_chat_template(..., tools=...)`), else in the widely used Hermes layout: the tools listed in
the system turn, each call written `<tool_call>{"name", "arguments"}</tool_call>`, and tool results sent back as a
user turn of `<tool_response>` blocks. `parse_tool_calls` reads calls back out of generated text.
"""

from __future__ import annotations

import json
import re
from typing import Any

TOOL_CALL_OPEN, TOOL_CALL_CLOSE = "<tool_call>", "</tool_call>"


def prompt_messages(messages: list[dict[str, str]]) -> list[dict[str, str]]:
    """Every turn before the final assistant answer."""
    return messages[:-1] if messages and messages[-1]["role"] == "assistant" else messages


def uses_tools(messages: list[dict], tools: list[dict] | None = None) -> bool:
    """Whether a conversation declares tools, calls one or carries a tool's result."""
    return bool(tools) or any(m.get("tool_calls") or m.get("role") == "tool" for m in messages)


def renders_tools(tokenizer: Any) -> bool:
    """Whether the tokenizer's chat template renders `tools` and `tool_calls` itself."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = template.get("tool_use") or template.get("default")
    return isinstance(template, str) and "tools" in template and "tool_calls" in template


def call_arguments(call: dict) -> Any:
    """A call's arguments as a value (OpenAI sends them as a JSON string; stage 1 stores the parsed object)."""
    args = call.get("function", call).get("arguments")
    if isinstance(args, str):
        try:
            return json.loads(args)
        except json.JSONDecodeError:
            return args
    return {} if args is None else args


def call_text(call: dict) -> str:
    """One call as the model writes it in the Hermes layout."""
    name = call.get("function", call)["name"]
    return f"{TOOL_CALL_OPEN}\n{json.dumps({'name': name, 'arguments': call_arguments(call)}, ensure_ascii=False)}" \
           f"\n{TOOL_CALL_CLOSE}"


def turn_text(message: dict) -> str:
    """An assistant turn as text: its content, then each of its calls as a `<tool_call>` block (what evaluation
    compares answers with)."""
    parts = [message.get("content") or ""] + [call_text(c) for c in message.get("tool_calls") or ()]
    return "\n".join(p for p in parts if p)


def tools_preamble(tools: list[dict]) -> str:
    """The system-turn text that declares tools in the Hermes layout."""
    listed = "\n".join(json.dumps(t.get("function", t), ensure_ascii=False, separators=(", ", ": ")) for t in tools)
    return ("You can call these functions. To call one, answer with "
            f'{TOOL_CALL_OPEN}\n{{"name": <function name>, "arguments": <arguments object>}}\n{TOOL_CALL_CLOSE}\n'
            f"<tools>\n{listed}\n</tools>")


def template_messages(tokenizer: Any, messages: list[dict], tools: list[dict] | None = None
                      ) -> tuple[list[dict], dict]:
    """(messages, extra `apply_chat_template` arguments) that render a conversation with its tools.

    A conversation without tools is returned as it is. With a template that renders tools, calls get their
    arguments as objects (what such templates serialise) and the tools travel as `tools=`; otherwise the
    conversation is rewritten into plain turns in the Hermes layout, which any chat template renders.
    """
    if not uses_tools(messages, tools):
        return messages, {}
    if renders_tools(tokenizer):
        out = []
        for m in messages:
            m = dict(m, content=m.get("content") or "")
            if m.get("tool_calls"):
                m["tool_calls"] = [{"type": "function", **({"id": c["id"]} if c.get("id") else {}),
                                    "function": {"name": c.get("function", c)["name"],
                                                 "arguments": call_arguments(c)}} for c in m["tool_calls"]]
            out.append(m)
        return out, ({"tools": tools} if tools else {})
    out: list[dict] = []
    rest = messages
    if tools:
        first = messages[0] if messages and messages[0]["role"] == "system" else None
        system = ((first.get("content") or "") + "\n\n" if first else "") + tools_preamble(tools)
        out.append({"role": "system", "content": system})
        rest = messages[1:] if first else messages
    for m in rest:
        if m["role"] == "tool":
            block = f"<tool_response>\n{m.get('content') or ''}\n</tool_response>"
            if out and out[-1].get("tool_results"):
                out[-1] = dict(out[-1], content=out[-1]["content"] + "\n" + block)
            else:
                out.append({"role": "user", "content": block, "tool_results": True})
        elif m["role"] == "assistant":
            out.append({"role": "assistant", "content": turn_text(m)})
        else:
            out.append({"role": m["role"], "content": m.get("content") or ""})
    return [{"role": m["role"], "content": m["content"]} for m in out], {}


def template_ids(tokenizer: Any, messages: list[dict], tools: list[dict] | None = None, *,
                 generation: bool = False) -> list[int]:
    """Token ids of a conversation as its chat template renders it (ending with the assistant header when
    `generation`)."""
    msgs, extra = template_messages(tokenizer, messages, tools)
    out = tokenizer.apply_chat_template(msgs, add_generation_prompt=generation, tokenize=True, return_dict=True,
                                        **extra)
    return list(out["input_ids"])


def template_text(tokenizer: Any, messages: list[dict], tools: list[dict] | None = None) -> str:
    """A prompt as text, ending with the assistant header."""
    msgs, extra = template_messages(tokenizer, messages, tools)
    return tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False, **extra)


def prompt_ids(tokenizer: Any, messages: list[dict[str, str]], tools: list[dict] | None = None) -> list[int]:
    """Token ids of the prompt, ending with the assistant header, as generation sees it."""
    return template_ids(tokenizer, prompt_messages(messages), tools, generation=True)


def answer_suffix(tokenizer: Any) -> str:
    """What closes an assistant turn in the chat template (the end-of-turn token)."""
    return tokenizer.eos_token or ""


def encode_example(tokenizer: Any, messages: list[dict[str, str]], max_len: int,
                   tools: list[dict] | None = None) -> dict[str, list[int]]:
    """Input ids and labels with the loss on the assistant answer only (prompt tokens are -100).

    A too-long example loses the end of its prompt's middle, never the answer: the answer and
    the last prompt tokens (the assistant header) are kept, the prompt's start is kept too.
    A conversation with tools is encoded whole, the loss on every assistant turn (calls and final answers) and
    none on tool results (see `encode_turns`).
    """
    if uses_tools(messages, tools):
        return encode_turns(tokenizer, messages, max_len, tools)
    prompt = prompt_ids(tokenizer, messages)
    answer = tokenizer(messages[-1]["content"] + answer_suffix(tokenizer), add_special_tokens=False)["input_ids"]
    answer = answer[: max_len - 8]
    room = max_len - len(answer)
    if len(prompt) > room:
        head = room // 2
        prompt = prompt[:head] + prompt[len(prompt) - (room - head):]
    return {"input_ids": prompt + answer, "labels": [-100] * len(prompt) + answer}


def encode_turns(tokenizer: Any, messages: list[dict], max_len: int,
                 tools: list[dict] | None = None) -> dict[str, list[int]]:
    """A whole conversation's ids, labelled on each assistant turn (its text, calls and end of turn).

    Each assistant turn's span is found by rendering the conversation up to it: from the end of the prompt with
    the assistant header to the end of the turn. A turn the template renders differently once later turns follow
    (some templates drop earlier reasoning) is left unlabelled. A conversation over `max_len` tokens loses the
    middle of its first prompt, then its end.
    """
    full = template_ids(tokenizer, messages, tools)
    labels = [-100] * len(full)
    for k, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start = len(template_ids(tokenizer, messages[:k], tools, generation=True))
        upto = full if k == len(messages) - 1 else template_ids(tokenizer, messages[: k + 1], tools)
        if full[: len(upto)] == upto and start < len(upto):
            labels[start:len(upto)] = upto[start:]
    over = len(full) - max_len
    if over > 0:
        first = next((i for i, t in enumerate(labels) if t != -100), len(full))
        cut = min(over, max(first - 16, 0))
        if cut:
            keep = (first - cut) // 2
            full, labels = full[:keep] + full[keep + cut:], labels[:keep] + labels[keep + cut:]
        full, labels = full[:max_len], labels[:max_len]
    return {"input_ids": full, "labels": labels}


_BLOCK = re.compile(re.escape(TOOL_CALL_OPEN) + r"(.*?)(?:" + re.escape(TOOL_CALL_CLOSE) + r"|$)", re.S)
_CALL_KEYS = {"name", "arguments", "parameters", "type", "id"}


def _one_call(value: Any) -> dict | None:
    """{"name", "arguments": object} from a parsed call, or None when it is not one."""
    if not isinstance(value, dict):
        return None
    if isinstance(value.get("function"), dict):  # OpenAI's own shape
        value = value["function"]
    name, args = value.get("name"), value.get("arguments", value.get("parameters", {}))
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            return None
    if not isinstance(name, str) or not name or not isinstance(args, dict):
        return None
    return {"name": name, "arguments": args}


def parse_tool_calls(text: str) -> tuple[str, list[dict] | None]:
    """(text outside calls, calls as [{"name", "arguments": object}] or None) read from generated text.

    Reads `<tool_call>` blocks (Hermes, Qwen, SmolLM3; the last may be unclosed when generation stopped),
    Mistral's `[TOOL_CALLS] [...]`, and an answer that is nothing but a call object (Llama 3.x). When any block
    does not hold a well-formed call the text has no calls: the whole text is returned as it is.
    """
    if TOOL_CALL_OPEN in text:
        calls = []
        for body in _BLOCK.findall(text):
            try:
                call = _one_call(json.loads(body.strip()))
            except json.JSONDecodeError:
                call = None
            if call is None:
                return text, None
            calls.append(call)
        return _BLOCK.sub("", text).strip(), calls
    stripped = text.strip()
    if stripped.startswith("[TOOL_CALLS]"):
        try:
            value = json.loads(stripped[len("[TOOL_CALLS]"):].strip())
        except json.JSONDecodeError:
            return text, None
        calls = [_one_call(v) for v in (value if isinstance(value, list) else [value])]
        return ("", calls) if calls and None not in calls else (text, None)
    if stripped.startswith("{") and stripped.endswith("}"):
        try:
            value = json.loads(stripped)
        except json.JSONDecodeError:
            return text, None
        if isinstance(value, dict) and "name" in value and set(value) <= _CALL_KEYS:
            call = _one_call(value)
            if call is not None:
                return "", [call]
    return text, None


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
             progress: Any = None, stop_after_json: bool = False,
             tools: list[list[dict] | None] | None = None, engine: str = "auto",
             kv_cache_tokens: int | None = None) -> list[str]:
    """Greedy answers for many prompts, left-padded in batches, prompts of similar length batched together.

    `stop_after_json`: a row stops once its first JSON object has closed (for metrics that read only that
    object); a model that never closes one still stops at `max_new_tokens`. `tools`: each conversation's
    declared tools (or None), rendered into its prompt; calls come back as text (`parse_tool_calls` reads them).
    `engine`: `padded` batches of `batch_size`; `continuous`: transformers' continuous batching (every prompt in
    one paged KV cache of `kv_cache_tokens`, requests joining and leaving the running batch token by token, no
    padding); `auto`: continuous on CUDA, padded elsewhere. Both give the same greedy answers. The engine runs
    in a thread of its own, out of the caller's autocast: on CUDA an fp32 model is cast to `autocast_dtype` first.
    """
    import torch

    if engine not in ("auto", "padded", "continuous"):
        raise ValueError(f"engine {engine!r}: auto, padded or continuous")
    device = next(model.parameters()).device
    prompts = [prompt_messages(c) for c in conversations]
    tools = tools or [None] * len(prompts)
    if engine == "continuous" or (engine == "auto" and device.type == "cuda"):
        ids = [template_ids(tokenizer, p, t, generation=True) if uses_tools(p, t) else
               list(tokenizer.apply_chat_template(p, add_generation_prompt=True, return_dict=True)["input_ids"])
               for p, t in zip(prompts, tools)]
        if autocast_dtype is not None and device.type == "cuda" and next(model.parameters()).dtype == torch.float32:
            model.to(autocast_dtype)  # the engine runs in a thread of its own, which the caller's autocast misses
        answers_list = _generate_continuous(model, tokenizer, ids, max_new_tokens, stop_after_json, kv_cache_tokens)
        if progress:
            progress(len(prompts), len(prompts))
        return answers_list
    tokenizer.padding_side = "left"
    answers: dict[int, str] = {}
    # batch by prompt length: less left padding to run through the model (answers return in the given order)
    order = sorted(range(len(prompts)), key=lambda i: sum(len(m.get("content") or "") for m in prompts[i]))
    with_tools = any(uses_tools(p, t) for p, t in zip(prompts, tools))
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        if with_tools:  # each prompt with its own tools: rendered one by one, tokenized together
            texts = [template_text(tokenizer, prompts[i], tools[i]) for i in idx]
            enc = tokenizer(texts, add_special_tokens=False, return_tensors="pt", padding=True).to(device)
        else:
            enc = tokenizer.apply_chat_template(
                [prompts[i] for i in idx], add_generation_prompt=True, return_tensors="pt", return_dict=True,
                padding=True).to(device)
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


def _generate_continuous(model: Any, tokenizer: Any, ids: list[list[int]], max_new_tokens: int,
                         stop_after_json: bool, kv_cache_tokens: int | None) -> list[str]:
    """Greedy answers through transformers' continuous batching; with `stop_after_json` each answer ends at the
    token that closed its first JSON object, where the padded path's stopping criterion ends it."""
    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    gen = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=tokenizer.eos_token_id,
                           pad_token_id=tokenizer.pad_token_id)
    # the engine's own default sizes the cache from free memory (right on a GPU; on a CPU, gigabytes to allocate)
    cb = None if kv_cache_tokens is None else ContinuousBatchingConfig(
        page_size=32, num_blocks=max(16, kv_cache_tokens // 32), max_batch_tokens=1024)
    results = list(model.generate_batch(inputs=ids, generation_config=gen, continuous_batching_config=cb,
                                        progress_bar=False).values())
    if len(results) != len(ids):
        raise RuntimeError(f"continuous batching answered {len(results)} of {len(ids)} prompts")
    answers = []
    for result in results:
        if result.error is not None:
            raise RuntimeError(f"continuous batching failed on a prompt: {result.error}")
        tokens = list(result.generated_tokens)
        if stop_after_json:
            end = next((k for k in range(1, len(tokens) + 1)
                        if json_object_closed(tokenizer.decode(tokens[:k], skip_special_tokens=True))), len(tokens))
            tokens = tokens[:end]
        answers.append(tokenizer.decode(tokens, skip_special_tokens=True).strip())
    return answers


def autocast_dtype(precision: str) -> Any:
    """The autocast dtype for a precision name, or None for full fp32."""
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
