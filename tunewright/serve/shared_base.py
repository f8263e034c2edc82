"""Many LoRA adapters served over one copy of their base, their requests batched together.

`SharedBase` holds the base once, unmerged, with every adapter served over it loaded into one PeftModel under
an adapter name of its own, and one batching engine (transformers' continuous batching, plus a sampling engine
on the first sampled request) for all of them. Each served name is an `AdapterView`: a `Backend` clients pick by
name that answers through the shared engine with its adapter. Memory per extra adapter is its own A and B
matrices; an adapter served under two names (champion and challenger on one version) is loaded once.

The engine runs every running request as one flattened sequence (batch dimension 1, the requests' tokens one
after another). Before each step, the step's request order (as the engine laid the tokens out) becomes a plan:
for each adapter present, the positions of its requests' tokens. Every LoRA linear layer then computes its base
output for all tokens and adds, per adapter in the step, `B(A(x)) * scaling` on that adapter's tokens only (one
gather and one pair of small matmuls per adapter present), so a step costs what its tokens cost, however many
adapters are loaded. Tokens of a served base (no adapter) get no delta.

The KV cache's shared prompt blocks are found by a hash of their tokens; two adapters give the same prompt
different keys and values, so the tokens are hashed shifted into a range of the adapter's own (its salt): a
system prompt is reused between requests of one adapter, never across adapters.

Swapping one served name to a new adapter version (the registry watcher) loads just that adapter into the shared
base; the old version stays loaded until the requests that picked it have finished, then it is deleted.

Only plain LoRA on linear layers shares a base this way (rsLoRA and rank or alpha patterns included); DoRA,
other PEFT methods, `modules_to_save` and adapters of another base are served by a `Backend` of their own (the
server logs why).
"""

from __future__ import annotations

import contextlib
import contextvars
import itertools
import logging
import threading
import types
from dataclasses import dataclass, field
from pathlib import Path

from tunewright.registry.adapters import read_config
from tunewright.serve.engine import Backend, ServedModel

log = logging.getLogger("tunewright.serve")

_route = threading.local()  # .plan: the adapter plan of the forward this thread runs (None: the base alone)
_adapter: contextvars.ContextVar[str | None] = contextvars.ContextVar("tunewright_adapter", default=None)


class Unshareable(ValueError):
    """An adapter the shared base's LoRA layers cannot apply: it is served with a base of its own instead."""


def sharing_refusal(model: ServedModel) -> str:
    """Why `model` cannot be served over a shared base (its adapter's kind), or "" when it can."""
    source = model.source
    if source is None:
        return ""  # the base itself: served with no adapter
    if source.whole:
        return "a whole model, not an adapter"
    cfg = read_config(source.local_dir)
    if cfg.get("peft_type") != "LORA":
        return f"a {cfg.get('peft_type')} adapter (only LoRA adapters share a base)"
    for key, what in (("use_dora", "DoRA"), ("modules_to_save", "modules_to_save"), ("lora_bias", "a LoRA bias"),
                      ("target_parameters", "target_parameters"), ("trainable_token_indices", "trained tokens"),
                      ("alora_invocation_tokens", "aLoRA"), ("use_qalora", "QALoRA")):
        if cfg.get(key):
            return f"its adapter uses {what}, which the shared base's LoRA layers do not apply"
    return ""


@dataclass
class Plan:
    """Which tokens of one forward each adapter adds its delta to: `segments` of (adapter name, positions or None
    for every token) over `tokens` rows, and `rows` (adapter name, positions) over the `logit_rows` rows a head
    sees when the model keeps only the logits it samples from."""

    tokens: int
    segments: list
    logit_rows: int = -1
    rows: list = field(default_factory=list)

    @classmethod
    def whole(cls, adapter: str | None) -> "Plan | None":
        """Every token of the forward to `adapter` (None: the base alone)."""
        return None if adapter is None else cls(-1, [(adapter, None)])


@contextlib.contextmanager
def routing(plan: Plan | None):
    """Forwards this thread runs meanwhile add the adapters' deltas as `plan` says."""
    before = getattr(_route, "plan", None)
    _route.plan = plan
    try:
        yield
    finally:
        _route.plan = before


def _routed_forward(self, x, *args, **kwargs):
    """A PEFT LoRA linear layer's forward that adds each adapter's delta to the tokens the thread's plan gives it."""
    result = self.base_layer(x, *args, **kwargs)
    plan = getattr(_route, "plan", None)
    if plan is None:
        return result
    width = x.shape[-1]
    n = x.numel() // width
    if plan.tokens < 0 or n == plan.tokens:
        segments = plan.segments
    elif n == plan.logit_rows:  # a head seeing only the rows sampled from
        segments = plan.rows
    else:
        raise RuntimeError(f"a LoRA layer saw {n} tokens, but the engine's step laid out {plan.tokens} "
                           f"({plan.logit_rows} sampled)")
    flat_x, flat_out = x.reshape(n, width), result.view(n, result.shape[-1])
    for name, index in segments:
        lora_a, lora_b = self.lora_A._modules.get(name), self.lora_B._modules.get(name)
        if lora_a is None or lora_b is None:  # this adapter leaves the layer alone
            continue
        scaling = self.scaling[name]
        if index is None:
            flat_out += lora_b(lora_a(flat_x.to(lora_a.weight.dtype))).to(result.dtype) * scaling
        else:
            rows = flat_x.index_select(0, index).to(lora_a.weight.dtype)
            flat_out.index_add_(0, index, lora_b(lora_a(rows)).to(result.dtype), alpha=scaling)
    return result


class _ReadWrite:
    """Forwards read the adapters side by side; loading or deleting one waits for them, and holds new ones back."""

    def __init__(self):
        self._cond = threading.Condition()
        self._readers = self._writers_waiting = 0
        self._writing = False

    @contextlib.contextmanager
    def reading(self):
        with self._cond:
            while self._writing or self._writers_waiting:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                self._cond.notify_all()

    @contextlib.contextmanager
    def writing(self):
        with self._cond:
            self._writers_waiting += 1
            while self._writing or self._readers:
                self._cond.wait()
            self._writers_waiting -= 1
            self._writing = True
        try:
            yield
        finally:
            with self._cond:
                self._writing = False
                self._cond.notify_all()


class _Routes:
    """Which adapter (and cache salt) each request of one engine runs with, until the engine has let it go."""

    def __init__(self, device):
        self.device = device
        self._of: dict[str, tuple[str | None, int]] = {}
        self._done: set[str] = set()
        self._lock = threading.Lock()

    def add(self, request_id: str, adapter: str | None, salt: int) -> None:
        with self._lock:
            self._of[request_id] = (adapter, salt)

    def done(self, request_id: str) -> None:
        with self._lock:
            self._done.add(request_id)

    def of(self, request_id: str) -> tuple[str | None, int]:
        """(adapter, salt) of a request; a request this server did not send (the start-up token) is the base's."""
        with self._lock:
            return self._of.get(request_id) or self._of.get(request_id.split("__child#")[0]) or (None, 0)

    def prune(self, scheduler) -> None:
        """Forget the requests whose callers are done and which the engine holds no more (called in the engine's
        thread between steps, so no step still to come can ask for them)."""
        with self._lock:
            gone = {r for r in self._done if r not in scheduler.active_requests and r not in scheduler.waiting_requests}
            for r in gone:
                self._of.pop(r, None)
            self._done -= gone

    def plan(self, requests) -> Plan | None:
        """The adapter plan of one engine step from its requests in the order their tokens were laid out."""
        import torch

        tokens: dict[str, list[int]] = {}
        rows: dict[str, list[int]] = {}
        at = row = 0
        for future in requests:
            adapter, _salt = self.of(future.state.request_id)
            if adapter is not None:
                tokens.setdefault(adapter, []).extend(range(at, at + future.query_length))
                if future.has_new_token:
                    rows.setdefault(adapter, []).append(row)
            at += future.query_length
            row += bool(future.has_new_token)
        if not tokens:
            return None

        def segments(by: dict[str, list[int]], total: int) -> list:
            return [(name, None if len(idx) == total else torch.tensor(idx, dtype=torch.long, device=self.device))
                    for name, idx in by.items()]

        return Plan(at, segments(tokens, at), row, segments(rows, row))


@dataclass
class _Loaded:
    name: str          # the adapter's name in the PeftModel
    salt: int          # its KV-cache hash range
    bytes: int         # its weights' size
    users: int = 0     # views serving it


class SharedBase(Backend):
    """One base in memory, every LoRA adapter served over it, and the batching engines answering for all of them."""

    def __init__(self, base_dir: Path, *, precision: str = "fp32", device: str | None = None, batching: bool = True,
                 kv_cache_tokens: int = 16384, log=log):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
        self.base_dir = Path(base_dir)
        self.peft = None  # the PeftModel, made with the first adapter
        self.log = log
        self.adapters: dict[str, _Loaded] = {}   # adapter digest -> what is loaded for it
        self._salt_of: dict[str, int] = {}       # adapter name -> its cache salt (kept after it is deleted)
        self.views: list[AdapterView] = []
        self._weights = _ReadWrite()
        self._routes: dict[int, _Routes] = {}
        self._names = itertools.count(1)
        self._salts = itertools.count(1)
        self._views_lock = threading.Lock()
        self._vocab = 0
        tokenizer = AutoTokenizer.from_pretrained(self.base_dir)
        net = AutoModelForCausalLM.from_pretrained(self.base_dir, dtype=dtype).to(dev)
        self._vocab = max(len(tokenizer), int(getattr(net.config, "vocab_size", 0) or 0))
        max_len = int(getattr(net.config, "max_position_embeddings", 2048) or 2048)
        why_not = "" if batching else "continuous batching was switched off (--no-batching)"
        # the engine starts with the first view (`attach`), once its adapter is in
        super().__init__(ServedModel(f"shared base {self.base_dir.name}", None, str(self.base_dir)), net, tokenizer,
                         device=dev, batching=False, why_not=why_not, max_len=min(max_len, 4096),
                         kv_cache_tokens=kv_cache_tokens)
        self._want_batching = batching
        self.mixed_steps = 0  # engine steps that held tokens of more than one adapter

    # -- adapters -----------------------------------------------------------------------------------------
    def attach(self, model: ServedModel) -> "AdapterView":
        """A view answering as `model` (an adapter loaded here unless already, or the base itself)."""
        refusal = sharing_refusal(model)
        if refusal:
            raise Unshareable(f"{model.name}: {refusal}")
        with self._views_lock:
            loaded = None if model.source is None else self._load(model)
            view = AdapterView(self, model, loaded.name if loaded else None)
            if loaded:
                loaded.users += 1
            self.views.append(view)
        if self._want_batching and self.manager is None:
            self.manager = self._start_engine(sample=False)
            self.batching = True
        return view

    def _load(self, model: ServedModel) -> _Loaded:
        """The adapter of `model` in the PeftModel (loaded now unless it already is); refused when one of its layers
        is not a plain LoRA linear layer."""
        from peft import PeftModel
        from peft.tuners.lora.layer import Linear as LoraLinear
        from peft.tuners.tuners_utils import BaseTunerLayer

        digest = model.source.sha256
        if digest in self.adapters:
            return self.adapters[digest]
        name = f"adapter{next(self._names)}"
        with self._weights.writing():
            if self.peft is None:
                self.peft = PeftModel.from_pretrained(self.net, model.source.local_dir, adapter_name=name).eval()
            else:
                try:
                    self.peft.load_adapter(model.source.local_dir, adapter_name=name)
                except Exception:  # PEFT adds the adapter's layers before reading its weights: take them out again
                    if name in self.peft.peft_config:
                        self.peft.delete_adapter(name)
                    raise
                self.peft.eval()
            layers = [m for m in self.net.modules() if isinstance(m, BaseTunerLayer)
                      and any(name in getattr(m, attr, {}) for attr in m.adapter_layer_names)]
            odd = sorted({type(m).__name__ for m in layers if type(m) is not LoraLinear or name in m.lora_variant})
            if odd or not layers:
                self.peft.delete_adapter(name)
                raise Unshareable(f"{model.name}: its adapter adapts {', '.join(odd) or 'no layer'}; only plain LoRA "
                                 "linear layers share a base")
            for m in self.net.modules():  # layers the new adapter added too
                if isinstance(m, LoraLinear) and "forward" not in m.__dict__:
                    m.forward = types.MethodType(_routed_forward, m)
            size = sum(p.numel() * p.element_size() for m in layers
                       for p in (*m.lora_A[name].parameters(), *m.lora_B[name].parameters()))
        loaded = self.adapters[digest] = _Loaded(name, self._salt_for(next(self._salts)), size)
        self._salt_of[name] = loaded.salt
        self.log.info("%s: adapter loaded into the shared base %s (%.1f MB)", model.name, self.base_dir.name,
                      size / 1e6)
        return loaded

    def _salt_for(self, n: int) -> int:
        """An adapter's range of hashed token ids: ids shifted by n vocabularies, within the 32-bit ids the cache
        hashes (a range comes back only after tens of thousands of loads)."""
        ranges = (2 ** 31 - 1) // max(self._vocab, 1) - 1
        return 1 + (n - 1) % max(ranges, 1)

    def detach(self, view: "AdapterView") -> None:
        """`view` serves no more: its adapter is deleted once no other view serves it; the engines stop with the
        last view."""
        with self._views_lock:
            if view not in self.views:
                return
            self.views.remove(view)
            loaded = next((a for a in self.adapters.values() if a.name == view.adapter), None)
            if loaded is not None:
                loaded.users -= 1
                if not loaded.users:
                    with self._weights.writing():
                        self.peft.delete_adapter(loaded.name)
                    del self.adapters[next(d for d, a in self.adapters.items() if a is loaded)]
                    self.log.info("%s: its adapter was deleted from the shared base", view.served.name)
            last = not self.views
        if last:
            Backend.stop(self)

    @property
    def stopped(self) -> bool:
        """Whether its engines were stopped (its last view left): a new adapter needs a new shared base."""
        return self._stopped

    @property
    def parameter_bytes(self) -> int:
        """The bytes of every parameter this base holds: the base once and each loaded adapter's A and B."""
        return sum(p.numel() * p.element_size() for p in self.net.parameters())

    # -- the engines --------------------------------------------------------------------------------------
    def _engine_options(self, sample: bool) -> dict:
        # the plan is made on the host before each step: no CUDA graph replays a step, and no step is prepared
        # while the one before runs
        return {"use_cuda_graph": False, "use_async_batching": False}

    def _prepare(self, manager) -> None:
        """Before each step of `manager`, the adapter plan of its requests, the adapters held still meanwhile."""
        routes = self._routes[id(manager)] = _Routes(self.device)
        step = manager._generation_step

        def routed_step():
            processor = manager.batch_processor
            io = processor.inputs_and_outputs
            host = io.io_pairs[io.current_pair].host_io if hasattr(io, "io_pairs") else io
            routes.prune(processor.scheduler)
            with self._weights.reading():
                plan = routes.plan(host.requests_in_batch)
                if plan is not None and (len(plan.segments) > 1 or plan.segments[0][1] is not None):
                    self.mixed_steps += 1  # tokens of two adapters or more (the base counted as one)
                with routing(plan):
                    step()

        manager._generation_step = routed_step

    def _count_prefix_reuse(self, manager) -> None:
        self._salt_prompt_blocks(manager)
        super()._count_prefix_reuse(manager)

    def _salt_prompt_blocks(self, manager) -> None:
        """Hash each request's prompt blocks in its adapter's range of ids, so that a block is reused only by requests
        of the adapter that computed it."""
        from transformers.generation.continuous_batching.requests import RequestStatus

        cache = getattr(getattr(manager, "batch_processor", None), "cache", None)
        if cache is None or not getattr(cache, "use_prefix_sharing", False):
            return
        routes, vocab = self._routes[id(manager)], self._vocab
        search = cache.search_prefix_match

        def salted(request_id: str, ids: list[int]) -> list[int]:
            salt = routes.of(request_id)[1]
            return ids if not salt else [t + salt * vocab for t in ids]

        def match(request_id, prompt_ids):
            return search(request_id, salted(request_id, prompt_ids))

        def mark(state, complete_blocks):  # as PagedAttentionCache.mark_complete_blocks, on the salted ids
            if not cache.allow_block_sharing or not complete_blocks or state.status == RequestStatus.FINISHED:
                return
            ids = salted(state.request_id, state.initial_tokens + state.generated_tokens)
            for kind, blocks in complete_blocks.items():
                cache.cache_allocators[kind].mark_complete_blocks(state.request_id, ids, blocks)

        cache.search_prefix_match, cache.mark_complete_blocks = match, mark

    def _new_request(self, manager, request_id: str) -> None:
        adapter = _adapter.get()
        self._routes[id(manager)].add(request_id, adapter, self._salt_of.get(adapter, 0) if adapter else 0)

    def _request_done(self, manager, request_id: str) -> None:
        self._routes[id(manager)].done(request_id)

    def _one_at_a_time(self, *args, **kwargs):
        with self._weights.reading(), routing(Plan.whole(_adapter.get())):
            return super()._one_at_a_time(*args, **kwargs)

    def logprobs(self, ids: list[int], tokens: list[int], top: int) -> list[dict]:
        with self._weights.reading(), routing(Plan.whole(_adapter.get())):
            return super().logprobs(ids, tokens, top)

    def stop(self, wait: float = 60.0) -> None:
        """Stop every view, and with the last of them the engines."""
        for view in list(self.views):
            view.stop(wait)
        if not self.views:
            Backend.stop(self, wait)


class AdapterView(Backend):
    """One served name answered by a shared base with its adapter (or none: the base itself)."""

    def __init__(self, shared: SharedBase, served: ServedModel, adapter: str | None):
        self.shared, self.served, self.adapter = shared, served, adapter
        self.tokenizer, self.net, self.device = shared.tokenizer, shared.net, shared.device
        self.max_len, self.why_not = shared.max_len, shared.why_not
        self.base = str(shared.base_dir)
        self.in_flight = 0
        self._count_lock = threading.Lock()
        self.__dict__["chars_per_token"] = shared.chars_per_token  # the same vocabulary: read once

    @property
    def batching(self) -> bool:
        return self.shared.batching

    @property
    def manager(self):
        return self.shared.manager

    @property
    def sampler(self):
        return self.shared.sampler

    @property
    def prefix_tokens_reused(self) -> int:
        return self.shared.prefix_tokens_reused

    def alive(self) -> bool:
        return self in self.shared.views and self.shared.alive()

    def stop(self, wait: float = 60.0) -> None:
        """Once this name's requests in flight have finished (at most `wait` s), it leaves the shared base."""
        self.wait_idle(wait)
        self.shared.detach(self)

    async def generate(self, ids: list[int], **kwargs):
        self.hold()
        token = _adapter.set(self.adapter)
        try:
            return await self.shared.generate(ids, **kwargs)
        finally:
            _adapter.reset(token)
            self.release()

    def logprobs(self, ids: list[int], tokens: list[int], top: int) -> list[dict]:
        token = _adapter.set(self.adapter)
        try:
            return self.shared.logprobs(ids, tokens, top)
        finally:
            _adapter.reset(token)


class SharedBases:
    """A server's shared bases by folder: made on the first adapter that shares one, and made again when a base whose
    views have all gone is wanted once more (a moved alias after every name of it was swapped away)."""

    def __init__(self, folders, **options):
        self.folders = {Path(f).resolve() for f in folders}
        self.options = options  # for SharedBase: precision, batching, kv_cache_tokens, log
        self._bases: dict[Path, SharedBase] = {}
        self._lock = threading.Lock()

    def takes(self, model: ServedModel, folder: Path | None) -> bool:
        """Whether `model` is served over the shared base of `folder`."""
        return folder is not None and Path(folder).resolve() in self.folders and not sharing_refusal(model)

    def attach(self, model: ServedModel, folder: Path) -> AdapterView:
        with self._lock:
            key = Path(folder).resolve()
            shared = self._bases.get(key)
            if shared is None or shared.stopped:
                shared = self._bases[key] = SharedBase(key, **self.options)
        return shared.attach(model)
