"""Stage 4 on a Ray cluster: Ray Train's TorchTrainer runs the ranks' work of `distributed.run_rank` (the one loop
under DeepSpeed ZeRO) in its workers, on whichever nodes hold the resources asked for.

The task stays where the flow runs: it reaches the cluster (`check_cluster`, before any model is loaded), submits
the workers with the run's spec, follows rank 0's progress file into its own log, and reads rank 0's `result.json`
as the torchrun launcher does. Rank 0 logs to the stage's MLflow run. A worker or a node that dies, or a collective
that waits past `timeout_minutes`, fails the worker group; Ray Train starts it again (`max_failures` times) and the
ranks resume from the newest checkpoint in the shared folder, in the same MLflow run, without logging a step twice.

Every path in the spec must be readable and writable from every node: the run's folder (one machine, or a state
folder every node mounts) or `cluster.storage`, where the inputs are copied and the outputs are written.
"""

from __future__ import annotations

import json
import shutil
import socket
import threading
import time
from pathlib import Path

from tunewright.recipe.environment import ClusterConfig


class ClusterError(RuntimeError):
    """The cluster cannot be reached or cannot hold the workers asked for; names the setting and what was found."""


def _host_port(address: str) -> tuple[str, int]:
    """The host and port an address names; for `auto`, the cluster this machine runs or RAY_ADDRESS names."""
    if address == "auto":
        from ray._private.services import canonicalize_bootstrap_address

        try:
            address = canonicalize_bootstrap_address("auto") or ""
        except ConnectionError:
            raise ClusterError("environment.cluster.address auto: no Ray cluster runs on this machine and RAY_ADDRESS "
                               "is not set. Start one with `tunewright cluster up`, or give the head's HOST:PORT"
                               ) from None
    rest = address.removeprefix("ray://")
    host, _, port = rest.rpartition(":")
    if not host or not port.isdigit():
        raise ClusterError(f"environment.cluster.address {address!r}: expected `auto`, HOST:PORT (the head's GCS "
                           "port, 6379 by default) or ray://HOST:PORT (Ray Client, 10001 by default)")
    return host, int(port)


def connect(cluster: ClusterConfig, timeout: float = 10.0):
    """Join the cluster as a driver (after a quick check that something answers at the address)."""
    import ray

    where = _host_port(cluster.address)
    try:
        socket.create_connection(where, timeout=timeout).close()
    except OSError as exc:
        raise ClusterError(f"environment.cluster.address {cluster.address}: nothing answers at "
                           f"{where[0]}:{where[1]} ({exc}). Start the head with `tunewright cluster up` or "
                           f"`ray start --head --port {where[1]}`, or fix the address") from None
    if ray.is_initialized():
        ray.shutdown()
    try:
        ray.init(address=cluster.address, logging_level="ERROR", log_to_driver=False,
                 runtime_env={"env_vars": {"RAY_USAGE_STATS_ENABLED": "0"}})
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise ClusterError(f"environment.cluster.address {cluster.address}: cannot join the Ray cluster: "
                           f"{str(exc).splitlines()[0]}") from None
    return ray


def check_cluster(cluster: ClusterConfig, log=None) -> dict:
    """Reach the cluster and check it has the CPUs and GPUs the workers reserve: {"cpus", "gpus", "nodes"};
    ClusterError naming what is short. Leaves the driver disconnected."""
    ray = connect(cluster)
    try:
        total = ray.cluster_resources()
        nodes = [n for n in ray.nodes() if n.get("Alive")]
    finally:
        ray.shutdown()
    found = {"cpus": float(total.get("CPU", 0)), "gpus": float(total.get("GPU", 0)), "nodes": len(nodes)}
    for what, per in (("cpus", cluster.cpus_per_worker), ("gpus", cluster.gpus_per_worker)):
        need = cluster.workers * per
        if need > found[what] + 1e-9:
            raise ClusterError(
                f"environment.cluster asks for {cluster.workers} workers x {per:g} {what[:-1].upper()}s = {need:g} "
                f"{what[:-1].upper()}s; the cluster at {cluster.address} has {found[what]:g} across {len(nodes)} "
                f"node(s). Lower cluster.workers or {what}_per_worker, or add nodes")
    if log is not None:
        log.info("Ray cluster at %s: %d node(s), %g CPUs, %g GPUs; %d workers x %g CPUs, %g GPUs each",
                 cluster.address, found["nodes"], found["cpus"], found["gpus"], cluster.workers,
                 cluster.cpus_per_worker, cluster.gpus_per_worker)
    return found


def stage_inputs(spec: dict, storage: Path, run_id: str) -> dict:
    """The spec with its inputs copied into `storage` (the base once per digest) and its outputs written there."""
    shared = storage / "runs" / run_id
    shared.mkdir(parents=True, exist_ok=True)
    base = storage / "bases" / (spec.get("base_digest") or "unknown").replace(":", "-")
    if not (base / ".complete").is_file():
        tmp = base.with_name(base.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(spec["base_dir"], tmp)
        (tmp / ".complete").touch()
        shutil.rmtree(base, ignore_errors=True)
        tmp.rename(base)
    out = dict(spec, base_dir=str(base))
    for key, name in (("train_path", "train.jsonl"), ("deepspeed_config", "deepspeed.json")):
        shutil.copy2(spec[key], shared / name)
        out[key] = str(shared / name)
    if spec.get("adapter_dir"):
        shutil.copytree(spec["adapter_dir"], shared / "initial_adapter", dirs_exist_ok=True)
        out["adapter_dir"] = str(shared / "initial_adapter")
    for key in ("output_dir", "start_dir"):
        if spec.get(key):
            out[key] = str(shared / Path(spec[key]).name)
    for key in ("result_path", "checkpoint_dir", "reference_path", "rollout_dir"):
        out[key] = str(shared / Path(spec[key]).name)
    return out


def _worker(config: dict) -> None:
    """One Ray Train worker: a rank of `distributed.run_rank` in the process group Ray Train set up, recording
    where it runs (`worker-RANK.json` beside the result: rank, node, process)."""
    import os

    import ray
    import ray.train
    import torch

    from tasks.finetune import distributed

    spec = config["spec"]
    rank = ray.train.get_context().get_world_rank()
    Path(spec["result_path"]).with_name(f"worker-{rank}.json").write_text(json.dumps(
        {"rank": rank, "node_id": ray.get_runtime_context().get_node_id(), "pid": os.getpid(),
         "started": time.time()}))
    torch.set_num_threads(max(1, int(config["threads"])))
    distributed.run_rank(spec)


def _follow(path: Path, log, stop: threading.Event) -> None:
    """Forward the lines rank 0 appends to its progress file into the task's log until `stop`."""
    pos = 0
    while True:
        done = stop.is_set()
        if path.is_file():
            with path.open(encoding="utf-8") as fh:
                fh.seek(pos)
                for line in fh:
                    if line.endswith("\n"):
                        log.info("%s", line.rstrip())
                        pos += len(line.encode("utf-8"))
                    else:
                        break
        if done:
            return
        stop.wait(1.0)


def launch(spec: dict, cluster: ClusterConfig, work: Path, run_id: str, log) -> dict:
    """Train on the cluster and return rank 0's result; with `cluster.storage` the outputs are copied back to where
    the spec asked for them. Raises with the cause once Ray Train has given up."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    asked = dict(spec)
    cuda = cluster.gpus_per_worker > 0
    spec = dict(spec, device="cuda" if cuda else "cpu")
    if cluster.storage is not None:
        spec = stage_inputs(spec, Path(cluster.storage).expanduser(), run_id)
    progress = Path(spec["result_path"]).with_name("progress.log")
    progress.parent.mkdir(parents=True, exist_ok=True)
    progress.write_text("", encoding="utf-8")
    for old in progress.parent.glob("worker-*.json"):
        old.unlink()
    spec["progress_path"] = str(progress)
    Path(spec["result_path"]).unlink(missing_ok=True)
    ray = connect(cluster)
    threads = max(1, int(cluster.cpus_per_worker))
    trainer = TorchTrainer(
        _worker, train_loop_config={"spec": spec, "threads": threads},
        scaling_config=ScalingConfig(num_workers=cluster.workers, use_gpu=cuda,
                                     resources_per_worker={"CPU": cluster.cpus_per_worker,
                                                           **({"GPU": cluster.gpus_per_worker} if cuda else {})}),
        torch_config=TorchConfig(backend="nccl" if cuda else "gloo", timeout_s=int(cluster.timeout_minutes * 60)),
        run_config=RunConfig(
            name=f"tunewright-{run_id}", storage_path=str(Path(spec["result_path"]).parent / "ray"),
            failure_config=FailureConfig(max_failures=cluster.max_failures),
            worker_runtime_env={"env_vars": {"OMP_NUM_THREADS": str(threads), "RAY_USAGE_STATS_ENABLED": "0",
                                             "DS_ACCELERATOR": "cuda" if cuda else "cpu",
                                             "TOKENIZERS_PARALLELISM": "false"}}))
    log.info("training on the Ray cluster at %s: %d workers x %g CPUs%s, ZeRO config %s, up to %d restarts from the "
             "last checkpoint", cluster.address, cluster.workers, cluster.cpus_per_worker,
             f", {cluster.gpus_per_worker:g} GPUs" if cuda else "", Path(spec["deepspeed_config"]).name,
             cluster.max_failures)
    stop = threading.Event()
    follower = threading.Thread(target=_follow, args=(progress, log, stop), daemon=True)
    follower.start()
    started = time.monotonic()
    try:
        trainer.fit()
    except Exception as exc:  # Ray Train's TrainingFailedError wraps the workers' own errors
        raise RuntimeError(f"training on the Ray cluster at {cluster.address} failed after "
                           f"{time.monotonic() - started:.0f}s (max_failures {cluster.max_failures}): "
                           f"{str(exc)[-3000:]}") from None
    finally:
        stop.set()
        follower.join(timeout=10)
        ray.shutdown()
    result = json.loads(Path(spec["result_path"]).read_text())
    placed = [json.loads(p.read_text()) for p in Path(spec["result_path"]).parent.glob("worker-*.json")]
    result["nodes"] = len({w["node_id"] for w in placed})
    log.info("trained by %d workers on %d Ray node(s) in %.0fs", len(placed), result["nodes"],
             time.monotonic() - started)
    if cluster.storage is not None:
        for key in ("output_dir", "start_dir"):
            if asked.get(key) and Path(spec[key]).is_dir():
                shutil.copytree(spec[key], asked[key], dirs_exist_ok=True)
        Path(asked["result_path"]).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(spec["result_path"], asked["result_path"])
    return result
