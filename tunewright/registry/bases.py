"""Base weights stored once in MLflow, content-addressed, and referred to by every registered version.

A registered adapter version holds only its adapter; its model config names the base by digest and by
an MLflow artifact URI (`runs:/<run>/base` in the `tunewright-bases` experiment). The first version over
a base uploads it; every later one over the same weights refers to that copy. Loading a version with
MLflow's own API fetches the base once per machine into a cache named by its digest.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

BASES_EXPERIMENT = "tunewright-bases"


def store_base(base_dir: str | Path, digest: str, source: str, state: Path, tracking_uri: str, log) -> str:
    """The artifact URI of these base weights in the tracking store, uploading them only if no copy is there."""
    from tunewright.registry.tracking import experiment_id, store_client

    client = store_client(tracking_uri)
    exp = experiment_id(client, BASES_EXPERIMENT, state, tracking_uri)
    found = client.search_runs([exp], max_results=1, filter_string=(
        f"tags.`tunewright.base_digest` = '{digest}' and attributes.status = 'FINISHED'"))
    if found:
        uri = f"runs:/{found[0].info.run_id}/base"
        log.info("base weights %s are in the registry's store already: %s", digest[:23], uri)
        return uri
    run = client.create_run(exp, run_name=f"{Path(str(source)).name} {digest[7:19]}",
                            tags={"tunewright.base_digest": digest, "tunewright.base_source": str(source)})
    try:
        client.log_artifacts(run.info.run_id, str(base_dir), "base")
    except BaseException:
        client.set_terminated(run.info.run_id, "FAILED")
        raise
    client.set_terminated(run.info.run_id, "FINISHED")
    uri = f"runs:/{run.info.run_id}/base"
    log.info("stored base weights %s once for every version over them: %s", digest[:23], uri)
    return uri


def cache_dir() -> Path:
    return Path(os.environ.get("TUNEWRIGHT_BASE_CACHE") or Path.home() / ".cache" / "tunewright" / "bases")


def fetch_base(uri: str, digest: str) -> Path:
    """A local folder with the base weights at `uri`, downloaded once per digest."""
    import mlflow

    import hashlib

    target = cache_dir() / hashlib.sha256(digest.encode()).hexdigest()[:32]
    if (target / "config.json").is_file():
        return target
    tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        got = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(tmp)))
        if not (got / "config.json").is_file():
            raise FileNotFoundError(f"{uri}: no base model there (no config.json)")
        if target.exists():
            return target
        os.replace(got, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
