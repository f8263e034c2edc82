"""The fine-tune task: stage 4's training loop (`loop`) run in the task's own process, or handed to torchrun ranks
(`distributed`) when the environment has more than one process.

Supervised fine-tuning puts the loss on assistant tokens only; preference alignment (DPO, ORPO, KTO, GRPO, PPO;
`objectives`) can follow supervised warm-up steps; a reward model trains a score head (`tunewright.scoring
.reward_model`). Every step logs loss, learning rate, gradient norm, tokens/s and MFU to MLflow. With
`train.checkpoint_every`, training writes resumable checkpoints; whenever the task starts and finds one in its run
folder (a Prefect retry, or `tunewright run --resume`), it continues from the newest complete checkpoint.
"""

from __future__ import annotations

import json
import math
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from prefect import task

from tasks.artifacts import DataArtifact, EnvironmentArtifact, ModelArtifact, TrainArtifact
from tasks.finetune import checkpoints, distributed, loop, objectives, perf
from tasks.finetune.kernels import log_kernels, log_shared_prefix
from tunewright import preference, pruning
from tunewright.chat import autocast_dtype, generate
from tunewright.files import read_jsonl, write_atomic
from tunewright.logs import stage_logger
from tunewright.recipe import ON_POLICY, PEFT_METHODS, ModelConfig, TrainConfig
from tunewright.registry.tracking import RunContext, log_to_parent, stage_run
from tunewright.scoring import reward_model, rewards
from tunewright.scoring.metrics import same_answer
from tunewright.seeding import seed_everything
from tunewright.splits import read_split
from tunewright.train import memory_plan, methods
from tunewright.train.loss import answer_loss

GPU_LIMIT = "gpu"


@contextmanager
def gpu_slots(env: EnvironmentArtifact):
    """On CUDA, hold one slot of Prefect's `gpu` global concurrency limit per device this training uses, so two
    trainings never share a device (`tunewright deploy` creates the limit with one slot per GPU; without the limit,
    as on one machine outside a server, training goes ahead)."""
    gpus = env.num_processes if env.device == "cuda" else 0
    if env.cluster:  # the cluster's GPUs, wherever its workers run
        gpus = math.ceil(env.cluster["workers"] * env.cluster["gpus_per_worker"])
    if not gpus:
        yield
        return
    from prefect.concurrency.sync import concurrency

    with concurrency(GPU_LIMIT, occupy=max(1, gpus)):
        yield


@task(name="4-fine-tune")
def fine_tune(cfg: TrainConfig, model_cfg: ModelConfig, data: DataArtifact, model: ModelArtifact,
              env: EnvironmentArtifact, ctx: RunContext) -> TrainArtifact:
    """Train for `max_steps` optimiser steps (resuming from a checkpoint if one exists)."""
    import mlflow
    import torch

    log = stage_logger()
    seed_everything(env.seed)
    torch.set_num_threads(env.num_threads)
    with gpu_slots(env), stage_run(ctx, "4-fine-tune", log_system_metrics=True) as run:
        mlflow.set_tag("tunewright.dataset_digest", data.digest)
        if env.num_processes > 1 or env.cluster:
            return _fine_tune_distributed(cfg, model_cfg, data, model, env, ctx, run.info.run_id, log)
        return _fine_tune(cfg, model_cfg, data, model, env, ctx, log)


class _Paths:
    """Where one run's stage 4 keeps what it writes."""

    def __init__(self, work: Path, objective: str, sft_steps: int):
        self.work, self.sft_steps = work, sft_steps
        self.checkpoints = work / "checkpoints"
        self.reference = work / "reference_logps.pt"
        self.own_answers = work / "on_policy_rejected.jsonl"
        self.rollouts = work / "ppo_rollouts"
        # the model as alignment starts, kept for stage 5, where supervised steps come first
        self.start = work / "start" if objective != "sft" and sft_steps else None


def _fine_tune(cfg: TrainConfig, model_cfg: ModelConfig, data: DataArtifact, model: ModelArtifact,
               env: EnvironmentArtifact, ctx: RunContext, log) -> TrainArtifact:
    import mlflow
    import torch
    from transformers import AutoTokenizer

    device = torch.device("cuda" if env.device == "cuda" else "cpu")
    amp = autocast_dtype(env.precision)
    method = model_cfg.adapter.method
    tokenizer = AutoTokenizer.from_pretrained(model.base_dir)
    plan = env.memory_plan  # stage 3's: micro-batches by tokens, checkpointing only where needed
    net = methods.build(model.base_dir, model.adapter_dir, model_cfg, device,
                        plan["checkpointed_layers"] > 0 if plan else cfg.gradient_checkpointing, env.precision)
    if plan:
        memory_plan.checkpoint_layers(net, plan["checkpointed_layers"])
    net.train()
    hft = methods.HalfFineTuning(net, env.seed, model_cfg.adapter.hft_round_steps) if method == "hft" else None
    params = hft.parameters() if hft else [p for p in net.parameters() if p.requires_grad]
    ids = {id(p) for p in params}
    named = {n: p for n, p in net.named_parameters() if id(p) in ids}
    head = None
    if cfg.objective in ("reward", "ppo"):  # the reward model's score head, or PPO's critic
        head = reward_model.scalar_head(reward_model.hidden_size(net), device, bias=cfg.objective == "ppo")
        params = list(params) + list(head.parameters())
        named.update({f"{cfg.objective}_head.{n}": p for n, p in head.named_parameters()})
    n_trainable = sum(p.numel() for p in params) // (2 if hft else 1)

    records = read_split(data.train_path)
    paths = _Paths(Path(ctx.work_dir, "finetune"), cfg.objective,
                   cfg.max_steps if cfg.objective == "sft" else cfg.sft_steps)
    batches = loop.supervised_rows(cfg, tokenizer, records, 1, 0, env.seed, log) if paths.sft_steps else None
    align = loop.alignment_rows(cfg, tokenizer, records, 1, 0, env.seed, log) if cfg.objective != "sft" else None
    score = rewards.scorer(cfg.reward_model or cfg.reward, device) if cfg.objective in ON_POLICY else None
    launcher = OneProcess(cfg, net, tokenizer, params, named, paths, ctx, amp, records, data.val_path, log)
    start, state = launcher.resume()
    mlflow.log_params({"method": method, "objective": cfg.objective,
                       "n_train_examples": len((align or batches).encoded) if align or batches else 0,
                       "n_trainable": n_trainable, "effective_batch": cfg.batch_size * cfg.grad_accum,
                       "quantization_bits": model_cfg.load_bits()})
    peak = perf.peak_flops(device.type, env.precision, env.num_threads)
    fpt = perf.flops_per_token(sum(p.numel() for p in net.parameters()), n_trainable, method in ("full", "hft"),
                               n_embedding=net.get_input_embeddings().weight.numel())
    log.info("fine-tuning (%s) steps %d..%d x %d examples on %s/%s; %.2fM trainable; device peak %.0f GFLOP/s",
             method, start + 1, cfg.max_steps, cfg.batch_size * cfg.grad_accum, env.device, env.precision,
             n_trainable / 1e6, peak / 1e9)
    kernels, why_not = loop.kernels_for(cfg)
    log_shared_prefix(cfg, why_not, batches, align, method, log)
    log_kernels(net, cfg, device, amp, kernels, log)
    run = loop.Run(cfg, loop.step_loss_module(net, head, cfg, tokenizer, score, amp, kernels), tokenizer, batches,
                   align, score, amp, kernels, env.seed, paths.rollouts, fpt, peak, hft.select if hft else None,
                   micro_tokens=plan["micro_batch_tokens"] if plan and batches else 0)
    launcher.run = run
    result = loop.train(run, launcher, start, state, log)
    return _finish(cfg, run, launcher, result, state, start, method, model, ctx, log)


def _finish(cfg: TrainConfig, run: loop.Run, launcher: OneProcess, result: loop.Result, state: dict, start: int,
            method: str, model: ModelArtifact, ctx: RunContext, log) -> TrainArtifact:
    """Save what was trained, record the run's summary, and hand stage 5 its artifact."""
    import mlflow

    final_val = launcher.val_loss()
    out = launcher.paths.work / ("adapter" if method in PEFT_METHODS else "model")
    loop.save_trained(run.module.net, run.tokenizer, run.module.head, cfg.objective, out, model.base_digest)
    elapsed = max(state["seconds"], 1e-9)
    summary = {"final_train_loss": result.final_loss, "train_seconds": elapsed,
               "train_tokens_per_second": state["tokens"] / elapsed, "steps_done": result.steps}
    if final_val is not None:
        summary["val_loss"] = final_val
    mlflow.log_metrics(summary)
    log_to_parent(ctx, {k: v for k, v in summary.items() if k != "steps_done"})
    (out / "training_summary.json").write_text(json.dumps({**summary, "resumed_from": start}, indent=2))
    log.info("fine-tuned in %.1fs of compute: final loss %.4f, val loss %s", elapsed, result.final_loss,
             f"{final_val:.4f}" if final_val is not None else "n/a")
    start_dir = launcher.paths.start
    return TrainArtifact(output_dir=str(out), kind="adapter" if method in PEFT_METHODS else "full", steps=result.steps,
                         final_loss=result.final_loss, val_loss=final_val,
                         tokens_per_second=state["tokens"] / elapsed, train_seconds=elapsed, resumed_from=start,
                         stopped_early=result.stopped_early, objective=cfg.objective,
                         start_dir=str(start_dir) if start_dir else None,
                         reward=(cfg.reward_model or cfg.reward) if cfg.objective in ON_POLICY else None)


class OneProcess:
    """The loop's launcher in the task's own process: torch's optimiser and clipping, MLflow logging through the
    stage run, validation with early stopping and search pruning, and checkpoints of the trainable weights."""

    rank, world = 0, 1

    def __init__(self, cfg: TrainConfig, net, tokenizer, params: list, named: dict, paths: _Paths, ctx: RunContext,
                 amp, records: list[dict], val_path: str, log):
        from transformers import get_scheduler

        self.cfg, self.net, self.tokenizer, self.params, self.named = cfg, net, tokenizer, params, named
        self.paths, self.ctx, self.amp, self.records, self.log = paths, ctx, amp, records, log
        self.optimizer = methods.optimizer(params, cfg.learning_rate, cfg.weight_decay)
        self.scheduler = get_scheduler(cfg.lr_scheduler, self.optimizer, num_warmup_steps=cfg.warmup_steps,
                                       num_training_steps=cfg.max_steps)
        val = preference.sft_with_tools(read_split(val_path))
        self.val, self.val_tools = [c for c, _ in val], [t for _, t in val]
        self.run: loop.Run | None = None

    def resume(self) -> tuple[int, dict]:
        """The step to continue after and the loop state: from the newest complete checkpoint, else from scratch. A
        run that has not started alignment yet makes the reference and its own answers afresh."""
        state = {"best_val": math.inf, "bad_evals": 0, "tokens": 0, "seconds": 0.0}
        start = 0
        if (found := checkpoints.latest(self.paths.checkpoints, self.log)) is not None:
            state = checkpoints.load(found, self.named, self.optimizer, self.scheduler)
            start = state["step"]
            self.log.info("resuming from checkpoint %s (step %d of %d)", found.name, start, self.cfg.max_steps)
        if self.cfg.objective != "sft" and start <= self.paths.sft_steps:
            self.paths.reference.unlink(missing_ok=True)  # the reference is the model as alignment starts
            self.paths.own_answers.unlink(missing_ok=True)  # and so are its own answers
        return start, state

    def start_alignment(self, start: int) -> Any:
        """At the first alignment step: keep the starting model for stage 5, with `rejected: on_policy` its own
        mistakes as the rejected answers, and the reference log-probabilities."""
        cfg, net, log, start_dir = self.cfg, self.net, self.log, self.paths.start
        if start_dir is not None and not (start_dir / "training_summary.json").is_file():
            net.save_pretrained(start_dir)
            self.tokenizer.save_pretrained(start_dir)
            (start_dir / "training_summary.json").write_text(json.dumps({"sft_steps": cfg.sft_steps}))
            log.info("the model after %d supervised steps is kept as the alignment's starting point (%s)",
                     cfg.sft_steps, start_dir)
        if cfg.objective in ON_POLICY and cfg.beta and start_dir is not None and hasattr(net, "peft_config"):
            objectives.keep_reference(net, start_dir)
            log.info("%s: the KL reference is the starting adapter, frozen beside the trained one", cfg.objective)
        if cfg.rejected == "on_policy":
            _own_mistakes(cfg, net, self.tokenizer, self.run.align, self.records, self.paths.own_answers, self.amp,
                          log)
        if cfg.objective not in objectives.NEEDS_REFERENCE:
            return None
        needed = loop.needed_reference_rows(cfg, self.run.align)
        log.info("%s: reference log-probabilities of the %d rows training will see, from the model as alignment "
                 "starts", cfg.objective, len(needed))
        return objectives.reference_logps(net, self.run.align.encoded, cfg.objective, self.tokenizer.pad_token_id,
                                          cfg.batch_size * 2, self.paths.reference, needed, self.amp, log,
                                          kernels=self.run.kernels)

    def set_learning_rates(self, lrs: list[float]) -> None:
        for group, lr in zip(self.optimizer.param_groups, lrs):
            group["lr"] = lr  # the scheduler sets its own value again on its next step

    def loss(self, **inputs):
        return self.run.module(**inputs)

    def backward(self, loss, share: float) -> None:
        (loss * share).backward()

    def finish_step(self, aligning: bool) -> float:
        import torch

        head = self.run.module.head
        if self.cfg.objective == "ppo" and aligning:
            # the critic's gradients must not shrink the policy's under one norm
            critic = {id(p) for p in head.parameters()}
            torch.nn.utils.clip_grad_norm_([p for p in head.parameters() if p.grad is not None],
                                           self.cfg.max_grad_norm)
            trained = [p for p in self.params if p.grad is not None and id(p) not in critic]
        else:
            trained = [p for p in self.params if p.grad is not None]
        grad_norm = float(torch.nn.utils.clip_grad_norm_(trained, self.cfg.max_grad_norm))
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm

    def reduce(self, loss: float, tokens: int) -> tuple[float, int]:
        return loss, tokens

    def mean_metrics(self, values: dict[str, float]) -> dict[str, float]:
        return values

    def report(self, step: int, metrics: dict[str, float], line: str) -> None:
        import mlflow

        mlflow.log_metrics(metrics, step=step)
        self.log.info("%s", line)

    def val_loss(self) -> float | None:
        if not self.val:
            return None
        self.net.eval()
        value = answer_loss(self.net, self.tokenizer, self.val, max_len=self.cfg.max_seq_len,
                            batch_size=self.cfg.batch_size * 2, autocast_dtype=self.amp, tools=self.val_tools)
        self.net.train()
        return value

    def after_step(self, step: int, state: dict) -> bool:
        cfg = self.cfg
        if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.max_steps and self._validate(step, state):
            return True
        if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < cfg.max_steps:
            path = checkpoints.save(self.paths.checkpoints, step, self.named, self.optimizer, self.scheduler, state,
                                    cfg.keep_checkpoints)
            self.log.info("checkpoint %s written", path.name)
        return False

    def _validate(self, step: int, state: dict) -> bool:
        """The validation loss at `step`; True where a search prunes the trial or early stopping ends training."""
        import mlflow

        current = self.val_loss()
        if current is None:
            return False
        mlflow.log_metric("val_loss", current, step=step)
        improved = current < state["best_val"] - 1e-6
        state["best_val"] = min(state["best_val"], current)
        state["bad_evals"] = 0 if improved else state["bad_evals"] + 1
        self.log.info("step %d: val loss %.4f (best %.4f)", step, current, state["best_val"])
        if pruning.should_stop(self.ctx.parent_run_id, step, current):  # a search's trial that is not promising
            mlflow.set_tag("tunewright.pruned_at_step", str(step))
            self.log.info("pruned at step %d by the hyperparameter search (val loss %.4f)", step, current)
            return True
        if self.cfg.early_stopping_patience and state["bad_evals"] >= self.cfg.early_stopping_patience:
            self.log.info("early stopping at step %d: no val improvement in %d evaluations", step, state["bad_evals"])
            return True
        return False


def _own_mistakes(cfg: TrainConfig, net, tokenizer, align: loop.RankSlice, records: list[dict], path: Path, amp,
                  log) -> None:
    """`rejected: on_policy`: the model as alignment starts answers (greedily) the prompts of every pair training will
    see, and its wrong answers become those pairs' rejected ones in `align`. The answers are kept at `path` (JSON
    lines: row, id, answer, wrong), so a resumed run trains on the same pairs, and logged to MLflow for review."""
    import mlflow

    if not all("chosen" in r for r in records):
        raise ValueError(f"train.rejected: on_policy needs preference pairs (prompt/chosen/rejected) for "
                         f"{cfg.objective}; the training split has rows without a chosen answer")
    batches = (cfg.max_steps - cfg.sft_steps) * cfg.grad_accum
    wanted = preference.records_of_rows(cfg.objective, records, [i for b in range(batches) for i in align.rows(b)])
    if path.is_file():
        answers = {int(r["row"]): r["answer"] for r in read_jsonl(path)}
        log.info("rejected: on_policy: the starting model's answers to %d prompts read back from %s", len(answers),
                 path.name)
    else:
        log.info("rejected: on_policy: the starting model answers the %d prompts of the pairs training will see",
                 len(wanted))
        was_training, side = net.training, tokenizer.padding_side
        net.eval()
        outs = generate(net, tokenizer, [records[i]["prompt"] for i in wanted], max_new_tokens=cfg.max_new_tokens,
                        batch_size=cfg.batch_size * 2, autocast_dtype=amp,
                        progress=lambda done, total: log.info("rejected: on_policy: %d/%d answers", done, total))
        net.train(was_training)
        tokenizer.padding_side = side
        answers = dict(zip(wanted, outs))
        write_atomic(path, "".join(json.dumps({"row": i, "id": records[i].get("id"), "answer": a,
                                               "wrong": not same_answer(a, records[i]["chosen"][-1]["content"])},
                                              ensure_ascii=False) + "\n" for i, a in answers.items()))
        mlflow.log_artifact(str(path), "alignment")
    pairs, changed = preference.with_own_mistakes(records, answers)
    align.encoded[:] = preference.encode_rows(cfg.objective, tokenizer, pairs, cfg.max_seq_len)
    mlflow.log_metrics({"on_policy_prompts": len(answers), "on_policy_wrong": changed})
    log.info("rejected: on_policy: %d of %d answers are wrong (%.0f%%) and replace their pairs' rejected answers; "
             "the %d right ones keep theirs", changed, len(answers), 100 * changed / max(len(answers), 1),
             len(answers) - changed)


def _fine_tune_distributed(cfg: TrainConfig, model_cfg: ModelConfig, data: DataArtifact, model: ModelArtifact,
                           env: EnvironmentArtifact, ctx: RunContext, run_id: str, log) -> TrainArtifact:
    """Train in `env.num_processes` DeepSpeed processes, here under torchrun or as the workers of a Ray cluster;
    rank 0 logs to this stage's MLflow run (every objective; GRPO and PPO under ZeRO stages 0-2)."""
    import mlflow

    method = model_cfg.adapter.method
    distributed.check_supported(cfg, method, json.loads(Path(env.deepspeed_config).read_text()), env.num_processes,
                                log)
    if cfg.loss == "class_weighted":  # the ranks weight tokens the same way; the run records the weights once
        loop.log_class_weights(loop.class_weights([loop.label(r, cfg.label_field)
                                                   for r in read_split(data.train_path)]), log)
    work = Path(ctx.work_dir, "finetune")
    out = work / ("adapter" if method in PEFT_METHODS else "model")
    start_dir = work / "start" if cfg.objective != "sft" and cfg.sft_steps else None
    spec = {
        "base_dir": model.base_dir, "adapter_dir": model.adapter_dir, "model": model_cfg.model_dump(mode="json"),
        "train": cfg.model_dump(mode="json"), "seed": env.seed, "precision": env.precision, "device": env.device,
        "threads": env.num_threads, "deepspeed_config": env.deepspeed_config, "train_path": data.train_path,
        "tracking_uri": ctx.tracking_uri, "run_id": run_id, "output_dir": str(out),
        "result_path": str(work / "distributed" / "result.json"),
        "checkpoint_dir": str(work / "distributed" / "checkpoints"),
        "start_dir": str(start_dir) if start_dir else None, "reference_path": str(work / "reference_logps.pt"),
        "rollout_dir": str(work / "distributed" / "ppo_rollouts"),
        "base_digest": model.base_digest,
    }
    mlflow.log_params({"method": method, "objective": cfg.objective, "num_processes": env.num_processes,
                       "effective_batch": cfg.batch_size * cfg.grad_accum * env.num_processes})
    if env.cluster:
        from tasks.finetune import ray_cluster
        from tunewright.recipe.environment import ClusterConfig

        cluster = ClusterConfig.model_validate(env.cluster)
        mlflow.log_params({"cluster_address": cluster.address, "cluster_workers": cluster.workers,
                           "cluster_gpus_per_worker": cluster.gpus_per_worker})
        result = ray_cluster.launch(spec, cluster, work / "distributed", run_id, log)
    else:
        result = distributed.launch(spec, work / "distributed", env.num_processes, log)
    return _distributed_result(cfg, model_cfg, data, model, env, ctx, result, out, start_dir, log)


def _distributed_result(cfg: TrainConfig, model_cfg: ModelConfig, data: DataArtifact, model: ModelArtifact,
                        env: EnvironmentArtifact, ctx: RunContext, result: dict, out: Path, start_dir: Path | None,
                        log) -> TrainArtifact:
    """After the ranks: the validation loss of what they saved, the run's summary, and stage 5's artifact."""
    import mlflow
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    method = model_cfg.adapter.method
    device = torch.device("cuda" if env.device == "cuda" else "cpu")
    tokenizer = AutoTokenizer.from_pretrained(model.base_dir)
    if method in PEFT_METHODS:
        net = PeftModel.from_pretrained(methods.load_base(model.base_dir, model_cfg, device, for_training=False,
                                                       precision=env.precision), out)
    else:
        net = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).to(device)
    val = preference.sft_with_tools(read_split(data.val_path))
    val_loss = (answer_loss(net.eval(), tokenizer, [c for c, _ in val], max_len=cfg.max_seq_len,
                            batch_size=cfg.batch_size * 2, autocast_dtype=autocast_dtype(env.precision),
                            tools=[t for _, t in val]) if val else None)
    seconds = max(result["seconds"], 1e-9)
    summary = {"final_train_loss": result["final_loss"], "train_seconds": seconds,
               "train_tokens_per_second": result["tokens"] / seconds, "steps_done": result["steps"]}
    if val_loss is not None:
        summary["val_loss"] = val_loss
    mlflow.log_metrics(summary)
    log_to_parent(ctx, {k: v for k, v in summary.items() if k != "steps_done"})
    (out / "training_summary.json").write_text(json.dumps({**summary, "resumed_from": result["resumed_from"],
                                                           "world_size": result["world_size"],
                                                           **({"nodes": result["nodes"]} if "nodes" in result else {})},
                                                          indent=2))
    log.info("fine-tuned with %d processes in %.1fs: final loss %.4f", result["world_size"], seconds, result["final_loss"])
    return TrainArtifact(output_dir=str(out), kind="adapter" if method in PEFT_METHODS else "full",
                         steps=result["steps"], final_loss=result["final_loss"], val_loss=val_loss,
                         tokens_per_second=result["tokens"] / seconds, train_seconds=seconds,
                         resumed_from=result["resumed_from"], objective=cfg.objective,
                         start_dir=str(start_dir) if start_dir else None,
                         reward=(cfg.reward_model or cfg.reward) if cfg.objective in ON_POLICY else None)
