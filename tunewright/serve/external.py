"""A batching engine in a process of its own behind `tunewright serve`: vLLM on GPU workers (`--engine vllm`).

vLLM pins its own torch and transformers, so it lives in an environment of its own on the worker; tunewright
finds its `vllm` command (TUNEWRIGHT_VLLM, else `vllm` on the PATH). Each served model becomes one whole model
folder (an adapter is merged into its base once, kept by digest), vLLM serves that folder on a private local
port, and tunewright forwards each request to vLLM's OpenAI completions endpoint with the prompt as token ids.
LoRA adapters sharing a base are served instead by one vLLM process over that base (`--enable-lora`, each adapter
a `--lora-modules` entry named as it is served), each request sent with its adapter's module name as `model`. A new
version the registry watcher loads later goes into that same process through vLLM's runtime LoRA API
(`VLLM_ALLOW_RUNTIME_LORA_UPDATING=True` in its environment, `POST /v1/load_lora_adapter`) under a module name of its
own (served name and short digest), beside the old version until the old one's requests have finished; then the old
module is unloaded (`POST /v1/unload_lora_adapter`).
So the chat template, the training system prompt, the registry and its hot swap, the response cache, the limits,
API keys and the request log stay tunewright's, and the answers are vLLM's. The engine listens on loopback
only and asks for a key of its own (random, given in its environment, never on a command line), so no local
user can go around tunewright's keys, limits and log; its output goes to tunewright's log, not to a file.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import secrets
import tempfile
import threading
from collections import deque
import time
from pathlib import Path
from typing import Callable

from tunewright.serve.engine import Backend, EngineFailed, ServedModel

log = logging.getLogger("tunewright.serve")

VLLM_ENV = "TUNEWRIGHT_VLLM"
GPU_SHARE_ENV = "TUNEWRIGHT_VLLM_GPU_SHARE"
READ_TIMEOUT = 300.0  # seconds without a byte from the engine before a request fails (503)


LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)  # the --max-lora-rank values vLLM takes
# LoRA slots kept free beyond the adapters named at start-up: a moved alias's new version is loaded beside the old one
# while the old one's requests finish, so a swap needs one more slot for a moment (two: a champion and a challenger
# moving together); vLLM still answers past the limit, but swaps adapters between GPU and host memory to do so
RUNTIME_LORA_ROOM = 2
RUNTIME_LORA_ENV = {"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"}  # enables vLLM's load/unload_lora_adapter endpoints


def lora_rank(adapters: dict[str, str]) -> int:
    """The smallest `--max-lora-rank` vLLM takes that holds every adapter's rank (its rank pattern included)."""
    from tunewright.registry.adapters import read_config

    ranks = [max([int(c.get("r") or 8), *map(int, (c.get("rank_pattern") or {}).values())])
             for c in map(read_config, adapters.values())]
    top = max(ranks, default=8)
    fits = [r for r in LORA_RANKS if r >= top]
    if not fits:
        raise ValueError(f"an adapter of rank {top} is above the {LORA_RANKS[-1]} vLLM serves")
    return fits[0]


def vllm_command(folder: Path, name: str, precision: str, max_len: int,
                 loras: dict[str, str] | None = None) -> Callable[[int], list[str]]:
    """The command line starting vLLM's OpenAI server on `folder` at a given port; with `loras` (served name ->
    adapter folder), the base with each adapter as a LoRA module clients (tunewright) ask for by that name, and
    RUNTIME_LORA_ROOM more LoRA slots for versions loaded at runtime."""
    exe = os.environ.get(VLLM_ENV) or shutil.which("vllm")
    if not exe:
        raise ValueError(f"--engine vllm: no `vllm` command found. Install vLLM in an environment of its own on the "
                         f"GPU worker and set {VLLM_ENV} to its `vllm` executable (or put it on the PATH)")
    dtype = {"bf16": "bfloat16", "fp16": "float16"}.get(precision, "float32")
    # vLLM takes 0.9 of the GPU by default; a hot swap starts the new version's engine while the old one still
    # answers, so each engine gets a share that leaves room for a second (TUNEWRIGHT_VLLM_GPU_SHARE to change it)
    share = float(os.environ.get(GPU_SHARE_ENV) or 0.4)
    # --generation-config vllm: the model folder's sampling defaults do not apply; every request says its own
    lora = [] if not loras else ["--enable-lora", "--max-loras", str(len(loras) + RUNTIME_LORA_ROOM),
                                 "--max-lora-rank", str(lora_rank(loras)),
                                 "--lora-modules", *(f"{n}={p}" for n, p in loras.items())]
    return lambda port: [exe, "serve", str(folder), "--host", "127.0.0.1", "--port", str(port),
                         "--served-model-name", name, "--dtype", dtype, "--max-model-len", str(max_len),
                         "--generation-config", "vllm", "--gpu-memory-utilization", f"{share:g}", *lora]


def whole_model_folder(served: ServedModel, base_dir: Path | None, cache: Path, log=log) -> Path:
    """A folder holding the whole model `served` answers with: its own, or its adapter merged into the base (made
    once per adapter digest and base)."""
    if served.source is None:
        return Path(served.folder)
    if served.source.whole:
        return Path(served.source.local_dir)
    import hashlib

    key = hashlib.sha256(f"{served.source.sha256}|{Path(base_dir).resolve()}".encode()).hexdigest()[:16]
    target = cache / f"merged-{key}"
    if (target / "config.json").is_file():
        return target
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    net = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32),
                                    served.source.local_dir)
    if net.active_peft_config.is_prompt_learning:
        raise ValueError(f"{served.name}: its adapter ({net.active_peft_config.peft_type}) adds virtual tokens and "
                         "cannot be merged into weights another engine could serve; serve it with --engine batching")
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp-", dir=cache))
    net.merge_and_unload().save_pretrained(tmp)
    tokenizer_dir = base_dir if (Path(base_dir) / "tokenizer_config.json").is_file() else served.source.local_dir
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(tmp)
    if target.exists():
        shutil.rmtree(tmp)
    else:
        os.replace(tmp, target)
    log.info("%s: adapter merged into its base for the external engine (%s)", served.name, target)
    return target


def _die_with_parent():
    """What the engine's process runs before it starts: asks Linux for a SIGTERM when this server dies, however it
    dies (SIGKILL and the out-of-memory killer included), so no engine is left holding a GPU; None elsewhere.
    libc is loaded here, in this process, so that the forked child only makes the call."""
    import ctypes

    try:
        prctl = ctypes.CDLL("libc.so.6", use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    return lambda: prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_healthy(url: str, process: subprocess.Popen, timeout: float) -> bool:
    """Poll `url` until it answers 200 (True), or until `process` exits or `timeout` seconds pass (False): how a
    server started in another process is known to be ready."""
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return True
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    return False


class ExternalBackend(Backend):
    """One served model answered by an OpenAI-compatible engine this backend starts, owns and stops (`env`: more of
    the engine's environment)."""

    offers_logprobs = False

    def __init__(self, served: ServedModel, folder: Path, command: Callable[[int], list[str]], *, engine: str,
                 max_len: int, start_timeout: float = 900.0, env: dict[str, str] | None = None, log=log):
        from transformers import AutoTokenizer

        self.served = served
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.net, self.device = None, None
        self.max_len = max_len
        self.batching, self.why_not = True, ""
        self.engine_name = engine
        self.manager = self.sampler = None
        self.prefix_tokens_reused = 0
        self.in_flight = 0
        self._count_lock = threading.Lock()
        self.lock = threading.Lock()
        self.upstream_model = served.name
        self.fewest_tokens(0)  # reads the vocabulary now rather than on the first request's event loop
        self._client, self._client_loop = None, None  # one HTTP client for every request, on the server's loop
        port = _free_port()
        self.url = f"http://127.0.0.1:{port}"
        self._key = secrets.token_urlsafe(32)  # vLLM reads VLLM_API_KEY: in its environment, out of `ps`
        env = dict(os.environ, **(env or {}), VLLM_API_KEY=self._key)
        self.process = subprocess.Popen(command(port), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                                        start_new_session=True, preexec_fn=_die_with_parent())
        self._output: deque[str] = deque(maxlen=200)  # the engine's last lines, for when it fails
        self._starting = True
        threading.Thread(target=self._read_output, name=f"{engine}-output-{served.name}", daemon=True).start()
        log.info("%s: starting %s on %s (pid %d)", served.name, engine, self.url, self.process.pid)
        self._wait_ready(start_timeout)
        self._starting = False

    def _read_output(self) -> None:
        """The engine's output, line by line, into tunewright's log: shown while it starts (loading takes minutes),
        kept at debug level after; the last lines are kept for the error when it fails."""
        for raw in iter(self.process.stdout.readline, b""):
            line = raw.decode(errors="replace").rstrip()
            self._output.append(line)
            log.log(logging.INFO if self._starting else logging.DEBUG, "[%s %s] %s", self.engine_name,
                    self.served.name, line)

    def _tail(self, n: int = 2000) -> str:
        return "\n".join(self._output)[-n:]

    def _wait_ready(self, timeout: float) -> None:
        if wait_healthy(f"{self.url}/health", self.process, timeout):
            return
        if self.process.poll() is not None:
            raise EngineFailed(f"{self.served.name}: {self.engine_name} exited with {self.process.returncode} "
                               f"while starting:\n{self._tail()}")
        self._terminate()
        raise EngineFailed(f"{self.served.name}: {self.engine_name} was not ready after {timeout:.0f} s:\n{self._tail()}")

    def alive(self) -> bool:
        return self.process.poll() is None

    def client(self):
        """The HTTP client forwarding requests to the engine: one per event loop, kept (a new client per request
        would build an SSL context each time, costly CPU work), its connections reused, unbounded in number: the
        server's own queue limit decides how many requests run at once."""
        import asyncio

        import httpx

        loop = asyncio.get_running_loop()
        if self._client is None or self._client_loop is not loop:
            # a stream of tokens: no gap between two pieces should last minutes; if one does, the engine hangs
            timeout = httpx.Timeout(connect=10, read=READ_TIMEOUT, write=60, pool=None)
            self._client = httpx.AsyncClient(base_url=self.url, timeout=timeout, trust_env=False,
                                             headers={"Authorization": f"Bearer {self._key}"},
                                             limits=httpx.Limits(max_connections=None, max_keepalive_connections=64))
            self._client_loop = loop
        return self._client

    def _terminate(self) -> None:
        """SIGTERM to the engine's process group (it and the workers it started), then SIGKILL to whatever of the
        group is left, even when the engine itself has already died."""
        for sig, grace in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(grace)
        if self.process.poll() is None:
            log.error("%s: %s (pid %d) did not stop", self.served.name, self.engine_name, self.process.pid)

    def stop(self, wait: float = 60.0) -> None:
        self.wait_idle(wait)
        self._terminate()
        client, loop, self._client = self._client, self._client_loop, None
        if client is not None and loop is not None and not loop.is_closed():
            import asyncio

            with contextlib.suppress(RuntimeError):  # its loop has stopped: nothing left to close
                asyncio.run_coroutine_threadsafe(client.aclose(), loop)

    async def generate(self, ids: list[int], *, max_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
                       seed: int | None = None, stop: list[str] | None = None,
                       on_text: Callable[[str], None] | None = None) -> tuple[list[int], str, str]:
        import httpx

        self.hold()
        try:
            if not self.alive():
                raise EngineFailed(f"{self.engine_name} serving {self.served.name} stopped "
                                   f"(exit {self.process.returncode}):\n{self._tail(500)}")
            # streamed from the engine even when the client wants one reply: the engine answers more requests a
            # second that way (bench/results/serve-load-gpu-vllm.md)
            body = {"model": self.upstream_model, "prompt": ids, "max_tokens": max_tokens, "temperature": temperature,
                    "top_p": top_p, "stream": True, "stream_options": {"include_usage": True}}
            if seed is not None:
                body["seed"] = seed
            if stop:
                body["stop"] = stop
            text, finish, counted = "", None, None
            try:
                async with self.client().stream("POST", "/v1/completions", json=body) as reply:
                    if reply.status_code != 200:
                        detail = (await reply.aread()).decode(errors="replace")[:500]
                        raise EngineFailed(f"{self.engine_name} answered {reply.status_code}: {detail}")
                    async for line in reply.aiter_lines():
                        if not line.startswith("data: "):
                            continue
                        data = line[6:].strip()
                        if data == "[DONE]":
                            break
                        chunk = json.loads(data)
                        if "error" in chunk:
                            raise EngineFailed(f"{self.engine_name}: {chunk['error']}")
                        if chunk.get("usage"):
                            counted = chunk["usage"].get("completion_tokens")
                        for choice in chunk.get("choices") or []:
                            piece = choice.get("text") or ""
                            if piece:
                                text += piece
                                if on_text is not None:
                                    on_text(piece)
                            finish = choice.get("finish_reason") or finish
            except httpx.HTTPError as exc:
                raise EngineFailed(f"{self.engine_name} serving {self.served.name} did not answer: {exc}") from None
            tokens = self.text_ids(text)
            if counted is not None:  # the engine's own count (the end-of-sequence token has no text)
                eos = self.tokenizer.eos_token_id or 0
                tokens = tokens[:counted] + [eos] * max(0, counted - len(tokens))
            return tokens, text, finish or ("length" if len(tokens) >= max_tokens else "stop")
        finally:
            self.release()

    def logprobs(self, ids: list[int], tokens: list[int], top: int) -> list[dict]:
        raise ValueError(f"logprobs are not offered with --engine {self.engine_name}")


class LoraView(ExternalBackend):
    """One served adapter answered by an engine process that holds it as a LoRA module beside others over their base:
    requests go to that process with the adapter's module name as `model`."""

    def __init__(self, process: "LoraProcess", served: ServedModel, module: str):
        owner = process.owner
        self.served, self.owner, self.views = served, owner, process.views  # views: every adapter of the process
        self.lora_process, self.module = process, module
        self.tokenizer, self.net, self.device, self.max_len = owner.tokenizer, None, None, owner.max_len
        self.batching, self.why_not, self.engine_name = True, "", owner.engine_name
        self.manager = self.sampler = None
        self.prefix_tokens_reused = 0
        self.in_flight = 0
        self._count_lock, self.lock = threading.Lock(), threading.Lock()
        self.upstream_model = module  # its LoRA module's name in the engine
        self.base = owner.served.folder
        self.__dict__["chars_per_token"] = owner.chars_per_token
        self._client, self._client_loop = None, None
        self.process, self.url, self._key, self._output = owner.process, owner.url, owner._key, owner._output
        self.views.append(self)

    def stop(self, wait: float = 60.0) -> None:
        """Once this name's requests have finished: its module is unloaded from the engine when no other name uses it,
        and the engine process stops with the last of its adapters."""
        self.wait_idle(wait)
        client, loop, self._client = self._client, self._client_loop, None
        if client is not None and loop is not None and not loop.is_closed():
            import asyncio

            with contextlib.suppress(RuntimeError):
                asyncio.run_coroutine_threadsafe(client.aclose(), loop)
        self.lora_process.leave(self, wait)


def engine_answer(reply) -> str:
    """The message of an engine's refusal: OpenAI's error shape (`{"error": {"message": ...}}`), vLLM's older one
    (`{"message": ...}`) or the text as it came."""
    try:
        body = reply.json()
    except ValueError:
        return reply.text.strip()[:500]
    if isinstance(body, dict):
        error = body.get("error")
        message = error.get("message") if isinstance(error, dict) else body.get("message")
        if message:
            return str(message)[:500]
    return reply.text.strip()[:500]


class LoraProcess:
    """One engine process over a base and the LoRA modules in it: which module answers each (served name, adapter
    digest), how many served names use it, and loading or unloading modules through the engine's runtime LoRA API."""

    def __init__(self, owner: ExternalBackend, modules: dict[tuple[str, str], str], rank: int, log=log):
        self.owner, self.rank, self.log = owner, rank, log
        self.modules = dict(modules)  # (served name, adapter digest) -> module name in the engine
        self.users: dict[str, int] = {module: 0 for module in modules.values()}
        self.views: list[LoraView] = []
        self._lock = threading.Lock()

    def running(self) -> bool:
        """Whether the engine runs and still serves a name (a process whose last name left has been stopped)."""
        return bool(self.views) and self.owner.alive()

    def view(self, model: ServedModel) -> LoraView:
        """A view answering as `model` through its module: the one already in the engine, or one loaded now under a
        name unique to the version (`EngineFailed`, naming the adapter and the engine's answer, when refused)."""
        key = (model.name, model.source.sha256)
        with self._lock:
            module = self.modules.get(key)
            if module is None:
                module = f"{model.name}-{model.source.sha256[:12]}"
                self._call("/v1/load_lora_adapter", {"lora_name": module, "lora_path": str(model.source.local_dir)},
                           f"{model.name}: {self.owner.engine_name} did not load the adapter {model.source.local_dir}")
                self.modules[key], self.users[module] = module, 0
                self.log.info("%s: adapter loaded at runtime into the %s process over %s as the LoRA module %s",
                              model.name, self.owner.engine_name, self.owner.served.folder, module)
            self.users[module] += 1
            return LoraView(self, model, module)

    def leave(self, view: LoraView, wait: float) -> None:
        """`view` serves no more: its module is unloaded once no name uses it; the process stops with its last name."""
        with self._lock:
            if view not in self.views:
                return
            self.views.remove(view)
            if not self.views:
                self.owner.stop(wait)
                return
            self.users[view.module] -= 1
            if self.users[view.module]:
                return
            del self.users[view.module]
            self.modules = {k: m for k, m in self.modules.items() if m != view.module}
            try:
                self._call("/v1/unload_lora_adapter", {"lora_name": view.module},
                           f"{view.served.name}: {self.owner.engine_name} did not unload the LoRA module {view.module}")
                self.log.info("%s: the LoRA module %s was unloaded from the %s process", view.served.name, view.module,
                              self.owner.engine_name)
            except EngineFailed as exc:  # no name uses it any more: it only takes a slot until the engine stops
                self.log.warning("%s", exc)

    def _call(self, path: str, body: dict, failed: str) -> None:
        """POST `body` to the engine's `path` with the engine's key; EngineFailed saying `failed` and the engine's
        answer unless it answers 200."""
        import httpx

        try:
            reply = httpx.post(f"{self.owner.url}{path}", json=body, timeout=READ_TIMEOUT, trust_env=False,
                               headers={"Authorization": f"Bearer {self.owner._key}"})
        except httpx.HTTPError as exc:
            raise EngineFailed(f"{failed}: no answer ({exc})") from None
        if reply.status_code != 200:
            raise EngineFailed(f"{failed}: it answered {reply.status_code}: {engine_answer(reply)}")


class ExternalLoras:
    """Adapters that share a base, served by one external engine process holding the base once and each adapter as a
    LoRA module (vLLM's `--enable-lora`), started on the first of them asked for with the adapters named at start-up.
    A version loaded later (a moved alias) over a base whose process runs is loaded into that process at runtime when
    it is a plain LoRA adapter within the process's `--max-lora-rank`; otherwise it gets an engine of its own."""

    def __init__(self, groups: dict[Path, list[ServedModel]], *, engine: str, precision: str,
                 command: Callable | None = None, max_len: int = 4096, log=log):
        self.groups = {Path(folder).resolve(): list(models) for folder, models in groups.items()}
        self.engine, self.precision, self.command, self.max_len, self.log = engine, precision, command, max_len, log
        self._processes: dict[Path, LoraProcess] = {}
        self._lock = threading.Lock()

    def takes(self, model: ServedModel, folder: Path | None) -> bool:
        """Whether `model` is answered by the process over `folder`: one of the adapters it starts with, or, while
        it runs, an adapter it can load at runtime."""
        from tunewright.serve.shared_base import sharing_refusal

        if folder is None or model.source is None or model.source.whole:
            return False
        key = Path(folder).resolve()
        process = self._processes.get(key)
        if process is None or not process.running():
            group = self.groups.get(key, [])
            return any(m.name == model.name and m.source.sha256 == model.source.sha256 for m in group)
        if sharing_refusal(model):
            return False
        try:
            fits = lora_rank({model.name: model.source.local_dir}) <= process.rank
        except ValueError:
            fits = False
        if not fits:
            self.log.info("%s: its adapter's rank is above the %s process's --max-lora-rank %d; it gets an engine of "
                          "its own", model.name, self.engine, process.rank)
        return fits

    def attach(self, model: ServedModel, folder: Path) -> LoraView:
        key = Path(folder).resolve()
        with self._lock:
            process = self._processes.get(key)
            if process is None or not process.running():
                process = self._processes[key] = self._start(key)
        return process.view(model)

    def _start(self, folder: Path) -> LoraProcess:
        """The engine process over `folder` with the group's adapters as LoRA modules, runtime loading enabled."""
        models = self.groups[folder]
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        max_len = min(self.max_len, int(config.get("max_position_embeddings") or self.max_len))
        loras = {m.name: m.source.local_dir for m in models}
        build = self.command or {"vllm": vllm_command}.get(self.engine)
        if build is None:
            raise ValueError(f"--engine {self.engine}: not an engine tunewright can start (batching or vllm)")
        tokenizer_dir = folder if (folder / "tokenizer_config.json").is_file() else Path(models[0].source.local_dir)
        base = ServedModel(f"base:{folder.name}", None, str(folder))
        self.log.info("%s: one %s process over the base %s, each adapter a LoRA module", ", ".join(loras), self.engine,
                      folder)
        owner = ExternalBackend(base, tokenizer_dir, build(folder, base.name, self.precision, max_len, loras=loras),
                                engine=self.engine, max_len=max_len, env=RUNTIME_LORA_ENV, log=self.log)
        return LoraProcess(owner, {(m.name, m.source.sha256): m.name for m in models}, lora_rank(loras), log=self.log)


def load_external(served: ServedModel, base_dir: Path | None, cache: Path, *, engine: str, precision: str,
                  max_len: int = 4096, command: Callable[[Path, str, str, int], Callable[[int], list[str]]] | None = None,
                  log=log) -> ExternalBackend:
    """Start the external engine for one served model: `engine` names it (vllm), `command` may build its command
    line instead (folder, name, precision, max_len -> port -> argv)."""
    folder = whole_model_folder(served, base_dir, cache, log)
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    max_len = min(max_len, int(config.get("max_position_embeddings") or max_len))
    build = command or {"vllm": vllm_command}.get(engine)
    if build is None:
        raise ValueError(f"--engine {engine}: not an engine tunewright can start (batching or vllm)")
    return ExternalBackend(served, folder, build(folder, served.name, precision, max_len), engine=engine,
                           max_len=max_len, log=log)
