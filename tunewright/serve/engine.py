"""The served models: each one's weights and the batching engine that answers for it.

A served name gets its own `Backend`: the base with the adapter merged into it (LoRA-family and IA3
adapters fold into the weights), optionally with 8-bit linear layers, answered by transformers' continuous
batching engine: requests join and leave the running batch token by token, and the blocks of a prompt
prefix already in the KV cache (the system prompt every request shares) are reused rather than recomputed. On a
CPU its attention runs request by request (`tunewright.serve.attention`), not over the whole batch with a mask.
Sampled requests (temperature above 0) are batched by a second engine, started on the first such request,
with each request's temperature and top_p. Adapters that cannot be merged (prompt tuning and its relatives)
and requests with a `seed` (a reproducible draw) are answered one at a time by `generate` instead; the server
says so at start-up.

Swapping a backend (the registry watcher does when an alias moves) lets the old one finish what it holds
before it stops: no request in flight is dropped.

LoRA adapters that share a base are served instead by one copy of it (`tunewright.serve.shared_base`), whose
backends hook the engine through `_engine_options`, `_prepare`, `_new_request` and `_request_done`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import json
import logging
import os
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from tunewright.chat import template_ids, uses_tools
from tunewright.registry.adapters import AdapterSource

log = logging.getLogger("tunewright.serve")


@dataclass(frozen=True)
class ServedModel:
    """A name clients send as `model`, and what answers under it."""

    name: str
    source: AdapterSource | None  # None: a local whole model folder (the base, or a merged export)
    folder: str = ""              # the model folder when source is None

    def card(self) -> dict:
        """What `/v1/models` says about it beyond the OpenAI fields."""
        if self.source is None:
            return {"adapter": None, "folder": self.folder}
        s = self.source
        out = {"model": s.resolved, "adapter": None} if s.whole else {"adapter": s.resolved}
        out["sha256"] = s.sha256
        out.update({k: v for k, v in (("registered_model", s.registered_model), ("version", s.version),
                                      ("run_id", s.run_id)) if v})
        return out

    @property
    def identity(self) -> str:
        """What names these weights exactly (the response cache's key): the adapter digest, else the folder."""
        return self.source.sha256 if self.source else self.folder


@dataclass
class Completion:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str
    logprobs: list[dict] = field(default_factory=list)
    cached: bool = False
    served_by: str = ""     # the backend's name (a challenger answering for its champion says so)
    version: str | None = None


class QueueFull(RuntimeError):
    """More requests are waiting than the server takes (answered 429)."""


class EngineFailed(RuntimeError):
    """The batching engine stopped and cannot answer (answered 503)."""


def message_text(content: Any) -> str:
    """An OpenAI message's content as text: a string, or the text parts of a list of parts."""
    if isinstance(content, str):
        return content
    if content is None:
        return ""
    return "".join(part.get("text", "") for part in content if isinstance(part, dict) and part.get("type") == "text")


def _running(manager) -> bool:
    return manager.is_running() and manager.background_thread_status.fatal_error is None


def _quantise_8bit(net):
    """int8 weights for every linear layer, the head included, activations quantised per call (CPU), and the
    process set to one intra-op thread.

    The batching engine runs the model in a thread of its own, and a thread other than the main one pays for
    waking its OpenMP team in every parallel region: for int8 layers that costs more than a second thread gains,
    for fp32 ones it does not, so only an 8-bit server is set so. It is set here, in the thread that loads the
    model, because torch gives a thread the count last set when it first runs a parallel op: the engine's thread
    among them."""
    import torch

    net = torch.ao.quantization.quantize_dynamic(net, {torch.nn.Linear}, dtype=torch.qint8)
    if torch.get_num_threads() != 1:
        log.info("8-bit: one intra-op thread for this server (was %d): faster for int8 in the engine's thread",
                 torch.get_num_threads())
        torch.set_num_threads(1)
    return net


def cuda_graph_settings(device) -> dict:
    """CUDA graphs for the batching engine on a GPU: on unless TUNEWRIGHT_CUDA_GRAPHS=off. transformers leaves them
    off when the attention needs a mask (SDPA does), which leaves a small model's every decoding step waiting on the
    host launching its kernels (bench/results/serve-load-gpu-cuda-graphs.md). Graphs exist only on an accelerator."""
    choice = os.environ.get("TUNEWRIGHT_CUDA_GRAPHS", "on").lower()
    if choice not in ("on", "off"):
        raise ValueError(f"TUNEWRIGHT_CUDA_GRAPHS={choice!r}: use on or off")
    if device.type != "cuda":
        return {}
    return {"use_cuda_graph": choice == "on"}


class Backend:
    """One served model in memory and the engine answering for it."""

    offers_logprobs = True
    base: str | None = None  # the base folder an adapter is served over (listed by `/v1/models`)

    def __init__(self, served: ServedModel, net, tokenizer, *, device, batching: bool, why_not: str = "",
                 max_batch_tokens: int = 1024, page_size: int = 32, max_len: int = 2048,
                 kv_cache_tokens: int = 16384):
        self.served = served
        self.net = net.eval()
        self.tokenizer = tokenizer
        self.device = device
        self.max_len = max_len
        self.batching = batching
        self.why_not = why_not
        self.lock = threading.Lock()  # the one-at-a-time path
        self.in_flight = 0
        self._count_lock = threading.Lock()
        self.manager = None
        self.sampler = None  # a second engine for sampled requests, started on the first one
        self._stopped = False
        self.prefix_tokens_reused = 0  # prompt tokens whose KV-cache blocks an earlier request had already made
        self._sampler_lock = threading.Lock()
        self._page_size, self._max_batch_tokens, self._kv_cache_tokens = page_size, max_batch_tokens, kv_cache_tokens
        self.fewest_tokens(0)  # reads the vocabulary now rather than on the first request's event loop
        if batching:
            self.manager = self._start_engine(sample=False)

    def _start_engine(self, sample: bool):
        """A continuous batching engine over these weights: greedy, or sampling with each request's own temperature
        and top_p (the engine holds one decoding mode, so sampled requests get an engine of their own)."""
        from transformers import GenerationConfig
        from transformers.generation.configuration_utils import ContinuousBatchingConfig

        tokenizer = self.tokenizer
        # the sampling engine's defaults are never used (every request sends both), but must not be the neutral
        # 1.0, or the engine leaves the processor out; top_k stays off, as in OpenAI's API
        decoding = dict(do_sample=True, temperature=0.7, top_p=0.95, top_k=None) if sample else dict(do_sample=False)
        gen = GenerationConfig(max_new_tokens=64, eos_token_id=tokenizer.eos_token_id,
                               pad_token_id=tokenizer.pad_token_id, **decoding)
        # The KV cache holds `kv_cache_tokens` tokens across the requests running at once (the engine's own
        # default on a CPU sizes it from free memory: gigabytes, and half a minute to allocate); requests
        # beyond what fits wait their turn. Small pages let the shared system prompt's blocks be reused. The
        # sampling engine gets a quarter: sampled traffic is usually the smaller share.
        tokens = max(self._kv_cache_tokens // 4, self.max_len + 2 * self._page_size) if sample \
            else self._kv_cache_tokens  # the sampling cache holds at least one request of the longest kind
        cb = ContinuousBatchingConfig(page_size=self._page_size, num_blocks=max(16, tokens // self._page_size),
                                      max_batch_tokens=self._max_batch_tokens, max_requests_per_batch=None,
                                      allow_block_sharing=True, per_request_processors=sample,
                                      **self._engine_options(sample))
        if self.device.type == "cpu":  # each request's attention over its own keys, not the whole batch's
            from tunewright.serve import attention

            attention.install()
        manager = self.net.init_continuous_batching(generation_config=gen, continuous_batching_config=cb)
        self._prepare(manager)
        manager.start()
        # one token through the engine now, so that a cache that does not fit fails at start-up, not later
        manager.add_request([tokenizer.eos_token_id or 0], request_id="start-up", max_new_tokens=1)
        first = manager.get_result("start-up", timeout=600)
        fatal = manager.background_thread_status.fatal_error
        if first is None or first.error is not None or fatal is not None:
            manager.stop(block=True, timeout=10)
            raise EngineFailed(f"{self.served.name}: the {'sampling' if sample else 'batching'} engine failed to "
                               f"start: {fatal or (first.error if first else 'no answer in 600 s')}")
        self._count_prefix_reuse(manager)
        return manager

    def _engine_options(self, sample: bool) -> dict:
        """Further settings of a batching engine: CUDA graphs for the greedy one (they were measured and checked on a
        GPU for greedy decoding only; the sampling engine keeps transformers' choice until it is)."""
        return {} if sample else cuda_graph_settings(self.device)

    def _prepare(self, manager) -> None:
        """What a kind of backend sets on an engine before it starts (nothing here)."""

    def _new_request(self, manager, request_id: str) -> None:
        """Called before a request goes to `manager` (nothing here)."""

    def _request_done(self, manager, request_id: str) -> None:
        """Called once its caller no longer waits on a request (nothing here)."""

    def _count_prefix_reuse(self, manager) -> None:
        """Count the prompt tokens each request takes from blocks already in the cache (the shared system prompt),
        as the engine's scheduler finds them: the figure `/metrics` and `/ready` report."""
        cache = getattr(getattr(manager, "batch_processor", None), "cache", None)
        if cache is None or not getattr(cache, "use_prefix_sharing", False):
            log.info("%s: this engine does not share prompt prefixes between requests", self.served.name)
            return
        search = cache.search_prefix_match

        def counted(request_id, prompt_ids):
            matched = search(request_id, prompt_ids)
            self.prefix_tokens_reused += matched
            return matched

        cache.search_prefix_match = counted

    def _sampling_engine(self):
        with self._sampler_lock:
            if self._stopped:
                raise EngineFailed(f"{self.served.name} is stopping")
            dead = self.sampler is not None and not _running(self.sampler)
            if dead:  # a sampled request broke it: the next one gets a fresh engine
                log.error("%s: the sampling engine stopped (%s); starting it again", self.served.name,
                          self.sampler.background_thread_status.fatal_error)
                self.sampler.stop(block=True, timeout=10)
            if self.sampler is None or dead:
                started = time.perf_counter()
                self.sampler = self._start_engine(sample=True)
                log.info("%s: sampling engine started for requests with temperature above 0 (%.1f s)",
                         self.served.name, time.perf_counter() - started)
            return self.sampler

    # -- bookkeeping -------------------------------------------------------------------------------------
    def hold(self) -> None:
        """Count one more request in flight: `stop` waits until it is released."""
        with self._count_lock:
            self.in_flight += 1

    def release(self) -> None:
        with self._count_lock:
            self.in_flight -= 1

    def alive(self) -> bool:
        """Whether the greedy engine runs (the sampling engine starts again on its next request if it stopped)."""
        return self.manager is None or _running(self.manager)

    def wait_idle(self, wait: float) -> None:
        """Until nothing is in flight (at most `wait` seconds)."""
        deadline = time.monotonic() + wait
        while self.in_flight and time.monotonic() < deadline:
            time.sleep(0.05)

    def stop(self, wait: float = 60.0) -> None:
        """Stop once what is in flight has finished (at most `wait` seconds)."""
        self.wait_idle(wait)
        with self._sampler_lock:
            self._stopped = True
        for manager in (self.manager, self.sampler):
            if manager is not None:
                manager.stop(block=True, timeout=10)

    # -- prompts ----------------------------------------------------------------------------------------
    @functools.cached_property
    def chars_per_token(self) -> int:
        """An upper bound of the characters one token can stand for: its longest vocabulary entry (byte-level and
        SentencePiece entries are at least as long as the text they decode to), doubled for normalisers that fold
        several characters into one. A text of N characters is at least N / this many tokens."""
        longest = max((len(t) for t in self.tokenizer.convert_ids_to_tokens(list(range(len(self.tokenizer))))
                       if isinstance(t, str)), default=1)
        return 2 * max(1, longest)

    def fewest_tokens(self, chars: int) -> int:
        """The fewest tokens a prompt of `chars` characters can be: a prompt far past the context is refused
        without being tokenised (a megabyte takes over a second to tokenise)."""
        return chars // self.chars_per_token

    def tokens_at_least(self, text: str) -> int:
        """A lower bound of `text`'s tokens from its first 16 characters per context token: a text longer than that
        is tokenised only that far before it is known to be past the context (0 for a shorter text)."""
        cut = 16 * self.max_len
        return len(self.text_ids(text[:cut])) - 1 if len(text) > cut else 0

    def chat_ids(self, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
        """The prompt's token ids, ending with the assistant header: the messages (after the served model's system
        prompt, unless they bring their own) through the chat template; a conversation with tools, calls or tool
        results rendered with them as `tunewright.chat` renders them for training."""
        source = self.served.source
        if uses_tools(messages, tools):
            turns = [{**{k: m[k] for k in ("role", "tool_calls", "tool_call_id") if m.get(k)},
                      "content": message_text(m.get("content"))} for m in messages]
            if source and source.system_prompt and not any(m["role"] == "system" for m in turns):
                turns = [{"role": "system", "content": source.system_prompt}] + turns
            return template_ids(self.tokenizer, turns, tools, generation=True)
        messages = [{"role": m["role"], "content": message_text(m.get("content"))} for m in messages]
        if source and source.system_prompt and not any(m["role"] == "system" for m in messages):
            messages = [{"role": "system", "content": source.system_prompt}] + messages
        return list(self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)[
            "input_ids"])

    def text_ids(self, prompt: str) -> list[int]:
        return list(self.tokenizer(prompt, add_special_tokens=False)["input_ids"])

    # -- answering --------------------------------------------------------------------------------------
    async def generate(self, ids: list[int], *, max_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
                       seed: int | None = None, stop: list[str] | None = None,
                       on_text: Callable[[str], None] | None = None) -> tuple[list[int], str, str]:
        """(generated token ids, text, finish reason); `on_text` gets each new piece of text as it is made."""
        self.hold()
        try:
            if self.batching and temperature == 0:
                return await self._batched(self.manager, ids, max_tokens, stop or [], on_text)
            if self.batching and seed is None:  # a seed asks for a reproducible draw: that is one at a time
                sampler = await asyncio.to_thread(self._sampling_engine)
                return await self._batched(sampler, ids, max_tokens, stop or [], on_text,
                                           temperature=float(temperature), top_p=float(top_p))
            cancelled = threading.Event()  # the caller went away: the thread stops at its next token
            try:
                return await asyncio.to_thread(self._one_at_a_time, ids, max_tokens, temperature, top_p, seed,
                                               stop or [], on_text, cancelled)
            except asyncio.CancelledError:
                cancelled.set()
                raise
        finally:
            self.release()

    def _finish(self, tokens: list[int], max_tokens: int, stop: list[str]) -> tuple[list[int], str, str]:
        eos = self.tokenizer.eos_token_id
        ended = bool(tokens) and tokens[-1] == eos
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        for s in stop:
            if s and s in text:
                return tokens, text[: text.index(s)], "stop"
        return tokens, text, "stop" if ended or len(tokens) < max_tokens else "length"

    async def _batched(self, manager, ids, max_tokens, stop, on_text, **sampling):
        import uuid

        if not _running(manager):
            raise EngineFailed(f"the batching engine of {self.served.name} stopped: "
                               f"{manager.background_thread_status.fatal_error}")
        outputs: asyncio.Queue = asyncio.Queue()
        rid = uuid.uuid4().hex
        self._new_request(manager, rid)
        manager.register_result_handler(rid, outputs.put_nowait)
        # token by token only when someone reads the pieces (a stream, a stop sequence); else one result at the end,
        # which spares the event loop a wake-up per token of every running request
        sent, tokens = "", []
        try:
            added = manager.add_request(ids, request_id=rid, max_new_tokens=max_tokens,
                                        streaming=on_text is not None or bool(stop),
                                        eos_token_id=self.tokenizer.eos_token_id, **sampling)
            if added is None:
                raise EngineFailed(f"the batching engine of {self.served.name} is not accepting requests")
            while True:
                out = await outputs.get()
                if out.error is not None:
                    raise EngineFailed(f"generation failed: {out.error}")
                tokens = list(out.generated_tokens)
                if on_text is not None or stop:
                    text = self.tokenizer.decode(tokens, skip_special_tokens=True)
                    hit = next((text.index(s) for s in stop if s and s in text), None)
                    if hit is not None:
                        manager.cancel_request(rid)
                        if on_text is not None and hit > len(sent):
                            on_text(text[len(sent):hit])
                        return tokens, text[:hit], "stop"
                    # hold back a piece that may be half a character or the start of a stop sequence
                    safe = len(text) - max((len(s) - 1 for s in stop if s), default=0)
                    if text.endswith("\ufffd"):
                        safe = min(safe, len(text) - 1)
                    if on_text is not None and safe > len(sent):
                        on_text(text[len(sent):safe])
                        sent = text[:safe]
                if out.is_finished():
                    break
        except asyncio.CancelledError:  # the client went away: free its place in the batch
            manager.cancel_request(rid)
            raise
        finally:
            with manager.output_router._lock:
                manager.output_router.result_handlers.pop(rid, None)
            self._request_done(manager, rid)
        tokens, text, finish = self._finish(tokens, max_tokens, stop)
        if on_text is not None and len(text) > len(sent):
            on_text(text[len(sent):])
        return tokens, text, finish

    @contextlib.contextmanager
    def _seeded(self, seed):
        """A seeded draw holds the sampling engine still, since both draw from torch's global generator: paused if
        it runs, and not started meanwhile by a sampled request arriving (which waits for the draw to end)."""
        if seed is None:
            yield
            return
        with self._sampler_lock:
            running = self.sampler is not None and _running(self.sampler)
            with self.sampler.pause() if running else contextlib.nullcontext():
                yield

    def _one_at_a_time(self, ids, max_tokens, temperature, top_p, seed, stop, on_text, cancelled=None):
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList

        class Cancelled(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                return torch.full((input_ids.shape[0],), cancelled is not None and cancelled.is_set(),
                                  dtype=torch.bool, device=input_ids.device)

        sample = temperature > 0
        kwargs = ({"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": 0} if sample
                  else {"do_sample": False})
        with self.lock, self._seeded(seed), torch.no_grad():
            if seed is not None:
                torch.manual_seed(seed)
            out = self.net.generate(torch.tensor([ids], device=self.device), max_new_tokens=max_tokens,
                                    attention_mask=torch.ones(1, len(ids), dtype=torch.long, device=self.device),
                                    pad_token_id=self.tokenizer.pad_token_id,
                                    eos_token_id=self.tokenizer.eos_token_id,
                                    stopping_criteria=StoppingCriteriaList([Cancelled()]), **kwargs)
        tokens, text, finish = self._finish(out[0, len(ids):].tolist(), max_tokens, stop)
        if on_text is not None and text:
            on_text(text)
        return tokens, text, finish

    def logprobs(self, ids: list[int], tokens: list[int], top: int) -> list[dict]:
        """OpenAI's `logprobs.content` for an answer: each token's log-probability under the model given the prompt
        and the answer before it (one forward pass), with the `top` likeliest alternatives."""
        import torch

        if not tokens:
            return []
        with torch.no_grad():
            logits = self.net(torch.tensor([ids + tokens], device=self.device)).logits[0, len(ids) - 1: -1]
        logp = torch.log_softmax(logits.float(), dim=-1)

        def entry(token_id: int, value: float) -> dict:
            text = self.tokenizer.decode([token_id])
            return {"token": text, "logprob": value, "bytes": list(text.encode("utf-8"))}

        out = []
        for row, token_id in zip(logp, tokens):
            item = entry(token_id, float(row[token_id]))
            values, idx = row.topk(top) if top else (torch.empty(0), torch.empty(0, dtype=torch.long))
            item["top_logprobs"] = [entry(int(i), float(v)) for v, i in zip(values, idx)]
            out.append(item)
        return out


def load_backend(served: ServedModel, base_dir: Path | None, *, precision: str = "fp32", quantize: str | None = None,
                 batching: bool = True, device: str | None = None, kv_cache_tokens: int = 16384,
                 log=log) -> Backend:
    """Load one served model: its base with the adapter merged in (or a whole model folder), ready to answer."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    adapter = served.source is not None and not served.source.whole
    folder = (Path(served.folder) if served.source is None else Path(base_dir) if adapter
              else Path(served.source.local_dir))
    tokenizer_dir = folder if (folder / "tokenizer_config.json").is_file() else Path(served.source.local_dir)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    net = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(dev)
    why_not = ""
    if adapter:
        net = PeftModel.from_pretrained(net, served.source.local_dir)
        if net.active_peft_config.is_prompt_learning:
            why_not = (f"its adapter ({net.active_peft_config.peft_type}) adds virtual tokens that the batching "
                       "engine's cache cannot hold")
        else:
            net = net.merge_and_unload()
    if quantize == "8bit":
        if dev.type != "cpu":
            raise ValueError("--quantize 8bit quantises linear layers for the CPU; on a GPU serve in bf16 instead")
        net = _quantise_8bit(net)
    elif quantize:
        raise ValueError(f"--quantize {quantize}: only 8bit is offered")
    if not batching:
        why_not = why_not or "continuous batching was switched off (--no-batching)"
    max_len = int(getattr(net.config, "max_position_embeddings", 2048) or 2048)
    backend = Backend(served, net, tokenizer, device=dev, batching=not why_not, why_not=why_not,
                      max_len=min(max_len, 4096), kv_cache_tokens=kv_cache_tokens)
    if adapter:
        backend.base = str(folder)
    if why_not:
        log.info("%s: answered one request at a time: %s", served.name, why_not)
    return backend


class ResponseCache:
    """Answers to deterministic (greedy) requests, by model weights, prompt tokens and limits; least recently used
    entries go first."""

    def __init__(self, size: int):
        self.size = size
        self._items: OrderedDict[str, tuple] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0

    @staticmethod
    def key(identity: str, ids: list[int], max_tokens: int, stop: list[str] | None) -> str:
        return hashlib.sha256(json.dumps([identity, ids, max_tokens, stop or []]).encode()).hexdigest()

    def get(self, key: str):
        if not self.size:
            return None
        with self._lock:
            value = self._items.get(key)
            if value is not None:
                self._items.move_to_end(key)
                self.hits += 1
            return value

    def put(self, key: str, value: tuple) -> None:
        if not self.size:
            return
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self.size:
                self._items.popitem(last=False)


class Engine:
    """Every served model by name, a share of one name's traffic optionally sent to another (or a shadow copy of
    each request), the queue limit across all of them, and the response cache."""

    def __init__(self, backends: dict[str, Backend], *, max_queue: int = 256, cache_size: int = 1024,
                 challenger: dict[str, tuple[str, float]] | None = None, shadow: dict[str, str] | None = None,
                 seed: int | None = None):
        import random

        self.backends = dict(backends)
        self.max_queue = max_queue
        self.cache = ResponseCache(cache_size)
        self.challenger = dict(challenger or {})   # served name -> (challenger's served name, share of traffic)
        self.shadow = dict(shadow or {})           # served name -> the served name answering a copy of each request
        self.waiting = 0
        self._lock = threading.Lock()
        self._swap_lock = threading.Lock()  # picking a backend and replacing it never interleave
        self._random = random.Random(seed)
        self.ready = True

    @property
    def models(self) -> dict[str, ServedModel]:
        return {name: b.served for name, b in self.backends.items()}

    def pick(self, name: str) -> Backend:
        """The backend answering a request for `name`: its own, or by the configured share its challenger's,
        already counted as in flight (the caller ends with `backend.release()`), so that a swap in between cannot
        stop it under the request."""
        with self._swap_lock:
            route = self.challenger.get(name)
            if route and route[0] in self.backends and self._random.random() < route[1]:
                backend = self.backends[route[0]]
            else:
                backend = self.backends[name]
            backend.hold()
            return backend

    def resolve(self, name: str) -> str | None:
        """The served name a request's `model` means: a served name as it is, or a registered model's bare name
        (`support-ticket-json`) for the one alias of it served here (`support-ticket-json@champion`); None when it
        means nothing served."""
        if name in self.backends:
            return name
        return self.aliases().get(name)

    def aliases(self) -> dict[str, str]:
        """Bare registered-model names and the served name each stands for (when exactly one alias of it is served)."""
        found: dict[str, list[str]] = {}
        shares = {target for target, _share in self.challenger.values()}  # a challenger answers its alias' share
        shares |= set(self.shadow.values())
        for served in self.backends:
            bare, at, _alias = served.partition("@")
            if at and bare not in self.backends and served not in shares:
                found.setdefault(bare, []).append(served)
        return {bare: names[0] for bare, names in found.items() if len(names) == 1}

    def swap(self, name: str, backend: Backend) -> None:
        """Serve `name` from `backend` from now on; the old one stops once its requests in flight have finished."""
        with self._swap_lock:
            old = self.backends.get(name)
            self.backends[name] = backend
        if old is not None and old is not backend:
            threading.Thread(target=old.stop, name=f"retire-{name}", daemon=True).start()

    def shadow_of(self, name: str) -> Backend | None:
        """The backend answering a shadow copy of a request for `name`, counted as in flight (the caller releases
        it), or None when there is none or it is already as busy as the whole queue may be (copies are dropped
        rather than let pile up)."""
        with self._swap_lock:
            backend = self.backends.get(self.shadow.get(name, ""))
            if backend is None or backend.in_flight >= self.max_queue:
                return None
            backend.hold()
            return backend

    def retire(self, name: str) -> None:
        """Serve `name` no more (a challenger whose alias was removed): its share goes back to the name it answered
        for, and its backend stops once its requests in flight have finished."""
        with self._swap_lock:
            old = self.backends.pop(name, None)
        if old is not None:
            threading.Thread(target=old.stop, name=f"retire-{name}", daemon=True).start()

    @contextlib.contextmanager
    def admitted(self):
        """A place in the queue, or QueueFull when every place is taken."""
        with self._lock:
            if self.waiting >= self.max_queue:
                raise QueueFull(f"{self.waiting} requests are in progress, the server's limit (--max-queue)")
            self.waiting += 1
        try:
            yield
        finally:
            with self._lock:
                self.waiting -= 1

    def alive(self) -> bool:
        return self.ready and all(b.alive() for b in self.backends.values())

    def stop(self) -> None:
        for backend in list(self.backends.values()):
            try:
                backend.stop(wait=30)
            except Exception as exc:  # noqa: BLE001  the others still stop
                log.error("%s did not stop cleanly: %s", backend.served.name, exc)
