"""Stage 4 on a real two-node Ray cluster on this machine (a head and a second node, one CPU each, joined with
`ray start --address`): DeepSpeed ZeRO-2 and ZeRO-3 across the nodes match one process, a killed node is replaced
and the run resumes from its checkpoint to the uninterrupted run's loss, and bad settings fail before any model."""

from __future__ import annotations

import json
import shutil
import tempfile
import threading
import time
from pathlib import Path

import psutil
import pytest
from mlflow import MlflowClient

from tasks.data import prepare_data
from tasks.environment import setup_environment
from tasks.finetune import fine_tune
from tasks.finetune.ray_cluster import ClusterError, check_cluster
from tasks.model import initialise_model
from tunewright.platform import cluster as local
from tunewright.recipe.environment import ClusterConfig


@pytest.fixture()
def two_nodes():
    """A head and one more node, one CPU each, in a Ray folder of their own (never `auto` for anything else);
    every process of both is gone afterwards."""
    ray_dir = tempfile.mkdtemp(prefix="twray", dir="/tmp")  # short: Ray's Unix sockets live inside it
    head = local.start_head(local.free_port(), cpus=1, temp_dir=ray_dir)
    nodes = {"head": head, "dir": ray_dir}
    started: list = [head]
    pids: set[int] = set()
    try:
        nodes["second"] = local.add_node(head.address, cpus=1, temp_dir=ray_dir)
        started.append(nodes["second"])
        local.wait_for_nodes(head.address, 2)
        nodes["started"] = started
        yield nodes
    finally:
        for node in reversed(started):
            pids |= {p.pid for p in local.node_processes(node)}
            local.kill_node(node)
        shutil.rmtree(ray_dir, ignore_errors=True)
        left = [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
        assert not left, f"Ray processes of the test left running: {left}"


def _stages(run_ctx, cluster: ClusterConfig | None, stage: int, **train):
    recipe, ctx = run_ctx
    env_cfg = recipe.environment.model_copy(update={"cluster": cluster, "deepspeed_stage": stage,
                                                    "precision": "fp32"})
    train_cfg = recipe.train.model_copy(update={"max_steps": 6, "batch_size": 4 if cluster else 8,
                                                "learning_rate": 5e-3, **train})
    data = prepare_data.fn(recipe.data, ctx)
    model = initialise_model.fn(recipe.model, recipe.environment.seed, ctx)
    env = setup_environment.fn(env_cfg, train_cfg, recipe.model, model, ctx)
    return train_cfg, data, model, env


def _train(run_ctx, cluster: ClusterConfig | None, stage: int = 0, **train):
    recipe, ctx = run_ctx
    train_cfg, data, model, env = _stages(run_ctx, cluster, stage, **train)
    return fine_tune.fn(train_cfg, recipe.model, data, model, env, ctx)


def _summary(trained) -> dict:
    return json.loads((Path(trained.output_dir) / "training_summary.json").read_text())


def zero2_and_zero3_across_two_ray_nodes_match_one_process(run_ctx, two_nodes):
    cluster = ClusterConfig(address=two_nodes["head"].address, workers=2, cpus_per_worker=1, max_failures=0)
    one = _train(run_ctx, None)
    for stage in (2, 3):
        two = _train(run_ctx, cluster, stage)
        summary = _summary(two)
        assert summary["world_size"] == 2 and summary["nodes"] == 2, summary  # one worker on each node
        # 2 x 4 rows per step against 8 in one process: the same examples, summed in another order (fp32)
        assert abs(two.final_loss - one.final_loss) < 0.02 * max(1.0, one.final_loss), (stage, one.final_loss,
                                                                                        two.final_loss)


def a_killed_node_is_replaced_and_the_run_resumes_to_the_loss_of_an_uninterrupted_run(run_ctx, two_nodes):
    recipe, ctx = run_ctx
    cluster = ClusterConfig(address=two_nodes["head"].address, workers=2, cpus_per_worker=1, max_failures=2,
                            timeout_minutes=1)
    train = {"max_steps": 8, "checkpoint_every": 2, "keep_checkpoints": 4}
    work = Path(ctx.work_dir, "finetune", "distributed")
    baseline = _train(run_ctx, cluster, 2, **train)
    shutil.rmtree(work / "checkpoints")

    train_cfg, data, model, env = _stages(run_ctx, cluster, 2, **train)
    out: dict = {}
    runner = threading.Thread(target=lambda: out.update(trained=fine_tune.fn(train_cfg, recipe.model, data, model,
                                                                              env, ctx)))
    runner.start()
    deadline = time.monotonic() + 300
    while not (work / "checkpoints" / "step-000004").is_dir():
        assert runner.is_alive() and time.monotonic() < deadline, "no checkpoint at step 4"
        time.sleep(0.2)
    victim = two_nodes["second"]
    workers = [json.loads(p.read_text()) for p in work.glob("worker-*.json")]
    on_victim = [w["pid"] for w in workers if w["pid"] in {p.pid for p in local.node_processes(victim)}]
    assert on_victim, workers  # a rank runs on the second node
    local.kill_node(victim)  # SIGKILL: its raylet and every process it started, the rank among them
    assert not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in on_victim)
    replacement = local.add_node(two_nodes["head"].address, cpus=1, temp_dir=two_nodes["dir"])
    two_nodes["started"].append(replacement)
    two_nodes["second"] = replacement
    runner.join(timeout=600)
    assert not runner.is_alive() and "trained" in out
    resumed = out["trained"]
    assert resumed.resumed_from in (4, 6)
    assert abs(resumed.final_loss - baseline.final_loss) < 1e-3 * max(1.0, baseline.final_loss), (
        baseline.final_loss, resumed.final_loss)
    # one MLflow run for the interrupted training, each step logged once
    client = MlflowClient(ctx.tracking_uri)
    runs = client.search_runs([ctx.experiment_id], filter_string="tags.`tunewright.stage` = '4-fine-tune'",
                              order_by=["attributes.start_time DESC"])
    history = client.get_metric_history(runs[0].info.run_id, "train_loss")
    assert sorted(m.step for m in history) == list(range(1, 9))


def an_unreachable_address_or_more_than_the_cluster_has_fails_before_any_model(run_ctx, two_nodes):
    with pytest.raises(ClusterError, match=r"nothing answers at 127\.0\.0\.1:\d+"):
        check_cluster(ClusterConfig(address=f"127.0.0.1:{local.free_port()}", workers=2))
    with pytest.raises(ClusterError, match=r"2 workers x 1 GPUs = 2 GPUs; the cluster at .* has 0"):
        check_cluster(ClusterConfig(address=two_nodes["head"].address, workers=2, gpus_per_worker=1))
    with pytest.raises(ClusterError, match=r"3 workers x 1 CPUs = 3 CPUs; the cluster at .* has 2 across 2 node"):
        check_cluster(ClusterConfig(address=two_nodes["head"].address, workers=3))

    # the flow refuses before stage 1: no MLflow run, no model folder
    from flows.finetune import finetune

    recipe, ctx = run_ctx
    bad = recipe.model_copy(update={"environment": recipe.environment.model_copy(update={"cluster": ClusterConfig(
        address=two_nodes["head"].address, workers=4)})})
    before = len(MlflowClient(ctx.tracking_uri).search_runs([ctx.experiment_id]))
    with pytest.raises(ClusterError, match="4 workers"):
        finetune.fn(recipe=bad)
    assert len(MlflowClient(ctx.tracking_uri).search_runs([ctx.experiment_id])) == before


def every_alignment_objective_trains_across_the_nodes(aligned, two_nodes):
    """Each objective the torchrun ranks run (after a supervised step where it has them), a few steps under ZeRO-2."""
    cluster = ClusterConfig(address=two_nodes["head"].address, workers=2, cpus_per_worker=1, max_failures=0)
    for objective in ("dpo", "orpo", "kto", "reward", "grpo", "ppo"):
        extra = ({"num_generations": 2, "max_new_tokens": 6, "reward": "json_valid", "beta": 0.1}
                 if objective in ("grpo", "ppo") else {})
        recipe, ctx, data, model, _ = aligned(objective=objective, sft_steps=0 if objective == "reward" else 1,
                                              max_steps=3, **extra)
        env_cfg = recipe.environment.model_copy(update={"cluster": cluster, "deepspeed_stage": 2})
        env = setup_environment.fn(env_cfg, recipe.train, recipe.model, model, ctx)
        trained = fine_tune.fn(recipe.train, recipe.model, data, model, env, ctx)
        assert trained.objective == objective and trained.final_loss == trained.final_loss, objective  # not NaN
        assert _summary(trained)["nodes"] == 2, objective
        client = MlflowClient(ctx.tracking_uri)
        run = client.search_runs([ctx.experiment_id], filter_string="tags.`tunewright.stage` = '4-fine-tune'",
                                 order_by=["attributes.start_time DESC"])[0]
        assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "train_loss")) == [1, 2, 3]


@pytest.mark.slow
def test_stage_4_on_a_two_node_ray_cluster(run_ctx, aligned, two_nodes):
    """One cluster for every check (each a function above): bad settings fail first; ZeRO-2 and ZeRO-3 across the
    nodes match one process; a node killed mid-training is replaced and the run resumes; every alignment objective
    trains there."""
    an_unreachable_address_or_more_than_the_cluster_has_fails_before_any_model(run_ctx, two_nodes)
    zero2_and_zero3_across_two_ray_nodes_match_one_process(run_ctx, two_nodes)
    a_killed_node_is_replaced_and_the_run_resumes_to_the_loss_of_an_uninterrupted_run(run_ctx, two_nodes)
    every_alignment_objective_trains_across_the_nodes(aligned, two_nodes)


def test_a_storage_folder_gets_the_inputs_once_per_base_and_the_outputs(tmp_path):
    """`cluster.storage`: what the workers read is copied where every node mounts it (the base once per digest),
    and what they write goes there too."""
    from tasks.finetune.ray_cluster import stage_inputs

    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text("{}")
    (tmp_path / "train.jsonl").write_text('{"id": 1}\n')
    (tmp_path / "ds.json").write_text("{}")
    work = tmp_path / "work"
    spec = {"base_dir": str(base), "base_digest": "sha256:abc", "adapter_dir": None,
            "train_path": str(tmp_path / "train.jsonl"), "deepspeed_config": str(tmp_path / "ds.json"),
            "output_dir": str(work / "adapter"), "start_dir": None, "result_path": str(work / "d" / "result.json"),
            "checkpoint_dir": str(work / "d" / "checkpoints"), "reference_path": str(work / "reference_logps.pt"),
            "rollout_dir": str(work / "d" / "ppo_rollouts")}
    shared = tmp_path / "shared"
    first = stage_inputs(spec, shared, "run-1")
    assert first["base_dir"] == str(shared / "bases" / "sha256-abc")
    assert (shared / "bases" / "sha256-abc" / "config.json").is_file()
    assert Path(first["train_path"]).read_text() == '{"id": 1}\n'
    for key in ("train_path", "deepspeed_config", "output_dir", "result_path", "checkpoint_dir", "reference_path",
                "rollout_dir"):
        assert Path(first[key]).parent == shared / "runs" / "run-1", key
    assert first["start_dir"] is None and first["adapter_dir"] is None
    stamp = (shared / "bases" / "sha256-abc" / ".complete").stat().st_mtime_ns
    second = stage_inputs(spec, shared, "run-2")  # the same base: not copied again
    assert (shared / "bases" / "sha256-abc" / ".complete").stat().st_mtime_ns == stamp
    assert Path(second["output_dir"]).parent == shared / "runs" / "run-2"
