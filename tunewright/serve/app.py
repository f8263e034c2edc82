"""The OpenAI-compatible HTTP API over an Engine.

`/v1/chat/completions` (with OpenAI tool calling: `tools`, `tool_choice`, `tool_calls` in the reply) and
`/v1/completions`, both with streaming, `/v1/models`; with runtime adapters on (`--allow-runtime-adapters`), vLLM's
`/v1/load_lora_adapter` and `/v1/unload_lora_adapter`; `/health` (the process
is up), `/ready` (every model loaded and its engine running) and Prometheus `/metrics`. A request's
`model` picks the served model (a registered model's bare name means the alias of it served here).
Decoding is greedy unless `temperature` is above 0 (the registered models were evaluated greedily),
and greedy answers are cached. With API keys (`TUNEWRIGHT_API_KEYS`, comma-separated, or
`tunewright serve --api-key-file`), `/v1/*`, `/metrics` and the API docs ask for
`Authorization: Bearer <key>`; `/health` and `/ready` stay open for probes. Every request, refused
ones included, gets OpenAI's error shape, a count in `/metrics` and a record in the request log stage
7 reads: malformed bodies, unknown paths and the server's own failures too.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
from contextlib import asynccontextmanager

from fastapi import Request  # at module level: FastAPI reads the endpoints' annotations by name

from tunewright.serve.answer import ChatAnswer, CompletionAnswer
from tunewright.serve.keys import api_keys as keys_from_environment
from tunewright.serve.protocol import (ChatRequest, CompletionRequest, LoadAdapterRequest, UnloadAdapterRequest,
                                       error_response)
from tunewright.serve.requestlog import RequestLog
from tunewright.serve.service import Service

KEYED = ("/v1/", "/metrics", "/docs", "/redoc", "/openapi.json")  # what an API key guards (when the server has one)
log = logging.getLogger("tunewright.serve")


def create_app(engine, max_tokens: int = 512, request_log: RequestLog | str | os.PathLike | None = None,
               max_body_bytes: int = 1 << 20, api_keys: list[str] | None = None, open_metrics: bool = False,
               runtime_adapters=None):
    """The FastAPI application serving `engine`; `max_tokens` caps (and defaults) each answer's length;
    `open_metrics` leaves `/metrics` open when the API has keys (a scraper on a trusted network);
    `runtime_adapters` (a `tunewright.serve.wiring.RuntimeAdapters`) lets clients load and unload adapters while
    the server runs (None: those endpoints answer 404)."""
    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException

    if request_log is not None and not isinstance(request_log, RequestLog):
        request_log = RequestLog(request_log)
    if api_keys is None:
        api_keys = keys_from_environment()
    service = Service(engine, max_tokens, request_log, max_body_bytes, api_keys, open_metrics)
    app = FastAPI(title="tunewright", description="OpenAI-compatible completions over fine-tuned models",
                  lifespan=_lifespan(service))
    app.state.engine, app.state.request_log, app.state.metrics = engine, request_log, service.metrics

    @app.middleware("http")
    async def guard(request: Request, call_next):
        return await _guard(service, request, call_next)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        return _invalid(service, request, exc)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        return _http_error(service, request, exc)

    _add_status_routes(app, service)
    _add_completion_routes(app, service)
    _add_runtime_adapter_routes(app, service, runtime_adapters)
    return app


def _lifespan(service: Service):
    @asynccontextmanager
    async def lifespan(_app):
        yield
        service.engine.ready = False
        if service.shadows:  # shadow answers still running get a moment to finish and be logged
            await asyncio.wait(set(service.shadows), timeout=30)
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
    """Ask for an API key (when the server has any) where one is needed, refuse a body over the limit before reading
    it, and answer any failure of the server's own in OpenAI's error shape, counted and logged like a refusal."""
    path = request.url.path
    keyed = path.startswith(KEYED) and not (service.open_metrics and path == "/metrics")
    if keyed and service.api_keys and not _key_given(request, service.api_keys):
        service.count_refusal(_endpoint(path), 401, "missing or wrong API key")
        return error_response(401, "Incorrect or missing API key: send 'Authorization: Bearer <key>'",
                              code="invalid_api_key", kind="authentication_error")
    if path.startswith("/v1/"):
        size = await _body_size(request, service.max_body_bytes)
        if size is not None and (not size.isdigit() or int(size) > service.max_body_bytes):
            service.count_refusal(path, 413, f"body of {size} bytes")
            return error_response(413, f"the request body is {size} bytes, above this server's limit of "
                                  f"{service.max_body_bytes} (--max-body-bytes)", code="request_too_large")
    try:
        return await call_next(request)
    except Exception as exc:  # noqa: BLE001  a bug of ours: the client and monitoring still get an answer
        log.exception("%s %s failed", request.method, path)
        message = f"the server failed to answer: {type(exc).__name__}: {exc}"
        service.count_refusal(_endpoint(path), 500, message)
        return error_response(500, message, kind="server_error", code="internal_error")


def _endpoint(path: str) -> str:
    """The endpoint a path is counted under: its own for this server's routes, `other` for any other path (a fuzzer's
    paths must not each become a metric series)."""
    known = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/ready", "/metrics", "/docs",
             "/redoc", "/openapi.json", "/v1/load_lora_adapter", "/v1/unload_lora_adapter")
    return path if path in known else "/v1/models/{name}" if path.startswith("/v1/models/") else "other"


def _http_error(service: Service, request, exc):
    """Starlette's and FastAPI's own refusals (an unknown path, a wrong method, a body that cannot be parsed) in
    OpenAI's error shape, counted and logged."""
    status, message = exc.status_code, str(exc.detail)
    cause = exc.__cause__
    if isinstance(cause, UnicodeDecodeError):
        message = (f"the request body is not valid UTF-8 JSON: {cause.reason} (byte 0x{cause.object[cause.start]:02x} "
                   f"at offset {cause.start})")
    elif isinstance(cause, RecursionError):
        message = "the request body nests JSON arrays or objects too deeply to parse"
    elif status == 404:
        message = f"no such endpoint: {request.method} {request.url.path}"
    elif status == 405:
        message = f"{request.method} is not allowed on {request.url.path}"
    service.count_refusal(_endpoint(request.url.path), status, message)
    kind = "invalid_request_error" if status < 500 else "server_error"
    return error_response(status, message, kind=kind, headers=getattr(exc, "headers", None))


def _invalid(service: Service, request, exc):
    """A body that is not JSON or not a valid request: 400 in OpenAI's error format, naming the first bad field."""
    first = exc.errors()[0]
    # pydantic names the union member tried (`content.str`, `prompt.list[int]`): the field is what the client sent
    where = ".".join(str(p) for p in first["loc"] if p != "body" and not _union_member(p))
    if first.get("type") == "json_invalid":
        where, message = "", f"the request body is not valid JSON ({first.get('ctx', {}).get('error', 'decode error')})"
    else:
        message = ("the request body must be a JSON object (Content-Type: application/json)" if not where
                   else f"{where}: {first['msg']}")
    service.count_refusal(request.url.path, 400, message)
    return error_response(400, message, param=where or None)


def _union_member(part) -> bool:
    return isinstance(part, str) and ("[" in part or part in ("str", "int", "float", "bool", "dict", "list", "none"))


def _card(service: Service, name: str) -> dict:
    """A model as `/v1/models` lists it; a bare registered name is listed as the alias it stands for."""
    served = service.engine.resolve(name)
    base = service.engine.backends[served].base
    return {"id": name, "object": "model", "created": service.created, "owned_by": "tunewright",
            **service.engine.models[served].card(), **({"base": base} if base else {}),
            **({"alias_of": served} if served != name else {})}


def _backend_states(engine) -> dict:
    """What `/ready` says of each served model's engine."""
    return {name: {"engine": getattr(b, "engine_name", None) or ("continuous batching" if b.batching
                                                                   else "one at a time"),
                   **({"shared_base": b.base} if getattr(b, "shared", None) is not None else {}),
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
        return {"object": "list", "data": [_card(service, name) for name in [*engine.models, *engine.aliases()]]}

    @app.get("/v1/models/{name:path}")
    async def get_model(name: str):
        if engine.resolve(name) is None:
            service.count_refusal("/v1/models/{name}", 404, f"no model {name!r}")
            return error_response(404, f"The model '{name}' does not exist", "model", "model_not_found")
        return _card(service, name)


def _add_completion_routes(app, service: Service) -> None:
    """`/v1/chat/completions` and `/v1/completions`."""
    parsing = asyncio.Semaphore(1)  # large bodies are parsed in a thread, one at a time

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        req = await _parsed(request, ChatRequest, parsing)
        return await ChatAnswer(service, req, request).reply()

    @app.post("/v1/completions")
    async def completions(request: Request):
        req = await _parsed(request, CompletionRequest, parsing)
        tokens_given = isinstance(req.prompt, list) and bool(req.prompt) and isinstance(req.prompt[0], int)
        prompts = [req.prompt] if isinstance(req.prompt, str) or tokens_given else req.prompt
        if len(prompts) != 1:
            service.count_refusal("/v1/completions", 400, "more than one prompt", model=req.model)
            return error_response(400, "prompt: one prompt per request (send a list of one, or a string)",
                                  param="prompt")
        return await CompletionAnswer(service, req, prompts[0], request).reply()


def _add_runtime_adapter_routes(app, service: Service, runtime) -> None:
    """vLLM's runtime LoRA endpoints: `/v1/load_lora_adapter` serves a local adapter folder under a new name over the
    served base, `/v1/unload_lora_adapter` serves a name no more (once its requests in flight have finished). Both
    answer 200 with a line of text, as vLLM does, and 404 while runtime adapters are off."""
    from fastapi.responses import PlainTextResponse

    from tunewright.serve.engine import ServedModel

    engine = service.engine
    parsing, loading = asyncio.Semaphore(1), asyncio.Lock()
    off = ("runtime adapter loading is off: start `tunewright serve` with --allow-runtime-adapters (or "
           "VLLM_ALLOW_RUNTIME_LORA_UPDATING=True in its environment)")

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(request: Request):
        path = "/v1/load_lora_adapter"
        if runtime is None:
            service.count_refusal(path, 404, off)
            return error_response(404, off, code="not_found")
        req = await _parsed(request, LoadAdapterRequest, parsing)
        async with loading:  # one at a time: two loads of one name must not both pass the check below
            name = req.lora_name
            if name in engine.backends:
                message = f"The lora adapter '{name}' has already been loaded."
                service.count_refusal(path, 400, message)
                return error_response(400, message, param="lora_name")
            try:
                model = ServedModel(name, await asyncio.to_thread(runtime.source, req.lora_path))  # hashes weights
            except ValueError as exc:
                service.count_refusal(path, 400, str(exc))
                return error_response(400, str(exc), param="lora_path")
            try:
                backend = await asyncio.to_thread(runtime.load, model)
            except Exception as exc:  # noqa: BLE001  the engine's own failure, told to the client as vLLM does
                message = f"{name}: the adapter {req.lora_path} did not load: {type(exc).__name__}: {exc}"
                log.error("%s", message)
                service.count_refusal(path, 500, message)
                return error_response(500, message, kind="server_error")
            engine.swap(name, backend)
        log.info("%s: adapter %s loaded at runtime", name, req.lora_path)
        return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(request: Request):
        path = "/v1/unload_lora_adapter"
        if runtime is None:
            service.count_refusal(path, 404, off)
            return error_response(404, off, code="not_found")
        req = await _parsed(request, UnloadAdapterRequest, parsing)
        backend = engine.backends.get(req.lora_name)
        source = backend.served.source if backend is not None else None
        if source is None or source.whole:  # not served, or not an adapter (a base, a whole model)
            message = f"The lora adapter '{req.lora_name}' cannot be found."
            service.count_refusal(path, 404, message)
            return error_response(404, message, param="lora_name", code="not_found")
        engine.retire(req.lora_name)
        log.info("%s: adapter unloaded at runtime (once its requests in flight finish)", req.lora_name)
        return PlainTextResponse(f"Success: LoRA adapter '{req.lora_name}' removed successfully.")


async def _parsed(request, kind, parsing: asyncio.Semaphore):
    """The body as a `kind` request, parsed and validated in a worker thread: a megabyte of JSON takes milliseconds
    to parse, and twenty of them in a row on the event loop would hold up every other request (and `/health`)."""
    body = await request.body()
    if len(body) < 1 << 16:  # a typical request: quicker parsed here than handed to a thread
        return _parse(body, kind)
    async with parsing:  # one at a time: threads parsing side by side would keep the event loop waiting for the GIL
        return await asyncio.to_thread(_parse, body, kind)


def _parse(body: bytes, kind):
    """`kind` from the body, or the refusal FastAPI itself would raise (answered by the app's handlers)."""
    import json

    from fastapi.exceptions import RequestValidationError
    from pydantic import ValidationError
    from starlette.exceptions import HTTPException

    try:
        data = json.loads(body)
    except json.JSONDecodeError as exc:
        raise RequestValidationError([{"type": "json_invalid", "loc": ("body", exc.pos), "msg": "JSON decode error",
                                       "ctx": {"error": exc.msg}}]) from None
    except (UnicodeDecodeError, RecursionError) as exc:  # not UTF-8 (or UTF-16/32) JSON text, or nested too deeply
        raise HTTPException(400, "There was an error parsing the body") from exc
    try:
        return kind.model_validate(data)
    except ValidationError as exc:
        raise RequestValidationError([{**e, "loc": ("body", *e["loc"])} for e in exc.errors(include_input=False)]
                                     ) from None
