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
import os
from contextlib import asynccontextmanager

from tunewright.serve.answer import ChatAnswer, CompletionAnswer
from tunewright.serve.protocol import ChatRequest, CompletionRequest, error_response
from tunewright.serve.requestlog import RequestLog
from tunewright.serve.service import Service

API_KEYS_ENV = "TUNEWRIGHT_API_KEYS"


def create_app(engine, max_tokens: int = 512, request_log: RequestLog | str | os.PathLike | None = None,
               max_body_bytes: int = 1 << 20, api_keys: list[str] | None = None):
    """The FastAPI application serving `engine`; `max_tokens` caps (and defaults) each answer's length."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError

    if request_log is not None and not isinstance(request_log, RequestLog):
        request_log = RequestLog(request_log)
    if api_keys is None:
        api_keys = [k.strip() for k in os.environ.get(API_KEYS_ENV, "").split(",") if k.strip()]
    service = Service(engine, max_tokens, request_log, max_body_bytes, api_keys)
    app = FastAPI(title="tunewright", description="OpenAI-compatible completions over fine-tuned models",
                  lifespan=_lifespan(service))
    app.state.engine, app.state.request_log, app.state.metrics = engine, request_log, service.metrics

    @app.middleware("http")
    async def guard(request: Request, call_next):
        return await _guard(service, request, call_next)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        return _invalid(service, request, exc)

    _add_status_routes(app, service)
    _add_completion_routes(app, service)
    return app


def _lifespan(service: Service):
    @asynccontextmanager
    async def lifespan(_app):
        yield
        service.engine.ready = False
        if service.request_log is not None:  # a clean shutdown writes every queued record
            await asyncio.to_thread(service.request_log.close)

    return lifespan


def _key_given(request, api_keys: list[str]) -> bool:
    """Whether the request's `Authorization: Bearer <key>` names one of the keys."""
    given = request.headers.get("authorization", "")
    token = given[7:].strip() if given.lower().startswith("bearer ") else ""
    return any(hmac.compare_digest(token, key) for key in api_keys)


async def _body_size(request, limit: int) -> str | None:
    """The body's size as its Content-Length says, or for a chunked POST as much as was read up to `limit`: the body
    then goes on to the endpoint, or past the limit the size is `more than LIMIT`."""
    size = request.headers.get("content-length")
    if size is None and request.method == "POST":  # chunked: count what arrives, stop once over
        read, parts = 0, []
        async for part in request.stream():
            read += len(part)
            if read > limit:
                return f"more than {limit}"
            parts.append(part)
        request._body = b"".join(parts)  # what the endpoint reads (Starlette passes a read body on)
    return size


async def _guard(service: Service, request, call_next):
    """`/v1/*` asks for an API key (when the server has any) and refuses a body over the limit before reading it."""
    path = request.url.path
    if path.startswith("/v1/"):
        if service.api_keys and not _key_given(request, service.api_keys):
            service.count_refusal(path, 401, "missing or wrong API key")
            return error_response(401, "Incorrect or missing API key: send 'Authorization: Bearer <key>'",
                                  code="invalid_api_key", kind="authentication_error")
        size = await _body_size(request, service.max_body_bytes)
        if size is not None and (not size.isdigit() or int(size) > service.max_body_bytes):
            service.count_refusal(path, 413, f"body of {size} bytes")
            return error_response(413, f"the request body is {size} bytes, above this server's limit of "
                                  f"{service.max_body_bytes} (--max-body-bytes)", code="request_too_large")
    return await call_next(request)


def _invalid(service: Service, request, exc):
    """A body that is not JSON or not a valid request: 400 in OpenAI's error format, naming the first bad field."""
    first = exc.errors()[0]
    where = ".".join(str(p) for p in first["loc"] if p != "body")
    if first.get("type") == "json_invalid":
        where, message = "", f"the request body is not valid JSON ({first.get('ctx', {}).get('error', 'decode error')})"
    else:
        message = ("the request body must be a JSON object (Content-Type: application/json)" if not where
                   else f"{where}: {first['msg']}")
    service.count_refusal(request.url.path, 400, message)
    return error_response(400, message, param=where or None)


def _card(service: Service, name: str) -> dict:
    return {"id": name, "object": "model", "created": service.created, "owned_by": "tunewright",
            **service.engine.models[name].card()}


def _backend_states(engine) -> dict:
    """What `/ready` says of each served model's engine."""
    return {name: {"engine": getattr(b, "engine_name", None) or ("continuous batching" if b.batching
                                                                   else "one at a time"),
                   "alive": b.alive(), "in_flight": b.in_flight, "prefix_tokens_reused": b.prefix_tokens_reused}
            for name, b in engine.backends.items()}


def _add_status_routes(app, service: Service) -> None:
    """`/health`, `/ready`, `/metrics` and the model list."""
    engine = service.engine

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "models": list(engine.models)}

    @app.get("/ready")
    async def ready():
        from fastapi.responses import JSONResponse

        ok = engine.alive()
        return JSONResponse(status_code=200 if ok else 503, content={"ready": ok, "models": _backend_states(engine)})

    @app.get("/metrics")
    async def prometheus():
        from fastapi.responses import PlainTextResponse
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        service.metrics.refresh(engine, service.request_log)
        return PlainTextResponse(generate_latest(service.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def list_models() -> dict:
        return {"object": "list", "data": [_card(service, name) for name in engine.models]}

    @app.get("/v1/models/{name:path}")
    async def get_model(name: str):
        if name not in engine.models:
            return error_response(404, f"The model '{name}' does not exist", "model", "model_not_found")
        return _card(service, name)


def _add_completion_routes(app, service: Service) -> None:
    """`/v1/chat/completions` and `/v1/completions`."""

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest):
        return await ChatAnswer(service, req).reply()

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest):
        tokens_given = isinstance(req.prompt, list) and bool(req.prompt) and isinstance(req.prompt[0], int)
        prompts = [req.prompt] if isinstance(req.prompt, str) or tokens_given else req.prompt
        if len(prompts) != 1:
            service.count_refusal("/v1/completions", 400, "more than one prompt", model=req.model)
            return error_response(400, "prompt: one prompt per request (send a list of one, or a string)",
                                  param="prompt")
        return await CompletionAnswer(service, req, prompts[0]).reply()
