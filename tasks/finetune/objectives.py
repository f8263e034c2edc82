"""Preference objectives for stage 4: DPO, ORPO and KTO over the project's own training loop.

Each row is a prompt with answers scored by their summed log-probability (answer tokens only,
as `tunewright.chat.sequence_logps` computes it). The reference model of DPO and KTO is the
model as alignment starts (the bare base under a fresh adapter, or the adapter the supervised
warm-up steps produced): its log-probabilities are computed once, before the first alignment
step, and saved beside the checkpoints, so the reference is frozen by construction, no second
copy of any weights is held, and a resumed run reads the same numbers. ORPO needs no reference.
Rows are encoded and scored by `tunewright.preference`, which stage 5 shares.

The losses follow the papers and TRL 1.16's trainers (sigmoid DPO; ORPO's odds ratio with the
chosen answer's NLL; KTO with the batch KL estimate from mismatched prompt/answer pairs; GRPO's
clipped objective on group-normalised rewards, per-sequence token means, with the k3 KL estimate
to the base); tests/test_alignment.py compares each with TRL's on the same batch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tunewright.preference import part_logps, row_logps

NEEDS_REFERENCE = ("dpo", "kto")


def reference_logps(model: Any, rows: list[dict], objective: str, pad_id: int, batch_size: int, path: Path,
                    needed: list[int] | None = None, autocast: Any = None, log: Any = None):
    """The starting model's log-probabilities of the rows training will use, computed once and kept at `path`.

    A (rows, 2) float32 tensor; rows not in `needed` (default: all) are NaN, so a run that sees only part of a
    large dataset scores only that part.
    """
    import torch

    needed = list(range(len(rows))) if needed is None else sorted(set(needed))
    if path.is_file():
        ref = torch.load(path)
        if ref.shape == (len(rows), 2) and not ref[needed].isnan().any():
            if log is not None:
                log.info("reference log-probabilities of %d rows read from %s", len(needed), path.name)
            return ref
    was_training = model.training
    model.eval()
    out = torch.full((len(rows), 2), float("nan"))
    device = next(model.parameters()).device
    with torch.no_grad(), torch.autocast(device.type, dtype=autocast or torch.float32, enabled=autocast is not None):
        for k, start in enumerate(range(0, len(needed), batch_size)):
            idx = needed[start:start + batch_size]
            a, b, _, _ = row_logps(model, [rows[i] for i in idx], objective, pad_id, logit_chunk=0)
            out[idx, 0] = a.float().cpu()
            out[idx, 1] = b.float().cpu()
            if log is not None and (k % 10 == 9 or start + batch_size >= len(needed)):
                log.info("reference log-probabilities: %d/%d rows", min(start + batch_size, len(needed)), len(needed))
    model.train(was_training)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(out, tmp)
    tmp.replace(path)
    return out


def dpo_loss(chosen: Any, rejected: Any, ref_chosen: Any, ref_rejected: Any, beta: float) -> tuple[Any, dict]:
    """Sigmoid DPO: -log sigmoid(beta * ((chosen - ref_chosen) - (rejected - ref_rejected))), averaged."""
    import torch.nn.functional as F

    chosen_rewards = beta * (chosen - ref_chosen)
    rejected_rewards = beta * (rejected - ref_rejected)
    margin = chosen_rewards - rejected_rewards
    loss = -F.logsigmoid(margin).mean()
    return loss, {"rewards_chosen": chosen_rewards.detach().mean(), "rewards_rejected": rejected_rewards.detach().mean(),
                  "reward_margin": margin.detach().mean(), "preference_accuracy": (margin.detach() > 0).float().mean(),
                  "kl_chosen": (chosen - ref_chosen).detach().mean()}


def log1mexp(x: Any) -> Any:
    """log(1 - exp(x)) for x < 0, without cancellation near 0."""
    import torch

    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_loss(chosen: Any, rejected: Any, n_chosen: Any, n_rejected: Any, beta: float) -> tuple[Any, dict]:
    """ORPO: the chosen answers' NLL per token minus beta * log sigmoid(log odds ratio of chosen over rejected).

    The odds use each answer's mean per-token log-probability, as the paper and TRL do.
    """
    import torch.nn.functional as F

    avg_c, avg_r = chosen.float() / n_chosen.clamp_min(1), rejected.float() / n_rejected.clamp_min(1)
    log_odds = (avg_c - avg_r) - (log1mexp(avg_c) - log1mexp(avg_r))
    ratio = F.logsigmoid(log_odds)
    nll = -chosen.sum() / n_chosen.sum().clamp_min(1)
    loss = nll - beta * ratio.mean()
    return loss, {"nll_loss": nll.detach(), "log_odds_ratio": ratio.detach().mean(), "log_odds": log_odds.detach().mean(),
                  "rewards_chosen": (beta * avg_c).detach().mean(), "rewards_rejected": (beta * avg_r).detach().mean(),
                  "reward_margin": (beta * (avg_c - avg_r)).detach().mean(),
                  "preference_accuracy": (log_odds.detach() > 0).float().mean()}


def kto_loss(answer: Any, ref_answer: Any, kl: Any, ref_kl: Any, desirable: Any, beta: float,
             desirable_weight: float = 1.0, undesirable_weight: float = 1.0) -> tuple[Any, dict]:
    """KTO: desirable answers pushed above, undesirable below, the batch's KL estimate between policy and reference."""
    import torch

    z0 = (kl - ref_kl).mean().detach().clamp(min=0)
    logratio = answer - ref_answer
    good = torch.as_tensor(desirable, dtype=torch.bool, device=answer.device)
    losses = torch.cat([desirable_weight * (1 - torch.sigmoid(beta * (logratio[good] - z0))),
                        undesirable_weight * (1 - torch.sigmoid(beta * (z0 - logratio[~good])))])
    rewards = beta * logratio.detach()
    metrics = {"kl": z0}
    if good.any():
        metrics["rewards_chosen"] = rewards[good].mean()
    if (~good).any():
        metrics["rewards_rejected"] = rewards[~good].mean()
    if good.any() and (~good).any():
        metrics["reward_margin"] = metrics["rewards_chosen"] - metrics["rewards_rejected"]
    return losses.nanmean(), metrics


def step_loss(objective: str, model: Any, rows: list[dict], ref: Any, pad_id: int, beta: float,
              desirable_weight: float = 1.0, undesirable_weight: float = 1.0) -> tuple[Any, dict]:
    """The objective's loss and metrics on one micro-batch (`ref`: the rows' reference log-probabilities)."""
    import torch

    if objective == "kto":
        answer, _ = part_logps(model, rows, "answer", pad_id)
        with torch.no_grad():  # the KL estimate is a baseline, not trained through (as in the paper and TRL)
            kl, _ = part_logps(model, rows, "kl", pad_id)
        ref = ref.to(answer.device, answer.dtype)
        return kto_loss(answer, ref[:, 0], kl, ref[:, 1], [r["desirable"] for r in rows], beta, desirable_weight,
                        undesirable_weight)
    a, b, n_a, n_b = row_logps(model, rows, objective, pad_id)
    if objective == "dpo":
        ref = ref.to(a.device, a.dtype)
        return dpo_loss(a, b, ref[:, 0], ref[:, 1], beta)
    if objective == "orpo":
        return orpo_loss(a, b, n_a, n_b, beta)
    raise ValueError(f"unknown train.objective '{objective}'")


def group_advantages(rewards: Any, group: int) -> tuple[Any, Any]:
    """GRPO advantages: each reward minus its group's mean, over the group's standard deviation (+1e-4); and which
    groups had no spread (every answer scored the same, so they teach nothing)."""
    grouped = rewards.view(-1, group)
    mean = grouped.mean(dim=1, keepdim=True)
    std = grouped.std(dim=1, keepdim=True)
    adv = ((grouped - mean) / (std + 1e-4)).view(-1)
    return adv, (std.view(-1) < 1e-6)


def grpo_loss(logps: Any, old_logps: Any, ref_logps: Any, advantages: Any, rows: Any, n_rows: int, beta: float,
              epsilon: float) -> tuple[Any, dict]:
    """GRPO's clipped surrogate over answer tokens (flat, `rows` gives each token's sequence): per-token
    -min(ratio * A, clip(ratio) * A) + beta * KL, averaged within each sequence, then over sequences."""
    import torch

    ratio = torch.exp(logps - old_logps)
    adv = advantages[rows]
    per_token = -torch.min(ratio * adv, torch.clamp(ratio, 1 - epsilon, 1 + epsilon) * adv)
    metrics: dict = {}
    if beta:
        kl = torch.exp(ref_logps - logps) - (ref_logps - logps) - 1
        per_token = per_token + beta * kl
        metrics["kl"] = kl.detach().mean()
    counts = torch.zeros(n_rows, dtype=per_token.dtype, device=per_token.device).index_add(
        0, rows, torch.ones_like(per_token))
    per_seq = torch.zeros(n_rows, dtype=per_token.dtype, device=per_token.device).index_add(0, rows, per_token)
    loss = (per_seq / counts.clamp_min(1)).mean()
    clipped = ((ratio < 1 - epsilon) & (adv < 0)) | ((ratio > 1 + epsilon) & (adv > 0))
    metrics["clip_fraction"] = clipped.float().mean().detach()
    return loss, metrics


def sample_answers(net: Any, tokenizer: Any, prompts: list[list[dict]], group: int, temperature: float,
                   max_new_tokens: int, autocast: Any = None) -> tuple[list[list[int]], list[list[int]], list[str]]:
    """`group` sampled answers to each prompt: prompt ids, answer ids (through the end-of-turn token) and texts."""
    import torch

    from tunewright.chat import prompt_ids

    was_training = net.training
    net.eval()
    p_ids = [prompt_ids(tokenizer, p) for p in prompts for _ in range(group)]
    width = max(map(len, p_ids))
    pad = tokenizer.pad_token_id
    device = next(net.parameters()).device
    ids = torch.tensor([[pad] * (width - len(x)) + x for x in p_ids], device=device)
    mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in p_ids], device=device)
    with torch.no_grad(), torch.autocast(device.type, dtype=autocast or torch.float32, enabled=autocast is not None):
        out = net.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=temperature, top_k=0,
                           top_p=1.0, max_new_tokens=max_new_tokens, pad_token_id=pad,
                           eos_token_id=tokenizer.eos_token_id)
    net.train(was_training)
    answers, texts = [], []
    for row in out[:, width:].tolist():
        if tokenizer.eos_token_id in row:
            row = row[: row.index(tokenizer.eos_token_id) + 1]
        answers.append(row)
        texts.append(tokenizer.decode(row, skip_special_tokens=True).strip())
    return p_ids, answers, texts


def grpo_step(net: Any, tokenizer: Any, rows: list[dict], reward: Any, group: int, temperature: float,
              max_new_tokens: int, beta: float, epsilon: float, autocast: Any = None) -> tuple[Any, dict]:
    """One GRPO micro-batch: sample, score, and the clipped objective on the answers (one update per sample, as
    TRL's default, so the ratio starts at 1 and the clip guards only later updates of the same samples)."""
    import torch

    from tunewright.chat import pad_batch, token_losses

    p_ids, answers, texts = sample_answers(net, tokenizer, [r["prompt"] for r in rows], group, temperature,
                                           max_new_tokens, autocast)
    refs = [r["reference"] for r in rows for _ in range(group)]
    rewards = torch.tensor([reward(t, ref) for t, ref in zip(texts, refs)], dtype=torch.float32)
    adv, flat = group_advantages(rewards, group)
    encoded = [{"input_ids": p + a, "labels": [-100] * len(p) + a} for p, a in zip(p_ids, answers)]
    device = next(net.parameters()).device
    batch = {k: v.to(device) for k, v in pad_batch(encoded, tokenizer.pad_token_id).items()}
    losses, selected = token_losses(net, batch, logit_chunk=0 if not torch.is_grad_enabled() else None)
    logps = -losses
    row_of = torch.arange(selected.shape[0], device=device).unsqueeze(1).expand_as(selected)[selected]
    ref = None
    if beta:
        with torch.no_grad(), net.disable_adapter():
            ref = -token_losses(net, batch, logit_chunk=0)[0]
    loss, metrics = grpo_loss(logps, logps.detach(), ref, adv.to(device, logps.dtype), row_of, len(encoded), beta,
                              epsilon)
    metrics.update(reward_mean=rewards.mean(), reward_std=rewards.std(), groups_without_spread=flat.float().mean(),
                   answer_tokens=float(sum(map(len, answers))) / len(answers),
                   tokens=float(int(batch["attention_mask"].sum())))
    return loss, metrics
