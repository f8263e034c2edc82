"""A Ray cluster of two nodes on this machine (`tunewright.platform.cluster`): started on a free port in a Ray
folder of its own, so that it never becomes `auto` for anything else here, listed, losing a node, and leaving
no process behind; and the `tunewright cluster` commands."""

import os
import shutil
import subprocess
import sys
import tempfile
import time

import psutil
import pytest
from typer.testing import CliRunner

from tunewright.cli import app
from tunewright.platform import cluster


ACTOR = """
import os, sys, ray
ray.init(address=sys.argv[1], log_to_driver=False)
@ray.remote(resources={"shard": 1}, num_cpus=0)
class Pid:
    def pid(self):
        return os.getpid()
actor = Pid.options(name="pid", lifetime="detached").remote()
print(ray.get(actor.pid.remote()))
"""


def _left(pids: set[int]) -> set[int]:
    out = set()
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                out.add(pid)
        except psutil.NoSuchProcess:
            pass
    return out


def _cmdline(proc: psutil.Process) -> list[str]:
    try:
        return proc.cmdline()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return []


@pytest.fixture
def ray_dir():
    # short: Ray's Unix sockets live inside it
    path = tempfile.mkdtemp(prefix="twray", dir="/tmp")
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_two_nodes_on_one_machine_one_killed_then_none_left(ray_dir):
    port = cluster.free_port()
    head = cluster.start_head(port, cpus=1, temp_dir=ray_dir)
    started = [head]
    pids: set[int] = set()
    try:
        assert head.address == f"127.0.0.1:{port}" and psutil.Process(head.raylet_pid).name() == "raylet"
        second = cluster.add_node(head.address, cpus=1, resources={"shard": 2}, temp_dir=ray_dir)
        started.append(second)
        assert second.raylet_pid != head.raylet_pid and second.node_manager_port != head.node_manager_port
        cluster.wait_for_nodes(head.address, 2, timeout=30)

        listed = cluster.nodes(head.address)
        alive = [n for n in listed if n["alive"]]
        assert len(alive) == 2 and sum(n["head"] for n in alive) == 1
        assert sorted(n["port"] for n in alive) == sorted([head.node_manager_port, second.node_manager_port])
        assert all(n["resources"]["CPU"] == 1 for n in alive)
        assert next(n for n in alive if n["port"] == second.node_manager_port)["resources"]["shard"] == 2
        out = CliRunner().invoke(app, ["cluster", "status", "--address", head.address])
        assert out.exit_code == 0, out.output
        assert "2 alive node(s)" in out.output and str(second.node_manager_port) in out.output

        # a detached actor on the second node: a worker process that outlives the driver which made it
        driver = subprocess.run([sys.executable, "-c", ACTOR, head.address], capture_output=True, text=True,
                                timeout=60, env=dict(os.environ, RAY_USAGE_STATS_ENABLED="0"))
        assert driver.returncode == 0, driver.stderr[-3000:]
        worker_pid = int(driver.stdout.split()[-1])

        head_procs = {p.pid for p in cluster.node_processes(head)}
        second_procs = {p.pid for p in cluster.node_processes(second)}
        pids = head_procs | second_procs
        assert not head_procs & second_procs and len(head_procs) > len(second_procs) >= 2  # head: + GCS etc.
        assert worker_pid in second_procs and psutil.Process(worker_pid).ppid() == second.raylet_pid

        cluster.kill_node(second)
        assert not psutil.pid_exists(second.raylet_pid) or not _left({second.raylet_pid})
        assert not _left(second_procs) and not _left({worker_pid}) and _left({head.raylet_pid})
        t0 = time.monotonic()
        cluster.wait_for_nodes(head.address, 1, timeout=40)  # the GCS notices the lost node by its health checks
        assert time.monotonic() - t0 < 40
        assert [n["port"] for n in cluster.nodes(head.address) if n["alive"]] == [head.node_manager_port]
    finally:
        for node in reversed(started):
            pids |= {p.pid for p in cluster.node_processes(node)}
            cluster.kill_node(node)
    assert not _left(pids), f"Ray processes of the test still running: {_left(pids)}"
    with pytest.raises(cluster.ClusterError, match="cannot list|did not finish"):
        cluster.nodes(head.address, timeout=8)


def test_a_node_cannot_join_a_cluster_that_is_not_there(ray_dir):
    port = cluster.free_port()
    # `ray start --address` waits for the GCS without end: the timeout names the command, and nothing stays behind
    with pytest.raises(cluster.ClusterError, match=rf"ray start --address 127\.0\.0\.1:{port} .*did not finish"):
        cluster.add_node(f"127.0.0.1:{port}", cpus=1, temp_dir=ray_dir, timeout=8)
    assert not [p for p in psutil.process_iter() if ray_dir in " ".join(_cmdline(p))]
    with pytest.raises(cluster.ClusterError, match="HOST:PORT"):
        cluster.add_node("ray://127.0.0.1:10001")


def test_the_cluster_commands():
    runner = CliRunner()
    out = runner.invoke(app, ["cluster", "--help"])
    assert out.exit_code == 0 and all(c in out.output for c in ("up", "down", "status"))
    out = runner.invoke(app, ["cluster", "up", "--help"])
    assert out.exit_code == 0 and all(o in out.output for o in ("--nodes", "--cpus-per-node", "--gpus-per-node",
                                                                 "--port"))
    out = runner.invoke(app, ["cluster", "up", "--nodes", "0"])
    assert out.exit_code != 0
