"""Adapters by reference: fetch one from a folder, S3 or the MLflow registry, check that several fit together,
and describe where each came from (the lineage a registered version carries in its tags).

A reference is a local adapter folder (what stage 4 writes: `adapter_config.json` and weights), an
`s3://bucket/prefix` holding one, or a registered model version, `models:/NAME/VERSION` or
`models:/NAME@ALIAS`. A registered version is the pyfunc stage 6 logs; only its adapter is downloaded,
never the base weights beside it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from tunewright.files import hash_file_into, sha256_file
from tunewright.recipe.model import registered_reference
from tunewright.recipe.names import SAME_RANK


def is_remote(ref: str) -> bool:
    """Whether a reference names S3, the MLflow registry or a run's artifacts (fetched at run time) rather than a
    local folder."""
    return ref.startswith(("s3://", "models:/", "runs:/"))


@dataclass(frozen=True)
class AdapterSource:
    """One fetched adapter and what is known of where it came from."""

    uri: str                            # as the recipe or command line wrote it
    resolved: str                       # what it pointed at when fetched: an alias becomes models:/NAME/VERSION
    local_dir: str                      # the folder holding adapter_config.json and the weights
    sha256: str                         # digest of the adapter weights file
    registered_model: str | None = None
    version: str | None = None
    run_id: str | None = None           # the MLflow run that logged the registered model (its stage 6 run)
    parent_run_id: str | None = None    # the pipeline run that trained it
    base_digest: str | None = None
    dataset_digest: str | None = None
    recipe_digest: str | None = None
    system_prompt: str | None = None    # the training system prompt a registered model answers with
    whole: bool = False                 # local_dir holds a whole model (a full fine-tune), not an adapter

    def record(self) -> dict:
        """The lineage record (no local paths of this machine beyond the reference itself)."""
        out = {k: v for k, v in asdict(self).items() if v is not None and k not in ("local_dir", "system_prompt")}
        if not self.whole:
            config = read_config(self.local_dir)
            out.update(r=config.get("r"), lora_alpha=config.get("lora_alpha"),
                       use_rslora=config.get("use_rslora", False))
        return out


def read_config(folder: str | Path) -> dict:
    """The adapter_config.json of a folder; a clear error when the folder holds no PEFT adapter."""
    path = Path(folder) / "adapter_config.json"
    if not path.is_file():
        raise ValueError(f"{folder}: no adapter_config.json (not a PEFT adapter folder)")
    return json.loads(path.read_text(encoding="utf-8"))


def weights_file(folder: str | Path) -> Path:
    for name in ("adapter_model.safetensors", "adapter_model.bin"):
        if (Path(folder) / name).is_file():
            return Path(folder) / name
    raise ValueError(f"{folder}: no adapter_model.safetensors (the adapter's weights are missing)")


def weights_digest(folder: str | Path) -> str:
    """SHA-256 of an adapter's weights file: names the exact weights a version was built from."""
    return sha256_file(weights_file(folder))


def model_weights_digest(folder: str | Path) -> str:
    """SHA-256 over a whole model folder's weight files (each name and content, in name order)."""
    files = sorted(p for p in Path(folder).iterdir() if p.suffix in (".safetensors", ".bin") and p.is_file())
    if not files:
        raise ValueError(f"{folder}: no model weights (*.safetensors)")
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode() + b"\0")
        hash_file_into(h, f)
    return h.hexdigest()


def is_model_folder(folder: str | Path) -> bool:
    """A whole model folder (a full fine-tune, a merged export, a base) rather than an adapter."""
    path = Path(folder).expanduser()
    return (path / "config.json").is_file() and not (path / "adapter_config.json").is_file()


def base_name(config: dict) -> str:
    """The folder name of the base an adapter was trained over (stage 2 names cached bases by their digest)."""
    return Path(str(config.get("base_model_name_or_path") or "")).name


def check_same_base(configs: list[tuple[str, dict]], purpose: str) -> None:
    """Raise ValueError unless every adapter names the same base (by the folder name stage 2 gives a base)."""
    if len({base_name(cfg) for _, cfg in configs}) > 1:
        listing = ", ".join(f"{ref}: {base_name(cfg) or '?'}" for ref, cfg in configs)
        raise ValueError(f"the adapters were trained over different bases ({listing}); {purpose} needs one base")


def check_mergeable(configs: list[tuple[str, dict]], combination: str) -> None:
    """Raise ValueError unless PEFT's weighted merging can combine these adapters with `combination`.

    `configs` pairs each adapter's reference with its adapter_config.json.
    """
    for ref, cfg in configs:
        if cfg.get("peft_type") != "LORA":
            raise ValueError(f"{ref} is a {cfg.get('peft_type')} adapter; only LoRA adapters can be merged")
        if cfg.get("use_dora"):
            raise ValueError(f"{ref} is a DoRA adapter; weighted merging combines LoRA's A and B matrices and would "
                             "drop DoRA's magnitude vectors")
        if cfg.get("target_parameters"):
            raise ValueError(f"{ref} adapts parameters (target_parameters); PEFT cannot merge those")
    check_same_base(configs, "merging")
    if combination in SAME_RANK:
        ranks = {cfg.get("r") for _, cfg in configs}
        if len(ranks) > 1 or any(cfg.get("rank_pattern") for _, cfg in configs):
            listing = ", ".join(f"{ref}: r={cfg.get('r')}" for ref, cfg in configs)
            raise ValueError(f"combination '{combination}' needs adapters of one rank ({listing}); use cat (rank = "
                             "sum of ranks) or svd (rank = svd_rank)")


def fetch(ref: str, cache: Path, log, what: str = "adapter", whole_ok: bool = False) -> AdapterSource:
    """Bring an adapter reference onto this machine (cached) and say where it came from. With `whole_ok`, a
    registered full fine-tune is fetched too (`whole` set), for what can use a whole model (serving, comparing)."""
    if ref.startswith("models:/"):
        return _fetch_registered(ref, cache, log, what, whole_ok)
    if ref.startswith("runs:/"):
        return _fetch_run_artifact(ref, cache, log, what, whole_ok)
    if ref.startswith("s3://"):
        from tunewright.storage import fetch_s3

        local = fetch_s3(ref.rstrip("/"), cache, log, what=what)
        read_config(local)
        return AdapterSource(uri=ref, resolved=f"{ref}@{local.name.removeprefix('s3-')}", local_dir=str(local),
                             sha256=weights_digest(local))
    folder = Path(ref).expanduser().resolve()
    if not folder.is_dir():
        raise FileNotFoundError(f"{what}: adapter folder not found: {ref}")
    read_config(folder)
    return AdapterSource(uri=ref, resolved=str(folder), local_dir=str(folder), sha256=weights_digest(folder))


def registered_version(ref: str):
    """The model version a `models:/NAME/VERSION` or `models:/NAME@ALIAS` reference points at now."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    name, version, alias = registered_reference(ref)
    client = MlflowClient()
    try:
        if alias:
            return client.get_model_version_by_alias(name, alias)
        return client.get_model_version(name, version)
    except MlflowException as exc:
        raise ValueError(f"{ref}: not in the model registry at {client.tracking_uri} ({exc.message})") from None


def _fetch_registered(ref: str, cache: Path, log, what: str, whole_ok: bool = False) -> AdapterSource:
    import mlflow
    import yaml

    mv = registered_version(ref)
    resolved = f"models:/{mv.name}/{mv.version}"
    key = hashlib.sha256(f"{mlflow.get_tracking_uri()}|{resolved}|{mv.creation_timestamp}".encode()).hexdigest()[:16]
    target = cache / f"registry-{key}"
    if not (target / "MLmodel").is_file():
        tmp = target.with_name(target.name + f".tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        mlflow.artifacts.download_artifacts(artifact_uri=f"{resolved}/MLmodel", dst_path=str(tmp))
        flavor = yaml.safe_load((tmp / "MLmodel").read_text())["flavors"].get("python_function", {})
        artifacts = flavor.get("artifacts") or {}
        # the adapter only: the base weights beside it are not needed to merge or to serve over a known base;
        # a full fine-tune's whole model folder
        kind = "adapter" if "adapter" in artifacts else "model" if "model" in artifacts and whole_ok else None
        if kind is None:
            shutil.rmtree(tmp)
            held = "a whole fine-tuned model" if "model" in artifacts else "no tunewright adapter"
            raise ValueError(f"{what}: {ref} ({resolved}) holds {held}; only adapter versions can be used here")
        mlflow.artifacts.download_artifacts(artifact_uri=f"{resolved}/{artifacts[kind]['path']}", dst_path=str(tmp))
        os.replace(tmp / artifacts[kind]["path"], tmp / kind)
        if target.exists():
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, target)
        log.info("downloaded the %s of %s%s", "adapter" if kind == "adapter" else "fine-tuned model", resolved,
                 f" ({ref})" if ref != resolved else "")
    flavor = yaml.safe_load((target / "MLmodel").read_text())["flavors"]["python_function"]
    whole = not (target / "adapter").is_dir()
    if whole and not whole_ok:
        raise ValueError(f"{what}: {ref} ({resolved}) holds a whole fine-tuned model; only adapter versions can be "
                         "used here")
    local = target / ("model" if whole else "adapter")
    if not whole:
        read_config(local)
    tags = mv.tags or {}
    return AdapterSource(
        uri=ref, resolved=resolved, local_dir=str(local),
        sha256=model_weights_digest(local) if whole else weights_digest(local), registered_model=mv.name,
        version=str(mv.version), run_id=mv.run_id, parent_run_id=tags.get("tunewright.parent_run_id"),
        base_digest=tags.get("tunewright.base_digest"), dataset_digest=tags.get("tunewright.dataset_digest"),
        recipe_digest=tags.get("tunewright.recipe_digest"),
        system_prompt=(flavor.get("config") or {}).get("system_prompt"), whole=whole)


def _fetch_run_artifact(ref: str, cache: Path, log, what: str, whole_ok: bool) -> AdapterSource:
    """`runs:/RUN_ID/PATH`: a folder a run logged (an adapter, or with `whole_ok` a whole model such as the merged
    export stage 6 logs beside a version), downloaded once."""
    import mlflow

    run_id, _, path = ref.removeprefix("runs:/").strip("/").partition("/")
    if not run_id or not path:
        raise ValueError(f"{what}: {ref}: expected runs:/RUN_ID/PATH")
    key = hashlib.sha256(f"{mlflow.get_tracking_uri()}|{run_id}|{path}".encode()).hexdigest()[:16]
    target = cache / f"run-{key}"
    if not target.is_dir():
        tmp = target.with_name(target.name + f".tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=ref, dst_path=str(tmp)))
        except Exception as exc:  # noqa: BLE001  MLflow says what is missing
            shutil.rmtree(tmp, ignore_errors=True)
            raise ValueError(f"{what}: {ref}: could not be downloaded ({exc})") from None
        if not target.exists():
            os.replace(local, target)
        shutil.rmtree(tmp, ignore_errors=True)
        log.info("downloaded %s", ref)
    whole = is_model_folder(target)
    if whole and not whole_ok:
        raise ValueError(f"{what}: {ref} holds a whole model; only adapters can be used here")
    if not whole:
        read_config(target)
    return AdapterSource(uri=ref, resolved=ref, local_dir=str(target), run_id=run_id, whole=whole,
                         sha256=model_weights_digest(target) if whole else weights_digest(target),
                         system_prompt=_run_system_prompt(run_id, target.with_suffix(".json")))


def _run_system_prompt(run_id: str, remembered: Path) -> str | None:
    """The training system prompt of the model a run logged (stage 6's `model`, beside its exports), so that a
    run's export answers as its registered version does; None when the run logged no such model."""
    import mlflow
    import yaml

    if remembered.is_file():
        return json.loads(remembered.read_text(encoding="utf-8")).get("system_prompt")
    prompt = None
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = mlflow.artifacts.download_artifacts(artifact_uri=f"runs:/{run_id}/model/MLmodel", dst_path=tmp)
            flavor = yaml.safe_load(Path(path).read_text())["flavors"].get("python_function", {})
            prompt = (flavor.get("config") or {}).get("system_prompt")
        except Exception:  # noqa: BLE001  no logged model in that run: no system prompt
            prompt = None
    remembered.write_text(json.dumps({"system_prompt": prompt}), encoding="utf-8")
    return prompt


def registered_base(source: AdapterSource, cache: Path, log) -> Path:
    """The base weights logged beside a registered adapter (downloaded once per version)."""
    import mlflow
    import yaml

    target = Path(source.local_dir).parent
    base = target / "base_model"
    flavor = yaml.safe_load((target / "MLmodel").read_text())["flavors"]["python_function"]
    config = flavor.get("config") or {}
    if "base_model" not in (flavor.get("artifacts") or {}) and config.get("base_uri"):
        from tunewright.registry.bases import fetch_base  # stored once, by digest, beside the registry

        return fetch_base(config["base_uri"], config["base_digest"])
    if not (base / "config.json").is_file():
        path = flavor["artifacts"]["base_model"]["path"]
        tmp = target / f"base.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        mlflow.artifacts.download_artifacts(artifact_uri=f"{source.resolved}/{path}", dst_path=str(tmp))
        os.replace(tmp / path, base)
        shutil.rmtree(tmp, ignore_errors=True)
        log.info("downloaded the base weights of %s", source.resolved)
    return base


def lineage_tags(lineage: dict, recipe_digest: str, adapter_dir: str | None, trained_steps: int = 0) -> dict[str, str]:
    """Registry tags naming what a version was built from: its own weights and recipe, and for a merge, the
    adapters it combined, how, and with which weights."""
    tags = {"tunewright.recipe_digest": recipe_digest}
    if adapter_dir and (Path(adapter_dir) / "adapter_config.json").is_file():
        tags["tunewright.adapter_sha256"] = weights_digest(adapter_dir)
    if lineage.get("kind") != "merge":
        tags["tunewright.origin"] = "trained"
        return tags
    tags["tunewright.origin"] = "merged" + (f", then trained {trained_steps} steps" if trained_steps else "")
    tags["tunewright.merge.combination"] = lineage["combination"]
    tags["tunewright.merge.weights"] = json.dumps(lineage["weights"])
    for key in ("density", "majority_sign_method", "svd_rank", "seed"):
        if lineage.get(key) is not None:
            tags[f"tunewright.merge.{key}"] = str(lineage[key])
    sources = lineage["sources"]
    tags["tunewright.merge.sources"] = json.dumps([s["resolved"] for s in sources])[:4900]
    versions = [f"{s['registered_model']}/{s['version']}" for s in sources if s.get("version")]
    if versions:
        tags["tunewright.merge.source_versions"] = ",".join(versions)[:4900]
    runs = [s.get("parent_run_id") or s.get("run_id") for s in sources]
    if any(runs):
        tags["tunewright.merge.source_runs"] = ",".join(r or "-" for r in runs)
    for i, s in enumerate(sources):
        tags[f"tunewright.merge.source.{i}"] = json.dumps(
            {k: s[k] for k in ("uri", "resolved", "version", "run_id", "parent_run_id", "dataset_digest", "sha256", "r")
             if s.get(k) is not None})[:4900]
    return tags
