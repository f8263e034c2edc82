"""A Ray cluster on this machine, for stage 4 on a cluster (`environment.cluster`) and `tunewright cluster`.

`start_head` starts a head node with `ray start --head`, `add_node` joins another node on this machine to it
(Ray runs several nodes on one machine: each gets its own raylet, node manager port and dashboard agent
port, and the head its own Ray Client port), `wait_for_nodes` waits until the cluster counts a number of
alive nodes, `nodes` lists them, and `kill_node` kills one node's processes, the way a machine that fails
takes its node away. `stop` is `ray stop --force`: it ends every Ray process on this machine, whichever
cluster it belongs to; `stop(address)` ends only the processes on this machine of the cluster at that address.

Each `ray start` runs in a session of its own, so every process it leaves behind (the raylet and its agents;
for the head also the GCS server, the autoscaler monitor, the Ray Client server and the log monitor, which
Ray detaches from the raylet) shares the process group of that session: `kill_node` kills that group and the
raylet's descendants (the worker processes), and nothing else. Cluster state is read in a subprocess (the
GCS client, or `ray.init` for `ray://` and `auto` addresses), never with `ray.init` in the calling process.
Ray's usage reporting is off in every process started here (RAY_USAGE_STATS_ENABLED=0).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

START_TIMEOUT = 120.0
_OUTPUT_TAIL = 3000


class ClusterError(RuntimeError):
    """A Ray node could not be started, reached, listed or stopped; the message names the command and its output."""


@dataclass(frozen=True)
class LocalNode:
    """A Ray node running on this machine, started by `start_head` or `add_node`."""

    raylet_pid: int  # the node's raylet process; its worker processes are its descendants
    node_manager_port: int
    address: str  # the cluster address it joined, "127.0.0.1:PORT"


def ray_binary() -> str:
    """The `ray` executable beside this interpreter (the virtual environment's), else the one on PATH."""
    beside = Path(sys.executable).with_name("ray")
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("ray")
    if found is None:
        raise ClusterError(f"no `ray` executable beside {sys.executable} or on PATH: install ray[train]")
    return found


def _env() -> dict[str, str]:
    return dict(os.environ, RAY_USAGE_STATS_ENABLED="0")


def free_port() -> int:
    """A TCP port nothing on this machine listens on now."""
    with socket.socket() as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


def _free_ports(n: int, taken: set[int] = frozenset()) -> list[int]:
    ports: list[int] = []
    while len(ports) < n:
        port = free_port()
        if port not in ports and port not in taken:
            ports.append(port)
    return ports


def _tail(text: str) -> str:
    text = text.strip()
    return text if len(text) <= _OUTPUT_TAIL else "..." + text[-_OUTPUT_TAIL:]


def _resources_arg(resources: dict | None) -> list[str]:
    if not resources:
        return []
    bad = [k for k, v in resources.items() if not isinstance(k, str) or isinstance(v, bool)
           or not isinstance(v, (int, float)) or v < 0]
    if bad:
        raise ClusterError(f"resources: names must be strings and amounts numbers >= 0, not {bad}")
    return ["--resources", json.dumps(resources)]


def _counts(cpus: float, gpus: int) -> list[str]:
    if cpus < 0 or cpus != int(cpus) or gpus < 0 or gpus != int(gpus):
        raise ClusterError(f"a node offers whole CPUs and GPUs (>= 0), not cpus={cpus}, gpus={gpus}")
    return ["--num-cpus", str(int(cpus)), "--num-gpus", str(int(gpus))]


def _ray_start(args: list[str], node_manager_port: int, timeout: float) -> int:
    """Run `ray start ARGS` in a session of its own and return the PID of the raylet it started."""
    cmd = [ray_binary(), "start", *args]
    shown = " ".join(cmd)
    with tempfile.TemporaryFile(mode="w+") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=_env(),
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(proc.pid)
            proc.wait()
            out.seek(0)
            raise ClusterError(f"`{shown}` did not finish within {timeout:.0f} s; output:\n{_tail(out.read())}") \
                from None
        out.seek(0)
        output = out.read()
    if rc != 0:
        _kill_group(proc.pid)
        raise ClusterError(f"`{shown}` failed (exit {rc}); output:\n{_tail(output)}")
    pid = _find_raylet(node_manager_port, group=proc.pid)
    if pid is None:
        _kill_group(proc.pid)
        raise ClusterError(f"`{shown}` reported success but no raylet with --node_manager_port={node_manager_port} "
                           f"is running; output:\n{_tail(output)}")
    return pid


def _is_raylet(proc: psutil.Process) -> bool:
    try:
        cmdline = proc.cmdline()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return False
    return bool(cmdline) and os.path.basename(cmdline[0]) == "raylet"


def _find_raylet(node_manager_port: int, group: int | None = None) -> int | None:
    """The PID of the raylet on this machine listening as node manager on that port (in that process group)."""
    flag = f"--node_manager_port={node_manager_port}"
    for proc in psutil.process_iter(["pid"]):
        if not _is_raylet(proc):
            continue
        try:
            if flag in proc.cmdline() and (group is None or os.getpgid(proc.pid) == group):
                return proc.pid
        except (psutil.NoSuchProcess, psutil.AccessDenied, ProcessLookupError):
            continue
    return None


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def start_head(port: int, cpus: float = 1, gpus: int = 0, resources: dict | None = None,
               temp_dir: str | None = None, *, client_port: int | None = None,
               timeout: float = START_TIMEOUT) -> LocalNode:
    """Start the head node of a new Ray cluster on this machine, its GCS listening on `port`.

    `client_port` is the Ray Client server's port (the `ray://HOST:PORT` address; a free port when not given, so
    that two clusters on one machine do not collide on 10001). `temp_dir` is Ray's root folder for the session
    (sockets, logs, the `ray_current_cluster` file that the address `auto` reads; default /tmp/ray): a cluster
    that must not become `auto` for other programs on this machine gets a folder of its own (keep it short:
    Unix socket paths inside it are limited to about 100 characters).
    """
    node_manager_port, agent_port, *client = _free_ports(3 if client_port is None else 2, taken={port})
    client_port = client_port if client_port is not None else client[0]
    args = ["--head", "--port", str(port), *_counts(cpus, gpus), "--include-dashboard=false",
            "--disable-usage-stats", "--node-manager-port", str(node_manager_port),
            "--dashboard-agent-listen-port", str(agent_port), "--ray-client-server-port", str(client_port),
            *_resources_arg(resources)]
    if temp_dir is not None:
        args += ["--temp-dir", str(temp_dir)]
    pid = _ray_start(args, node_manager_port, timeout)
    return LocalNode(raylet_pid=pid, node_manager_port=node_manager_port, address=f"127.0.0.1:{port}")


def add_node(address: str, cpus: float = 1, gpus: int = 0, resources: dict | None = None,
             *, temp_dir: str | None = None, timeout: float = START_TIMEOUT) -> LocalNode:
    """Start a node on this machine that joins the cluster whose GCS is at `address` ("HOST:PORT").

    `temp_dir` as for `start_head` (give the head's, so that the node's sockets and logs sit beside its own).
    """
    port = _gcs_port(address)
    node_manager_port, agent_port = _free_ports(2, taken={port})
    args = ["--address", address, *_counts(cpus, gpus), "--disable-usage-stats",
            "--node-manager-port", str(node_manager_port), "--dashboard-agent-listen-port", str(agent_port),
            *_resources_arg(resources)]
    if temp_dir is not None:
        args += ["--temp-dir", str(temp_dir)]
    pid = _ray_start(args, node_manager_port, timeout)
    return LocalNode(raylet_pid=pid, node_manager_port=node_manager_port, address=f"127.0.0.1:{port}")


def _gcs_port(address: str) -> int:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or "://" in address:
        raise ClusterError(f"{address!r}: a node joins a cluster by its GCS address HOST:PORT (e.g. 127.0.0.1:6379)")
    return int(port)


def _arg(cmdline: list[str], name: str) -> str | None:
    for part in cmdline:
        if part.startswith(name + "="):
            return part.split("=", 1)[1]
    return None


def node_processes(node: LocalNode) -> list[psutil.Process]:
    """The processes of that node now running: its raylet, the raylet's descendants, and the processes `ray start`
    left in the raylet's process group that name its session or node (for the head: GCS, monitors, Ray Client),
    with their descendants. A raylet in the caller's own process group is taken with its descendants only."""
    try:
        raylet = psutil.Process(node.raylet_pid)
        cmdline = raylet.cmdline()
        pgid = os.getpgid(node.raylet_pid)
    except (psutil.NoSuchProcess, psutil.ZombieProcess, ProcessLookupError):
        return []
    if not _is_raylet(raylet) or _arg(cmdline, "--node_manager_port") != str(node.node_manager_port):
        return []  # the node is gone and its PID belongs to another process now
    found = {raylet.pid: raylet}
    found.update((p.pid, p) for p in raylet.children(recursive=True))
    if pgid in (os.getpgrp(), 0, 1):
        return list(found.values())
    group = []
    for proc in psutil.process_iter(["pid"]):
        try:
            if proc.pid not in found and os.getpgid(proc.pid) == pgid:
                group.append((proc, " ".join(proc.cmdline())))
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess, ProcessLookupError):
            continue
    # a group of one node (`ray start` in a session of its own, as here): what names its session is the node's;
    # a group holding several raylets (nodes started from one shell): only what names this node's ID
    marks = [_arg(cmdline, "--node_id")]
    if not any(_is_raylet(proc) for proc, _ in group):
        marks.append(_arg(cmdline, "--session_dir"))
    marks = [m for m in marks if m]
    for proc, text in group:
        if marks and any(m in text for m in marks):
            found[proc.pid] = proc
            for child in _children(proc):
                found[child.pid] = child
    return list(found.values())


def _children(proc: psutil.Process) -> list[psutil.Process]:
    try:
        return proc.children(recursive=True)
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return []


def _gone(proc: psutil.Process) -> bool:
    try:
        return not proc.is_running() or proc.status() == psutil.STATUS_ZOMBIE
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return True


def _kill_all(procs: list[psutil.Process], what: str, timeout: float) -> None:
    for proc in procs:
        try:
            proc.kill()
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            pass
        except psutil.AccessDenied as exc:
            raise ClusterError(f"{what}: not allowed to kill process {proc.pid}") from exc
    deadline = time.monotonic() + timeout
    while True:
        left = [p for p in procs if not _gone(p)]
        if not left:
            return
        if time.monotonic() > deadline:
            raise ClusterError(f"{what}: processes {[p.pid for p in left]} still running {timeout:.0f} s after SIGKILL")
        time.sleep(0.1)


def kill_node(node: LocalNode, timeout: float = 30) -> None:
    """SIGKILL the node's raylet and every process of the node (`node_processes`), and wait until they are gone.

    A node killed this way is what a failed machine looks like to the cluster: the GCS marks it dead once its
    health checks fail (about 15 s); killing the head ends the cluster."""
    # the raylet is listed, and so killed, first: it starts no worker after the listing
    _kill_all(node_processes(node), f"kill node (raylet {node.raylet_pid})", timeout)


def stop(address: str | None = None, timeout: float = 60) -> None:
    """Stop Ray on this machine.

    Without an address: `ray stop --force`, which SIGKILLs EVERY Ray process on this machine, of any cluster and
    any user's driver started with `ray.init()` here, not only the nodes `tunewright cluster up` started. With an
    address ("HOST:PORT"): only this machine's nodes of the cluster whose GCS listens on that port (their
    raylets, found by the GCS address on their command line, and their processes, see `node_processes`).
    """
    if address is None:
        cmd = [ray_binary(), "stop", "--force"]
        try:
            out = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            raise ClusterError(f"`{' '.join(cmd)}` did not finish within {timeout:.0f} s") from exc
        if out.returncode != 0:
            raise ClusterError(f"`{' '.join(cmd)}` failed (exit {out.returncode}); output:\n"
                               f"{_tail(out.stdout + out.stderr)}")
        return
    port = _gcs_port(address)
    raylets = []
    for proc in psutil.process_iter(["pid"]):
        if not _is_raylet(proc):
            continue
        try:
            cmdline = proc.cmdline()
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
        gcs = _arg(cmdline, "--gcs-address") or ""
        nm = _arg(cmdline, "--node_manager_port")
        if gcs.rpartition(":")[2] == str(port) and nm and nm.isdigit():
            raylets.append(LocalNode(raylet_pid=proc.pid, node_manager_port=int(nm), address=f"127.0.0.1:{port}"))
    # the head last: the other nodes then do not spend their last moments on a GCS that is gone
    raylets.sort(key=lambda n: _is_head(n))
    for node in raylets:
        kill_node(node, timeout=timeout)


def _is_head(node: LocalNode) -> bool:
    return any(os.path.basename((_cmd(p) or [""])[0]) == "gcs_server" for p in node_processes(node))


def _cmd(proc: psutil.Process) -> list[str] | None:
    try:
        return proc.cmdline()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return None


# Run in a subprocess: prints the cluster's nodes as one JSON list. A GCS address is read with the GCS client
# (under a second, starts nothing); `auto` and `ray://` need a driver, so they use ray.init and ray.nodes().
_NODES_SCRIPT = r"""
import json, sys
address = sys.argv[1]
nodes = []
if address == "auto" or address.startswith("ray://"):
    import logging
    import ray
    ray.init(address=address, logging_level=logging.ERROR, log_to_driver=False)
    for n in ray.nodes():
        nodes.append({"node_id": n["NodeID"], "ip": n["NodeManagerAddress"], "port": n["NodeManagerPort"],
                      "alive": bool(n["Alive"]), "head": "node:__internal_head__" in n.get("Resources", {}),
                      "resources": n.get("Resources", {})})
    ray.shutdown()
else:
    from ray._raylet import GcsClient
    from ray.core.generated import gcs_pb2
    client = GcsClient(address=address)
    for info in client.get_all_node_info(timeout=float(sys.argv[2])).values():
        nodes.append({"node_id": info.node_id.hex(), "ip": info.node_manager_address, "port": info.node_manager_port,
                      "alive": info.state == gcs_pb2.GcsNodeInfo.ALIVE, "head": bool(info.is_head_node),
                      "resources": dict(info.resources_total)})
print(json.dumps(nodes))
"""


def nodes(address: str, timeout: float = 30) -> list[dict]:
    """The nodes the cluster at `address` knows (alive and dead), each {node_id, ip, port, alive, head, resources}.

    `address` is a GCS address HOST:PORT, `auto` (the cluster last started on this machine) or ray://HOST:PORT."""
    cmd = [sys.executable, "-c", _NODES_SCRIPT, address, str(max(1.0, timeout - 5))]
    try:
        out = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=timeout,
                             stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as exc:
        raise ClusterError(f"listing the nodes of the Ray cluster at {address} did not finish within "
                           f"{timeout:.0f} s; is a cluster running there?") from exc
    lines = out.stdout.strip().splitlines()
    if out.returncode != 0 or not lines:
        raise ClusterError(f"cannot list the nodes of the Ray cluster at {address} (exit {out.returncode}):\n"
                           f"{_tail(out.stderr + out.stdout)}")
    try:
        return json.loads(lines[-1])
    except json.JSONDecodeError as exc:
        raise ClusterError(f"listing the nodes of the Ray cluster at {address} printed no node list:\n"
                           f"{_tail(out.stdout + out.stderr)}") from exc


def wait_for_nodes(address: str, n: int, timeout: float = 60) -> None:
    """Wait until the cluster at `address` counts exactly `n` alive nodes (nodes joining, or a dead node noticed)."""
    deadline = time.monotonic() + timeout
    seen: str = "no answer"
    while True:
        left = deadline - time.monotonic()
        try:
            alive = [x for x in nodes(address, timeout=max(5.0, min(30.0, left))) if x["alive"]]
            if len(alive) == n:
                return
            seen = f"{len(alive)} alive"
        except ClusterError as exc:
            seen = str(exc)
        if time.monotonic() > deadline:
            raise ClusterError(f"the Ray cluster at {address} did not reach {n} alive node(s) within {timeout:.0f} s; "
                               f"last: {seen}")
        time.sleep(1.0)
