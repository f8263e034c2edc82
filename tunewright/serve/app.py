"""The OpenAI-compatible HTTP API over an Engine.

`/v1/chat/completions` and `/v1/completions` (both with streaming), `/v1/models`; `/health` (the process
is up), `/ready` (every model loaded and its engine running) and Prometheus `/metrics`. A request's
`model` picks the served model. Decoding is greedy unless `temperature` is above 0 (the registered
models were evaluated greedily), and greedy answers are cached. With `TUNEWRIGHT_API_KEYS` set
(comma-separated), `/v1/*` asks for `Authorization: Bearer <key>`. Every request, refused ones
included, goes to the request log stage 7 reads.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import os
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from tunewright.serve.engine import Backend, EngineFailed, QueueFull
from tunewright.serve.requestlog import RequestLog, record

API_KEYS_ENV = "TUNEWRIGHT_API_KEYS"


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict[str, Any]] | None = None


class _Sampling(BaseModel):
    # other OpenAI fields (frequency_penalty, user, ...) are accepted and have no effect
    model_config = ConfigDict(extra="allow")

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(0.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1, le=1)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: dict | None = None  # {"include_usage": true}: a last chunk with the usage


class ChatRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]  # text, or token ids (OpenAI's API allows both)
    max_tokens: int | None = Field(16, ge=1)  # OpenAI's default for completions
    echo: bool = False


def _stream_class():
    from fastapi.responses import StreamingResponse

    class _Stream(StreamingResponse):
        """A stream that runs `on_close` however it ends, even when the client left before its first chunk (the
        generator's own `finally` never runs then)."""

        def __init__(self, content, on_close, **kw):
            super().__init__(content, **kw)
            self._on_close = on_close

        async def __call__(self, scope, receive, send):
            try:
                await super().__call__(scope, receive, send)
            finally:
                self._on_close()

    return _Stream


def _error(status: int, message: str, param: str | None = None, code: str | None = None,
           kind: str = "invalid_request_error", headers: dict | None = None):
    from fastapi.responses import JSONResponse

    return JSONResponse(status_code=status, headers=headers,
                        content={"error": {"message": message, "type": kind, "param": param, "code": code}})


class _Metrics:
    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter("tunewright_requests", "Requests answered, by model, endpoint and HTTP status",
                                ["model", "endpoint", "status"], registry=self.registry)
        self.latency = Histogram("tunewright_request_seconds", "Time to the whole answer", ["model", "endpoint"],
                                 buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64), registry=self.registry)
        self.tokens = Counter("tunewright_tokens", "Tokens read and written", ["model", "kind"],
                              registry=self.registry)
        self.cache_hits = Counter("tunewright_cache_hits", "Answers served from the response cache", ["model"],
                                  registry=self.registry)
        self.in_progress = Gauge("tunewright_requests_in_progress", "Requests admitted and not yet answered",
                                 registry=self.registry)
        self.prefix_reused = Gauge("tunewright_prefix_tokens_reused", "Prompt tokens taken from KV-cache blocks "
                                   "earlier requests made (the shared system prompt), since the model was loaded",
                                   ["model"], registry=self.registry)
        self.log_written = Gauge("tunewright_request_log_written", "Records written to the request log",
                                 registry=self.registry)
        self.log_failures = Gauge("tunewright_request_log_failures", "Failed writes to the request log (retried)",
                                  registry=self.registry)
        self.log_dropped = Gauge("tunewright_request_log_dropped", "Records the request log gave up on",
                                 registry=self.registry)


def create_app(engine, max_tokens: int = 512, request_log: RequestLog | str | os.PathLike | None = None,
               max_body_bytes: int = 1 << 20, api_keys: list[str] | None = None):
    """The FastAPI application serving `engine`; `max_tokens` caps (and defaults) each answer's length."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import PlainTextResponse
    from jinja2 import TemplateError

    _Stream = _stream_class()

    if request_log is not None and not isinstance(request_log, RequestLog):
        request_log = RequestLog(request_log)
    if api_keys is None:
        api_keys = [k.strip() for k in os.environ.get(API_KEYS_ENV, "").split(",") if k.strip()]
    metrics = _Metrics()
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(_app):
        yield
        engine.ready = False
        if request_log is not None:  # a clean shutdown writes every queued record
            await asyncio.to_thread(request_log.close)

    app = FastAPI(title="tunewright", description="OpenAI-compatible completions over fine-tuned models",
                  lifespan=lifespan)
    app.state.engine, app.state.request_log, app.state.metrics = engine, request_log, metrics

    def log_request(**fields) -> None:
        if request_log is not None:
            request_log.write(record(**fields))

    @app.middleware("http")
    async def guard(request: Request, call_next):
        path = request.url.path
        if path.startswith("/v1/"):
            if api_keys:
                given = request.headers.get("authorization", "")
                token = given[7:].strip() if given.lower().startswith("bearer ") else ""
                if not any(hmac.compare_digest(token, key) for key in api_keys):
                    metrics.requests.labels("", path, "401").inc()
                    log_request(endpoint=path, status=401, error="missing or wrong API key")
                    return _error(401, "Incorrect or missing API key: send 'Authorization: Bearer <key>'",
                                  code="invalid_api_key", kind="authentication_error")
            size = request.headers.get("content-length")
            if size is None and request.method == "POST":  # chunked: count what arrives, stop once over
                read, parts = 0, []
                async for part in request.stream():
                    read += len(part)
                    if read > max_body_bytes:
                        size = f"more than {max_body_bytes}"
                        break
                    parts.append(part)
                else:
                    request._body = b"".join(parts)  # what the endpoint reads (Starlette passes a read body on)
            if size is not None and (not size.isdigit() or int(size) > max_body_bytes):
                metrics.requests.labels("", path, "413").inc()
                log_request(endpoint=path, status=413, error=f"body of {size} bytes")
                return _error(413, f"the request body is {size} bytes, above this server's limit of "
                              f"{max_body_bytes} (--max-body-bytes)", code="request_too_large")
        return await call_next(request)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"] if p != "body")
        if first.get("type") == "json_invalid":
            where, message = "", f"the request body is not valid JSON ({first.get('ctx', {}).get('error', 'decode error')})"
        else:
            message = ("the request body must be a JSON object (Content-Type: application/json)" if not where
                       else f"{where}: {first['msg']}")
        metrics.requests.labels("", request.url.path, "400").inc()
        log_request(endpoint=request.url.path, status=400, error=message)
        return _error(400, message, param=where or None)

    def card(name: str) -> dict:
        return {"id": name, "object": "model", "created": created, "owned_by": "tunewright",
                **engine.models[name].card()}

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "models": list(engine.models)}

    @app.get("/ready")
    async def ready():
        from fastapi.responses import JSONResponse

        ok = engine.alive()
        body = {"ready": ok, "models": {name: {"engine": getattr(b, "engine_name", None) or (
                                                   "continuous batching" if b.batching else "one at a time"),
                                               "alive": b.alive(), "in_flight": b.in_flight,
                                               "prefix_tokens_reused": b.prefix_tokens_reused}
                                        for name, b in engine.backends.items()}}
        return JSONResponse(status_code=200 if ok else 503, content=body)

    @app.get("/metrics")
    async def prometheus():
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        metrics.in_progress.set(engine.waiting)
        for name, backend in engine.backends.items():
            metrics.prefix_reused.labels(name).set(backend.prefix_tokens_reused)
        if request_log is not None:
            metrics.log_written.set(request_log.written)
            metrics.log_failures.set(request_log.failures)
            metrics.log_dropped.set(request_log.dropped)
        return PlainTextResponse(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def list_models() -> dict:
        return {"object": "list", "data": [card(name) for name in engine.models]}

    @app.get("/v1/models/{name:path}")
    async def get_model(name: str):
        if name not in engine.models:
            return _error(404, f"The model '{name}' does not exist", "model", "model_not_found")
        return card(name)

    async def answer(endpoint: str, req: _Sampling, wanted: int, prompt_for_log: dict, encode, shape, chunk,
                     logprobs: int | None = None, strip: bool = False):
        """Admit, encode, generate (or take from the cache), log, and shape the reply or the stream; `strip`: the
        answer without the whitespace around it (chat answers, as evaluation reads them)."""
        started = time.perf_counter()
        stop = [req.stop] if isinstance(req.stop, str) else (req.stop or [])

        def refused(status: int, message: str, **kw):
            metrics.requests.labels(req.model, endpoint, str(status)).inc()
            log_request(endpoint=endpoint, model=req.model, status=status, error=message, **prompt_for_log)
            return _error(status, message, **kw)

        if req.model not in engine.models:
            return refused(404, f"The model '{req.model}' does not exist; this server has "
                           f"{', '.join(engine.models)}", param="model", code="model_not_found")
        if wanted > max_tokens:
            return refused(400, f"max_tokens {wanted} is above this server's limit of {max_tokens}",
                           param="max_tokens")
        backend: Backend = engine.pick(req.model)  # held until answered: a swap meanwhile waits for it
        held: dict = {"backend": True, "admission": None, "by_stream": False}

        def let_go() -> None:
            """Give back the queue place and the backend (once, whichever path gets here first)."""
            if held["admission"] is not None:
                admission_, held["admission"] = held["admission"], None
                admission_.__exit__(None, None, None)
            if held["backend"]:
                held["backend"] = False
                backend.release()

        try:
            try:
                ids = encode(backend)
            except (ValueError, TypeError, TemplateError) as exc:  # e.g. the chat template refuses the roles' order
                return refused(400, f"the prompt could not be encoded: {exc}",
                               param="messages" if endpoint.endswith("chat/completions") else "prompt")
            if logprobs is not None and not backend.offers_logprobs:
                return refused(400, f"logprobs are not offered by the engine serving '{req.model}'", param="logprobs")
            if len(ids) + wanted > backend.max_len:
                return refused(400, f"the prompt is {len(ids)} tokens; with max_tokens {wanted} that is above the "
                               f"model's context of {backend.max_len} tokens", param="max_tokens",
                               code="context_length_exceeded")
            try:
                admission = engine.admitted()
                admission.__enter__()
                held["admission"] = admission
            except QueueFull as exc:
                return refused(429, f"the server is at capacity: {exc}; retry shortly", code="queue_full",
                               kind="rate_limit_error", headers={"Retry-After": "1"})
            rid = f"{'chatcmpl' if endpoint.endswith('chat/completions') else 'cmpl'}-{uuid.uuid4().hex}"
            served = backend.served
            deterministic = req.temperature == 0
            key = engine.cache.key(served.identity, ids, wanted, stop) if deterministic else None
            hit = engine.cache.get(key) if key else None

            def finish_log(status: int, tokens: list[int], text: str, finish: str | None, error: str | None = None):
                latency = time.perf_counter() - started
                metrics.requests.labels(req.model, endpoint, str(status)).inc()
                metrics.latency.labels(req.model, endpoint).observe(latency)
                metrics.tokens.labels(req.model, "prompt").inc(len(ids))
                metrics.tokens.labels(req.model, "completion").inc(len(tokens))
                log_request(request_id=rid, endpoint=endpoint, model=req.model, served_by=served.name,
                            registered_model=served.source.registered_model if served.source else None,
                            version=served.source.version if served.source else None, **prompt_for_log,
                            answer=text, prompt_tokens=len(ids), completion_tokens=len(tokens),
                            latency_ms=round(latency * 1000, 1), status=status, finish_reason=finish,
                            cached=hit is not None, error=error)

            def usage(tokens: list[int]) -> dict:
                return {"prompt_tokens": len(ids), "completion_tokens": len(tokens), "total_tokens": len(ids) + len(tokens)}

            async def produce(on_text=None):
                if hit is not None:
                    metrics.cache_hits.labels(req.model).inc()
                    tokens, text, finish = hit
                    if on_text is not None and text:
                        on_text(text)
                    return tokens, text, finish
                result = await backend.generate(ids, max_tokens=wanted, temperature=req.temperature, top_p=req.top_p,
                                                seed=req.seed, stop=stop, on_text=on_text)
                if key:
                    engine.cache.put(key, result)
                return result

            if not req.stream:
                try:
                    tokens, text, finish = await produce()
                    text = text.strip() if strip else text
                    probs = (await asyncio.to_thread(backend.logprobs, ids, tokens, logprobs)
                             if logprobs is not None else None)
                except EngineFailed as exc:
                    finish_log(503, [], "", None, str(exc))
                    return _error(503, str(exc), kind="server_error", code="engine_failed")
                finally:
                    let_go()
                finish_log(200, tokens, text, finish)
                return {"id": rid, "created": int(time.time()), "model": req.model,
                        "system_fingerprint": f"{served.name}:{served.identity[:12]}", **shape(text, finish, probs),
                        "usage": usage(tokens)}

            async def events():
                pieces: asyncio.Queue = asyncio.Queue()
                held = {"begun": not strip, "space": ""}

                def emit(piece: str) -> None:  # as `strip` asks: no leading space, trailing space only before more text
                    if not held["begun"]:
                        piece = piece.lstrip()
                        if not piece:
                            return
                        held["begun"] = True
                    body = piece.rstrip() if strip else piece
                    if body:
                        pieces.put_nowait(held["space"] + body)
                        held["space"] = piece[len(body):]
                    else:
                        held["space"] += piece

                task = asyncio.create_task(produce(emit))
                task.add_done_callback(lambda _: pieces.put_nowait(None))
                base = {"id": rid, "created": int(time.time()), "model": req.model}
                status, tokens, text, finish, error = 200, [], "", None, None
                try:
                    first = True
                    while True:
                        piece = await pieces.get()
                        if piece is None:
                            break
                        yield f"data: {json.dumps({**base, **chunk(piece, None, first)})}\n\n"
                        first = False
                    try:
                        tokens, text, finish = task.result()
                        text = text.strip() if strip else text
                    except EngineFailed as exc:
                        status, error = 503, str(exc)
                        yield f"data: {json.dumps({'error': {'message': error, 'type': 'server_error'}})}\n\n"
                        return
                    final = {**base, **chunk('', finish, first)}
                    yield f"data: {json.dumps(final)}\n\n"
                    if (req.stream_options or {}).get("include_usage"):  # OpenAI's last chunk: no choices, the usage
                        yield f"data: {json.dumps({**final, 'choices': [], 'usage': usage(tokens)})}\n\n"
                    yield "data: [DONE]\n\n"
                finally:
                    if not task.done():  # the client went away mid-answer
                        task.cancel()
                        status, error = 499, "client closed the stream"
                    let_go()
                    finish_log(status, tokens, text, finish, error)

            held["by_stream"] = True  # from here the response lets go, however it ends
            return _Stream(events(), on_close=let_go, media_type="text/event-stream")
        finally:
            if not held["by_stream"]:
                let_go()

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest):
        wanted = req.max_completion_tokens or req.max_tokens or max_tokens
        messages = [m.model_dump(exclude_none=True) for m in req.messages]
        for_log = {"messages": [{"role": m["role"], "content": m.get("content")} for m in messages]}

        def shape(text, finish, probs):
            return {"object": "chat.completion",
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                 "logprobs": {"content": probs} if probs is not None else None,
                                 "finish_reason": finish}]}

        def chunk(piece, finish, first):
            delta = ({"role": "assistant", "content": piece} if first else {"content": piece}) if piece or first else {}
            return {"object": "chat.completion.chunk",
                    "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}

        top = (req.top_logprobs or 0) if req.logprobs else None
        return await answer("/v1/chat/completions", req, wanted, for_log, lambda b: b.chat_ids(messages), shape,
                            chunk, top, strip=True)

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest):
        tokens_given = isinstance(req.prompt, list) and bool(req.prompt) and isinstance(req.prompt[0], int)
        prompts = [req.prompt] if isinstance(req.prompt, str) or tokens_given else req.prompt
        if len(prompts) != 1:
            metrics.requests.labels(req.model, "/v1/completions", "400").inc()
            log_request(endpoint="/v1/completions", model=req.model, status=400, error="more than one prompt")
            return _error(400, "prompt: one prompt per request (send a list of one, or a string)", param="prompt")
        prompt = prompts[0]
        token_ids = list(prompt) if isinstance(prompt, list) else None
        if token_ids is not None:  # shown, echoed and logged as the text the ids stand for
            known = engine.backends.get(req.model)
            prompt = known.tokenizer.decode(token_ids) if known is not None and token_ids and \
                all(0 <= t < len(known.tokenizer) for t in token_ids) else ""
        wanted = min(req.max_tokens or 16, max_tokens) if req.max_tokens is None else req.max_tokens

        def shape(text, finish, _probs):
            return {"object": "text_completion",
                    "choices": [{"index": 0, "text": (prompt + text) if req.echo else text, "logprobs": None,
                                 "finish_reason": finish}]}

        def chunk(piece, finish, first):
            return {"object": "text_completion",
                    "choices": [{"index": 0, "text": ((prompt if first and req.echo else "") + piece),
                                 "logprobs": None, "finish_reason": finish}]}

        def encode(backend):
            if token_ids is not None:
                if not token_ids:
                    raise ValueError("prompt is empty")
                bad = next((t for t in token_ids if not 0 <= t < len(backend.tokenizer)), None)
                if bad is not None:
                    raise ValueError(f"token id {bad} is outside the model's vocabulary of {len(backend.tokenizer)}")
                return token_ids
            if not prompt:
                raise ValueError("prompt is empty")
            return backend.text_ids(prompt)

        return await answer("/v1/completions", req, wanted, {"prompt": prompt}, encode, shape, chunk)

    return app
