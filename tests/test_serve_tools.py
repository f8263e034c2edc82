"""OpenAI tool calling through `tunewright serve`: tools in the request, calls in the prompt, calls in the reply
(whole and streamed), and the refusals of a malformed `tools` or `tool_choice`."""

from __future__ import annotations

import contextlib
import json
import re

import httpx

from tests.test_serve import USER, _client, _engine, _read_log, serving
from tunewright import chat

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather now in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
CLOCK = {"type": "function", "function": {"name": "get_time", "description": "The time now in a city",
                                          "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'

# what the scripted backend answers, by a marker in the prompt
SCRIPT = {
    "Case call": CALL,
    "Case said": "Let me look that up.\n" + CALL,
    "Case broken": '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Par\n</tool_call>',
    "Case unknown": '<tool_call>\n{"name": "book_flight", "arguments": {"to": "Paris"}}\n</tool_call>',
    "Case plain": "It is sunny in Paris.",
    "Case two": CALL + '\n<tool_call>\n{"name": "get_time", "arguments": {"city": "Paris"}}\n</tool_call>',
}


def _ask(marker: str) -> list[dict]:
    return [{"role": "user", "content": f"{marker}: what is the weather in Paris?"}]


def _scripted(backend) -> list[list[int]]:
    """Make `backend` answer with fixed text chosen by a marker in its prompt (the tiny random model writes no call of
    its own): only the generation is replaced, the prompt's encoding and the reply's shaping are the server's. Returns
    the list the prompts' token ids are collected in."""
    tok, seen = backend.tokenizer, []

    async def generate(ids, *, max_tokens, on_text=None, **_sampling):
        seen.append(list(ids))
        prompt = tok.decode(ids)
        text = next(answer for marker, answer in SCRIPT.items() if marker in prompt)
        if on_text is not None:
            on_text(text)
        return tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id], text, "stop"

    backend.generate = generate
    return seen


@contextlib.contextmanager
def scripted_server(model_dir, state, log):
    """(base URL, collected prompt ids, tokenizer) of a server whose model answers from SCRIPT; its request log is
    written by the time the block ends."""
    engine, _ = _engine([f"m={model_dir}"], state)
    backend = engine.backends["m"]
    seen = _scripted(backend)
    with serving(engine, max_tokens=32, request_log=log) as (url, _app):
        yield url, seen, backend.tokenizer


def test_a_call_of_a_declared_tool_is_answered_as_tool_calls_and_anything_else_as_text(tiny_model_dir, state, tmp_path):
    log = tmp_path / "requests.jsonl"
    with scripted_server(tiny_model_dir, state, log) as (url, seen, tok):
        client = _client(url)
        ask = lambda marker, **kw: client.chat.completions.create(  # noqa: E731
            model="m", messages=_ask(marker), tools=[WEATHER, CLOCK], max_tokens=16, **kw).choices[0]

        call = ask("Case call")
        assert call.finish_reason == "tool_calls" and call.message.content is None
        [made] = call.message.tool_calls
        assert re.fullmatch(r"call_[0-9a-f]{24}", made.id) and made.type == "function"
        assert made.function.name == "get_weather" and json.loads(made.function.arguments) == {"city": "Paris"}
        assert chat.tools_preamble([WEATHER, CLOCK]) in tok.decode(seen[-1])  # the model was shown the tools

        said = ask("Case said", tool_choice={"type": "function", "function": {"name": "get_weather"}})
        assert said.finish_reason == "tool_calls" and said.message.content == "Let me look that up."
        assert said.message.tool_calls[0].function.name == "get_weather"

        two = ask("Case two", tool_choice="required", parallel_tool_calls=True)
        assert two.finish_reason == "tool_calls"
        assert [c.function.name for c in two.message.tool_calls] == ["get_weather", "get_time"]
        assert len({c.id for c in two.message.tool_calls}) == 2

        # no valid call: the text as it was generated, with the usual finish reason
        for marker in ("Case broken", "Case unknown", "Case plain"):
            text = ask(marker)
            assert text.finish_reason == "stop" and not text.message.tool_calls
            assert text.message.content == SCRIPT[marker].strip()
        other = ask("Case call", tool_choice={"type": "function", "function": {"name": "get_time"}})
        assert other.finish_reason == "stop" and other.message.content == CALL and not other.message.tool_calls

        # "none": the tools are not shown and the answer is not read for calls
        hidden = client.chat.completions.create(model="m", messages=_ask("Case call again"), tools=[WEATHER],
                                                tool_choice="none", max_tokens=16).choices[0]
        assert hidden.finish_reason == "stop" and hidden.message.content == CALL and not hidden.message.tool_calls
        assert seen[-1] == chat.prompt_ids(tok, _ask("Case call again")) and "get_weather" not in tok.decode(seen[-1])

        # the tiny model's own text (no call) under tools is a plain answer
        raw = httpx.post(f"{url}/v1/chat/completions", timeout=60, json={
            "model": "m", "messages": _ask("Case plain"), "tools": [WEATHER], "tool_choice": "auto"})
        assert raw.status_code == 200 and raw.json()["choices"][0]["message"] == {"role": "assistant",
                                                                                  "content": SCRIPT["Case plain"]}

    records = [r for r in _read_log(log) if r.get("status") == 200]
    called = [r for r in records if r["finish_reason"] == "tool_calls"]
    assert len(records) == 9 and len(called) == 3 and called[0]["answer"] == CALL


def test_a_conversation_with_calls_and_tool_results_is_rendered_into_the_prompt(tiny_model_dir, state, tmp_path):
    """An assistant turn of calls (content null, arguments as a JSON string) and a tool turn answering it reach the
    model as `tunewright.chat` renders them; a conversation without tools is encoded as before."""
    log = tmp_path / "requests.jsonl"
    with scripted_server(tiny_model_dir, state, log) as (url, seen, tok):
        client = _client(url)
        conversation = _ask("Case plain") + [
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "call_1", "type": "function",
                 "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": '{"sky": "clear", "celsius": 21}'}]
        reply = client.chat.completions.create(model="m", messages=conversation, tools=[WEATHER], max_tokens=16)
        assert reply.choices[0].message.content == SCRIPT["Case plain"] and reply.choices[0].finish_reason == "stop"
        assert seen[-1] == chat.prompt_ids(tok, conversation, [WEATHER])
        prompt = tok.decode(seen[-1])
        assert CALL in prompt and '<tool_response>\n{"sky": "clear", "celsius": 21}\n</tool_response>' in prompt

        # the same history without tools declared: still rendered with its call and result, and not read for calls
        history = client.chat.completions.create(model="m", messages=conversation, max_tokens=16)
        assert seen[-1] == chat.prompt_ids(tok, conversation)
        assert history.choices[0].message.content == SCRIPT["Case plain"]

        plain = client.chat.completions.create(model="m", messages=USER + _ask("Case plain"), max_tokens=16)
        assert seen[-1] == chat.prompt_ids(tok, USER + _ask("Case plain"))
        assert plain.choices[0].message.content == SCRIPT["Case plain"]
    logged = [r for r in _read_log(log) if r.get("status") == 200][0]["messages"]
    assert logged[1]["content"] is None and logged[1]["tool_calls"][0]["function"]["name"] == "get_weather"
    assert logged[2]["tool_call_id"] == "call_1"


def test_a_stream_with_tools_sends_the_calls_as_one_delta_and_the_finish_reason(tiny_model_dir, state, tmp_path):
    log = tmp_path / "requests.jsonl"
    with scripted_server(tiny_model_dir, state, log) as (url, _seen, _tok):
        client = _client(url)

        def stream(marker: str) -> list:
            return list(client.chat.completions.create(model="m", messages=_ask(marker), tools=[WEATHER], max_tokens=16,
                                                       stream=True, stream_options={"include_usage": True}))

        chunks = stream("Case said")
        deltas = [c.choices[0].delta for c in chunks if c.choices]
        assert deltas[0].role == "assistant" and deltas[1].content == "Let me look that up."
        [call] = deltas[2].tool_calls
        assert call.index == 0 and re.fullmatch(r"call_[0-9a-f]{24}", call.id) and call.type == "function"
        assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}
        assert [c.choices[0].finish_reason for c in chunks if c.choices] == [None, None, None, "tool_calls"]
        assert chunks[-1].usage.completion_tokens > 0 and not chunks[-1].choices
        assert all("<tool_call>" not in (d.content or "") for d in deltas)

        text = stream("Case broken")
        assert "".join(c.choices[0].delta.content or "" for c in text if c.choices) == SCRIPT["Case broken"].strip()
        assert [c.choices[0].finish_reason for c in text if c.choices][-1] == "stop"
        assert not any(c.choices[0].delta.tool_calls for c in text if c.choices)
    assert [r["finish_reason"] for r in _read_log(log)] == ["tool_calls", "stop"]


def test_a_malformed_tools_or_tool_choice_is_refused_400_naming_the_field(tiny_model_dir, state):
    """Refusals name the field; a request with tools answered by the real (tiny) model is a plain 200 answer, whole
    and streamed."""
    engine, _ = _engine([f"m={tiny_model_dir}"], state)
    with serving(engine, max_tokens=16) as (url, _app):
        post = lambda **body: httpx.post(f"{url}/v1/chat/completions", timeout=60,  # noqa: E731
                                         json={"model": "m", "messages": USER, **body})
        cases = {
            "tools": post(tools={"type": "function"}),
            "tools.0.function": post(tools=[{"type": "function"}]),
            "tools.0.function.name": post(tools=[{"type": "function", "function": {"description": "no name"}}]),
            "tools.0.type": post(tools=[{"type": "retrieval", "function": {"name": "x"}}]),
            "tool_choice": post(tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "get_time"}}),
            "messages.0": post(messages=[{"role": "user", "content": "x", "tool_calls": [
                {"id": "c", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}]}]),
        }
        for field, reply in cases.items():
            assert reply.status_code == 400, (field, reply.text)
            error = reply.json()["error"]
            assert error["param"] == field and error["message"].startswith(f"{field}: "), (field, error)
        assert "'get_time', which is not among the request's tools (get_weather)" in cases["tool_choice"].text
        for choice in ("required", "sometimes", {"type": "function"}):
            refused = post(tool_choice=choice)
            assert refused.status_code == 400 and refused.json()["error"]["param"] == "tool_choice"

        answered = post(tools=[WEATHER, CLOCK], tool_choice="auto", max_tokens=6)
        assert answered.status_code == 200, answered.text
        choice = answered.json()["choices"][0]
        assert choice["finish_reason"] in ("stop", "length") and isinstance(choice["message"]["content"], str)
        with httpx.stream("POST", f"{url}/v1/chat/completions", timeout=60, json={
                "model": "m", "messages": USER, "tools": [WEATHER], "max_tokens": 6, "stream": True}) as streamed:
            lines = [line for line in streamed.iter_lines() if line.startswith("data: ")]
        assert streamed.status_code == 200 and lines[-1] == "data: [DONE]"
        chunks = [json.loads(line[6:]) for line in lines[:-1]]
        assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == choice["message"]["content"]
        assert chunks[-1]["choices"][0]["finish_reason"] == choice["finish_reason"]
