"""Multi-process fine-tuning under torchrun with DeepSpeed ZeRO; launched by the fine-tune task.

Each rank runs `tasks.finetune.loop` with the `Rank` launcher: the loop is the one-process one.

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
import logging
import math
import os
import sys
import time
from pathlib import Path

from tasks.finetune import checkpoints, loop, objectives, perf
from tunewright.chat import autocast_dtype
from tunewright.files import save_atomic
from tunewright.recipe import ON_POLICY, ModelConfig, TrainConfig
from tunewright.scoring import reward_model, rewards
from tunewright.splits import read_split
from tunewright.train import methods


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



def _die_with_parent() -> None:
    """In the launcher child: get SIGTERM if the task's process dies (even by SIGKILL), so torchrun stops
    its workers instead of leaving them training, and writing checkpoints, beside a resumed run."""
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def check_supported(cfg: TrainConfig, method: str, ds_config: dict, nproc: int, log) -> None:
    """Refuse, before any process starts, what the ranks cannot do together; warn of what they leave out."""
    if cfg.objective in ON_POLICY and ds_config["zero_optimization"]["stage"] == 3:
        raise ValueError(f"train.objective '{cfg.objective}' samples answers during training, which ZeRO-3 cannot share "
                         "out (every rank would gather the weights for every generated token): set "
                         "environment.deepspeed_stage to 0-2, or num_processes: 1")
    if getattr(cfg, "rejected", "dataset") == "on_policy":
        raise ValueError("train.rejected: on_policy generates the starting model's answers in one process; set "
                         "environment.num_processes: 1 (or train.rejected: dataset)")
    if method == "hft":
        raise ValueError("model.adapter.method 'hft' runs in one process (its per-round freezing is not "
                         "partition-aware); set environment.num_processes: 1")
    if cfg.eval_every and cfg.early_stopping_patience:
        log.warning("train.early_stopping_patience is not applied with %d processes; the validation loss is "
                    "measured once, after training", nproc)


def run_rank(spec: dict) -> None:
    """One rank's work, under torchrun or in a Ray Train worker alike: build the network and its DeepSpeed engine,
    resume from the newest checkpoint, run the loop on this rank's share, save on rank 0. A process group already
    set up (Ray Train's) is used as it is."""
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if spec["device"] == "cuda" else "cpu")
    import deepspeed
    import torch
    import torch.distributed as dist

    from tunewright.seeding import seed_everything

    cuda = spec["device"] == "cuda"
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    cfg = TrainConfig.model_validate(spec["train"])
    seed_everything(spec["seed"])
    rank = Rank(spec, cfg, device)
    start, state = rank.resume()
    result = loop.train(rank.run, rank, start, state, rank.say)
    rank.save(result, start, state)
    dist.barrier()


def main(spec_path: str) -> None:
    """A torchrun rank: `run_rank`, then leave."""
    import torch.distributed as dist

    run_rank(json.loads(Path(spec_path).read_text()))
    dist.destroy_process_group()
    # Every rank is done and rank 0 has written the result: leave without the interpreter's teardown, where a
    # communication thread still joinable when its C++ object is destroyed aborts the process ("terminate called
    # without an active exception", SIGABRT), now and then, failing a run that finished.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


class Rank:
    """The loop's launcher on one torchrun rank: DeepSpeed's engine steps, the figures are reduced over the ranks,
    and only rank 0 talks to MLflow (one stage run, not one per rank) and writes weights and results."""

    def __init__(self, spec: dict, cfg: TrainConfig, device):
        import deepspeed
        import torch
        import torch.distributed as dist
        from transformers import AutoTokenizer, get_scheduler

        self.spec, self.cfg, self.rank, self.world = spec, cfg, dist.get_rank(), dist.get_world_size()
        self.say = _Quiet() if self.rank else _Say(spec.get("progress_path"))
        model_cfg = ModelConfig.model_validate(spec["model"])
        self.tokenizer = AutoTokenizer.from_pretrained(spec["base_dir"])
        self.net = methods.build(spec["base_dir"], spec["adapter_dir"], model_cfg, device, cfg.gradient_checkpointing,
                                 spec["precision"], cast_frozen=False)
        params = [p for p in self.net.parameters() if p.requires_grad]
        self.head = None
        if cfg.objective in ("reward", "ppo"):  # made right after the network, as in one process: the same first draw
            self.head = reward_model.scalar_head(reward_model.hidden_size(self.net), device,
                                                 bias=cfg.objective == "ppo")
            params += list(self.head.parameters())
        fpt = perf.flops_per_token(sum(p.numel() for p in self.net.parameters()), sum(p.numel() for p in params),
                                   model_cfg.adapter.method in ("full", "hft"),
                                   n_embedding=self.net.get_input_embeddings().weight.numel())
        self.n_trainable = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in params)
        # every rank measures its own matmul peak at once (they share the machine on a CPU); MFU is over the sum
        peak = torch.tensor(perf.peak_flops(device.type, spec["precision"], torch.get_num_threads()),
                            dtype=torch.float64)
        dist.all_reduce(peak)
        ds_config = json.loads(Path(spec["deepspeed_config"]).read_text())
        self.zero_stage = ds_config["zero_optimization"]["stage"]
        score = None
        if cfg.objective in ON_POLICY:
            import mlflow

            mlflow.set_tracking_uri(spec["tracking_uri"])  # where train.reward_model (models:/...) is registered
            score = rewards.scorer(cfg.reward_model or cfg.reward, device)
        amp = autocast_dtype(spec["precision"]) if not ds_config.get("bf16", {}).get("enabled") else None
        optimizer = _optimizer(params, cfg, ds_config, self.rank)
        self.optimizer = optimizer
        self.scheduler = get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.warmup_steps,
                                       num_training_steps=cfg.max_steps)
        ds_config.update(train_micro_batch_size_per_gpu=cfg.batch_size, gradient_accumulation_steps=cfg.grad_accum,
                         zero_allow_untested_optimizer=True, steps_per_print=10**9)
        kernels, _ = loop.kernels_for(cfg, self.zero_stage)
        module = loop.step_loss_module(self.net, self.head, cfg, self.tokenizer, score, amp, kernels, self._across)
        self.engine, _, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, lr_scheduler=self.scheduler,
                                                    config=ds_config)
        batches, align = self._rows()
        # each rank samples from its own stream (the one process's when there is one rank)
        self.run = loop.Run(cfg, module, self.tokenizer, batches, align, score, amp, kernels,
                            spec["seed"] * self.world + self.rank, Path(spec["rollout_dir"]) / f"rank{self.rank}",
                            fpt, float(peak))
        self.client, self.logged_up_to = None, 0
        if self.rank == 0:
            from mlflow import MlflowClient

            self.client = MlflowClient(spec["tracking_uri"])
            # a run resumed in the same MLflow run (a task retry, a restart after a lost node) trains again the steps
            # after its checkpoint; the ones already logged are not logged twice
            self.logged_up_to = max((m.step for m in self.client.get_metric_history(spec["run_id"], "train_loss")),
                                    default=0)

    def _rows(self):
        cfg, spec = self.cfg, self.spec
        records = read_split(spec["train_path"])
        sft_steps = cfg.max_steps if cfg.objective == "sft" else cfg.sft_steps
        batches = (loop.supervised_rows(cfg, self.tokenizer, records, self.world, self.rank, spec["seed"], self.say,
                                        log_weights=False) if sft_steps else None)
        align = (loop.alignment_rows(cfg, self.tokenizer, records, self.world, self.rank, spec["seed"], self.say)
                 if cfg.objective != "sft" else None)
        return batches, align

    def _across(self, x):
        """A batch statistic's mean over the ranks (ORPO's token count, KTO's KL estimate)."""
        import torch.distributed as dist

        total = x.detach().double().clone()
        dist.all_reduce(total)
        return (total / self.world).to(x.dtype)

    def resume(self) -> tuple[int, dict]:
        """Rank 0 picks the newest checkpoint that verifies; every rank loads its own partition of it."""
        import torch
        import torch.distributed as dist

        root = Path(self.spec["checkpoint_dir"])
        choice = [None]
        if self.rank == 0:
            found = checkpoints.latest(root, _Say())
            choice = [str(found) if found else None]
        dist.broadcast_object_list(choice, src=0)
        if not choice[0]:
            return 0, {"tokens": 0, "seconds": 0.0}
        found = Path(choice[0])
        kept = json.loads((found / "loop_state.json").read_text())
        if kept["world_size"] != self.world:
            raise RuntimeError(f"checkpoint {found} was written by {kept['world_size']} processes, this run has "
                               f"{self.world}; resume with environment.num_processes: {kept['world_size']}")
        # GRPO's and PPO's frozen KL reference, saved with the module, is loaded again from the starting adapter
        self.engine.load_checkpoint(str(found), tag="deepspeed", load_module_strict=self.cfg.objective not in ON_POLICY)
        checkpoints.set_rng_state(torch.load(found / f"rng-rank{self.rank}.pt", weights_only=False))
        self.say.info("resuming from checkpoint %s (step %d of %d)", found.name, kept["step"], self.cfg.max_steps)
        return kept["step"], {"tokens": kept["tokens"], "seconds": kept["seconds"]}

    def start_alignment(self, start: int):
        return _start_alignment(self.cfg, self.net, self.head, self.tokenizer, self.run.align, self.spec, start,
                                self.zero_stage, self.rank, self.world, self.run.amp, self.say, self.run.kernels)

    def set_learning_rates(self, lrs: list[float]) -> None:
        for group, lr in zip(self.optimizer.param_groups, lrs):
            group["lr"] = lr  # the scheduler sets its own value again on its next step

    def loss(self, **inputs):
        return self.engine(**inputs)

    def backward(self, loss, share: float) -> None:
        self.engine.backward(loss)  # DeepSpeed divides by its gradient_accumulation_steps (the recipe's grad_accum)
        self.engine.step()  # DeepSpeed applies the gradients at the accumulation boundary

    def finish_step(self, aligning: bool) -> float | None:
        return None  # the global norm is read by rank 0 when it reports

    def reduce(self, loss: float, tokens: int) -> tuple[float, int]:
        import torch
        import torch.distributed as dist

        both = torch.tensor([loss, float(tokens)], dtype=torch.float64)
        dist.all_reduce(both)
        return float(both[0]) / self.world, int(both[1])

    def mean_metrics(self, values: dict[str, float]) -> dict[str, float]:
        return _mean_over_ranks(values, self.world)

    def report(self, step: int, metrics: dict[str, float], line: str) -> None:
        if self.rank:
            return
        norm = self.engine.get_global_grad_norm()
        if norm is not None:
            metrics["grad_norm"] = float(norm)
        if step > self.logged_up_to:
            self.client.log_batch(self.spec["run_id"], metrics=[_metric(k, v, step) for k, v in metrics.items()])
        self.say.info("%s  (%d processes, ZeRO-%d)", line, self.world, self.zero_stage)

    def after_step(self, step: int, state: dict) -> bool:
        cfg = self.cfg
        if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < cfg.max_steps:
            path = _save_checkpoint(self.engine, Path(self.spec["checkpoint_dir"]), step,
                                    {**state, "world_size": self.world}, cfg.keep_checkpoints, self.rank)
            self.say.info("checkpoint %s written", path.name)
        return False

    def save(self, result: loop.Result, start: int, state: dict) -> None:
        """Rank 0 writes the trained weights (gathered under ZeRO-3) and `result.json` for the task."""
        with _gathered(self.net, self.head, self.zero_stage):
            if self.rank == 0:
                loop.save_trained(self.net, self.tokenizer, self.head, self.cfg.objective,
                                  Path(self.spec["output_dir"]), self.spec.get("base_digest"))
        if self.rank == 0:
            Path(self.spec["result_path"]).write_text(json.dumps({
                "final_loss": result.final_loss, "steps": self.cfg.max_steps, "tokens": state["tokens"],
                "seconds": state["seconds"], "world_size": self.world, "resumed_from": start,
                "n_trainable": self.n_trainable}))


def _start_alignment(train, net, head, tokenizer, align, spec: dict, start: int, zero_stage: int, rank: int,
                     world: int, amp, say, kernels):
    """At the first alignment step, on every rank together: keep the starting model for stage 5 (rank 0 writes it,
    gathered under ZeRO-3), load it frozen as GRPO's or PPO's KL reference, and return the reference
    log-probabilities of DPO and KTO, each rank scoring its share of the rows training will see. A run resumed past
    this point reads the reference rank 0 kept."""
    import torch
    import torch.distributed as dist

    start_dir = Path(spec["start_dir"]) if spec.get("start_dir") else None
    ref_path = Path(spec["reference_path"])
    needs_ref = train.objective in objectives.NEEDS_REFERENCE
    needed = loop.needed_reference_rows(train, align) if needs_ref else []
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
                                     amp, None, min_batches=math.ceil(math.ceil(len(needed) / world) / size),
                                     kernels=kernels)
    # each row was scored by one rank: the sum over ranks of the scored values is the whole table
    scored = (~out.isnan()).to(torch.float32)
    values = out.nan_to_num(0.0)
    dist.all_reduce(scored)
    dist.all_reduce(values)
    ref = torch.where(scored > 0, values, torch.full_like(values, float("nan")))
    if rank == 0:
        ref_path.parent.mkdir(parents=True, exist_ok=True)
        save_atomic(ref_path, lambda tmp: torch.save(ref, tmp))
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
    """Rank 0's log: lines the launching task forwards to its own log (printed for torchrun's pipe, and appended to
    `progress` for a launcher on another machine, e.g. Ray's driver, which follows the file)."""

    def __init__(self, progress: str | None = None):
        self.progress = progress

    def info(self, msg, *args):
        text = msg % args if args else msg
        print("[tunewright] " + text, flush=True)
        if self.progress:
            with open(self.progress, "a", encoding="utf-8") as fh:
                fh.write(text.replace("\n", " ") + "\n")

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
