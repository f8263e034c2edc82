"""OpenAI's wire format as this server takes and refuses it: the request bodies and the error body."""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator
from pydantic_core import PydanticCustomError

FUNCTION_NAME = r"^[A-Za-z0-9_-]{1,64}$"  # OpenAI's rule for a function's name


class CalledFunction(BaseModel):
    """The function an assistant turn called: its name and arguments (a JSON string, as OpenAI sends them, or an
    object)."""

    model_config = ConfigDict(extra="allow")

    name: str = Field(min_length=1)
    arguments: str | dict[str, Any] = "{}"


class ToolCall(BaseModel):
    """One call in an assistant turn's `tool_calls`."""

    model_config = ConfigDict(extra="allow")

    id: str | None = None
    type: Literal["function"] = "function"
    function: CalledFunction


class Message(BaseModel):
    """One turn of a conversation; an assistant turn may carry `tool_calls` (its content then may be null), a tool
    turn answers the call named by `tool_call_id`."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict[str, Any]] | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None

    @model_validator(mode="after")
    def _calls_are_the_assistants(self):
        if self.tool_calls and self.role != "assistant":
            raise PydanticCustomError("tool_calls_role", f"only an assistant turn carries tool_calls, not a {self.role} "
                                      "turn")
        return self


class FunctionSpec(BaseModel):
    """A function the model may call: its name, what it does, and its arguments as a JSON Schema object."""

    model_config = ConfigDict(extra="allow")

    name: str = Field(pattern=FUNCTION_NAME)
    description: str | None = None
    parameters: dict[str, Any] | None = None


class Tool(BaseModel):
    """One entry of a chat request's `tools`."""

    model_config = ConfigDict(extra="allow")

    type: Literal["function"]
    function: FunctionSpec


class Sampling(BaseModel):
    """What every completion request says about decoding."""

    # other OpenAI fields (frequency_penalty, user, ...) are accepted and have no effect; NaN and infinities are
    # refused as "not a finite number" rather than compared with the bounds
    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(0.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1, le=1)
    seed: int | None = Field(None, ge=-(2 ** 63), le=2 ** 63 - 1)  # a 64-bit integer, as OpenAI documents it
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: dict | None = None  # {"include_usage": true}: a last chunk with the usage


class ChatRequest(Sampling):
    """A chat completion request. With `tools` the model is shown the functions it may call and a call it writes is
    answered as `tool_calls`; `tool_choice` "none" hides the tools, and "required" or a named function are taken as
    the client's wish only: the answer is not constrained to a call (when the model writes none, its text is the
    answer). `parallel_tool_calls` is accepted; the calls are answered as the model wrote them."""

    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[Tool] | None = None
    tool_choice: Any = None  # "none" | "auto" | "required" | {"type": "function", "function": {"name": ...}}
    parallel_tool_calls: bool | None = None

    @field_validator("tool_choice")
    @classmethod
    def _known_choice(cls, choice: Any, info: ValidationInfo) -> Any:
        if choice is None or choice in ("none", "auto"):
            return choice
        tools = info.data.get("tools")
        if choice == "required":
            if not tools:
                raise PydanticCustomError("tool_choice", "'required' asks for a call, but the request declares no tools")
            return choice
        name = choice.get("function", {}).get("name") if isinstance(choice, dict) and choice.get("type") == "function" \
            and isinstance(choice.get("function"), dict) else None
        if not isinstance(name, str):
            raise PydanticCustomError("tool_choice", "expected 'none', 'auto', 'required' or "
                                      '{"type": "function", "function": {"name": ...}}, got ' + json.dumps(choice)[:200])
        declared = [t.function.name for t in tools or ()]
        if name not in declared:
            raise PydanticCustomError("tool_choice", f"names the function {name!r}, which is not among the request's "
                                      f"tools ({', '.join(declared) or 'none declared'})")
        return choice

    def tool_specs(self) -> list[dict] | None:
        """The tools the model is shown (none when `tool_choice` is "none"), as plain dicts."""
        if not self.tools or self.tool_choice == "none":
            return None
        return [t.model_dump(exclude_none=True) for t in self.tools]

    def chosen_tool(self) -> str | None:
        """The function `tool_choice` names, if it names one."""
        return self.tool_choice["function"]["name"] if isinstance(self.tool_choice, dict) else None


class CompletionRequest(Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]  # text, or token ids (OpenAI's API allows both)
    max_tokens: int | None = Field(16, ge=1)  # OpenAI's default for completions
    echo: bool = False


def unreadable(req: Sampling) -> tuple[str, str] | None:
    """The field the model cannot read and a message saying why, or None when every prompt is text: a content part
    that is not text (an image, audio, a file: the served models read text only), or text holding a UTF-16
    surrogate with no partner (JSON can escape one, `"\\udc80"`, but no tokenizer or UTF-8 file can hold it)."""
    texts: list[tuple[str, str]] = []
    if isinstance(req, ChatRequest):
        texts += [(f"tools.{i}", json.dumps(t.model_dump(), ensure_ascii=False)) for i, t in enumerate(req.tools or ())]
        texts += [(f"messages.{i}.tool_calls.{j}", json.dumps(c.model_dump(), ensure_ascii=False))
                  for i, m in enumerate(req.messages) for j, c in enumerate(m.tool_calls or ())]
        for i, m in enumerate(req.messages):
            if not isinstance(m.content, list):
                texts += [(f"messages.{i}.content", m.content)] if isinstance(m.content, str) else []
                continue
            for j, part in enumerate(m.content):
                where = f"messages.{i}.content.{j}"
                if part.get("type") != "text":
                    return where, (f"{where}: a content part of type {part.get('type')!r} cannot be read by this "
                                   "model, which reads text only; send {\"type\": \"text\", \"text\": ...}")
                if not isinstance(part.get("text"), str):
                    return f"{where}.text", f"{where}.text: a text part needs its text as a string"
                texts.append((f"{where}.text", part["text"]))
    elif isinstance(req, CompletionRequest):
        prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
        texts = [(f"prompt.{i}" if not isinstance(req.prompt, str) else "prompt", p) for i, p in enumerate(prompts)
                 if isinstance(p, str)]
    for where, text in texts:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            return where, (f"{where} holds a lone UTF-16 surrogate (U+{ord(text[exc.start]):04X}) at character "
                           f"{exc.start}, which is not text: send the prompt as valid Unicode")
    return None


class LoadAdapterRequest(BaseModel):
    """`POST /v1/load_lora_adapter`'s body, as vLLM takes it: the name to serve an adapter folder under."""

    model_config = ConfigDict(extra="allow")

    lora_name: str = Field(min_length=1)
    lora_path: str = Field(min_length=1)


class UnloadAdapterRequest(BaseModel):
    """`POST /v1/unload_lora_adapter`'s body, as vLLM takes it: the name of the adapter to serve no more."""

    model_config = ConfigDict(extra="allow")

    lora_name: str = Field(min_length=1)


def error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                   kind: str = "invalid_request_error", headers: dict | None = None):
    """OpenAI's error body with its HTTP status."""
    from fastapi.responses import JSONResponse

    return JSONResponse(status_code=status, headers=headers,
                        content={"error": {"message": message, "type": kind, "param": param, "code": code}})
