"""Preference objectives for stage 4: DPO, ORPO and KTO over the project's own training loop.

Each row is a prompt with answers scored by their summed log-probability (answer tokens only,
as `tunewright.chat.sequence_logps` computes it). The reference model of DPO and KTO is the
model as alignment starts (the bare base under a fresh adapter, or the adapter the supervised
warm-up steps produced): its log-probabilities are computed once, before the first alignment
step, and saved beside the checkpoints, so the reference is frozen by construction, no second
copy of any weights is held, and a resumed run reads the same numbers. ORPO needs no reference.
Rows are encoded and scored by `tunewright.preference`, which stage 5 shares.

The losses follow the papers and TRL 1.16's trainers (sigmoid DPO; ORPO's odds ratio with the
chosen answer's NLL; KTO with the batch KL estimate from mismatched prompt/answer pairs);
tests/test_alignment.py compares each with TRL's on the same batch.
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
