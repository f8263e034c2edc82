"""OpenAI's wire format as this server takes and refuses it: the request bodies and the error body."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class Message(BaseModel):
    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict[str, Any]] | None = None


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
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)


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


def error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                   kind: str = "invalid_request_error", headers: dict | None = None):
    """OpenAI's error body with its HTTP status."""
    from fastapi.responses import JSONResponse

    return JSONResponse(status_code=status, headers=headers,
                        content={"error": {"message": message, "type": kind, "param": param, "code": code}})
