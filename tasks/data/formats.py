"""Formats: detect each record's shape and normalise every shape to one internal example.

The internal example is a dict that later stages read:
  - `kind` "sft": `messages`, the whole conversation (chat, ShareGPT, alpaca, prompt/completion,
    and labelled text as user text -> assistant label);
  - `kind` "preference": `prompt` (messages) with `chosen` and `rejected` (assistant messages), and
    `score_chosen` / `score_rejected` (numbers from the source, or None);
  - `kind` "feedback": `prompt` (messages), `completion` (assistant messages), `label` (bool);
  - `kind` "text": `text`, for continued pre-training.
Each also carries `id`, `source`, `row`, `where`, `format`, `label` (or None) and `notes`, the
repairs made on the way (reported, never silent).

Tool calling (with `data.clean.tool_turns: keep`; OpenAI's function-calling form, which chat
templates render with `tokenizer.apply_chat_template(messages, tools=ex["tools"])`):
  - an assistant turn that calls tools has `tool_calls`: [{"id", "type": "function", "function":
    {"name", "arguments"}}] with `arguments` always a parsed JSON object (a source's JSON string is
    parsed: templates take objects), and `content` "" when it says nothing besides;
  - a tool turn is {"role": "tool", "content", "tool_call_id"} (and `name` where given);
  - the row's `tools` list ([{"type": "function", "function": {"name", "description", "parameters"}}],
    bare function objects or a JSON string of them read as that) is the example's `tools`, and is
    written with it. ShareGPT's `function_call` turns (a JSON string {"name", "arguments"}) become
    calls with ids `call_<turn>`, and `observation`/`function` turns the tool turns answering the
    latest call.
A row is quarantined, naming the turn and call, when a call names a tool the row's `tools` does not
declare (when it declares any), its arguments are not a JSON object or do not satisfy that tool's
`parameters` schema (jsonschema), or a tool turn answers a `tool_call_id` no earlier call has.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from typing import Any

SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant",
                  "bard": "assistant", "model": "assistant", "bing": "assistant", "system": "system",
                  "tool": "tool", "function": "tool", "observation": "tool", "function_call": "assistant"}
CHAT_ROLES = {"system", "user", "assistant", "tool"}
TRUE = {"true", "1", "yes", "y", "good", "desirable", "thumbs_up", "+1"}
FALSE = {"false", "0", "no", "n", "bad", "undesirable", "thumbs_down", "-1"}
# the field pairs a preference pair's scores come in (UltraFeedback's first), read as score_chosen / score_rejected
SCORE_FIELDS = (("score_chosen", "score_rejected"), ("chosen_score", "rejected_score"),
                ("chosen_rating", "rejected_rating"), ("rating_chosen", "rating_rejected"))
# an Anthropic HH-RLHF transcript: "\n\nHuman: ...\n\nAssistant: ..."
_TRANSCRIPT = re.compile(r"\s*(?:Human|Assistant):")
_SPEAKER = re.compile(r"(?:^|\n\n)(Human|Assistant):")


class FormatError(ValueError):
    """A source whose format is mixed or cannot be told; names the formats and example rows."""


class RowError(ValueError):
    """One record that cannot be normalised; the message says why."""


def shape(record: Any) -> str | None:
    """The format a record's fields say it is, or None."""
    if not isinstance(record, dict):
        return None
    keys = {k for k, v in record.items() if v is not None}
    if {"chosen", "rejected"} <= keys:
        # before chat and sharegpt: UltraFeedback rows also carry `messages`, a copy of the chosen conversation, and
        # ShareGPT pairs (LLaMA-Factory's layout) hold their prompt in `conversations`
        return "preference"
    if "messages" in keys:
        return "chat"
    if "conversations" in keys:
        return "sharegpt"
    if {"prompt", "completion", "label"} <= keys:
        return "kto"
    if {"instruction", "output"} <= keys:
        return "alpaca"
    if "prompt" in keys and ("completion" in keys or "response" in keys):
        return "prompt_completion"
    if {"text", "label"} <= keys:
        return "labelled"
    if "text" in keys:
        return "text"
    return None


def detect(records: list[tuple[str, Any]], source: str) -> str:
    """The one format of a source's records; FormatError when mixed or unknown."""
    seen: dict[str, list] = {}
    for where, rec in records:
        entry = seen.setdefault(shape(rec) or "unknown", [0, []])
        entry[0] += 1
        if len(entry[1]) < 3:
            entry[1].append(where)
    return decide(seen, [list(r) if isinstance(r, dict) else [] for _, r in records[:50]], source)


def decide(seen: dict[str, list], fields: list[list], source: str) -> str:
    """The one format of a source from the shapes of its records: `seen` is {shape or "unknown": [rows, first
    wheres]} in the order shapes first occur, `fields` the field names of its first 50 records."""
    known = [k for k in seen if k != "unknown"]
    if len(known) == 1:
        return known[0]
    counts = Counter({k: n for k, (n, _) in seen.items()})
    described = "; ".join(f"{fmt} ({n} rows, e.g. {', '.join(seen[fmt][1][:3])})" for fmt, n in counts.most_common())
    if not known:
        keys = sorted({k for f in fields[:50] for k in f})
        raise FormatError(f"{source}: cannot tell the format: no row has the fields of a known format "
                          f"(fields seen: {', '.join(keys) or 'none'}). Rename fields with `columns` or declare "
                          f"`format`. Known: chat (messages), sharegpt (conversations), alpaca (instruction/output), "
                          f"prompt_completion (prompt/completion or response), preference (prompt/chosen/rejected), "
                          f"kto (prompt/completion/label), labelled (text/label), text (text)")
    raise FormatError(f"{source}: rows of more than one format: {described}. Split the source by format, "
                      f"or declare `format` to read every row as one of them")


def _text(value: Any, field: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in value):
        return "".join(str(p.get("text", "")) for p in value)  # OpenAI content parts
    if value is None:
        raise RowError(f"'{field}' is missing or null")
    raise RowError(f"'{field}' is {type(value).__name__}, expected text")


def _messages(value: Any, field: str, tool_turns: str, notes: list[str]) -> list[dict]:
    if isinstance(value, str):
        return [{"role": "assistant", "content": value}]
    if not isinstance(value, list) or not value:
        raise RowError(f"'{field}' must be a non-empty list of {{role, content}} turns")
    out = []
    for i, turn in enumerate(value):
        if not isinstance(turn, dict):
            raise RowError(f"'{field}' turn {i} is {type(turn).__name__}, expected an object")
        role = str(turn.get("role", ""))
        if role == "developer":
            role = "system"
            notes.append(f"{field} turn {i}: role 'developer' read as 'system'")
        if role not in CHAT_ROLES:
            raise RowError(f"'{field}' turn {i} has role '{role}' (allowed: {', '.join(sorted(CHAT_ROLES))})")
        if role == "tool" or turn.get("tool_calls"):
            if tool_turns == "reject":
                raise RowError(f"'{field}' turn {i} is a tool {'call' if turn.get('tool_calls') else 'turn'} "
                               "(data.clean.tool_turns: reject)")
        msg: dict[str, Any] = {"role": role}
        if turn.get("tool_calls"):
            msg["content"] = turn.get("content") or ""
            msg["tool_calls"] = _calls(turn["tool_calls"], f"{field} turn {i}")
        else:
            content = turn.get("content")
            msg["content"] = content if isinstance(content, str) else _text(content, f"{field} turn {i} content")
        for extra in ("name", "tool_call_id"):
            if turn.get(extra) is not None:
                msg[extra] = str(turn[extra])
        out.append(msg)
    return out


def _parsed(text: str, failing: str) -> Any:
    """`text` read as JSON; a RowError "`failing` as JSON: why" (`failing` names the field and says it does not
    parse) when it is not."""
    try:
        return json.loads(text)
    except ValueError as exc:
        raise RowError(f"{failing} as JSON: {exc}") from None


def _calls(value: Any, where: str) -> list[dict]:
    """A turn's tool calls in the internal form: arguments parsed to a JSON object."""
    if not isinstance(value, list):
        raise RowError(f"{where}: 'tool_calls' is {type(value).__name__}, expected a list")
    out = []
    for j, call in enumerate(value):
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise RowError(f"{where} call {j}: expected {{id, type: function, function: {{name, arguments}}}}")
        args = fn.get("arguments")
        if isinstance(args, str):
            args = _parsed(args, f"{where} call {j} ({fn['name']}): arguments do not parse") if args.strip() else {}
        if not isinstance(args, dict):
            raise RowError(f"{where} call {j} ({fn['name']}): arguments are {type(args).__name__}, expected an object")
        out.append({"id": str(call.get("id") or f"call_{j}"), "type": "function",
                    "function": {"name": fn["name"], "arguments": args}})
    return out


def _tools(value: Any) -> list[dict]:
    """A row's declared tools as [{"type": "function", "function": {...}}]; bare functions and JSON text are read."""
    if isinstance(value, str):
        value = _parsed(value, "'tools' does not parse")
    if not isinstance(value, list):
        raise RowError(f"'tools' is {type(value).__name__}, expected a list of functions")
    out = []
    for k, tool in enumerate(value):
        fn = tool.get("function", tool) if isinstance(tool, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise RowError(f"'tools' entry {k}: expected {{type: function, function: {{name, description, parameters}}}}")
        out.append({"type": "function", "function": fn})
    return out


def _check_calls(messages: list[dict], tools: list[dict] | None, field: str) -> None:
    """RowError for a call to an undeclared tool, arguments its `parameters` schema refuses, or a tool turn
    answering no earlier call: rows that would teach a model calls it cannot make."""
    import jsonschema

    declared = {t["function"]["name"]: t["function"].get("parameters") for t in tools or ()}
    ids: set[str] = set()
    for i, m in enumerate(messages):
        for j, call in enumerate(m.get("tool_calls") or ()):
            name, args = call["function"]["name"], call["function"]["arguments"]
            where = f"'{field}' turn {i} call {j} ('{call['id']}', {name})"
            if tools is not None and name not in declared:
                raise RowError(f"{where} names a tool not declared in 'tools' ({', '.join(declared) or 'none'})")
            if declared.get(name):
                try:
                    jsonschema.validate(args, declared[name])
                except jsonschema.ValidationError as exc:
                    raise RowError(f"{where}: arguments do not satisfy its parameters: {exc.message}") from None
                except jsonschema.SchemaError as exc:
                    raise RowError(f"{where}: the parameters of '{name}' are not a JSON schema: {exc.message}") from None
            ids.add(call["id"])
        if m["role"] == "tool" and m.get("tool_call_id") not in ids:
            raise RowError(f"'{field}' turn {i} is a tool turn answering tool_call_id "
                           f"'{m.get('tool_call_id')}', which no earlier call has")


def _sharegpt(value: Any, tool_turns: str, notes: list[str], field: str = "conversations") -> list[dict]:
    if not isinstance(value, list) or not value:
        raise RowError(f"'{field}' must be a non-empty list of {{from, value}} turns")
    out = []
    for i, turn in enumerate(value):
        if not isinstance(turn, dict):
            raise RowError(f"'{field}' turn {i} is {type(turn).__name__}, expected an object")
        who = str(turn.get("from", turn.get("role", ""))).lower()
        if who not in SHAREGPT_ROLES:
            raise RowError(f"'{field}' turn {i} is from '{who}' (known: {', '.join(sorted(SHAREGPT_ROLES))})")
        said = _text(turn.get("value", turn.get("content")), f"{field} turn {i} value")
        if tool_turns == "keep" and who == "function_call":
            call = _parsed(said, f"'{field}' turn {i} (function_call) does not parse")
            if not isinstance(call, dict):
                raise RowError(f"'{field}' turn {i} (function_call) is not a {{name, arguments}} object")
            out.append({"role": "assistant", "content": "", "tool_calls": _calls(
                [{"id": f"call_{i}", "function": call}], f"'{field}' turn {i}")})
        elif tool_turns == "keep" and SHAREGPT_ROLES[who] == "tool":
            last = next((m["tool_calls"][-1]["id"] for m in reversed(out) if m.get("tool_calls")), None)
            out.append({"role": "tool", "content": said, **({"tool_call_id": last} if last else {})})
        else:
            out.append({"role": SHAREGPT_ROLES[who], "content": said})
    return out


def _end_on_answer(messages: list[dict], notes: list[str]) -> list[dict]:
    """Drop trailing turns after the last assistant turn (reported); none left is an error."""
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=-1)
    if last < 0:
        raise RowError("the conversation has no assistant turn")
    if last < len(messages) - 1:
        dropped = [m["role"] for m in messages[last + 1:]]
        notes.append(f"dropped {len(dropped)} trailing turn(s) after the last answer ({', '.join(dropped)})")
    return messages[: last + 1]


def _bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    text = str(value).strip().lower()
    if text in TRUE:
        return True
    if text in FALSE:
        return False
    raise RowError(f"'label' is {value!r}; KTO feedback needs true/false (or 1/0, good/bad)")


def _with_system(messages: list[dict], system_prompt: str | None) -> list[dict]:
    if system_prompt and (not messages or messages[0]["role"] != "system"):
        return [{"role": "system", "content": system_prompt}] + messages
    return messages


def normalise(record: Any, fmt: str, *, system_prompt: str | None, tool_turns: str) -> dict:
    """One record of format `fmt` as an internal example (without its id and origin)."""
    if not isinstance(record, dict):
        raise RowError(f"record is {type(record).__name__}, expected an object")
    notes: list[str] = []
    ex: dict[str, Any] = {"format": fmt, "kind": KIND[fmt], "label": None, "notes": notes}
    ex.update(_FORMATS[fmt][1](record, system_prompt, tool_turns, notes))
    return ex


def _tools_of(record: dict, msgs: list[dict], field: str, tool_turns: str) -> dict:
    """{"tools": the row's tools} (or {}), with the calls of `msgs` checked against them, when tool turns are kept."""
    if tool_turns != "keep":
        return {}
    tools = _tools(record["tools"]) if record.get("tools") not in (None, "", []) else None
    _check_calls(msgs, tools, field)
    return {"tools": tools} if tools else {}


def _read_chat(record: dict, system_prompt: str | None, tool_turns: str, notes: list[str]) -> dict:
    msgs = _messages(record.get("messages"), "messages", tool_turns, notes)
    return {"messages": _with_system(msgs, system_prompt), **_tools_of(record, msgs, "messages", tool_turns)}


def _read_sharegpt(record: dict, system_prompt: str | None, tool_turns: str, notes: list[str]) -> dict:
    msgs = _sharegpt(record.get("conversations"), tool_turns, notes)
    tools = _tools_of(record, msgs, "conversations", tool_turns)
    if record.get("system") and msgs[0]["role"] != "system":
        msgs = [{"role": "system", "content": _text(record["system"], "system")}] + msgs
    return {"messages": _with_system(_end_on_answer(msgs, notes), system_prompt), **tools}


def _read_alpaca(record: dict, system_prompt: str | None, tool_turns: str, notes: list[str]) -> dict:
    instruction = _text(record.get("instruction"), "instruction")
    extra = record.get("input")
    user = instruction + (f"\n\n{_text(extra, 'input')}" if extra not in (None, "") else "")
    msgs = [{"role": "user", "content": user}, {"role": "assistant", "content": _text(record.get("output"), "output")}]
    if record.get("system"):
        msgs = [{"role": "system", "content": _text(record["system"], "system")}] + msgs
    return {"messages": _with_system(msgs, system_prompt)}


def _read_prompt_completion(record: dict, system_prompt: str | None, tool_turns: str, notes: list[str]) -> dict:
    answer_field = "completion" if record.get("completion") is not None else "response"
    return {"messages": _with_system(
        [{"role": "user", "content": _text(record.get("prompt"), "prompt")},
         {"role": "assistant", "content": _text(record.get(answer_field), answer_field)}], system_prompt)}


def _read_labelled(record: dict, system_prompt: str | None, tool_turns: str, notes: list[str]) -> dict:
    label = record.get("label")
    if label is None or (isinstance(label, str) and not label.strip()):
        raise RowError("'label' is missing or empty")
    return {"label": str(label),
            "messages": _with_system([{"role": "user", "content": _text(record.get("text"), "text")},
                                      {"role": "assistant", "content": str(label)}], system_prompt)}


def _read_text(record: dict, system_prompt: str | None, tool_turns: str, notes: list[str]) -> dict:
    return {"text": _text(record.get("text"), "text")}


def _transcript(text: str) -> list[dict] | None:
    """The turns of an HH-RLHF transcript (Human -> user, Assistant -> assistant), or None when `text` is not one."""
    if not _TRANSCRIPT.match(text) or ("\n\nHuman:" not in text and "\n\nAssistant:" not in text):
        return None
    parts = _SPEAKER.split(text.lstrip())
    return [{"role": "user" if who == "Human" else "assistant", "content": said.strip()}
            for who, said in zip(parts[1::2], parts[2::2])]


def _pair_turns(value: Any, field: str, role: str, tool_turns: str, notes: list[str]) -> list[dict]:
    """A prompt or answer of a preference pair as turns: a message list, ShareGPT turns ({from, value}, one or a
    list), a transcript, or plain text said by `role`."""
    if isinstance(value, dict) and "from" in value:
        value = [value]
    if isinstance(value, list) and value and all(isinstance(t, dict) and "from" in t for t in value):
        return _sharegpt(value, tool_turns, notes, field)
    if isinstance(value, str):
        parsed = _transcript(value)
        if parsed is not None:
            if field == "prompt" and len(parsed) > 1 and parsed[-1] == {"role": "assistant", "content": ""}:
                parsed.pop()  # Anthropic's prompts end on "Assistant:", the answer's cue
            return parsed
        return [{"role": role, "content": value}]
    return _messages(value, field, tool_turns, notes)


def _score(record: dict, field: str) -> float | None:
    value = record[field]
    if isinstance(value, bool):
        raise RowError(f"'{field}' is {value!r}, expected a number")
    try:
        score = float(value)
    except (TypeError, ValueError):
        raise RowError(f"'{field}' is {value!r}, expected a number") from None
    return None if math.isnan(score) else score


def _scores(record: dict) -> tuple[float | None, float | None]:
    """The pair's (chosen, rejected) scores from the first of SCORE_FIELDS it has both of; (None, None) if none."""
    for c, r in SCORE_FIELDS:
        if record.get(c) is not None and record.get(r) is not None:
            sc, sr = _score(record, c), _score(record, r)
            return (sc, sr) if sc is not None and sr is not None else (None, None)
    return None, None


def _inside(prompt: list[dict], shared: list[dict]) -> bool:
    """Whether each non-system turn of a given prompt is among the turns the answers share (whitespace aside)."""
    seen = {(m["role"], m["content"].strip()) for m in shared}
    return all((m["role"], m["content"].strip()) in seen for m in prompt if m["role"] != "system")


def _read_preference(record: dict, system_prompt: str | None, tool_turns: str, notes: list[str]) -> dict:
    chosen = _pair_turns(record.get("chosen"), "chosen", "assistant", tool_turns, notes)
    rejected = _pair_turns(record.get("rejected"), "rejected", "assistant", tool_turns, notes)
    prompt = record.get("prompt")
    if prompt is None and record.get("conversations") is not None:  # ShareGPT pairs: the prompt's turns
        prompt = _sharegpt(record["conversations"], tool_turns, notes)
        if isinstance(record.get("system"), str) and record["system"].strip():
            prompt = [{"role": "system", "content": record["system"]}] + prompt
    elif prompt is not None:
        prompt = _pair_turns(prompt, "prompt", "user", tool_turns, notes)
    if prompt is None or chosen[0]["role"] != "assistant" or rejected[0]["role"] != "assistant":
        # the answers are whole conversations (HH-RLHF, UltraFeedback): the turns both start with are the prompt
        n = 0
        while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
            n += 1
        if n == 0 and prompt is None:
            raise RowError("no 'prompt', and 'chosen' and 'rejected' share no leading turns to take it from")
        if n and prompt is not None and not _inside(prompt, chosen[:n]):
            raise RowError(f"'prompt' is not among the {n} turn(s) 'chosen' and 'rejected' both start with")
        if n:
            if prompt is None:
                notes.append(f"prompt taken from the {n} turn(s) chosen and rejected share")
            system = prompt[:1] if prompt and prompt[0]["role"] == "system" and chosen[0]["role"] != "system" else []
            prompt, chosen, rejected = system + chosen[:n], chosen[n:], rejected[n:]
    # a transcript going on past the answer (a user turn last): the answer is what comes before
    chosen, rejected = (a if a[-1]["role"] == "assistant" else _end_on_answer(a, notes) for a in (chosen, rejected))
    score_chosen, score_rejected = _scores(record)
    return {"prompt": _with_system(prompt, system_prompt), "chosen": chosen, "rejected": rejected,
            "score_chosen": score_chosen, "score_rejected": score_rejected}


def _read_kto(record: dict, system_prompt: str | None, tool_turns: str, notes: list[str]) -> dict:
    prompt = record.get("prompt")
    prompt = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else _messages(
        prompt, "prompt", tool_turns, notes)
    return {"prompt": _with_system(prompt, system_prompt),
            "completion": _messages(record.get("completion"), "completion", tool_turns, notes),
            "label": _bool(record.get("label"))}


# every format: the kind of data it holds (what later stages train on) and the reader of its records
_FORMATS = {"chat": ("sft", _read_chat), "sharegpt": ("sft", _read_sharegpt), "alpaca": ("sft", _read_alpaca),
            "prompt_completion": ("sft", _read_prompt_completion), "labelled": ("sft", _read_labelled),
            "preference": ("preference", _read_preference), "kto": ("feedback", _read_kto),
            "text": ("text", _read_text)}
KIND = {fmt: kind for fmt, (kind, _) in _FORMATS.items()}


def turns(ex: dict) -> list[dict]:
    """Every message of an example, in order (prompt, then answers)."""
    if ex["kind"] == "sft":
        return ex["messages"]
    if ex["kind"] == "preference":
        return ex["prompt"] + ex["chosen"] + ex["rejected"]
    if ex["kind"] == "feedback":
        return ex["prompt"] + ex["completion"]
    return []


def texts(ex: dict) -> list[str]:
    """Every text of an example, for cleaning and detectors."""
    if ex["kind"] == "text":
        return [ex["text"]]
    return [m["content"] for m in turns(ex)]
