"""The fine-tune task: supervised fine-tuning with the loss on assistant tokens only, preference
alignment (DPO, ORPO, KTO, GRPO, PPO; `objectives`), optionally after supervised warm-up steps, or a
reward model (`tunewright.scoring.reward_model`).

Every step logs loss, learning rate, gradient norm, tokens/s and MFU to MLflow. With
`train.checkpoint_every`, training writes resumable checkpoints; whenever the task starts and
finds one in its run folder (a Prefect retry, or `tunewright run --resume`), it continues from
the newest complete checkpoint instead of starting over.
"""

from __future__ import annotations

from contextlib import contextmanager

import functools
import json
import math
import time
from pathlib import Path

from prefect import task

from tasks.artifacts import DataArtifact, EnvironmentArtifact, ModelArtifact, TrainArtifact
from tasks.finetune import checkpoints, objectives, perf
from tunewright import preference
from tunewright.train import methods
from tunewright.scoring import reward_model, rewards
from tunewright import pruning
from tunewright.chat import answer_loss, autocast_dtype, encode_example, pack, pad_batch, token_loss
from tunewright.logs import stage_logger
from tunewright.recipe import ON_POLICY, PEFT_METHODS, ModelConfig, TrainConfig
from tunewright.seeding import seed_everything
from tunewright.splits import read_split
from tunewright.registry.tracking import RunContext, log_to_parent, stage_run


class _Batches:
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


def training_examples(cfg: TrainConfig, train: list[dict], tokenizer, log, log_weights: bool = True) -> list[dict]:
    """Encoded training rows: answer-only labels, class weights per token, packed if the recipe asks.

    One process and every rank of a distributed run build the same rows from the same split.
    """
    encoded = [encode_example(tokenizer, r["messages"], cfg.max_seq_len) for r in train]
    if cfg.loss == "class_weighted":
        weights = class_weights([_label(r, cfg.label_field) for r in train])
        for ex, r in zip(encoded, train):
            ex["token_weight"] = [weights[_label(r, cfg.label_field)]] * len(ex["input_ids"])
        if log_weights:
            _log_class_weights(weights, log)
    if cfg.packing:
        n_examples = len(encoded)
        encoded = pack(encoded, cfg.max_seq_len)
        log.info("packed %d examples into %d rows of up to %d tokens", n_examples, len(encoded), cfg.max_seq_len)
    return encoded


def _set_shared_prefix(cfg: TrainConfig, batches: _Batches | None, align: _Batches | None, method: str, log) -> None:
    """Switch the shared-prefix forward (`tunewright.chat.shared_prefix_length`) as the recipe says, and say whether
    it is used and why not."""
    import mlflow

    from tunewright import chat

    chat.SHARED_PREFIX.update(enabled=cfg.shared_prefix, why_not="" if cfg.shared_prefix else "train.shared_prefix is false")
    why = (chat.SHARED_PREFIX["why_not"] if not chat.SHARED_PREFIX["enabled"] else
           "train.packing: packed rows restart their positions" if cfg.packing else
           "train.gradient_checkpointing keeps no cache to share" if cfg.gradient_checkpointing else
           f"adapter method {method} prepends soft prompts" if method in ("prompt_tuning", "prefix_tuning") else "")
    first = None
    if batches is not None:
        first = batches(0)
    elif align is not None and align.encoded and ("chosen" in align.encoded[0] or "answer" in align.encoded[0]):
        part = "chosen" if "chosen" in align.encoded[0] else "answer"
        first = chat.pad_batch([align.encoded[i][part] for i in align.rows(0)], align.pad_id)
    shared = chat.shared_prefix_length(first) if first is not None and not why else 0
    if why:
        log.info("shared prefix: not used (%s); the plain forward runs every token of every row", why)
    elif shared:
        width = first["input_ids"].shape[1]
        log.info("shared prefix: the first batch's rows share %d of their %d positions; they run through the "
                 "model once per batch, not once per row", shared, width)
    else:
        log.info("shared prefix: the first batch's rows share fewer than %d prompt tokens; batches that do share "
                 "them still use it", chat.MIN_SHARED_PREFIX)
    mlflow.log_param("shared_prefix_tokens_first_batch", shared)


def _log_kernels(net, cfg: TrainConfig, device, amp, log) -> None:
    """Say which of the step's speed-ups this run uses, and why not where one stands aside."""
    import mlflow
    import torch

    from tunewright import chat

    from tunewright.train import attention, fused_lora, fused_rmsnorm

    lm = net.get_base_model() if hasattr(net, "get_base_model") else net
    attn = getattr(lm.config, "_attn_implementation", "?")
    log.info("attention: %s%s", attn, " (the plain product on the CPU for short rows, sdpa for long ones)"
             if attn == attention.NAME else "" if device.type != "cpu" else " (tunewright_cpu is for sdpa models)")
    head = lm.get_output_embeddings()
    special = any(getattr(lm.config, k, None) for k in ("final_logit_softcapping", "logit_scale"))
    own_decode = type(head) is torch.nn.Linear and not special and not getattr(
        getattr(net, "active_peft_config", None), "is_prompt_learning", False)
    if own_decode:
        log.info("vocabulary projection: answer positions only, fused with the cross-entropy, %d positions at a time%s",
                 chat.LOGIT_CHUNK_TOKENS, "; the frozen head kept in the autocast dtype" if amp is not None
                 and not head.weight.requires_grad else "")
    else:
        log.info("vocabulary projection: the model's own head on every position (%s)",
                 "soft prompts" if head is not None and not special else "a head that is not a plain projection")
    unpadded = own_decode and attn == attention.NAME and not cfg.packing and chat.UNPADDED["enabled"]
    why = "packed rows have no padding" if cfg.packing else (f"it needs the {attention.NAME} attention and the "
                                                             "model's own decoder and head")
    log.info("padding: %s", "each batch decoded unpadded (its rows' real tokens as one sequence, apart only in "
             "attention); left-padded batches and sliding-window models decode padded" if unpadded
             else f"batches decoded padded ({why})")
    if unpadded:
        last_why = chat.last_layer_rows_why_not(lm.get_decoder())
        log.info("last layer: %s", f"every position ({last_why})" if last_why else "query and output projections "
                 "and MLP on the positions that reach the loss only (the others give keys and values)")
        mlflow.log_param("last_layer_read_positions_only", not last_why)
    fused = fused_lora.fused_layers(net)
    log.info("LoRA layers: %s", f"{fused} fused (base product, rank-r adapter and sum in one function, the scale "
             "applied at rank r)" if fused else "PEFT's forward" + (" (the fused layer is for CPU training)"
                                                                     if device.type != "cpu" else ""))
    norms = fused_rmsnorm.fused_layers(net)
    log.info("RMSNorm layers: %s", f"{norms} fused (one function each, written in the dtype their linear layers "
             "read)" if norms else "the model's own" + (" (the fused norm is for CPU training)"
                                                         if device.type != "cpu" else ""))
    mlflow.log_params({"attention": attn, "unpadded": unpadded, "fused_lora_layers": fused,
                       "fused_rmsnorm_layers": norms})


def _sft_records(records: list[dict]) -> list[dict]:
    """Training records as conversations: chat records as they are; preference pairs and feedback by their good answers."""
    if all("messages" in r for r in records):
        return records
    return [{"id": r.get("id"), "messages": c} for r, c in zip(records, preference.sft_conversations(records))]


def _start_alignment(cfg: TrainConfig, net, tokenizer, align: _Batches, ref_path: Path, start_dir: Path | None, amp,
                     log, records: list[dict] | None = None, own_path: Path | None = None):
    """At the first alignment step: keep the starting model for stage 5, with `rejected: on_policy` its own
    mistakes as the rejected answers, and the reference log-probabilities."""
    if start_dir is not None and not (start_dir / "training_summary.json").is_file():
        net.save_pretrained(start_dir)
        tokenizer.save_pretrained(start_dir)
        (start_dir / "training_summary.json").write_text(json.dumps({"sft_steps": cfg.sft_steps}))
        log.info("the model after %d supervised steps is kept as the alignment's starting point (%s)",
                 cfg.sft_steps, start_dir)
    if cfg.objective in ON_POLICY and cfg.beta and start_dir is not None and hasattr(net, "peft_config"):
        objectives.keep_reference(net, start_dir)
        log.info("%s: the KL reference is the starting adapter, frozen beside the trained one", cfg.objective)
    if cfg.rejected == "on_policy":
        _own_mistakes(cfg, net, tokenizer, align, records, own_path, amp, log)
    if cfg.objective not in objectives.NEEDS_REFERENCE:
        return None
    batches = (cfg.max_steps - cfg.sft_steps) * cfg.grad_accum
    needed = sorted({i for b in range(batches) for i in align.rows(b)})
    log.info("%s: reference log-probabilities of the %d rows training will see, from the model as alignment starts",
             cfg.objective, len(needed))
    return objectives.reference_logps(net, align.encoded, cfg.objective, tokenizer.pad_token_id, cfg.batch_size * 2,
                                      ref_path, needed, amp, log)


def _own_mistakes(cfg: TrainConfig, net, tokenizer, align: _Batches, records: list[dict], path: Path, amp,
                  log) -> None:
    """`rejected: on_policy`: the model as alignment starts answers (greedily) the prompts of every pair training will
    see, and its wrong answers become those pairs' rejected ones in `align`. The answers are kept at `path` (JSON
    lines: row, id, answer, wrong), so a resumed run trains on the same pairs, and logged to MLflow for review."""
    import mlflow

    from tunewright.chat import generate
    from tunewright.scoring.metrics import same_answer

    if not all("chosen" in r for r in records):
        raise ValueError(f"train.rejected: on_policy needs preference pairs (prompt/chosen/rejected) for "
                         f"{cfg.objective}; the training split has rows without a chosen answer")
    batches = (cfg.max_steps - cfg.sft_steps) * cfg.grad_accum
    wanted = preference.records_of_rows(cfg.objective, records, [i for b in range(batches) for i in align.rows(b)])
    if path.is_file():
        answers = {int(r["row"]): r["answer"] for r in map(json.loads, path.read_text(encoding="utf-8").splitlines())}
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
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps({"row": i, "id": records[i].get("id"), "answer": a,
                                           "wrong": not same_answer(a, records[i]["chosen"][-1]["content"])},
                                          ensure_ascii=False) + "\n" for i, a in answers.items()), encoding="utf-8")
        tmp.replace(path)
        mlflow.log_artifact(str(path), "alignment")
    pairs, changed = preference.with_own_mistakes(records, answers)
    align.encoded[:] = preference.encode_rows(cfg.objective, tokenizer, pairs, cfg.max_seq_len)
    mlflow.log_metrics({"on_policy_prompts": len(answers), "on_policy_wrong": changed})
    log.info("rejected: on_policy: %d of %d answers are wrong (%.0f%%) and replace their pairs' rejected answers; "
             "the %d right ones keep theirs", changed, len(answers), 100 * changed / max(len(answers), 1),
             len(answers) - changed)


def _ppo_rollouts(cfg: TrainConfig, net, head, tokenizer, align: _Batches, index: int, score, amp, folder: Path,
                  seed: int, log) -> list[dict]:
    """The sampled answers that PPO's next `ppo_epochs` steps train on, one per micro-batch: read back from `folder`
    when a resumed run reaches a rollout it had made before it stopped, so it trains on the same samples."""
    import torch

    path = folder / f"rollout-{index:06d}.pt"
    if path.is_file():
        log.info("ppo: rollout %d read back from %s", index, path.name)
        return torch.load(path)
    made = [objectives.ppo_rollout(net, head, tokenizer, [align.encoded[i] for i in align.rows(index * cfg.grad_accum + m)],
                                   score, cfg.temperature, cfg.max_new_tokens, cfg.beta, cfg.gae_gamma, cfg.gae_lambda,
                                   amp, _sampling_seed(seed, index * cfg.grad_accum + m),
                                   cfg.reward_baseline, answers_per_prompt(cfg)) for m in range(cfg.grad_accum)]
    folder.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(made, tmp)
    tmp.replace(path)
    return made


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


def _sampling_seed(seed: int, batch: int) -> int:
    """The seed GRPO and PPO sample micro-batch `batch` with (a function of the run's seed and the batch alone)."""
    return (seed * 1_000_003 + 7919 * (batch + 1)) % 2**63


def _log_class_weights(weights: dict[str, float], log) -> None:
    import mlflow

    mlflow.log_dict(weights, "class_weights.json")
    log.info("class weights over %d labels: %s", len(weights), ", ".join(f"{k}={v:.2f}" for k, v in list(weights.items())[:8]))


def _label(record: dict, field: str | None) -> str:
    """The class label of a training record: its answer, or one JSON field of it."""
    answer = record["messages"][-1]["content"]
    if field is None:
        return answer
    try:
        value = json.loads(answer)[field]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ValueError(f"train.label_field '{field}': record {record['id']} has no such JSON field in its answer") from exc
    return str(value)


def class_weights(labels: list[str]) -> dict[str, float]:
    """Inverse-frequency weights, N / (K * count), so the mean weight per example is 1."""
    from collections import Counter

    counts = Counter(labels)
    return {label: len(labels) / (len(counts) * n) for label, n in sorted(counts.items())}


GPU_LIMIT = "gpu"


@contextmanager
def gpu_slots(env: EnvironmentArtifact):
    """On CUDA, hold one slot of Prefect's `gpu` global concurrency limit per device this training uses, so two
    trainings never share a device (`tunewright deploy` creates the limit with one slot per GPU; without the limit,
    as on one machine outside a server, training goes ahead)."""
    if env.device != "cuda":
        yield
        return
    from prefect.concurrency.sync import concurrency

    with concurrency(GPU_LIMIT, occupy=max(1, env.num_processes)):
        yield


@task(name="4-fine-tune")
def fine_tune(cfg: TrainConfig, model_cfg: ModelConfig, data: DataArtifact, model: ModelArtifact,
              env: EnvironmentArtifact, ctx: RunContext) -> TrainArtifact:
    """Train for `max_steps` optimiser steps (resuming from a checkpoint if one exists)."""
    with gpu_slots(env):
        return _fine_tune(cfg, model_cfg, data, model, env, ctx)


def _fine_tune(cfg: TrainConfig, model_cfg: ModelConfig, data: DataArtifact, model: ModelArtifact,
               env: EnvironmentArtifact, ctx: RunContext) -> TrainArtifact:
    import mlflow
    import torch
    from transformers import AutoTokenizer, get_scheduler

    log = stage_logger()
    seed_everything(env.seed)
    torch.set_num_threads(env.num_threads)
    device = torch.device("cuda" if env.device == "cuda" else "cpu")
    amp = autocast_dtype(env.precision)
    method = model_cfg.adapter.method
    with stage_run(ctx, "4-fine-tune", log_system_metrics=True) as run:
        mlflow.set_tag("tunewright.dataset_digest", data.digest)
        if env.num_processes > 1:
            return _fine_tune_distributed(cfg, model_cfg, data, model, env, ctx, run.info.run_id, log)
        tokenizer = AutoTokenizer.from_pretrained(model.base_dir)
        net = methods.build(model.base_dir, model.adapter_dir, model_cfg, device, cfg.gradient_checkpointing,
                            env.precision)
        net.train()
        hft = methods.HalfFineTuning(net, env.seed, model_cfg.adapter.hft_round_steps) if method == "hft" else None
        params = hft.parameters() if hft else [p for p in net.parameters() if p.requires_grad]
        ids = {id(p) for p in params}
        named = {n: p for n, p in net.named_parameters() if id(p) in ids}
        n_total = sum(p.numel() for p in net.parameters())
        objective = cfg.objective
        head = None
        if objective in ("reward", "ppo"):  # the reward model's score head, or PPO's critic
            head = reward_model.scalar_head(reward_model.hidden_size(net), device, bias=objective == "ppo")
            params = list(params) + list(head.parameters())
            named.update({f"{objective}_head.{n}": p for n, p in head.named_parameters()})
        n_trainable = sum(p.numel() for p in params) // (2 if hft else 1)

        records = read_split(data.train_path)
        sft_steps = cfg.max_steps if objective == "sft" else cfg.sft_steps
        encoded = training_examples(cfg, _sft_records(records), tokenizer, log) if sft_steps else []
        focal_gamma = cfg.focal_gamma if cfg.loss == "focal" else 0.0
        if sft_steps and len(encoded) < cfg.batch_size:
            raise ValueError(f"train.batch_size {cfg.batch_size} exceeds the {len(encoded)} training examples")
        val = preference.sft_conversations(read_split(data.val_path))
        batches = _Batches(encoded, cfg.batch_size, env.seed, tokenizer.pad_token_id) if sft_steps else None
        align = None
        if objective != "sft":
            rows = preference.encode_rows(objective, tokenizer, records, cfg.max_seq_len)
            if len(rows) < cfg.batch_size:
                raise ValueError(f"train.batch_size {cfg.batch_size} exceeds the {len(rows)} {objective} rows")
            align = _Batches(rows, cfg.batch_size, env.seed + 1, tokenizer.pad_token_id)
            log.info("%s: %d rows (%s)", objective, len(rows),
                     f"{sum(r['desirable'] for r in rows)} desirable" if objective == "kto" else
                     f"prompts, {answers_per_prompt(cfg)} answers sampled per prompt, "
                     f"reward {cfg.reward_model or cfg.reward}" if objective in ON_POLICY else "chosen/rejected pairs")
        score = rewards.scorer(cfg.reward_model or cfg.reward, device) if objective in ON_POLICY else None
        rollout_dir = Path(ctx.work_dir, "finetune", "ppo_rollouts")
        rollouts, rollout_key = [], None
        optimizer = methods.optimizer(params, cfg.learning_rate, cfg.weight_decay)
        scheduler = get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.warmup_steps,
                                  num_training_steps=cfg.max_steps)
        ckpt_root = Path(ctx.work_dir, "finetune", "checkpoints")
        ref_path = Path(ctx.work_dir, "finetune", "reference_logps.pt")
        start_dir = Path(ctx.work_dir, "finetune", "start") if objective != "sft" and sft_steps else None
        state = {"best_val": math.inf, "bad_evals": 0, "tokens": 0, "seconds": 0.0}
        start = 0
        if (found := checkpoints.latest(ckpt_root, log)) is not None:
            state = checkpoints.load(found, named, optimizer, scheduler)
            start = state["step"]
            log.info("resuming from checkpoint %s (step %d of %d)", found.name, start, cfg.max_steps)
        own_path = Path(ctx.work_dir, "finetune", "on_policy_rejected.jsonl")
        if objective != "sft" and start <= sft_steps:
            ref_path.unlink(missing_ok=True)  # the reference is the model as alignment starts: made afresh below
            own_path.unlink(missing_ok=True)  # and so are its own answers
        mlflow.log_params({"method": method, "objective": objective, "n_train_examples": len(align.encoded if align else encoded),
                           "n_trainable": n_trainable,
                           "effective_batch": cfg.batch_size * cfg.grad_accum, "quantization_bits": model_cfg.load_bits()})
        peak = perf.peak_flops(device.type, env.precision, env.num_threads)
        fpt = perf.flops_per_token(n_total, n_trainable, method in ("full", "hft"),
                                   n_embedding=net.get_input_embeddings().weight.numel())
        log.info("fine-tuning (%s) steps %d..%d x %d examples on %s/%s; %.2fM trainable; device peak %.0f GFLOP/s",
                 method, start + 1, cfg.max_steps, cfg.batch_size * cfg.grad_accum, env.device, env.precision,
                 n_trainable / 1e6, peak / 1e9)

        _set_shared_prefix(cfg, batches, align, method, log)
        _log_kernels(net, cfg, device, amp, log)

        def val_loss() -> float | None:
            if not val:
                return None
            net.eval()
            value = answer_loss(net, tokenizer, val, max_len=cfg.max_seq_len, batch_size=cfg.batch_size * 2,
                                autocast_dtype=amp)
            net.train()
            return value

        loss_value, stopped_early, step = float("nan"), False, start
        ref, started = None, False
        for step in range(start + 1, cfg.max_steps + 1):
            if hft:
                hft.select(step)
            aligning = step > sft_steps
            if aligning and not started:
                ref, started = _start_alignment(cfg, net, tokenizer, align, ref_path, start_dir, amp, log,
                                                records, own_path), True
            t0 = time.perf_counter()
            step_loss, step_tokens = 0.0, 0
            extra: dict[str, float] = {}
            if aligning and objective == "ppo" and rollout_key != (step - sft_steps - 1) // cfg.ppo_epochs:
                rollout_key = (step - sft_steps - 1) // cfg.ppo_epochs
                rollouts = _ppo_rollouts(cfg, net, head, tokenizer, align, rollout_key, score, amp, rollout_dir,
                                         env.seed, log)
            for micro in range(cfg.grad_accum):
                with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
                    if aligning:
                        b = (step - sft_steps - 1) * cfg.grad_accum + micro
                        idx = align.rows(b)
                        chosen = [align.encoded[i] for i in idx]
                        if objective == "grpo":
                            loss, found = objectives.grpo_step(
                                net, tokenizer, chosen, score, cfg.num_generations, cfg.temperature,
                                cfg.max_new_tokens, cfg.beta, cfg.clip_epsilon, amp, _sampling_seed(env.seed, b))
                            tokens = int(found.pop("tokens"))
                        elif objective == "ppo":
                            loss, found = objectives.ppo_update(net, head, rollouts[micro], cfg.clip_epsilon,
                                                                cfg.value_clip, cfg.value_coef)
                            tokens = int(found.pop("tokens"))
                        else:
                            loss, found, tokens = objectives.pair_step(
                                objective, net, head, chosen, ref[idx] if ref is not None else None,
                                tokenizer.pad_token_id, cfg)
                        for k, v in found.items():
                            extra[k] = extra.get(k, 0.0) + float(v) / cfg.grad_accum
                    else:
                        batch = {k: v.to(device) for k, v in batches((step - 1) * cfg.grad_accum + micro).items()}
                        loss = token_loss(net, batch, focal_gamma=focal_gamma)
                        tokens = int(batch["attention_mask"].sum())
                (loss / cfg.grad_accum).backward()
                step_loss += loss.item() / cfg.grad_accum
                step_tokens += tokens
            if objective == "ppo" and aligning:  # the critic's gradients must not shrink the policy's under one norm
                critic = {id(p) for p in head.parameters()}
                torch.nn.utils.clip_grad_norm_([p for p in head.parameters() if p.grad is not None], cfg.max_grad_norm)
                grad_norm = float(torch.nn.utils.clip_grad_norm_(
                    [p for p in params if p.grad is not None and id(p) not in critic], cfg.max_grad_norm))
            else:
                grad_norm = float(torch.nn.utils.clip_grad_norm_([p for p in params if p.grad is not None],
                                                                 cfg.max_grad_norm))
            lrs = step_learning_rates(cfg, scheduler, step)
            for group, lr in zip(optimizer.param_groups, lrs):
                group["lr"] = lr  # the scheduler sets its own value again on its next step
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            dt = time.perf_counter() - t0
            state["tokens"] += step_tokens
            state["seconds"] += dt
            loss_value = step_loss
            if not math.isfinite(step_loss):
                raise FloatingPointError(f"train loss became {step_loss} at step {step}; lower train.learning_rate")
            if step % cfg.log_every == 0 or step == cfg.max_steps:
                tps = step_tokens / dt
                lr = lrs[0]
                mlflow.log_metrics({"train_loss": step_loss, "learning_rate": lr, "grad_norm": grad_norm,
                                    "tokens_per_second": tps, "mfu": tps * fpt / peak, "step_seconds": dt,
                                    **{f"{objective}_{k}": v for k, v in extra.items()}}, step=step)
                log.info("step %d/%d %s loss %.4f  lr %.2e  grad_norm %.3f  %.0f tok/s  MFU %.1f%%  %.2fs%s",
                         step, cfg.max_steps, objective if aligning else "sft", step_loss, lr, grad_norm, tps,
                         100 * tps * fpt / peak, dt, "".join(f"  {k} {v:.3f}" for k, v in extra.items()))
            if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.max_steps:
                current = val_loss()
                if current is not None:
                    mlflow.log_metric("val_loss", current, step=step)
                    improved = current < state["best_val"] - 1e-6
                    state["best_val"] = min(state["best_val"], current)
                    state["bad_evals"] = 0 if improved else state["bad_evals"] + 1
                    log.info("step %d: val loss %.4f (best %.4f)", step, current, state["best_val"])
                    if pruning.should_stop(ctx.parent_run_id, step, current):  # a search's trial that is not promising
                        mlflow.set_tag("tunewright.pruned_at_step", str(step))
                        log.info("pruned at step %d by the hyperparameter search (val loss %.4f)", step, current)
                        stopped_early = True
                        break
                    if cfg.early_stopping_patience and state["bad_evals"] >= cfg.early_stopping_patience:
                        log.info("early stopping at step %d: no val improvement in %d evaluations",
                                 step, state["bad_evals"])
                        stopped_early = True
                        break
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < cfg.max_steps:
                path = checkpoints.save(ckpt_root, step, named, optimizer, scheduler, state, cfg.keep_checkpoints)
                log.info("checkpoint %s written", path.name)

        final_val = val_loss()
        out = Path(ctx.work_dir, "finetune", "adapter" if method in PEFT_METHODS else "model")
        net.save_pretrained(out)
        tokenizer.save_pretrained(out)
        if objective == "reward":
            reward_model.save_head(head, out, meta={"kind": "reward_model", "pooling": "last_token",
                                                    "base_digest": model.base_digest})
        elif objective == "ppo":
            reward_model.save_head(head, out, reward_model.VALUE_HEAD_FILE)
        elapsed = max(state["seconds"], 1e-9)
        summary = {"final_train_loss": loss_value, "train_seconds": elapsed, "train_tokens_per_second": state["tokens"] / elapsed,
                   "steps_done": step}
        if final_val is not None:
            summary["val_loss"] = final_val
        mlflow.log_metrics(summary)
        log_to_parent(ctx, {k: v for k, v in summary.items() if k != "steps_done"})
        (out / "training_summary.json").write_text(json.dumps({**summary, "resumed_from": start}, indent=2))
        log.info("fine-tuned in %.1fs of compute: final loss %.4f, val loss %s", elapsed, loss_value,
                 f"{final_val:.4f}" if final_val is not None else "n/a")
        return TrainArtifact(output_dir=str(out), kind="adapter" if method in PEFT_METHODS else "full", steps=step,
                             final_loss=loss_value, val_loss=final_val, tokens_per_second=state["tokens"] / elapsed,
                             train_seconds=elapsed, resumed_from=start, stopped_early=stopped_early,
                             objective=objective, start_dir=str(start_dir) if start_dir else None,
                             reward=(cfg.reward_model or cfg.reward) if objective in ON_POLICY else None)


def _fine_tune_distributed(cfg: TrainConfig, model_cfg: ModelConfig, data: DataArtifact, model: ModelArtifact,
                           env: EnvironmentArtifact, ctx: RunContext, run_id: str, log) -> TrainArtifact:
    """Train in `env.num_processes` DeepSpeed processes; rank 0 logs to this stage's MLflow run (every objective;
    GRPO and PPO under ZeRO stages 0-2)."""
    import mlflow
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tasks.finetune import distributed

    method = model_cfg.adapter.method
    zero_stage = json.loads(Path(env.deepspeed_config).read_text())["zero_optimization"]["stage"]
    if cfg.objective in ON_POLICY and zero_stage == 3:
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
                    "measured once, after training", env.num_processes)
    if cfg.loss == "class_weighted":  # the ranks weight tokens the same way; the run records the weights once
        _log_class_weights(class_weights([_label(r, cfg.label_field) for r in read_split(data.train_path)]), log)
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
    result = distributed.launch(spec, work / "distributed", env.num_processes, log)
    device = torch.device("cuda" if env.device == "cuda" else "cpu")
    tokenizer = AutoTokenizer.from_pretrained(model.base_dir)
    if method in PEFT_METHODS:
        net = PeftModel.from_pretrained(methods.load_base(model.base_dir, model_cfg, device, for_training=False,
                                                       precision=env.precision), out)
    else:
        net = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).to(device)
    val = preference.sft_conversations(read_split(data.val_path))
    val_loss = (answer_loss(net.eval(), tokenizer, val, max_len=cfg.max_seq_len, batch_size=cfg.batch_size * 2,
                            autocast_dtype=autocast_dtype(env.precision)) if val else None)
    seconds = max(result["seconds"], 1e-9)
    summary = {"final_train_loss": result["final_loss"], "train_seconds": seconds,
               "train_tokens_per_second": result["tokens"] / seconds, "steps_done": result["steps"]}
    if val_loss is not None:
        summary["val_loss"] = val_loss
    mlflow.log_metrics(summary)
    log_to_parent(ctx, {k: v for k, v in summary.items() if k != "steps_done"})
    (out / "training_summary.json").write_text(json.dumps({**summary, "resumed_from": result["resumed_from"],
                                                           "world_size": result["world_size"]}, indent=2))
    log.info("fine-tuned with %d processes in %.1fs: final loss %.4f", result["world_size"], seconds, result["final_loss"])
    return TrainArtifact(output_dir=str(out), kind="adapter" if method in PEFT_METHODS else "full",
                         steps=result["steps"], final_loss=result["final_loss"], val_loss=val_loss,
                         tokens_per_second=result["tokens"] / seconds, train_seconds=seconds,
                         resumed_from=result["resumed_from"], objective=cfg.objective,
                         start_dir=str(start_dir) if start_dir else None,
                         reward=(cfg.reward_model or cfg.reward) if cfg.objective in ON_POLICY else None)
