"""Multi-process fine-tuning under torchrun with DeepSpeed ZeRO; launched by the fine-tune task.

Run (what the task does): python -m torch.distributed.run --standalone --nproc_per_node N \\
    -m tasks.finetune.distributed SPEC.json

Each rank trains on its slice of every global batch (batch_size examples per process), so a
run with N processes sees the same examples per step as one process with N x batch_size.
Supervised steps and every alignment objective, with `sft_steps` of warm-up before it, run here.
For DPO, ORPO, KTO and reward models the per-row means make the ranks' averaged gradient the one
process's, and the batch statistics ORPO and KTO use (token count, KL estimate) are averaged over
the ranks first. GRPO and PPO sample their answers on each rank, from a stream seeded by the run's
seed, the rank and the batch, under ZeRO stages 0-2 (ZeRO-3 would make every rank gather the
weights for every generated token; the recipe refuses it). Only rank 0 talks to MLflow (one stage
run, not one per rank) and writes the trained weights, the starting adapter, the reference
log-probabilities and `result.json`; the task computes validation loss afterwards in its own process.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path


def launch(spec: dict, work: Path, nproc: int, log) -> dict:
    """Run the workers as a subprocess and return rank 0's result; raise with their output on failure."""
    import subprocess

    work.mkdir(parents=True, exist_ok=True)
    spec_path = work / "spec.json"
    spec_path.write_text(json.dumps(spec, indent=2))
    env = dict(os.environ)
    env.setdefault("DS_ACCELERATOR", "cuda" if spec["device"] == "cuda" else "cpu")
    env["OMP_NUM_THREADS"] = str(max(1, spec["threads"] // nproc))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "tasks.finetune.distributed", str(spec_path)]
    log.info("launching %d training processes: %s", nproc, " ".join(cmd[2:]))
    tail: list[str] = []
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                          cwd=Path(__file__).resolve().parents[2], preexec_fn=_die_with_parent) as proc:
        for line in proc.stdout:
            tail = (tail + [line.rstrip()])[-60:]
            if line.startswith("[tunewright]"):
                log.info("%s", line.removeprefix("[tunewright]").strip())
    if proc.returncode != 0:
        raise RuntimeError(f"distributed training failed (exit {proc.returncode}):\n" + "\n".join(tail))
    return json.loads((work / "result.json").read_text())


def _loss_module(net, head, train, tokenizer, zero_stage: int, across, score, amp):
    """The network wrapped so DeepSpeed's forward computes tunewright's loss: answer tokens (focal, weights) for a
    supervised batch, or the alignment objective's on this rank's rows, GRPO sampling with `seed`, PPO on a
    rollout (its metrics and tokens kept in `last`)."""
    import torch

    from tasks.finetune import objectives
    from tunewright.chat import token_loss

    # ZeRO-3 gathers the head's weights on every call, so ranks with different answer lengths
    # must not make different numbers of chunked head calls
    chunk = 0 if zero_stage == 3 else None
    why_not = ("ZeRO-3 gathers weights on every call, so every rank must make the same calls" if zero_stage == 3 else
               "" if train.shared_prefix else "train.shared_prefix is false")
    if why_not:
        from tunewright.chat import disable_shared_prefix

        disable_shared_prefix(why_not)
    focal_gamma = train.focal_gamma if train.loss == "focal" else 0.0

    class LossModule(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = net
            self.head = head  # a reward model's score head or PPO's critic: ZeRO partitions and saves it too
            self.last: tuple[dict, int] = ({}, 0)

        def forward(self, batch=None, rows=None, ref=None, seed=None, rollout=None):
            if batch is not None:
                return token_loss(self.net, batch, focal_gamma=focal_gamma, logit_chunk=chunk)
            if train.objective == "grpo":
                loss, metrics = objectives.grpo_step(
                    self.net, tokenizer, rows, score, train.num_generations, train.temperature, train.max_new_tokens,
                    train.beta, train.clip_epsilon, amp, seed)
                tokens = int(metrics.pop("tokens"))
            elif train.objective == "ppo":
                loss, metrics = objectives.ppo_update(self.net, self.head, rollout, train.clip_epsilon,
                                                      train.value_clip, train.value_coef)
                tokens = int(metrics.pop("tokens"))
            else:
                loss, metrics, tokens = objectives.pair_step(train.objective, self.net, self.head, rows, ref,
                                                             tokenizer.pad_token_id, train, chunk, across)
            self.last = ({k: float(v) for k, v in metrics.items()}, tokens)
            return loss

    return LossModule()


def _die_with_parent() -> None:
    """In the launcher child: get SIGTERM if the task's process dies (even by SIGKILL), so torchrun stops
    its workers instead of leaving them training, and writing checkpoints, beside a resumed run."""
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def main(spec_path: str) -> None:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    import torch
    import torch.distributed as dist
    from transformers import AutoTokenizer, get_scheduler

    from tasks.finetune import checkpoints, perf
    from tasks.finetune.stage import (_Batches, _ppo_rollouts, _sampling_seed, _sft_records, step_learning_rates,
                                      training_examples)
    from tunewright import preference
    from tunewright.train import methods
    from tunewright.scoring import reward_model, rewards
    from tunewright.chat import autocast_dtype
    from tunewright.recipe import ON_POLICY, ModelConfig, TrainConfig
    from tunewright.seeding import seed_everything
    from tunewright.splits import read_split

    spec = json.loads(Path(spec_path).read_text())
    cuda = spec["device"] == "cuda"
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    local = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    train = TrainConfig.model_validate(spec["train"])
    model_cfg = ModelConfig.model_validate(spec["model"])
    objective = train.objective
    sft_steps = train.max_steps if objective == "sft" else train.sft_steps
    seed_everything(spec["seed"])
    say = _Quiet() if rank else _Say()

    tokenizer = AutoTokenizer.from_pretrained(spec["base_dir"])
    net = methods.build(spec["base_dir"], spec["adapter_dir"], model_cfg, device, train.gradient_checkpointing,
                        spec["precision"], cast_frozen=False)
    params = [p for p in net.parameters() if p.requires_grad]
    head = None
    if objective in ("reward", "ppo"):  # made right after the network, as in one process: the same first draw
        head = reward_model.scalar_head(reward_model.hidden_size(net), device, bias=objective == "ppo")
        params += list(head.parameters())
    method = model_cfg.adapter.method
    fpt = perf.flops_per_token(sum(p.numel() for p in net.parameters()), sum(p.numel() for p in params),
                               method in ("full", "hft"), n_embedding=net.get_input_embeddings().weight.numel())
    # every rank measures its own matmul peak at once (they share the machine on a CPU); MFU is over the sum
    peak = torch.tensor(perf.peak_flops(device.type, spec["precision"], torch.get_num_threads()), dtype=torch.float64)
    dist.all_reduce(peak)
    ds_config = json.loads(Path(spec["deepspeed_config"]).read_text())
    zero_stage = ds_config["zero_optimization"]["stage"]
    if objective in ON_POLICY and zero_stage == 3:
        raise ValueError(f"train.objective '{objective}' samples answers during training: environment.deepspeed_stage "
                         "3 would gather every rank's weights for every generated token; use stage 0-2")
    score = None
    if objective in ON_POLICY:
        import mlflow

        mlflow.set_tracking_uri(spec["tracking_uri"])  # where train.reward_model (models:/...) is registered
        score = rewards.scorer(train.reward_model or train.reward, device)
    amp = autocast_dtype(spec["precision"]) if not ds_config.get("bf16", {}).get("enabled") else None
    optimizer = _optimizer(params, train, ds_config, rank)
    scheduler = get_scheduler(train.lr_scheduler, optimizer, num_warmup_steps=train.warmup_steps,
                              num_training_steps=train.max_steps)
    ds_config.update(train_micro_batch_size_per_gpu=train.batch_size, gradient_accumulation_steps=train.grad_accum,
                     zero_allow_untested_optimizer=True, steps_per_print=10**9)

    def across(x):  # a batch statistic's mean over the ranks (ORPO's token count, KTO's KL estimate)
        total = x.detach().double().clone()
        dist.all_reduce(total)
        return (total / world).to(x.dtype)

    wrapped = _loss_module(net, head, train, tokenizer, zero_stage, across, score, amp)
    engine, _, _, _ = deepspeed.initialize(model=wrapped, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=ds_config)

    records = read_split(spec["train_path"])
    global_batch = train.batch_size * world
    batches = align = None
    if sft_steps:
        encoded = training_examples(train, _sft_records(records), tokenizer, say, log_weights=False)
        if len(encoded) < global_batch:
            raise ValueError(f"train.batch_size {train.batch_size} x {world} processes exceeds the "
                             f"{len(encoded)} training rows")
        batches = _Batches(encoded, global_batch, spec["seed"], tokenizer.pad_token_id)
    if objective != "sft":
        rows = preference.encode_rows(objective, tokenizer, records, train.max_seq_len)
        if len(rows) < global_batch:
            raise ValueError(f"train.batch_size {train.batch_size} x {world} processes exceeds the {len(rows)} "
                             f"{objective} rows")
        align = _Slice(_Batches(rows, global_batch, spec["seed"] + 1, tokenizer.pad_token_id), rank, train.batch_size)
        say.info("%s: %d rows, %d per process in each micro-batch", objective, len(rows), train.batch_size)
    # each rank samples from its own stream (the one process's when there is one rank)
    sample_seed = spec["seed"] * world + rank
    rollout_dir = Path(spec["rollout_dir"]) / f"rank{rank}"
    rollouts, rollout_key = [], None

    # resume: rank 0 picks the newest checkpoint that verifies; every rank loads its own partition of it
    root = Path(spec["checkpoint_dir"])
    choice = [None]
    if rank == 0:
        found = checkpoints.latest(root, _Say())
        choice = [str(found) if found else None]
    dist.broadcast_object_list(choice, src=0)
    state = {"tokens": 0, "seconds": 0.0}
    start = 0
    if choice[0]:
        found = Path(choice[0])
        loop = json.loads((found / "loop_state.json").read_text())
        if loop["world_size"] != world:
            raise RuntimeError(f"checkpoint {found} was written by {loop['world_size']} processes, this run has "
                               f"{world}; resume with environment.num_processes: {loop['world_size']}")
        # GRPO's and PPO's frozen KL reference, saved with the module, is loaded again from the starting adapter
        engine.load_checkpoint(str(found), tag="deepspeed", load_module_strict=objective not in ON_POLICY)
        checkpoints.set_rng_state(torch.load(found / f"rng-rank{rank}.pt", weights_only=False))
        state, start = {"tokens": loop["tokens"], "seconds": loop["seconds"]}, loop["step"]
        say.info("resuming from checkpoint %s (step %d of %d)", found.name, start, train.max_steps)

    client = None
    if rank == 0:
        from mlflow import MlflowClient

        client = MlflowClient(spec["tracking_uri"])
    loss_value = float("nan")
    ref, started = None, False
    for step in range(start + 1, train.max_steps + 1):
        aligning = step > sft_steps
        if aligning and not started:
            ref, started = _start_alignment(train, net, head, tokenizer, align, spec, start, zero_stage, rank,
                                            world, amp, say), True
        lrs = step_learning_rates(train, scheduler, step)
        for group, lr in zip(optimizer.param_groups, lrs):
            group["lr"] = lr  # the scheduler sets its own value again on its next step
        t0 = time.perf_counter()
        step_loss = torch.zeros((), dtype=torch.float64)
        tokens = torch.zeros((), dtype=torch.float64)
        extra: dict[str, float] = {}
        if aligning and objective == "ppo" and rollout_key != (step - sft_steps - 1) // train.ppo_epochs:
            rollout_key = (step - sft_steps - 1) // train.ppo_epochs
            rollouts = _ppo_rollouts(train, net, head, tokenizer, align, rollout_key, score, amp, rollout_dir,
                                     sample_seed, say)
        for micro in range(train.grad_accum):
            with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
                if aligning:
                    b = (step - sft_steps - 1) * train.grad_accum + micro
                    idx = align.rows(b)
                    loss = engine(rows=[align.encoded[i] for i in idx], ref=ref[idx] if ref is not None else None,
                                  seed=_sampling_seed(sample_seed, b), rollout=rollouts[micro] if rollouts else None)
                    found_metrics, n = engine.module.last
                    for k, v in found_metrics.items():
                        extra[k] = extra.get(k, 0.0) + v / train.grad_accum
                else:
                    full = batches((step - 1) * train.grad_accum + micro)
                    mine = {k: v[rank * train.batch_size : (rank + 1) * train.batch_size].to(device)
                            for k, v in full.items()}
                    loss = engine(mine)
                    n = int(mine["attention_mask"].sum())
            engine.backward(loss)
            engine.step()
            step_loss += loss.detach().double().cpu() / train.grad_accum
            tokens += float(n)
        dist.all_reduce(step_loss)
        dist.all_reduce(tokens)
        loss_value = float(step_loss) / world
        if not math.isfinite(loss_value):
            raise FloatingPointError(f"train loss became {loss_value} at step {step}; lower train.learning_rate")
        dt = time.perf_counter() - t0
        state["tokens"] += int(tokens)
        state["seconds"] += dt
        if step % train.log_every == 0 or step == train.max_steps:
            extra = _mean_over_ranks(extra, world)
            if rank == 0:
                norm = engine.get_global_grad_norm()
                lr = lrs[0]
                metrics = {"train_loss": loss_value, "learning_rate": lr, "tokens_per_second": float(tokens) / dt,
                           "mfu": float(tokens) / dt * fpt / float(peak), "step_seconds": dt,
                           **{f"{objective}_{k}": v for k, v in extra.items()}}
                if norm is not None:
                    metrics["grad_norm"] = float(norm)
                client.log_batch(spec["run_id"], metrics=[_metric(k, v, step) for k, v in metrics.items()])
                print(f"[tunewright] step {step}/{train.max_steps} {objective if aligning else 'sft'} loss "
                      f"{loss_value:.4f}  lr {lr:.2e}  {float(tokens) / dt:.0f} tok/s  MFU {100 * metrics['mfu']:.1f}%"
                      f"  ({world} processes, ZeRO-{zero_stage})" + "".join(f"  {k} {v:.3f}" for k, v in extra.items()),
                      flush=True)
        if train.checkpoint_every and step % train.checkpoint_every == 0 and step < train.max_steps:
            path = _save_checkpoint(engine, root, step, {**state, "world_size": world}, train.keep_checkpoints,
                                    rank)
            say.info("checkpoint %s written", path.name)

    out = Path(spec["output_dir"])
    with _gathered(net, head, zero_stage):
        if rank == 0:
            net.save_pretrained(out, safe_serialization=True)
            tokenizer.save_pretrained(out)
            if objective == "reward":
                reward_model.save_head(head, out, meta={"kind": "reward_model", "pooling": "last_token",
                                                        "base_digest": spec.get("base_digest")})
            elif objective == "ppo":
                reward_model.save_head(head, out, reward_model.VALUE_HEAD_FILE)
    if rank == 0:
        Path(spec["result_path"]).write_text(json.dumps({
            "final_loss": loss_value, "steps": train.max_steps, "tokens": state["tokens"], "seconds": state["seconds"],
            "world_size": world, "resumed_from": start,
            "n_trainable": sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in params),
        }))
    dist.barrier()
    dist.destroy_process_group()


class _Slice:
    """One rank's share (`size` rows from `rank * size`) of every global batch of `batches`."""

    def __init__(self, batches, rank: int, size: int):
        self.batches, self.rank, self.size = batches, rank, size
        self.encoded = batches.encoded

    def rows(self, index: int) -> list:
        return self.batches.rows(index)[self.rank * self.size : (self.rank + 1) * self.size]


def _start_alignment(train, net, head, tokenizer, align, spec: dict, start: int, zero_stage: int, rank: int,
                     world: int, amp, say):
    """At the first alignment step, on every rank together: keep the starting model for stage 5 (rank 0 writes it,
    gathered under ZeRO-3), load it frozen as GRPO's or PPO's KL reference, and return the reference
    log-probabilities of DPO and KTO, each rank scoring its share of the rows training will see. A run resumed past
    this point reads the reference rank 0 kept."""
    import torch
    import torch.distributed as dist

    from tasks.finetune import objectives

    from tunewright.recipe import ON_POLICY

    start_dir = Path(spec["start_dir"]) if spec.get("start_dir") else None
    ref_path = Path(spec["reference_path"])
    needs_ref = train.objective in objectives.NEEDS_REFERENCE
    batches = (train.max_steps - train.sft_steps) * train.grad_accum
    needed = sorted({i for b in range(batches) for i in align.batches.rows(b)}) if needs_ref else []
    plan = [False, False]  # every rank must agree: a gather or a forward made by one rank alone never returns
    if rank == 0:
        # a run that starts alignment here writes its own starting point, even over one an earlier attempt left
        plan[0] = start_dir is not None and (start <= train.sft_steps
                                             or not (start_dir / "training_summary.json").is_file())
        if needs_ref and start > train.sft_steps and ref_path.is_file():
            kept = torch.load(ref_path)
            plan[1] = kept.shape == (len(align.encoded), 2) and not kept[needed].isnan().any()
    dist.broadcast_object_list(plan, src=0)
    keep_start, reuse = plan
    if keep_start:
        with _gathered(net, head, zero_stage):
            if rank == 0:
                net.save_pretrained(start_dir, safe_serialization=True)
                tokenizer.save_pretrained(start_dir)
                (start_dir / "training_summary.json").write_text(json.dumps({"sft_steps": train.sft_steps}))
        say.info("the model after %d supervised steps is kept as the alignment's starting point (%s)",
                 train.sft_steps, start_dir)
    if train.objective in ON_POLICY and train.beta and start_dir is not None and hasattr(net, "peft_config"):
        dist.barrier()  # rank 0 has written the starting adapter
        objectives.keep_reference(net, start_dir)
        say.info("%s: the KL reference is the starting adapter, frozen beside the trained one", train.objective)
    if not needs_ref:
        return None
    if reuse:
        say.info("%s: reference log-probabilities of %d rows read from %s", train.objective, len(needed),
                 ref_path.name)
        return torch.load(ref_path)
    say.info("%s: reference log-probabilities of the %d rows training will see, from the model as alignment "
             "starts, shared among %d processes", train.objective, len(needed), world)
    size = train.batch_size * 2
    mine = needed[rank::world]
    out = objectives.reference_logps(net, align.encoded, train.objective, tokenizer.pad_token_id, size, None, mine,
                                     amp, None, min_batches=math.ceil(math.ceil(len(needed) / world) / size))
    # each row was scored by one rank: the sum over ranks of the scored values is the whole table
    scored = (~out.isnan()).to(torch.float32)
    values = out.nan_to_num(0.0)
    dist.all_reduce(scored)
    dist.all_reduce(values)
    ref = torch.where(scored > 0, values, torch.full_like(values, float("nan")))
    if rank == 0:
        ref_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = ref_path.with_suffix(".tmp")
        torch.save(ref, tmp)
        tmp.replace(ref_path)
    dist.barrier()
    return ref


def _mean_over_ranks(values: dict[str, float], world: int) -> dict[str, float]:
    """Each metric's mean over the ranks that measured it (a KTO slice may hold no desirable row)."""
    import torch.distributed as dist

    gathered: list = [None] * world
    dist.all_gather_object(gathered, values)
    keys = [k for k in values] + [k for g in gathered for k in g if k not in values]
    return {k: sum(g[k] for g in gathered if k in g) / sum(k in g for g in gathered) for k in dict.fromkeys(keys)}


def _gathered(net, head, zero_stage: int):
    """Under ZeRO-3, every rank's partitions of the weights gathered (all ranks enter it together); else nothing."""
    if zero_stage != 3:
        return _Null()
    import deepspeed

    params = list(net.parameters()) + (list(head.parameters()) if head is not None else [])
    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)


def _optimizer(params, train, ds_config: dict, rank: int):
    """AdamW; with ZeRO optimiser offload, DeepSpeed's CPU Adam (a C++ op built on first use) steps the
    offloaded states. Where that op cannot be built (no compiler), torch's AdamW steps them instead."""
    import torch

    if "offload_optimizer" in ds_config.get("zero_optimization", {}):
        try:
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            return DeepSpeedCPUAdam(params, lr=train.learning_rate, weight_decay=train.weight_decay, adamw_mode=True)
        except Exception as exc:  # the op builder reports missing compilers in many ways
            if rank == 0:
                print(f"[tunewright] DeepSpeed CPU Adam unavailable ({type(exc).__name__}: {exc}); offloaded "
                      "optimiser states are stepped by torch AdamW", flush=True)
            ds_config["zero_force_ds_cpu_optimizer"] = False
    return torch.optim.AdamW(params, lr=train.learning_rate, weight_decay=train.weight_decay)


def _save_checkpoint(engine, root: Path, step: int, loop_state: dict, keep: int, rank: int) -> Path:
    """Every rank writes its ZeRO partition and RNG state into one temporary folder; rank 0 seals it.

    The folder gets the same manifest (SHA-256 of every file, written last) and the same rename into
    place as a one-process checkpoint, so `checkpoints.latest` finds, verifies and skips them alike.
    """
    import shutil

    import torch
    import torch.distributed as dist

    from tasks.finetune import checkpoints

    final = root / f"step-{step:06d}"
    tmp = root / f".tmp-step-{step:06d}"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    engine.save_checkpoint(str(tmp), tag="deepspeed")
    torch.save(checkpoints.rng_state(), tmp / f"rng-rank{rank}.pt")
    dist.barrier()
    if rank == 0:
        checkpoints.seal(tmp, final, step, loop_state, keep)
    dist.barrier()
    return final


class _Say:
    """Rank 0's log: lines the launching task forwards to its own log."""

    def info(self, msg, *args):
        print("[tunewright] " + (msg % args if args else msg), flush=True)

    warning = info


class _Quiet:
    def info(self, *args):
        pass

    warning = info


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _metric(key: str, value: float, step: int):
    from mlflow.entities import Metric

    return Metric(key, float(value), int(time.time() * 1000), step)


if __name__ == "__main__":
    main(sys.argv[1])
