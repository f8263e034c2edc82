"""From `tunewright serve`'s arguments to a running server: name and fetch the models, load each into an engine,
follow the registry aliases, and answer over HTTP.

A served model is `NAME=REFERENCE` or a bare reference; a registered `models:/NAME@ALIAS` is followed by the
registry watcher, and with a challenger share (`--challenger-share`, or the registered model's canary setting) a
served alias also loads `NAME@challenger` to answer that share of its traffic, or, in shadow mode, a copy of each
request off the user's path.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from tunewright.registry.adapters import (check_same_base, fetch, is_model_folder, is_remote, read_config,
                                          registered_base, registered_reference, registered_version)
from tunewright.serve.engine import Backend, Engine, ServedModel, load_backend
from tunewright.serve.external import ExternalLoras, LoraView, load_external
from tunewright.serve.shared_base import AdapterView, SharedBases, Unshareable, sharing_refusal
from tunewright.serve.watcher import RegistryWatcher

log = logging.getLogger("tunewright.serve")

ENGINE_KINDS = ("batching", "vllm")


def name_and_reference(spec: str) -> tuple[str | None, str]:
    """`NAME=REFERENCE` or a bare reference (named by default_name)."""
    head, sep, tail = spec.partition("=")
    if sep and head and "/" not in head and ":" not in head:
        return head, tail
    return None, spec


def default_name(ref: str) -> str:
    """What clients call a model given without a name: `NAME@ALIAS` or `NAME/VERSION` for a registered one,
    else its folder's name (a stage 4 `adapter` folder is named by its run)."""
    if ref.startswith("models:/"):
        return ref.removeprefix("models:/").rstrip("/")
    path = Path(ref.rstrip("/"))
    if path.name == "adapter" and path.parent.name == "finetune":  # runs/<run id>/finetune/adapter
        return path.parent.parent.name
    return path.name


def resolve(specs: list[str], base: str | None, cache: Path, log) -> tuple[Path | None, list[ServedModel]]:
    """Fetch the models the command line names and find the one base their adapters share.

    The base is `base` when given; else the base weights logged with the first registered adapter (every
    registered adapter must name the same base digest); else the folder the first adapter was trained over.
    A whole model folder (a merged export) is served as it is.
    """
    served = []
    for spec in specs:
        name, ref = name_and_reference(spec)
        name = name or default_name(ref)
        if not ref.startswith(("s3://", "models:/", "runs:/")) and is_model_folder(ref):
            served.append(ServedModel(name, None, str(Path(ref).expanduser().resolve())))
        else:  # an adapter, or a registered full fine-tune or a run's logged model folder (a merged export)
            served.append(ServedModel(name, fetch(ref, cache, log, what=f"serve {spec}", whole_ok=True)))
    names = [s.name for s in served]
    if len(set(names)) != len(names):
        raise ValueError(f"model names must differ: {names}")
    adapters = [s.source for s in served if s.source is not None and not s.source.whole]
    if not adapters:
        return None, served
    return _shared_base(adapters, base, cache, log), served


def _shared_base(adapters: list, base: str | None, cache: Path, log) -> Path:
    """The base folder every adapter is served over (see `resolve`)."""
    check_same_base([(s.uri, read_config(s.local_dir)) for s in adapters], "serving them together")
    digests = {s.base_digest for s in adapters if s.base_digest}
    if len(digests) > 1:
        listing = ", ".join(f"{s.uri}: {s.base_digest}" for s in adapters if s.base_digest)
        raise ValueError(f"the registered adapters were trained over different bases ({listing})")
    if base is not None:
        base_dir = Path(base).expanduser()
        if not (base_dir / "config.json").is_file():
            raise FileNotFoundError(f"--base {base}: not a Hugging Face model folder (no config.json)")
        return base_dir
    registered = [s for s in adapters if s.registered_model]
    if registered:
        return registered_base(registered[0], cache, log)
    trained_over = Path(str(read_config(adapters[0].local_dir).get("base_model_name_or_path") or ""))
    if not (trained_over / "config.json").is_file():
        raise FileNotFoundError(f"{adapters[0].uri} was trained over {trained_over}, which is not on this machine; "
                                "name the base with --base")
    return trained_over


def with_challengers(specs: list[str], share: float, log, shadow: bool = False
                     ) -> tuple[list[str], dict[str, tuple[str, float]], dict[str, str]]:
    """The specs plus `NAME@challenger` for each served alias that has one, which served name sends what share of
    its traffic to which challenger, and which served name copies every request to its challenger (shadow).

    `share` (`--challenger-share`, with `shadow` for `--shadow`) applies to every served alias; without it, a
    registered model's own canary setting (`tunewright canary NAME`, or a recipe's `deploy.canary`) applies to its
    aliases."""
    from tunewright.registry.canary import canary_setting

    specs, challengers, shadows = list(specs), {}, {}
    if share and not 0 < share <= 1:
        raise ValueError(f"--challenger-share {share}: a share between 0 and 1")
    if shadow and not share:
        share = 1.0
    for spec in list(specs):
        name, ref = name_and_reference(spec)
        reg_name, _, alias = registered_reference(ref) if ref.startswith("models:/") else (None, None, None)
        if not alias or alias == "challenger":
            continue
        setting = {"share": share, "mode": "shadow" if shadow else "canary"} if share else canary_setting(reg_name)
        if not setting:
            continue
        challenger_ref = f"models:/{reg_name}@challenger"
        try:
            registered_version(challenger_ref)
            specs.append(challenger_ref)
        except ValueError:  # routed all the same: the watcher loads a challenger once one is registered
            log.warning("%s has no 'challenger' alias yet: all of %s's traffic goes to %s until it has", reg_name, ref,
                        alias)
        if setting["mode"] == "shadow":
            shadows[name or default_name(ref)] = default_name(challenger_ref)
        else:
            challengers[name or default_name(ref)] = (default_name(challenger_ref), setting["share"])
    return specs, challengers, shadows


def followed_aliases(specs: list[str], served: list[ServedModel]) -> dict[str, str]:
    """Served name -> `models:/NAME@ALIAS` for each model loaded by an alias (what the registry watcher follows)."""
    aliases = {}
    for spec, model in zip(specs, served):
        _, ref = name_and_reference(spec)
        if ref.startswith("models:/") and registered_reference(ref)[2]:
            aliases[model.name] = ref
    return aliases


@dataclass(frozen=True)
class ModelLoader:
    """Loads one served model into the engine this server answers with; the registry watcher loads a moved
    alias's new version with the same one."""

    base_dir: Path | None
    cache: Path
    first_digest: str | None  # the base the first adapter was trained over
    engine_kind: str = "batching"
    precision: str = "fp32"
    quantize: str | None = None
    batching: bool = True
    kv_cache_tokens: int = 16384
    external_command: Callable | None = None
    shared: SharedBases | ExternalLoras | None = None  # the bases adapters share (None: each model on its own)
    log: logging.Logger = log

    def folder(self, model: ServedModel) -> Path | None:
        """The base folder `model`'s adapter is served over (its own folder for a whole model)."""
        source = model.source
        if source is None:
            return Path(model.folder)
        if not source.whole and source.registered_model and source.base_digest and \
                source.base_digest != self.first_digest:
            return registered_base(source, self.cache, self.log)  # a version trained over another base
        return self.base_dir

    def __call__(self, model: ServedModel) -> Backend:
        folder = self.folder(model)
        if self.shared is not None and self.shared.takes(model, folder):
            try:
                return self.shared.attach(model, folder)
            except Unshareable as exc:  # found out once loaded (a layer kind the shared base does not route)
                self.log.info("%s: served with its adapter merged into a base of its own: %s", model.name, exc)
        if self.engine_kind != "batching":
            return load_external(model, folder, self.cache, engine=self.engine_kind, precision=self.precision,
                                 command=self.external_command, log=self.log)
        return load_backend(model, folder, precision=self.precision, quantize=self.quantize, batching=self.batching,
                            kv_cache_tokens=self.kv_cache_tokens, log=self.log)


@dataclass(frozen=True)
class RuntimeAdapters:
    """What `POST /v1/load_lora_adapter` loads while the server runs (`--allow-runtime-adapters`): a local LoRA adapter
    folder, served over this server's base as the registry watcher would load it (into the shared base where there is
    one, else as a backend of its own over `--base`)."""

    load: ModelLoader

    def source(self, path: str):
        """The adapter folder at `path`; ValueError naming `path` when it is not a local PEFT adapter folder."""
        if is_remote(path):
            raise ValueError(f"lora_path {path}: a local adapter folder is loaded at runtime, not a remote reference")
        folder = Path(path).expanduser()
        if not (folder / "adapter_config.json").is_file():
            raise ValueError(f"lora_path {path}: not a PEFT adapter folder (no adapter_config.json)")
        try:
            return fetch(str(folder), self.load.cache, self.load.log, what="lora_path")
        except (ValueError, FileNotFoundError) as exc:
            raise ValueError(f"lora_path {path}: {exc}") from None

    def __call__(self, model: ServedModel) -> Backend:
        """`model` loaded over the served base; ValueError when this server has none."""
        if self.load.folder(model) is None:
            raise ValueError(f"{model.name}: this server serves no adapter, so it has no base to load one over "
                             "(start it with --base)")
        return self.load(model)


def shared_folders(served: list[ServedModel], load: ModelLoader, quantize: str | None, log) -> set[Path]:
    """The base folders two or more served LoRA adapters share: each is loaded once and its adapters batched
    together (a served base joins its adapters). Adapters that cannot share are served on their own, said why."""
    adapters: dict[Path, list[str]] = {}
    for m in served:
        if m.source is None or m.source.whole:
            continue
        refusal = sharing_refusal(m) or ("--quantize 8bit quantises each model's own linear layers" if quantize
                                         else "")
        if refusal:
            log.info("%s: served with its adapter merged into a base of its own: %s", m.name, refusal)
            continue
        adapters.setdefault(Path(load.folder(m)).resolve(), []).append(m.name)
    return {folder for folder, names in adapters.items() if len(names) > 1}


def load_all(served: list[ServedModel], load: ModelLoader) -> dict[str, Backend]:
    """Every served model loaded; when one fails, what started already (engine threads, engine processes) stops
    again."""
    backends: dict[str, Backend] = {}
    try:
        for m in served:
            backends[m.name] = load(m)
    except BaseException:
        for started in backends.values():
            started.stop(wait=0)
        raise
    return backends


def open_engine(specs: list[str], base: str | None, cache: Path, *, serve_base: str | None = None,
                challenger_share: float = 0.0, shadow: bool = False, precision: str = "fp32", quantize: str | None = None,
                batching: bool = True, max_queue: int = 256, cache_size: int = 1024,
                watch_interval: float = 30.0, kv_cache_tokens: int = 16384, engine_kind: str = "batching",
                external_command=None, share_base: bool = True, log=log) -> tuple[Engine, RegistryWatcher]:
    """Resolve, load and wire everything `tunewright serve` answers with: (engine, registry watcher).

    `engine_kind` batching: transformers' continuous batching in this process; vllm: each model served by a vLLM
    process this server starts (`external_command` may build another OpenAI-compatible engine's command line).
    With `share_base`, LoRA adapters over one base are served by one copy of it (`tunewright.serve.shared_base`)."""
    if engine_kind not in ENGINE_KINDS:
        raise ValueError(f"--engine {engine_kind}: {' or '.join(ENGINE_KINDS)}")
    if engine_kind != "batching" and quantize:
        raise ValueError(f"--quantize {quantize} quantises for transformers' engine; with --engine {engine_kind} "
                         "serve the merged weights as they are")
    specs, challengers, shadows = with_challengers(specs, challenger_share, log, shadow=shadow)
    base_dir, served = resolve(specs, base, cache, log)
    aliases = followed_aliases(specs, served)
    for target in {t for t, _share in challengers.values()} | set(shadows.values()):
        aliases.setdefault(target, f"models:/{target}")  # a challenger not registered yet, loaded when it is
    if serve_base:
        if base_dir is None:
            raise ValueError("--serve-base: no adapter is served, so there is no base to serve")
        served.append(ServedModel(serve_base, None, str(base_dir)))
    first_digest = next((m.source.base_digest for m in served
                         if m.source and not m.source.whole and m.source.base_digest), None)
    load = ModelLoader(base_dir, cache, first_digest, engine_kind=engine_kind, precision=precision, quantize=quantize,
                       batching=batching, kv_cache_tokens=kv_cache_tokens, external_command=external_command, log=log)
    folders = shared_folders(served, load, quantize, log) if share_base else set()
    if folders and engine_kind == "batching":
        load = dataclasses.replace(load, shared=SharedBases(folders, precision=precision, batching=batching,
                                                            kv_cache_tokens=kv_cache_tokens, log=log))
    elif folders:  # one engine process per base, each adapter a LoRA module of it
        groups = {f: [m for m in served if m.source and not m.source.whole and not sharing_refusal(m)
                      and Path(load.folder(m)).resolve() == f] for f in folders}
        load = dataclasses.replace(load, shared=ExternalLoras(groups, engine=engine_kind, precision=precision,
                                                              command=external_command, log=log))
    engine = Engine(load_all(served, load), max_queue=max_queue, cache_size=cache_size, challenger=challengers,
                    shadow=shadows)
    return engine, RegistryWatcher(engine, aliases, load, cache, interval=watch_interval)


def describe(engine: Engine, watcher: RegistryWatcher) -> list[str]:
    """What `tunewright serve` says at start-up: each served model, where it came from and how it is answered."""
    lines = []
    for name, backend in engine.backends.items():
        served = backend.served
        where = served.source.resolved if served.source else served.folder
        how = (f"{backend.engine_name} at {backend.url}" if hasattr(backend, "engine_name") else
               "continuous batching" if backend.batching else f"one at a time ({backend.why_not})")
        if isinstance(backend, AdapterView):
            how += f", on the base {backend.base} shared with {len(backend.shared.views) - 1} more"
        elif isinstance(backend, LoraView):
            how += f", a LoRA module over the base {backend.base} beside {len(backend.views) - 1} more"
        elif backend.base:
            how += f", merged into its base {backend.base}"
        share = engine.challenger.get(name)
        share = share if share and share[0] in engine.backends else None
        lines.append(f"  {name}: {where} [{how}]" + (f", {share[1]:.0%} of its traffic to {share[0]}" if share else "")
                     + (f", a shadow copy of each request to {engine.shadow[name]}" if name in engine.shadow else ""))
    if watcher.aliases:
        lines.append(f"following {', '.join(watcher.aliases.values())} (checked every {watcher.interval:g} s)")
    return lines


def run_server(engine: Engine, watcher: RegistryWatcher, *, host: str, port: int, runtime_adapters: bool = False,
               **app_options) -> None:
    """Answer on `host`:`port` until stopped, following the served aliases meanwhile; then stop the watcher and
    every engine. With `runtime_adapters`, clients may load and unload adapters (vLLM's runtime LoRA endpoints).
    `app_options` go to `create_app`."""
    import uvicorn

    from tunewright.serve.app import create_app

    runtime = RuntimeAdapters(watcher.load) if runtime_adapters else None
    watcher.start()
    try:
        uvicorn.run(create_app(engine, runtime_adapters=runtime, **app_options), host=host, port=port,
                    log_level="warning")
    finally:
        watcher.stop()
        engine.stop()
