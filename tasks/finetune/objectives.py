"""Alignment objectives for stage 4 over the project's own training loop: DPO, ORPO, KTO, GRPO and PPO.

Each row is a prompt with answers scored by their summed log-probability (answer tokens only,
as `tunewright.train.loss.sequence_logps` computes it). The reference model of DPO and KTO is the
model as alignment starts (the bare base under a fresh adapter, or the adapter the supervised
warm-up steps produced): its log-probabilities are computed once, before the first alignment
step, and saved beside the checkpoints, so the reference is frozen by construction, no second
copy of any weights is held, and a resumed run reads the same numbers. ORPO needs no reference.
Rows are encoded and scored by `tunewright.preference`, which stage 5 shares.

The losses follow the papers and TRL 1.16's trainers (sigmoid DPO; ORPO's odds ratio with the
chosen answer's NLL; KTO with the batch KL estimate from mismatched prompt/answer pairs; GRPO's
clipped objective on group-normalised rewards, per-sequence token means, with the k3 KL estimate
to the reference); tests/test_alignment.py compares each with TRL's on the same batch. PPO (which TRL no
longer ships) is written out here: one or a group of sampled answers per prompt, per-token rewards of -beta * KL to the
reference plus the reward model's score at the last token, GAE over a value head on the policy's
hidden states, and `ppo_epochs` clipped updates per sample; tests/test_ppo.py checks its properties.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tunewright.files import save_atomic
from tunewright.preference import part_logps, row_logps
from tunewright.train.cross_entropy import chunked_cross_entropy
from tunewright.train.loss import Kernels, token_losses

NEEDS_REFERENCE = ("dpo", "kto")


def reference_logps(model: Any, rows: list[dict], objective: str, pad_id: int, batch_size: int, path: Path | None,
                    needed: list[int] | None = None, autocast: Any = None, log: Any = None, min_batches: int = 0,
                    kernels: Kernels = Kernels()):
    """The starting model's log-probabilities of the rows training will use, computed once and kept at `path`.

    A (rows, 2) float32 tensor; rows not in `needed` (default: all) are NaN, so a run that sees only part of a
    large dataset scores only that part. `path` None: computed, not read or kept (a rank's share of a distributed
    run's reference). At least `min_batches` forwards are made, the last batch repeated, because every ZeRO-3 rank
    must call the model as often as the others. `kernels`: the run's loss paths (scored in one head call).
    """
    import torch

    needed = list(range(len(rows))) if needed is None else sorted(set(needed))
    if path is not None and path.is_file():
        ref = torch.load(path)
        if ref.shape == (len(rows), 2) and not ref[needed].isnan().any():
            if log is not None:
                log.info("reference log-probabilities of %d rows read from %s", len(needed), path.name)
            return ref
    was_training = model.training
    model.eval()
    out = torch.full((len(rows), 2), float("nan"))
    device = next(model.parameters()).device
    starts = list(range(0, len(needed), batch_size))
    with torch.no_grad(), torch.autocast(device.type, dtype=autocast or torch.float32, enabled=autocast is not None):
        for k in range(max(len(starts), min_batches)):
            if k >= len(starts):  # a forward whose result is not kept
                row_logps(model, [rows[(needed or [0])[-1]]], objective, pad_id, kernels.in_one_head_call())
                continue
            start = starts[k]
            idx = needed[start:start + batch_size]
            a, b, _, _ = row_logps(model, [rows[i] for i in idx], objective, pad_id, kernels.in_one_head_call())
            out[idx, 0] = a.float().cpu()
            out[idx, 1] = b.float().cpu()
            if log is not None and (k % 10 == 9 or start + batch_size >= len(needed)):
                log.info("reference log-probabilities: %d/%d rows", min(start + batch_size, len(needed)), len(needed))
    model.train(was_training)
    if path is None:
        return out
    save_atomic(path, lambda tmp: torch.save(out, tmp))
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


def identity(x: Any) -> Any:
    """`across` in one process: a batch statistic is already the whole batch's."""
    return x


def orpo_loss(chosen: Any, rejected: Any, n_chosen: Any, n_rejected: Any, beta: float,
              across: Any = identity) -> tuple[Any, dict]:
    """ORPO: the chosen answers' NLL per token minus beta * log sigmoid(log odds ratio of chosen over rejected).

    The odds use each answer's mean per-token log-probability, as the paper and TRL do. `across` maps a batch
    statistic to its mean over the processes that share the global batch (identity in one process): the NLL is
    over the global batch's chosen tokens, as one process computes it.
    """
    import torch.nn.functional as F

    avg_c, avg_r = chosen.float() / n_chosen.clamp_min(1), rejected.float() / n_rejected.clamp_min(1)
    log_odds = (avg_c - avg_r) - (log1mexp(avg_c) - log1mexp(avg_r))
    ratio = F.logsigmoid(log_odds)
    nll = -chosen.sum() / across(n_chosen.sum().detach()).clamp_min(1)
    loss = nll - beta * ratio.mean()
    return loss, {"nll_loss": nll.detach(), "log_odds_ratio": ratio.detach().mean(), "log_odds": log_odds.detach().mean(),
                  "rewards_chosen": (beta * avg_c).detach().mean(), "rewards_rejected": (beta * avg_r).detach().mean(),
                  "reward_margin": (beta * (avg_c - avg_r)).detach().mean(),
                  "preference_accuracy": (log_odds.detach() > 0).float().mean()}


def kto_loss(answer: Any, ref_answer: Any, kl: Any, ref_kl: Any, desirable: Any, beta: float,
             desirable_weight: float = 1.0, undesirable_weight: float = 1.0, across: Any = identity) -> tuple[Any, dict]:
    """KTO: desirable answers pushed above, undesirable below, the batch's KL estimate between policy and reference
    (over the global batch: `across` as in `orpo_loss`)."""
    import torch

    z0 = across((kl - ref_kl).mean().detach()).clamp(min=0)
    logratio = answer - ref_answer
    good = torch.as_tensor(desirable, dtype=torch.bool, device=answer.device)
    losses = torch.cat([desirable_weight * (1 - torch.sigmoid(beta * (logratio[good] - z0))),
                        undesirable_weight * (1 - torch.sigmoid(beta * (z0 - logratio[~good])))])
    rewards = beta * logratio.detach()
    metrics = {"kl": z0}
    # means over the global batch's desirable and undesirable rows, however they fall on the ranks
    for key, rows in (("rewards_chosen", good), ("rewards_rejected", ~good)):
        count = across(rows.sum().to(rewards.dtype))
        total = across(rewards[rows].sum())
        if count > 0:
            metrics[key] = total / count
    if "rewards_chosen" in metrics and "rewards_rejected" in metrics:
        metrics["reward_margin"] = metrics["rewards_chosen"] - metrics["rewards_rejected"]
    return losses.nanmean(), metrics


def step_loss(objective: str, model: Any, rows: list[dict], ref: Any, pad_id: int, beta: float,
              desirable_weight: float = 1.0, undesirable_weight: float = 1.0, kernels: Kernels = Kernels(),
              across: Any = identity) -> tuple[Any, dict]:
    """The objective's loss and metrics on one micro-batch (`ref`: the rows' reference log-probabilities;
    `kernels` as in `tunewright.train.loss.token_loss`, `across` as in `orpo_loss`)."""
    import torch

    if objective == "kto":
        answer, _ = part_logps(model, rows, "answer", pad_id, kernels)
        with torch.no_grad():  # the KL estimate is a baseline, not trained through (as in the paper and TRL)
            kl, _ = part_logps(model, rows, "kl", pad_id, kernels)
        ref = ref.to(answer.device, answer.dtype)
        return kto_loss(answer, ref[:, 0], kl, ref[:, 1], [r["desirable"] for r in rows], beta, desirable_weight,
                        undesirable_weight, across)
    a, b, n_a, n_b = row_logps(model, rows, objective, pad_id, kernels)
    if objective == "dpo":
        ref = ref.to(a.device, a.dtype)
        return dpo_loss(a, b, ref[:, 0], ref[:, 1], beta)
    if objective == "orpo":
        return orpo_loss(a, b, n_a, n_b, beta, across)
    raise ValueError(f"unknown train.objective '{objective}'")


def pair_step(objective: str, model: Any, head: Any, rows: list[dict], ref: Any, pad_id: int, train: Any,
              kernels: Kernels = Kernels(), across: Any = identity) -> tuple[Any, dict, int]:
    """One micro-batch of DPO, ORPO, KTO or a reward model (`head`: its score head): the loss, the method's
    metrics and the tokens read. One process and every rank of a distributed run train through this."""
    if objective == "reward":
        from tunewright.scoring import reward_model

        loss, metrics = reward_model.reward_loss(*reward_model.pair_scores(model, head, rows, pad_id))
        return loss, metrics, sum(len(r[part]["input_ids"]) for r in rows for part in r)
    loss, metrics = step_loss(objective, model, rows, ref, pad_id, train.beta, train.kto_desirable_weight,
                              train.kto_undesirable_weight, kernels, across)
    return loss, metrics, sum(len(r[part]["input_ids"]) for r in rows for part in r if part != "desirable")


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
                   max_new_tokens: int, autocast: Any = None,
                   seed: int | None = None) -> tuple[list[list[int]], list[list[int]], list[str]]:
    """`group` sampled answers to each prompt: prompt ids, answer ids (through the end-of-turn token) and texts.

    With `seed`, the sampling draws from its own seeded stream: the answers are a function of the model and the
    seed alone, so a resumed run samples what an uninterrupted one did, and the run's stream is left as it was."""
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
    with torch.no_grad(), torch.autocast(device.type, dtype=autocast or torch.float32, enabled=autocast is not None), \
            torch.random.fork_rng(devices=[device] if device.type == "cuda" else [], enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
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


def grpo_step(net: Any, tokenizer: Any, rows: list[dict], score: Any, group: int, temperature: float,
              max_new_tokens: int, beta: float, epsilon: float, autocast: Any = None,
              seed: int | None = None, kernels: Kernels = Kernels()) -> tuple[Any, dict]:
    """One GRPO micro-batch: sample, score, and the clipped objective on the answers (one update per sample, as
    TRL's default, so the ratio starts at 1 and the clip guards only later updates of the same samples).

    `score(prompts, answers, references)` gives one reward per answer (`tunewright.scoring.rewards.scorer`)."""
    import torch

    from tunewright.chat import pad_batch

    prompts = [r["prompt"] for r in rows for _ in range(group)]
    p_ids, answers, texts = sample_answers(net, tokenizer, [r["prompt"] for r in rows], group, temperature,
                                           max_new_tokens, autocast, seed)
    refs = [r["reference"] for r in rows for _ in range(group)]
    rewards = torch.tensor(score(prompts, texts, refs), dtype=torch.float32)
    adv, flat = group_advantages(rewards, group)
    encoded = [{"input_ids": p + a, "labels": [-100] * len(p) + a} for p, a in zip(p_ids, answers)]
    device = next(net.parameters()).device
    batch = {k: v.to(device) for k, v in pad_batch(encoded, tokenizer.pad_token_id).items()}
    losses, selected = token_losses(net, batch, kernels if torch.is_grad_enabled() else kernels.in_one_head_call())
    logps = -losses
    row_of = torch.arange(selected.shape[0], device=device).unsqueeze(1).expand_as(selected)[selected]
    ref = None
    if beta:
        with torch.no_grad(), reference(net):
            ref = -token_losses(net, batch, kernels.in_one_head_call())[0]
    loss, metrics = grpo_loss(logps, logps.detach(), ref, adv.to(device, logps.dtype), row_of, len(encoded), beta,
                              epsilon)
    metrics.update(reward_mean=rewards.mean(), reward_std=rewards.std(), groups_without_spread=flat.float().mean(),
                   answer_tokens=float(sum(map(len, answers))) / len(answers),
                   tokens=float(int(batch["attention_mask"].sum())))
    return loss, metrics


REFERENCE_ADAPTER = "reference"


def keep_reference(net: Any, start_dir: Any) -> None:
    """Load the starting adapter (after supervised warm-up) frozen beside the trained one, as the KL reference."""
    import torch

    if hasattr(net, "peft_config") and REFERENCE_ADAPTER not in net.peft_config:
        # loading initialises the adapter before reading its weights: keep that off the run's random stream, so a
        # resumed run (which loads it at a later step) samples as an uninterrupted one
        with torch.random.fork_rng(devices=[]):
            net.load_adapter(str(start_dir), adapter_name=REFERENCE_ADAPTER, is_trainable=False)
        net.set_adapter(net.active_adapter)  # trained adapter active and trainable, the reference frozen


class reference:
    """Context: the network as the KL reference of GRPO and PPO. The frozen starting adapter where the run had
    supervised warm-up steps (`keep_reference`), else the bare base (the adapter switched off)."""

    def __init__(self, net: Any):
        self.net = net
        self.trained = net.active_adapter
        self.frozen = REFERENCE_ADAPTER in getattr(net, "peft_config", {})

    def __enter__(self):
        if self.frozen:
            self.net.set_adapter(REFERENCE_ADAPTER, inference_mode=True)
        else:
            self._off = self.net.disable_adapter()
            self._off.__enter__()
        return self.net

    def __exit__(self, *exc):
        if self.frozen:
            self.net.set_adapter(self.trained)  # trainable again
        else:
            self._off.__exit__(*exc)
        return False


# --- PPO ----------------------------------------------------------------------------------------------

def gae(rewards: Any, values: Any, mask: Any, gamma: float, lam: float) -> tuple[Any, Any]:
    """Generalised advantage estimation over (rows, T) answer tokens (`mask` marks real ones, left-aligned): the
    advantages and the returns (advantages + values) the value head learns."""
    import torch

    rows, width = rewards.shape
    adv = torch.zeros_like(rewards)
    last = torch.zeros(rows, dtype=rewards.dtype, device=rewards.device)
    m = mask.to(rewards.dtype)
    for t in reversed(range(width)):
        nxt_mask = m[:, t + 1] if t + 1 < width else torch.zeros_like(last)
        nxt_value = values[:, t + 1] * nxt_mask if t + 1 < width else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * nxt_value - values[:, t]
        last = (delta + gamma * lam * last * nxt_mask) * m[:, t]
        adv[:, t] = last
    return adv, (adv + values) * m


def whiten(x: Any, mask: Any) -> Any:
    """Zero mean, unit variance over the real tokens."""
    vals = x[mask]
    return ((x - vals.mean()) / (vals.std() + 1e-8)) * mask


def ppo_loss(logps: Any, old_logps: Any, values: Any, old_values: Any, advantages: Any, returns: Any,
             epsilon: float, value_clip: float, value_coef: float) -> tuple[Any, dict]:
    """PPO's clipped surrogate plus the clipped value loss, both averaged over answer tokens (flat tensors)."""
    import torch

    ratio = torch.exp(logps - old_logps)
    pg = torch.max(-advantages * ratio, -advantages * torch.clamp(ratio, 1 - epsilon, 1 + epsilon))
    clipped_values = old_values + torch.clamp(values - old_values, -value_clip, value_clip)
    vf = 0.5 * torch.max((values - returns) ** 2, (clipped_values - returns) ** 2)
    policy_loss, value_loss = pg.mean(), vf.mean()
    outside = ((ratio < 1 - epsilon) & (advantages < 0)) | ((ratio > 1 + epsilon) & (advantages > 0))
    return policy_loss + value_coef * value_loss, {
        "policy_loss": policy_loss.detach(), "value_loss": value_loss.detach(),
        "clip_fraction": outside.float().mean().detach(),
        "value_clip_fraction": ((values - old_values).abs() > value_clip).float().mean().detach(),
        "approx_kl": (0.5 * (logps - old_logps) ** 2).mean().detach()}


def logps_and_values(net: Any, value_head: Any, batch: dict[str, Any],
                     kernels: Kernels = Kernels()) -> tuple[Any, Any, Any]:
    """Log-probability and value of every answer token (flat), and the (rows, width - 1) mask that selected them.

    The value of a token is the head's reading of the hidden state that predicts it (the state before it)."""
    from tunewright.scoring.reward_model import final_hidden

    import torch

    lm = net.get_base_model() if hasattr(net, "get_base_model") else net
    selected = batch["labels"][:, 1:] != -100
    hidden = final_hidden(net, batch)[:, :-1][selected]
    chunk = kernels.logit_chunk if torch.is_grad_enabled() else 0
    logps = -chunked_cross_entropy(lm.get_output_embeddings(), hidden, batch["labels"][:, 1:][selected], chunk)
    # the critic reads the policy's hidden states but does not train them: a fresh value head's large errors would
    # otherwise reach the shared adapter through the value loss and pull the policy off course
    return logps, value_head(hidden.detach().float()).squeeze(-1), selected


def _padded(flat: Any, selected: Any) -> tuple[Any, Any]:
    """Flat per-token values back to (rows, T) left-aligned, and the mask of real tokens."""
    import torch

    counts = selected.sum(dim=1)
    width = int(counts.max()) if len(counts) else 0
    mask = torch.arange(width, device=flat.device).unsqueeze(0) < counts.unsqueeze(1)
    out = torch.zeros(mask.shape, dtype=flat.dtype, device=flat.device)
    out[mask] = flat
    return out, mask


def ppo_rollout(net: Any, value_head: Any, tokenizer: Any, rows: list[dict], score: Any, temperature: float,
                max_new_tokens: int, beta: float, gamma: float, lam: float, autocast: Any = None,
                seed: int | None = None, baseline: str = "none", group: int = 1, kernels: Kernels = Kernels()) -> dict:
    """Sample `group` answers per prompt and score them: the batch, old log-probabilities and values, and the
    advantages and returns of the per-token rewards (-beta * KL to the reference at every token, the score, less
    a baseline, at the last).

    The baseline is a constant per prompt, so the best policy is the same, but how hard a prompt is no longer passes
    for how good an answer is (a critic that starts from nothing cannot tell the two apart): `reference` subtracts
    the score of the prompt's reference answer; `group` (needs `group` >= 2) the mean score of the prompt's other
    sampled answers (leave-one-out, as RLOO), so only how an answer compares with the policy's own alternatives
    counts; `none` subtracts nothing."""
    import torch

    from tunewright.chat import pad_batch

    if baseline == "group" and group < 2:
        raise ValueError("ppo: the group baseline compares each answer with the prompt's other answers; it needs "
                         "num_generations >= 2")
    prompts = [r["prompt"] for r in rows]
    p_ids, answers, texts = sample_answers(net, tokenizer, prompts, group, temperature, max_new_tokens, autocast, seed)
    each = [r for r in rows for _ in range(group)]
    refs = [r["reference"] for r in each]
    scores = torch.tensor(score([r["prompt"] for r in each], texts, refs), dtype=torch.float32)
    shift = _baseline(score, rows, scores, baseline, group)
    encoded = [{"input_ids": p + a, "labels": [-100] * len(p) + a} for p, a in zip(p_ids, answers)]
    batch = pad_batch(encoded, tokenizer.pad_token_id)
    device = next(net.parameters()).device
    on_device = {k: v.to(device) for k, v in batch.items()}
    was_training = net.training
    net.eval()
    with torch.no_grad(), torch.autocast(device.type, dtype=autocast or torch.float32, enabled=autocast is not None):
        logps, values, selected = logps_and_values(net, value_head, on_device, kernels)
        ref = None
        if beta:
            with reference(net):
                ref = -token_losses(net, on_device, kernels.in_one_head_call())[0]
    net.train(was_training)
    logps, values = logps.float().cpu(), values.float().cpu()
    selected = selected.cpu()
    kl = (logps - ref.float().cpu()) if ref is not None else torch.zeros_like(logps)
    per_token, mask = _padded(-beta * kl, selected)
    last = mask.sum(dim=1) - 1
    per_token[torch.arange(len(each)), last] += scores - shift
    padded_values, _ = _padded(values, selected)
    adv, returns = gae(per_token, padded_values, mask, gamma, lam)
    adv = whiten(adv, mask)
    kl_rows, _ = _padded(kl, selected)
    return {"batch": batch, "old_logps": logps, "old_values": values, "advantages": adv[mask], "returns": returns[mask],
            "metrics": {"reward_mean": float(scores.mean()), "reward_std": float(scores.std()) if len(each) > 1 else 0.0,
                        **({"reward_vs_reference": float((scores - shift).mean())} if baseline == "reference" else {}),
                        **({"reward_spread_in_group": float(scores.view(-1, group).std(dim=1).mean())}
                           if group > 1 else {}),
                        "kl": float(kl_rows.sum(dim=1).mean()),
                        "non_score_reward": float((-beta * kl_rows).sum(dim=1).mean()),
                        "answer_tokens": float(mask.sum()) / len(each)},
            "texts": texts}


def _baseline(score: Any, rows: list[dict], scores: Any, baseline: str, group: int) -> Any:
    """What each sampled answer's score is measured against (see `ppo_rollout`)."""
    import torch

    if baseline == "reference":
        own = [r["reference"] for r in rows]
        return torch.tensor(score([r["prompt"] for r in rows], own, own), dtype=torch.float32).repeat_interleave(group)
    if baseline == "group":
        grouped = scores.view(-1, group)
        return ((grouped.sum(dim=1, keepdim=True) - grouped) / (group - 1)).view(-1)
    return torch.zeros_like(scores)


def ppo_update(net: Any, value_head: Any, rollout: dict, epsilon: float, value_clip: float,
               value_coef: float, kernels: Kernels = Kernels()) -> tuple[Any, dict]:
    """PPO's loss on one sampled batch with the current policy and value head."""
    device = next(net.parameters()).device
    batch = {k: v.to(device) for k, v in rollout["batch"].items()}
    logps, values, _ = logps_and_values(net, value_head, batch, kernels)
    loss, metrics = ppo_loss(logps, rollout["old_logps"].to(device, logps.dtype),
                             values, rollout["old_values"].to(device, values.dtype),
                             rollout["advantages"].to(device, logps.dtype), rollout["returns"].to(device, values.dtype),
                             epsilon, value_clip, value_coef)
    metrics.update(rollout["metrics"])
    metrics["tokens"] = float(int(batch["attention_mask"].sum()))
    return loss, metrics
