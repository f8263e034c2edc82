"""The OpenAI-compatible HTTP API over an Engine: `/v1/models`, `/v1/chat/completions`, `/health`.

A request's `model` picks the adapter. Decoding is greedy unless `temperature` is above 0 (the
registered models were evaluated greedily). With a request log, every request is appended as a
JSON line with its `messages`, which stage 7 reads as production traffic (`monitor.production_path`).
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from tunewright.serve.engine import Engine


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict[str, Any]] | None = None


class ChatRequest(BaseModel):
    # other OpenAI fields (frequency_penalty, user, ...) are accepted and have no effect
    model_config = ConfigDict(extra="allow")

    model: str
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(0.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1, le=1)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)


def _error(status: int, message: str, param: str | None = None, code: str | None = None):
    from fastapi.responses import JSONResponse

    return JSONResponse(status_code=status, content={"error": {"message": message, "type": "invalid_request_error",
                                                               "param": param, "code": code}})


def create_app(engine: Engine, max_tokens: int = 512, request_log: Path | None = None):
    """The FastAPI application serving `engine`; `max_tokens` caps (and defaults) each answer's length."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import StreamingResponse

    app = FastAPI(title="tunewright", description="OpenAI-compatible chat completions over fine-tuned adapters")
    created = int(time.time())
    log_lock = threading.Lock()

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError):
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"] if p != "body")
        if not where:
            return _error(400, "the request body must be a JSON object (Content-Type: application/json)")
        return _error(400, f"{where}: {first['msg']}", param=where)

    def card(name: str) -> dict:
        return {"id": name, "object": "model", "created": created, "owned_by": "tunewright",
                **engine.models[name].card()}

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok", "models": list(engine.models)}

    @app.get("/v1/models")
    def list_models() -> dict:
        return {"object": "list", "data": [card(name) for name in engine.models]}

    @app.get("/v1/models/{name:path}")
    def get_model(name: str):
        if name not in engine.models:
            return _error(404, f"The model '{name}' does not exist", "model", "model_not_found")
        return card(name)

    @app.post("/v1/chat/completions")
    def chat(req: ChatRequest):
        if req.model not in engine.models:
            return _error(404, f"The model '{req.model}' does not exist; this server has "
                          f"{', '.join(engine.models)}", "model", "model_not_found")
        wanted = req.max_completion_tokens or req.max_tokens or max_tokens
        if wanted > max_tokens:
            return _error(400, f"max_tokens {wanted} is above this server's limit of {max_tokens}", "max_tokens")
        messages = [m.model_dump(exclude_none=True) for m in req.messages]
        done = engine.complete(req.model, messages, max_tokens=wanted, temperature=req.temperature, top_p=req.top_p,
                               seed=req.seed, stop=[req.stop] if isinstance(req.stop, str) else req.stop,
                               top_logprobs=(req.top_logprobs or 0) if req.logprobs else None)
        if request_log is not None:
            record = {"time": datetime.now(timezone.utc).isoformat(), "model": req.model,
                      "messages": [{"role": m["role"], "content": m.get("content")} for m in messages],
                      "answer": done.text}
            with log_lock, request_log.open("a", encoding="utf-8") as fh:
                fh.write(json.dumps(record) + "\n")
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        logprobs = {"content": done.logprobs} if req.logprobs else None
        usage = {"prompt_tokens": done.prompt_tokens, "completion_tokens": done.completion_tokens,
                 "total_tokens": done.prompt_tokens + done.completion_tokens}
        if req.stream:  # the whole answer in one chunk: generation is not incremental here
            def events():
                base = {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": req.model}
                chunks = [{"delta": {"role": "assistant", "content": done.text}, "logprobs": logprobs,
                           "finish_reason": None},
                          {"delta": {}, "logprobs": None, "finish_reason": done.finish_reason}]
                for chunk in chunks:
                    yield f"data: {json.dumps({**base, 'choices': [{'index': 0, **chunk}]})}\n\n"
                yield "data: [DONE]\n\n"

            return StreamingResponse(events(), media_type="text/event-stream")
        return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": req.model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": done.text},
                             "logprobs": logprobs, "finish_reason": done.finish_reason}],
                "usage": usage}

    return app
