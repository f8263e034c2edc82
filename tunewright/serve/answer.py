"""The way of one completion request: admission, the prompt's tokens, generation or the response cache, the
request log, and the reply as one body or as a stream of server-sent events.

`ChatAnswer` and `CompletionAnswer` say how their endpoint encodes the prompt and shapes what it sends; `Answer`
does the rest, the same for both. Where the served name has a shadow challenger, a request answered for the user is
answered once more by the challenger, in a background task once the user's answer is made, and logged with
`shadow: true`; what the copy does never reaches the user.
"""

from __future__ import annotations

import asyncio
import functools
import json
import time
import uuid
from abc import ABC, abstractmethod

from tunewright.chat import parse_tool_calls
from tunewright.serve.engine import Backend, EngineFailed, QueueFull, message_text
from tunewright.serve.protocol import ChatRequest, CompletionRequest, Sampling, error_response, unreadable
from tunewright.serve.service import Service


@functools.cache
def _closing_stream():
    from fastapi.responses import StreamingResponse

    class ClosingStream(StreamingResponse):
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

    return ClosingStream


def _event(data: dict) -> str:
    return f"data: {json.dumps(data)}\n\n"


class _Pieces:
    """A streamed answer's pieces on their way to the client; with `strip`, as the whole answer is stripped: no
    leading space, and trailing space only once more text follows it."""

    def __init__(self, strip: bool):
        self.queue: asyncio.Queue = asyncio.Queue()
        self.strip = strip
        self.begun = not strip
        self.space = ""

    def emit(self, piece: str) -> None:
        if not self.begun:
            piece = piece.lstrip()
            if not piece:
                return
            self.begun = True
        body = piece.rstrip() if self.strip else piece
        if body:
            self.queue.put_nowait(self.space + body)
            self.space = piece[len(body):]
        else:
            self.space += piece


class Answer(ABC):
    """One request from admission to its reply. A subclass per endpoint encodes the prompt (`encode`) and shapes
    the reply (`shape`) and each chunk of a stream (`chunk`)."""

    endpoint = ""
    prompt_param = "prompt"  # the field an unencodable prompt is blamed on
    id_prefix = "cmpl"
    strip = False            # the answer without the whitespace around it (chat answers, as evaluation reads them)
    logprobs: int | None = None  # with each token's log-probability, this many alternatives; None: none asked

    def __init__(self, service: Service, req: Sampling, wanted: int, for_log: dict, request=None):
        self.service, self.req, self.wanted, self.for_log = service, req, wanted, for_log
        self.request = request   # the HTTP request, watched for the client leaving before a whole answer
        self.stop = [req.stop] if isinstance(req.stop, str) else (req.stop or [])
        self.started = time.perf_counter()
        self.backend: Backend | None = None
        self.holding = False     # the backend is counted in flight for this request
        self.admission = None    # the place in the queue, while held
        self.streaming = False   # the stream lets go of both, however it ends
        self.ids: list[int] = []
        self.rid, self.served, self.key, self.hit = "", None, None, None

    @abstractmethod
    def encode(self, backend: Backend) -> list[int]:
        """The prompt's token ids for `backend`'s tokenizer (run off the event loop: a long prompt takes a while)."""

    @abstractmethod
    def prompt_chars(self) -> int:
        """The prompt's length in characters (in tokens for a prompt given as token ids), known without encoding."""

    @abstractmethod
    def shape(self, text: str, finish: str | None, probs: list | None) -> dict:
        """The whole reply's body."""

    @abstractmethod
    def chunk(self, piece: str, finish: str | None, first: bool) -> dict:
        """One chunk of a streamed reply."""

    @property
    def held_back(self) -> bool:
        """Whether a stream waits for the whole answer instead of sending its text piece by piece (the answer is read
        once made, e.g. for tool calls the client must not see as text)."""
        return False

    def settle(self, text: str, finish: str | None) -> str | None:
        """The reply's finish reason once the whole answer's `text` is known (read further by a subclass)."""
        return finish

    def whole_chunks(self, text: str) -> list[dict]:
        """A held-back stream's chunks of the answer, before the one with the finish reason."""
        return [self.chunk(text, None, True)]

    async def reply(self):
        """Admit, encode, generate (or take from the cache), log, and shape the reply or the stream."""
        engine, req = self.service.engine, self.req
        served_as = engine.resolve(req.model)
        if served_as is None:
            return self.refused(404, f"The model '{req.model}' does not exist; this server has "
                                f"{', '.join(engine.models)}", param="model", code="model_not_found")
        req.model = served_as  # a registered model's bare name is the alias served for it
        if self.wanted > self.service.max_tokens:
            return self.refused(400, f"max_tokens {self.wanted} is above this server's limit of "
                                f"{self.service.max_tokens}", param="max_tokens")
        self.backend, self.holding = engine.pick(req.model), True  # held until answered: a swap meanwhile waits
        try:
            refusal = await self._admit()
            if refusal is not None:
                return refusal
            self._look_up()
            if not req.stream:
                return await self._whole()
            self.streaming = True  # from here the response lets go, however it ends
            return _closing_stream()(self._events(), on_close=self.let_go, media_type="text/event-stream")
        finally:
            if not self.streaming:
                self.let_go()

    def refused(self, status: int, message: str, **kw):
        self.service.count_refusal(self.endpoint, status, message, model=self.req.model, **self.for_log)
        return error_response(status, message, **kw)

    def let_go(self) -> None:
        """Give back the queue place and the backend (once, whichever path gets here first)."""
        if self.admission is not None:
            admission, self.admission = self.admission, None
            admission.__exit__(None, None, None)
        if self.holding:
            self.holding = False
            self.backend.release()

    async def _admit(self):
        """Take a place in the queue, then encode the prompt in a worker thread; the refusal when either cannot be
        done. The queue comes first, so that `--max-queue` bounds the tokenising too, and the event loop stays free
        for every other request (and `/health`) while a long prompt is encoded."""
        from jinja2 import TemplateError

        backend, req = self.backend, self.req
        bad = unreadable(req)
        if bad is not None:
            return self.refused(400, bad[1], param=bad[0])
        fewest = backend.fewest_tokens(self.prompt_chars())
        if fewest + self.wanted > backend.max_len:
            return self.refused(400, f"the prompt is at least {fewest} tokens; with max_tokens {self.wanted} that is "
                                f"above the model's context of {backend.max_len} tokens", param="max_tokens",
                                code="context_length_exceeded")
        try:
            admission = self.service.engine.admitted()
            admission.__enter__()
            self.admission = admission
        except QueueFull as exc:
            return self.refused(429, f"the server is at capacity: {exc}; retry shortly", code="queue_full",
                                kind="rate_limit_error", headers={"Retry-After": "1"})
        try:
            self.ids = await asyncio.to_thread(self.encode, backend)
        except _PastContext as exc:
            return self.refused(400, f"the prompt is at least {exc.args[0]} tokens; with max_tokens {self.wanted} that "
                                f"is above the model's context of {backend.max_len} tokens", param="max_tokens",
                                code="context_length_exceeded")
        except (ValueError, TypeError, TemplateError) as exc:  # e.g. the chat template refuses the roles' order
            return self.refused(400, f"the prompt could not be encoded: {exc}", param=self.prompt_param)
        if self.logprobs is not None and not backend.offers_logprobs:
            return self.refused(400, f"logprobs are not offered by the engine serving '{req.model}'", param="logprobs")
        if len(self.ids) + self.wanted > backend.max_len:
            return self.refused(400, f"the prompt is {len(self.ids)} tokens; with max_tokens {self.wanted} that is "
                                f"above the model's context of {backend.max_len} tokens", param="max_tokens",
                                code="context_length_exceeded")
        return None

    def _look_up(self) -> None:
        """Name the answer and look for it in the response cache (greedy answers only: a draw is drawn anew)."""
        cache = self.service.engine.cache
        self.rid = f"{self.id_prefix}-{uuid.uuid4().hex}"
        self.served = self.backend.served
        self.key = cache.key(self.served.identity, self.ids, self.wanted, self.stop) if self.req.temperature == 0 \
            else None
        self.hit = cache.get(self.key) if self.key else None

    async def _produce(self, on_text=None) -> tuple[list[int], str, str]:
        """(tokens, text, finish reason): from the cache, or generated (and cached when greedy)."""
        if self.hit is not None:
            self.service.metrics.cache_hits.labels(self.req.model).inc()
            tokens, text, finish = self.hit
            if on_text is not None and text:
                on_text(text)
            return tokens, text, finish
        req = self.req
        result = await self.backend.generate(self.ids, max_tokens=self.wanted, temperature=req.temperature,
                                             top_p=req.top_p, seed=req.seed, stop=self.stop, on_text=on_text)
        if self.key:
            self.service.engine.cache.put(self.key, result)
        return result

    def _usage(self, tokens: list[int]) -> dict:
        return {"prompt_tokens": len(self.ids), "completion_tokens": len(tokens),
                "total_tokens": len(self.ids) + len(tokens)}

    def _log(self, status: int, tokens: list[int], text: str, finish: str | None, error: str | None = None) -> None:
        """Count the answered request in the metrics and write its record to the request log."""
        latency = time.perf_counter() - self.started
        metrics, model, endpoint, served = self.service.metrics, self.req.model, self.endpoint, self.served
        metrics.requests.labels(model, endpoint, str(status)).inc()
        metrics.latency.labels(model, endpoint).observe(latency)
        metrics.tokens.labels(model, "prompt").inc(len(self.ids))
        metrics.tokens.labels(model, "completion").inc(len(tokens))
        self.service.log(request_id=self.rid, endpoint=endpoint, model=model, served_by=served.name,
                         registered_model=served.source.registered_model if served.source else None,
                         version=served.source.version if served.source else None, **self.for_log,
                         answer=text, prompt_tokens=len(self.ids), completion_tokens=len(tokens),
                         latency_ms=round(latency * 1000, 1), status=status, finish_reason=finish,
                         cached=self.hit is not None, error=error)
        if status == 200 and self.service.engine.shadow:
            self._shadow()

    def _shadow(self) -> None:
        """Answer a copy of this request on the served name's shadow challenger, off the user's path: a background
        task the reply does not wait for (none when there is no shadow or it is as busy as the queue may be)."""
        backend = self.service.engine.shadow_of(self.req.model)
        if backend is None:
            return
        task = asyncio.get_running_loop().create_task(self._answer_shadow(backend))
        self.service.shadows.add(task)
        task.add_done_callback(self.service.shadows.discard)

    async def _answer_shadow(self, backend: Backend) -> None:
        """The challenger's answer to the same prompt and limits, logged with `shadow: true`, its version, and its
        status (503 when its engine failed, 500 for anything else it raised); nothing here can reach the user."""
        started, served = time.perf_counter(), backend.served
        ids, tokens, text, finish, status, error = [], [], "", None, 200, None
        try:
            ids = await asyncio.to_thread(self.encode, backend)  # its own tokenizer
            tokens, text, finish = await backend.generate(ids, max_tokens=self.wanted, temperature=self.req.temperature,
                                                          top_p=self.req.top_p, seed=self.req.seed, stop=self.stop)
            text = text.strip() if self.strip else text
        except EngineFailed as exc:
            status, error = 503, str(exc)
        except Exception as exc:  # noqa: BLE001  a failing shadow is a finding for the canary, not an outage
            status, error = 500, f"{type(exc).__name__}: {exc}"
        finally:
            backend.release()
        self.service.log(request_id=self.rid, endpoint=self.endpoint, model=self.req.model, served_by=served.name,
                         registered_model=served.source.registered_model if served.source else None,
                         version=served.source.version if served.source else None, shadow=True, **self.for_log,
                         answer=text, prompt_tokens=len(ids), completion_tokens=len(tokens),
                         latency_ms=round((time.perf_counter() - started) * 1000, 1), status=status,
                         finish_reason=finish, cached=False, error=error)

    async def _whole(self):
        """The answer as one reply; a client that leaves before it is ready stops its generation (logged as 499)."""
        from fastapi.responses import Response

        produce = asyncio.create_task(self._produce())
        try:
            if self.request is not None:
                gone = asyncio.create_task(_client_left(self.request))
                await asyncio.wait({produce, gone}, return_when=asyncio.FIRST_COMPLETED)
                gone.cancel()
                if not produce.done():
                    produce.cancel()  # the engine drops the request (a batch slot, or the one-at-a-time loop)
                    await asyncio.wait({produce})
                    self._log(499, [], "", None, "client closed the connection before the answer")
                    return Response(status_code=499)
            tokens, text, finish = await produce
            text = text.strip() if self.strip else text
            finish = self.settle(text, finish)
            probs = (await asyncio.to_thread(self.backend.logprobs, self.ids, tokens, self.logprobs)
                     if self.logprobs is not None else None)
        except EngineFailed as exc:
            self._log(503, [], "", None, str(exc))
            return error_response(503, str(exc), kind="server_error", code="engine_failed")
        finally:
            self.let_go()
        self._log(200, tokens, text, finish)
        return {"id": self.rid, "created": int(time.time()), "model": self.req.model,
                "system_fingerprint": f"{self.served.name}:{self.served.identity[:12]}",
                **self.shape(text, finish, probs), "usage": self._usage(tokens)}

    async def _events(self):
        """The answer as server-sent events: a chunk per piece of text (or, held back, the chunks of the whole answer
        once made), the last one with the finish reason (and with `include_usage` one more with the usage), then
        `[DONE]`."""
        pieces = _Pieces(self.strip)
        task = asyncio.create_task(self._produce(None if self.held_back else pieces.emit))
        task.add_done_callback(lambda _: pieces.queue.put_nowait(None))
        base = {"id": self.rid, "created": int(time.time()), "model": self.req.model}
        status, tokens, text, finish, error = 200, [], "", None, None
        try:
            first = True
            while (piece := await pieces.queue.get()) is not None:
                yield _event({**base, **self.chunk(piece, None, first)})
                first = False
            try:
                tokens, text, finish = task.result()
                text = text.strip() if self.strip else text
            except EngineFailed as exc:
                status, error = 503, str(exc)
                yield _event({"error": {"message": error, "type": "server_error"}})
                return
            if self.held_back:
                finish = self.settle(text, finish)
                for part in self.whole_chunks(text):
                    yield _event({**base, **part})
                first = False
            final = {**base, **self.chunk("", finish, first)}
            yield _event(final)
            if (self.req.stream_options or {}).get("include_usage"):  # OpenAI's last chunk: no choices, the usage
                yield _event({**final, "choices": [], "usage": self._usage(tokens)})
            yield "data: [DONE]\n\n"
        finally:
            if not task.done():  # the client went away mid-answer
                task.cancel()
                status, error = 499, "client closed the stream"
            self.let_go()
            self._log(status, tokens, text, finish, error)


class _PastContext(Exception):
    """The prompt is known to be past the context before it is all tokenised (args: its least token count)."""


def _check_length(backend: Backend, texts: list[str], wanted: int) -> None:
    """Raise _PastContext when the texts' first part alone already fills the context with the answer."""
    fewest = sum(backend.tokens_at_least(text) for text in texts)
    if fewest + wanted > backend.max_len:
        raise _PastContext(fewest)


async def _client_left(request) -> None:
    """Return once the client has closed the connection (the body is read: what arrives next is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


class ChatAnswer(Answer):
    """`/v1/chat/completions`: the messages through the model's chat template, the answer stripped.

    With `tools` (and `tool_choice` other than "none") the prompt shows the model the tools, and the answer is read
    for calls (`tunewright.chat.parse_tool_calls`): when every call it writes is well formed and names a declared
    tool (the one `tool_choice` names, if it names one), the reply carries them as `tool_calls`, the text around
    them as the content (null when there is none), and finish reason "tool_calls"; otherwise the generated text is
    the content, with the usual finish reason. Decoding is not constrained: `tool_choice` "required" or a named
    function does not force a call, and a model that writes none is answered with its text. A stream with tools is
    sent once the answer is whole, so that the client never sees a call's markup as text.
    """

    endpoint, prompt_param, id_prefix, strip = "/v1/chat/completions", "messages", "chatcmpl", True

    def __init__(self, service: Service, req: ChatRequest, request=None):
        self.messages = [m.model_dump(exclude_none=True) for m in req.messages]
        for_log = {"messages": [{"role": m["role"], "content": m.get("content"),
                                 **{k: m[k] for k in ("tool_calls", "tool_call_id") if k in m}}
                                for m in self.messages]}
        super().__init__(service, req, req.max_completion_tokens or req.max_tokens or service.max_tokens, for_log,
                         request)
        self.logprobs = (req.top_logprobs or 0) if req.logprobs else None
        self.tools = req.tool_specs()
        self.calls: list[dict] | None = None  # the answer's calls, once read
        self.content: str | None = None      # the answer's text outside its calls

    def encode(self, backend: Backend) -> list[int]:
        # the contents alone: the tools and calls are counted once encoded (a template may render them otherwise)
        _check_length(backend, [message_text(m.get("content")) for m in self.messages], self.wanted)
        return backend.chat_ids(self.messages, self.tools)

    def prompt_chars(self) -> int:
        return sum(len(message_text(m.get("content"))) for m in self.messages)

    @property
    def held_back(self) -> bool:
        return self.tools is not None

    def settle(self, text: str, finish: str | None) -> str | None:
        """"tool_calls" when the answer holds well-formed calls of declared tools (kept in `calls`), else `finish`."""
        if self.tools is None:
            return finish
        rest, calls = parse_tool_calls(text)
        allowed = {t["function"]["name"] for t in self.tools}
        chosen = self.req.chosen_tool()
        if not calls or any(c["name"] not in allowed or (chosen and c["name"] != chosen) for c in calls):
            return finish
        self.content = rest or None
        self.calls = [{"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                       "function": {"name": c["name"], "arguments": json.dumps(c["arguments"], ensure_ascii=False)}}
                      for c in calls]
        return "tool_calls"

    def shape(self, text, finish, probs):
        message = ({"role": "assistant", "content": self.content, "tool_calls": self.calls} if self.calls
                   else {"role": "assistant", "content": text})
        return {"object": "chat.completion",
                "choices": [{"index": 0, "message": message,
                             "logprobs": {"content": probs} if probs is not None else None,
                             "finish_reason": finish}]}

    def whole_chunks(self, text: str) -> list[dict]:
        """The role, then the content (the text outside the calls, when there are calls), then the calls."""
        content = self.content if self.calls else text
        deltas = [{"role": "assistant"}] + ([{"content": content}] if content else [])
        if self.calls:
            deltas.append({"tool_calls": [{"index": i, **call} for i, call in enumerate(self.calls)]})
        return [{"object": "chat.completion.chunk",
                 "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}]}
                for delta in deltas]

    def chunk(self, piece, finish, first):
        delta = ({"role": "assistant", "content": piece} if first else {"content": piece}) if piece or first else {}
        return {"object": "chat.completion.chunk",
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}


class CompletionAnswer(Answer):
    """`/v1/completions`: one prompt, as text or as token ids; with `echo`, the prompt before the answer."""

    endpoint, prompt_param, id_prefix = "/v1/completions", "prompt", "cmpl"

    def __init__(self, service: Service, req: CompletionRequest, prompt: str | list[int], request=None):
        self.token_ids = list(prompt) if isinstance(prompt, list) else None
        self.prompt = "" if self.token_ids is not None else prompt  # token ids: their text, once encoded
        wanted = min(req.max_tokens or 16, service.max_tokens) if req.max_tokens is None else req.max_tokens
        for_log = {"prompt": self.prompt} if self.token_ids is None else {"prompt_token_ids": len(self.token_ids)}
        super().__init__(service, req, wanted, for_log, request)

    def encode(self, backend: Backend) -> list[int]:
        if self.token_ids is not None:
            if not self.token_ids:
                raise ValueError("prompt is empty")
            bad = next((t for t in self.token_ids if not 0 <= t < len(backend.tokenizer)), None)
            if bad is not None:
                raise ValueError(f"token id {bad} is outside the model's vocabulary of {len(backend.tokenizer)}")
            self.prompt = self.for_log["prompt"] = backend.tokenizer.decode(self.token_ids)  # echoed and logged
            return self.token_ids
        if not self.prompt:
            raise ValueError("prompt is empty")
        _check_length(backend, [self.prompt], self.wanted)
        return backend.text_ids(self.prompt)

    def prompt_chars(self) -> int:
        return len(self.prompt) if self.token_ids is None else len(self.token_ids) * self.backend.chars_per_token

    def shape(self, text, finish, _probs):
        return {"object": "text_completion",
                "choices": [{"index": 0, "text": (self.prompt + text) if self.req.echo else text, "logprobs": None,
                             "finish_reason": finish}]}

    def chunk(self, piece, finish, first):
        return {"object": "text_completion",
                "choices": [{"index": 0, "text": ((self.prompt if first and self.req.echo else "") + piece),
                             "logprobs": None, "finish_reason": finish}]}
