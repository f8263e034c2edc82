"""Stage 4's training loop: one loop for every objective and every launcher.

The loop owns what a step is: which rows each micro-batch holds (`Batches`, a pure function of the seed and the
batch index, so a resumed run needs no iterator state), the learning rate of each step (`step_learning_rates`),
PPO's rollouts, and the loss of each objective on a micro-batch (`StepLoss`). What differs between launchers is
how a process computes gradients and steps, gathers figures across processes, keeps checkpoints and validates:
that is a `Launcher`. `tasks.finetune.stage` runs the loop in the task's own process (`OneProcess`);
`tasks.finetune.distributed` runs it on every torchrun rank under DeepSpeed ZeRO.
"""

from __future__ import annotations

import functools
import json
import math
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

from tasks.finetune import objectives
from tunewright import preference
from tunewright.chat import encode_example, pack, pad_batch
from tunewright.files import save_atomic
from tunewright.recipe import ON_POLICY, TrainConfig
from tunewright.scoring import reward_model
from tunewright.train.cross_entropy import LOGIT_CHUNK_TOKENS
from tunewright.train import memory_plan
from tunewright.train.loss import Kernels, token_loss


class Batches:
    """Micro-batch `i` is a pure function of (seed, i): resuming at a step needs no iterator state."""

    def __init__(self, encoded: list[dict], batch_size: int, seed: int, pad_id: int):
        self.encoded, self.batch_size, self.seed, self.pad_id = encoded, batch_size, seed, pad_id
        self.per_epoch = len(encoded) // batch_size
        self._orders: dict[int, list[int]] = {}

    def rows(self, index: int) -> list:
        import torch

        epoch, pos = divmod(index, self.per_epoch)
        if epoch not in self._orders:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._orders = {epoch: torch.randperm(len(self.encoded), generator=gen).tolist()}
        return self._orders[epoch][pos * self.batch_size : (pos + 1) * self.batch_size]

    def __call__(self, index: int) -> dict:
        return pad_batch([self.encoded[i] for i in self.rows(index)], self.pad_id)


class RankSlice:
    """One process's share (`size` rows from `rank * size`) of every global batch of `batches` (all of it in one
    process)."""

    def __init__(self, batches: Batches, rank: int, size: int):
        self.batches, self.rank, self.size = batches, rank, size
        self.encoded, self.pad_id = batches.encoded, batches.pad_id

    def rows(self, index: int) -> list:
        return self.batches.rows(index)[self.rank * self.size : (self.rank + 1) * self.size]


def sft_records(records: list[dict]) -> list[dict]:
    """Training records as conversations: chat records as they are; preference pairs and feedback by their good answers."""
    if all("messages" in r for r in records):
        return records
    return [{"id": r.get("id"), "messages": c} for r, c in zip(records, preference.sft_conversations(records))]


def training_examples(cfg: TrainConfig, train: list[dict], tokenizer, log, log_weights: bool = True) -> list[dict]:
    """Encoded training rows: answer-only labels, class weights per token, packed if the recipe asks.

    One process and every rank of a distributed run build the same rows from the same split.
    """
    encoded = [encode_example(tokenizer, r["messages"], cfg.max_seq_len, r.get("tools")) for r in train]
    if cfg.loss == "class_weighted":
        weights = class_weights([label(r, cfg.label_field) for r in train])
        for ex, r in zip(encoded, train):
            ex["token_weight"] = [weights[label(r, cfg.label_field)]] * len(ex["input_ids"])
        if log_weights:
            log_class_weights(weights, log)
    if cfg.packing:
        n_examples = len(encoded)
        encoded = pack(encoded, cfg.max_seq_len)
        log.info("packed %d examples into %d rows of up to %d tokens", n_examples, len(encoded), cfg.max_seq_len)
    return encoded


def label(record: dict, field_name: str | None) -> str:
    """The class label of a training record: its answer, or one JSON field of it."""
    answer = record["messages"][-1]["content"]
    if field_name is None:
        return answer
    try:
        value = json.loads(answer)[field_name]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ValueError(f"train.label_field '{field_name}': record {record['id']} has no such JSON field in its "
                         "answer") from exc
    return str(value)


def class_weights(labels: list[str]) -> dict[str, float]:
    """Inverse-frequency weights, N / (K * count), so the mean weight per example is 1."""
    counts = Counter(labels)
    return {name: len(labels) / (len(counts) * n) for name, n in sorted(counts.items())}


def log_class_weights(weights: dict[str, float], log) -> None:
    import mlflow

    mlflow.log_dict(weights, "class_weights.json")
    log.info("class weights over %d labels: %s", len(weights),
             ", ".join(f"{k}={v:.2f}" for k, v in list(weights.items())[:8]))


def step_learning_rates(cfg: TrainConfig, scheduler, step: int) -> list[float]:
    """Each parameter group's learning rate for optimiser step `step` (from 1): the scheduler's for supervised steps;
    for the alignment steps after `sft_steps`, peaking at alignment_learning_rate, either further along the one
    schedule over max_steps (`shared`) or on a schedule of their own over the alignment steps (`restart`)."""
    if cfg.objective == "sft" or step <= cfg.sft_steps:
        return scheduler.get_last_lr()
    scale = (cfg.alignment_learning_rate or cfg.learning_rate) / cfg.learning_rate
    if cfg.alignment_schedule == "shared":
        return [lr * scale for lr in scheduler.get_last_lr()]
    factor = _schedule_factor(cfg.lr_scheduler, cfg.warmup_steps, cfg.max_steps - cfg.sft_steps)(
        step - cfg.sft_steps - 1)
    return [base * scale * factor for base in scheduler.base_lrs]


@functools.lru_cache(maxsize=4)
def _schedule_factor(kind: str, warmup: int, steps: int):
    """transformers' multiplier of the peak rate at each 0-based step of a `kind` schedule over `steps` steps."""
    import torch
    from transformers import get_scheduler

    return get_scheduler(kind, torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0),
                         num_warmup_steps=warmup, num_training_steps=steps).lr_lambdas[0]


def answers_per_prompt(cfg: TrainConfig) -> int:
    """Answers GRPO and PPO sample per prompt: `num_generations` for GRPO and for PPO's group baseline, else one."""
    return cfg.num_generations if cfg.objective == "grpo" or cfg.reward_baseline == "group" else 1


def sampling_seed(seed: int, batch: int) -> int:
    """The seed GRPO and PPO sample micro-batch `batch` with (a function of the run's seed and the batch alone)."""
    return (seed * 1_000_003 + 7919 * (batch + 1)) % 2**63


def kernels_for(cfg: TrainConfig, zero_stage: int | None = None) -> tuple[Kernels, str]:
    """The loss paths this run may take, and why the shared prefix is off ('' where it is on). Under ZeRO-3 every
    rank must make the same calls, so the shared prefix's extra decoder call and chunked head calls stand aside."""
    why = ("ZeRO-3 gathers weights on every call, so every rank must make the same calls" if zero_stage == 3 else
           "" if cfg.shared_prefix else "train.shared_prefix is false")
    return Kernels(shared_prefix=not why, logit_chunk=0 if zero_stage == 3 else LOGIT_CHUNK_TOKENS), why


def ppo_rollouts(cfg: TrainConfig, net, head, tokenizer, align: RankSlice, index: int, score, amp, folder: Path,
                 seed: int, log, kernels: Kernels = Kernels()) -> list[dict]:
    """The sampled answers that PPO's next `ppo_epochs` steps train on, one per micro-batch: read back from `folder`
    when a resumed run reaches a rollout it had made before it stopped, so it trains on the same samples."""
    import torch

    path = folder / f"rollout-{index:06d}.pt"
    if path.is_file():
        log.info("ppo: rollout %d read back from %s", index, path.name)
        return torch.load(path)
    made = [objectives.ppo_rollout(net, head, tokenizer,
                                   [align.encoded[i] for i in align.rows(index * cfg.grad_accum + m)], score,
                                   cfg.temperature, cfg.max_new_tokens, cfg.beta, cfg.gae_gamma, cfg.gae_lambda, amp,
                                   sampling_seed(seed, index * cfg.grad_accum + m), cfg.reward_baseline,
                                   answers_per_prompt(cfg), kernels) for m in range(cfg.grad_accum)]
    save_atomic(path, lambda tmp: torch.save(made, tmp))
    return made


def step_loss_module(net, head, cfg: TrainConfig, tokenizer, score, amp, kernels: Kernels,
                     across: Callable = objectives.identity):
    """The network wrapped so that its forward computes the objective's loss on one micro-batch: answer tokens
    (focal, weighted) for a supervised batch, or the alignment objective on `rows` (GRPO sampling with `seed`, PPO
    on a `rollout`). Its `last` holds the objective's metrics and the tokens read. One process calls it directly;
    DeepSpeed wraps it, so the head (a reward model's or PPO's critic) is partitioned and saved with the network."""
    import torch

    focal_gamma = cfg.focal_gamma if cfg.loss == "focal" else 0.0

    class StepLoss(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net, self.head = net, head
            self.last: tuple[dict, int] = ({}, 0)

        def forward(self, batch=None, rows=None, ref=None, seed=None, rollout=None, reduction="mean"):
            if batch is not None:
                self.last = ({}, int(batch["attention_mask"].sum()))
                return token_loss(self.net, batch, reduction, focal_gamma=focal_gamma, kernels=kernels)
            if cfg.objective == "grpo":
                loss, metrics = objectives.grpo_step(
                    self.net, tokenizer, rows, score, cfg.num_generations, cfg.temperature, cfg.max_new_tokens,
                    cfg.beta, cfg.clip_epsilon, amp, seed, kernels)
                tokens = int(metrics.pop("tokens"))
            elif cfg.objective == "ppo":
                loss, metrics = objectives.ppo_update(self.net, self.head, rollout, cfg.clip_epsilon, cfg.value_clip,
                                                      cfg.value_coef, kernels)
                tokens = int(metrics.pop("tokens"))
            else:
                loss, metrics, tokens = objectives.pair_step(cfg.objective, self.net, self.head, rows, ref,
                                                             tokenizer.pad_token_id, cfg, kernels, across)
            self.last = ({k: float(v) for k, v in metrics.items()}, tokens)
            return loss

    return StepLoss()


class Launcher(Protocol):
    """What differs between running the loop in one process and on each rank of a distributed run."""

    rank: int
    world: int
    scheduler: Any  # the learning-rate schedule of supervised steps (`step_learning_rates` reads it)

    def start_alignment(self, start: int) -> Any:
        """At the first alignment step: keep the starting model, make the reference; returns DPO's or KTO's
        reference log-probabilities (or None)."""

    def set_learning_rates(self, lrs: list[float]) -> None: ...

    def loss(self, **inputs) -> Any:
        """The step loss module's forward on this process's share of a micro-batch."""

    def backward(self, loss, share: float) -> None:
        """Gradients of `loss`, whose weight in the step's loss is `share` (a launcher that accumulates on its own,
        as DeepSpeed does over its fixed micro-batches, scales by itself)."""

    def finish_step(self, aligning: bool) -> float | None:
        """Apply the step's gradients; the gradient norm where the launcher knows it."""

    def reduce(self, loss: float, tokens: int) -> tuple[float, int]:
        """The step's loss (mean) and tokens (sum) over the processes."""

    def mean_metrics(self, values: dict[str, float]) -> dict[str, float]: ...

    def report(self, step: int, metrics: dict[str, float], line: str) -> None:
        """Record one step's figures (MLflow) and its log line."""

    def after_step(self, step: int, state: dict) -> bool:
        """Validation, early stopping and checkpoints after `step`; True stops training."""


@dataclass
class Run:
    """What the loop trains, on which rows, and how it measures itself."""

    cfg: TrainConfig
    module: Any  # `step_loss_module`'s: the network, the head and the objective's loss
    tokenizer: Any
    batches: RankSlice | None  # supervised micro-batches
    align: RankSlice | None  # alignment rows
    score: Any
    amp: Any
    kernels: Kernels
    sample_seed: int  # GRPO's and PPO's sampling stream: the run's seed (and rank)
    rollout_dir: Path
    flops_per_token: float
    peak: float
    before_step: Callable[[int], None] | None = None  # Half Fine-Tuning picks the step's trainable half
    micro_tokens: int = 0  # a memory plan's micro-batch budget in tokens (0: the recipe's micro-batches)
    ref: Any = None
    rollouts: list = field(default_factory=list)
    rollout_key: int | None = None

    @property
    def sft_steps(self) -> int:
        return self.cfg.max_steps if self.cfg.objective == "sft" else self.cfg.sft_steps


@dataclass
class Result:
    final_loss: float
    steps: int
    stopped_early: bool


def train(run: Run, launcher: Launcher, start: int, state: dict, log) -> Result:
    """Optimiser steps `start + 1` .. `max_steps` (fewer if validation stops it); `state` (tokens, seconds, and what
    the launcher keeps there) carries over from a checkpoint and is updated in place."""
    import torch

    cfg = run.cfg
    loss_value, step, started = float("nan"), start, False
    for step in range(start + 1, cfg.max_steps + 1):
        if run.before_step:
            run.before_step(step)
        aligning = step > run.sft_steps
        if aligning and not started:
            run.ref, started = launcher.start_alignment(start), True
        lrs = step_learning_rates(cfg, launcher.scheduler, step)
        launcher.set_learning_rates(lrs)
        t0 = time.perf_counter()
        if aligning and cfg.objective == "ppo":
            _refresh_rollouts(run, step, launcher, log)
        step_loss, tokens, extra = 0.0, 0, {}
        for inputs, share in _step_inputs(run, launcher, step, aligning):
            with torch.autocast(_device_type(run), dtype=run.amp or torch.float32, enabled=run.amp is not None):
                loss = launcher.loss(**inputs)
            launcher.backward(loss, share)
            step_loss += float(loss.detach()) * share
            found, n = run.module.last
            tokens += n
            for k, v in found.items():
                extra[k] = extra.get(k, 0.0) + v * share
        grad_norm = launcher.finish_step(aligning)
        loss_value, tokens = launcher.reduce(step_loss, tokens)
        dt = time.perf_counter() - t0
        state["tokens"] += tokens
        state["seconds"] += dt
        if not math.isfinite(loss_value):
            raise FloatingPointError(f"train loss became {loss_value} at step {step}; lower train.learning_rate")
        if step % cfg.log_every == 0 or step == cfg.max_steps:
            _report(run, launcher, step, aligning, loss_value, lrs[0], grad_norm, tokens / dt, dt,
                    launcher.mean_metrics(extra))
        if launcher.after_step(step, state):
            return Result(loss_value, step, True)
    return Result(loss_value, step, False)


def _device_type(run: Run) -> str:
    return next(run.module.net.parameters()).device.type


def _refresh_rollouts(run: Run, step: int, launcher: Launcher, log) -> None:
    """PPO samples afresh every `ppo_epochs` steps; the steps between train on the same rollout."""
    key = (step - run.sft_steps - 1) // run.cfg.ppo_epochs
    if key != run.rollout_key:
        run.rollout_key = key
        run.rollouts = ppo_rollouts(run.cfg, run.module.net, run.module.head, run.tokenizer, run.align, key,
                                    run.score, run.amp, run.rollout_dir, run.sample_seed, log, run.kernels)


def _step_inputs(run: Run, launcher: Launcher, step: int, aligning: bool) -> list[tuple[dict, float]]:
    """The step loss's inputs for each micro-batch of `step` and its share of the step's loss: the recipe's
    `grad_accum` micro-batches, each a mean over its answer tokens weighing 1 / grad_accum; or, under a memory plan,
    the step's rows cut by the token budget, each micro-batch's summed loss over the step's answer tokens."""
    cfg = run.cfg
    if aligning or not run.micro_tokens:
        return [(_micro_inputs(run, launcher, step, micro, aligning), 1.0 / cfg.grad_accum)
                for micro in range(cfg.grad_accum)]
    rows = [i for micro in range(cfg.grad_accum) for i in run.batches.rows((step - 1) * cfg.grad_accum + micro)]
    encoded = [run.batches.encoded[i] for i in rows]
    total = sum(memory_plan.answer_weight(e) for e in encoded) or 1.0
    device = next(run.module.net.parameters()).device
    groups = memory_plan.split_by_tokens([len(e["input_ids"]) for e in encoded], run.micro_tokens)
    return [({"batch": {k: v.to(device) for k, v in pad_batch([encoded[i] for i in g], run.batches.pad_id).items()},
              "reduction": "sum"}, 1.0 / total) for g in groups]


def _micro_inputs(run: Run, launcher: Launcher, step: int, micro: int, aligning: bool) -> dict:
    """The step loss's inputs for one micro-batch: this process's rows of it."""
    cfg = run.cfg
    if not aligning:
        # the global batch is padded as a whole, then shared out: every process's rows have the same width
        full = run.batches.batches((step - 1) * cfg.grad_accum + micro)
        mine = slice(launcher.rank * cfg.batch_size, (launcher.rank + 1) * cfg.batch_size)
        device = next(run.module.net.parameters()).device
        return {"batch": {k: v[mine].to(device) for k, v in full.items()}}
    b = (step - run.sft_steps - 1) * cfg.grad_accum + micro
    idx = run.align.rows(b)
    return {"rows": [run.align.encoded[i] for i in idx], "ref": run.ref[idx] if run.ref is not None else None,
            "seed": sampling_seed(run.sample_seed, b), "rollout": run.rollouts[micro] if run.rollouts else None}


def _report(run: Run, launcher: Launcher, step: int, aligning: bool, loss: float, lr: float, grad_norm, tps: float,
            dt: float, extra: dict[str, float]) -> None:
    cfg = run.cfg
    mfu = tps * run.flops_per_token / run.peak
    metrics = {"train_loss": loss, "learning_rate": lr, "tokens_per_second": tps, "mfu": mfu, "step_seconds": dt,
               **({"grad_norm": grad_norm} if grad_norm is not None else {}),
               **{f"{cfg.objective}_{k}": v for k, v in extra.items()}}
    norm = f"  grad_norm {grad_norm:.3f}" if grad_norm is not None else ""
    line = (f"step {step}/{cfg.max_steps} {cfg.objective if aligning else 'sft'} loss {loss:.4f}  lr {lr:.2e}{norm}  "
            f"{tps:.0f} tok/s  MFU {100 * mfu:.1f}%  {dt:.2f}s" + "".join(f"  {k} {v:.3f}" for k, v in extra.items()))
    launcher.report(step, metrics, line)


def save_trained(net, tokenizer, head, objective: str, out: Path, base_digest: str | None) -> None:
    """The trained weights (adapter or model), the tokenizer, and a reward model's head or PPO's critic."""
    net.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    if objective == "reward":
        reward_model.save_head(head, out, meta={"kind": "reward_model", "pooling": "last_token",
                                                "base_digest": base_digest})
    elif objective == "ppo":
        reward_model.save_head(head, out, reward_model.VALUE_HEAD_FILE)


def needed_reference_rows(cfg: TrainConfig, align: RankSlice) -> list[int]:
    """Every row (of the global batches) the alignment steps will train on."""
    batches = (cfg.max_steps - cfg.sft_steps) * cfg.grad_accum
    return sorted({i for b in range(batches) for i in align.batches.rows(b)})


def alignment_rows(cfg: TrainConfig, tokenizer, records: list[dict], world: int, rank: int, seed: int,
                   log) -> RankSlice:
    """The alignment objective's encoded rows, this process's share of each global batch."""
    rows = preference.encode_rows(cfg.objective, tokenizer, records, cfg.max_seq_len)
    processes = f" x {world} processes" if world > 1 else ""
    if len(rows) < cfg.batch_size * world:
        raise ValueError(f"train.batch_size {cfg.batch_size}{processes} exceeds the {len(rows)} {cfg.objective} rows")
    log.info("%s: %d rows (%s)", cfg.objective, len(rows),
             f"{sum(r['desirable'] for r in rows)} desirable" if cfg.objective == "kto" else
             f"prompts, {answers_per_prompt(cfg)} answers sampled per prompt, "
             f"reward {cfg.reward_model or cfg.reward}" if cfg.objective in ON_POLICY else "chosen/rejected pairs")
    return RankSlice(Batches(rows, cfg.batch_size * world, seed + 1, tokenizer.pad_token_id), rank, cfg.batch_size)


def supervised_rows(cfg: TrainConfig, tokenizer, records: list[dict], world: int, rank: int, seed: int, log,
                    log_weights: bool = True) -> RankSlice:
    """The supervised rows, encoded, this process's share of each global batch."""
    encoded = training_examples(cfg, sft_records(records), tokenizer, log, log_weights)
    if len(encoded) < cfg.batch_size * world:
        what = (f"train.batch_size {cfg.batch_size} x {world} processes exceeds the {len(encoded)} training rows"
                if world > 1 else f"train.batch_size {cfg.batch_size} exceeds the {len(encoded)} training examples")
        raise ValueError(what)
    return RankSlice(Batches(encoded, cfg.batch_size * world, seed, tokenizer.pad_token_id), rank, cfg.batch_size)
