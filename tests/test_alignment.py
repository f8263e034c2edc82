"""Preference alignment (DPO, ORPO, KTO): the losses equal TRL's on the same batch, and training on the
tiny model does what each method is for, from a frozen reference, resumably."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from tasks.evaluate import evaluate
from tasks.finetune import fine_tune, objectives
from tests.conftest import crash_then_resume
from tests.conftest import metric_history as _history
from tests.conftest import load_generator, write_jsonl
from tunewright import preference
from tunewright.recipe import RecipeError, load_recipe
from tunewright.train.loss import sequence_logps

os.environ.setdefault("TRL_TELEMETRY", "0")


def _perturbed_lora(tiny_model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    return get_peft_model(LlamaForCausalLM.from_pretrained(tiny_model_dir),
                          LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))


def _move_policy(model):
    """Make the trained adapter differ from TRL's frozen copy of it ("ref"), so the losses are not log 2."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name and ".default." in name:
                p.add_(torch.randn_like(p) * 0.5)


def _labelled(batch: dict, ids: str = "input_ids", completion: str = "completion_mask", mask: str = "attention_mask"):
    return {"input_ids": batch[ids], "attention_mask": batch[mask],
            "labels": batch[ids].masked_fill(batch[completion] == 0, -100)}


def _trl_args(config_cls, **kw):
    return config_cls(output_dir=tempfile.mkdtemp(), report_to=[], bf16=False, gradient_checkpointing=False,
                      beta=0.1, per_device_train_batch_size=4, use_cpu=True, **kw)


def _trl_loss_on_its_first_batch(tiny_model_dir, trainer_cls, config_cls, rows: list[dict]):
    """TRL's loss on the first batch its trainer builds from `rows`, after the policy moved off TRL's reference copy."""
    from datasets import Dataset
    from transformers import AutoTokenizer

    model = _perturbed_lora(tiny_model_dir)
    trainer = trainer_cls(model=model, args=_trl_args(config_cls), train_dataset=Dataset.from_list(rows),
                          processing_class=AutoTokenizer.from_pretrained(tiny_model_dir))
    batch = next(iter(trainer.get_train_dataloader()))
    _move_policy(model)
    model.train()
    return model, batch, trainer._compute_loss(trainer.model, batch, False)


def test_dpo_loss_equals_trls_on_the_same_batch(tiny_model_dir):
    from trl import DPOConfig, DPOTrainer
    from trl.trainer.utils import use_adapter

    pairs = [{"prompt": [{"role": "user", "content": f"ticket {i}: the kettle is broken"}],
              "chosen": [{"role": "assistant", "content": '{"category": "technical"}'}],
              "rejected": [{"role": "assistant", "content": f"Sure, ticket {i} is about billing."}]} for i in range(4)]
    model, batch, theirs = _trl_loss_on_its_first_batch(tiny_model_dir, DPOTrainer, DPOConfig, pairs)
    logps, _ = sequence_logps(model, _labelled(batch))
    with torch.no_grad(), use_adapter(model, adapter_name="ref"):
        ref, _ = sequence_logps(model, _labelled(batch))
    ours, metrics = objectives.dpo_loss(logps[:4], logps[4:], ref[:4], ref[4:], beta=0.1)
    assert abs(float(theirs) - 0.6931) > 1e-3, "policy and reference must differ for the check to mean anything"
    assert torch.allclose(ours, theirs, atol=1e-5)
    assert 0 <= float(metrics["preference_accuracy"]) <= 1


def test_kto_loss_equals_trls_on_the_same_batch(tiny_model_dir):
    from trl import KTOConfig, KTOTrainer
    from trl.trainer.utils import use_adapter

    rows = [{"prompt": [{"role": "user", "content": f"ticket {i}: my parcel is late"}],
             "completion": [{"role": "assistant", "content": '{"category": "shipping"}' if i % 2 else f"no idea {i}"}],
             "label": bool(i % 2)} for i in range(4)]
    model, batch, theirs = _trl_loss_on_its_first_batch(tiny_model_dir, KTOTrainer, KTOConfig, rows)
    answer, _ = sequence_logps(model, _labelled(batch))
    kl, _ = sequence_logps(model, _labelled(batch, "KL_input_ids", "KL_completion_mask", "KL_attention_mask"))
    with torch.no_grad(), use_adapter(model, adapter_name="ref"):
        ref, _ = sequence_logps(model, _labelled(batch))
        ref_kl, _ = sequence_logps(model, _labelled(batch, "KL_input_ids", "KL_completion_mask", "KL_attention_mask"))
    ours, _ = objectives.kto_loss(answer, ref, kl, ref_kl, batch["label"].bool().tolist(), beta=0.1)
    assert torch.allclose(ours, theirs, atol=1e-5)


def test_orpo_loss_equals_trls_odds_ratio_term_plus_nll():
    from trl.experimental.orpo import ORPOTrainer

    torch.manual_seed(0)
    n_c, n_r = torch.tensor([5.0, 7.0, 3.0]), torch.tensor([6.0, 4.0, 8.0])
    chosen, rejected = -torch.rand(3) * n_c, -torch.rand(3) * 2 * n_r
    fake = SimpleNamespace(beta=0.25, accelerator=SimpleNamespace(device="cpu"))
    terms, *_ = ORPOTrainer.odds_ratio_loss(fake, chosen / n_c, rejected / n_r)
    nll = -chosen.sum() / n_c.sum()  # TRL: cross-entropy averaged over the chosen answers' tokens
    ours, metrics = objectives.orpo_loss(chosen, rejected, n_c, n_r, beta=0.25)
    assert torch.allclose(ours, nll - terms.mean(), atol=1e-6)
    assert torch.allclose(metrics["nll_loss"], nll)


# --- training on the tiny model -------------------------------------------------------------------

def test_dpo_after_supervised_steps_grows_the_margin_against_a_frozen_reference(aligned, tiny_model_dir):
    recipe, ctx, data, model, env = aligned(objective="dpo", sft_steps=3, max_steps=27, beta=0.5, learning_rate=1e-2)
    trained = fine_tune.fn(recipe.train, recipe.model, data, model, env, ctx)
    assert len(_history(ctx, "dpo_reward_margin")) == 24, "one margin per DPO step, none for the 3 supervised steps"
    # the reference is the model after the supervised steps: its log-probabilities, computed once, equal the kept
    # starting adapter's, and the trained policy has moved the chosen answers above the rejected ones relative to it
    from peft import PeftModel
    from transformers import AutoTokenizer

    from tunewright.splits import read_split
    from tunewright.train.methods import load_base

    ref = torch.load(Path(ctx.work_dir, "finetune", "reference_logps.pt"))
    seen = torch.nonzero(~ref[:, 0].isnan()).flatten()[:48].tolist()  # only rows training used are scored
    assert len(seen) == 48
    ref = ref[seen]
    tok = AutoTokenizer.from_pretrained(model.base_dir)
    every = preference.encode_rows("dpo", tok, read_split(data.train_path), recipe.train.max_seq_len)
    rows = [every[i] for i in seen]

    def logps(adapter):
        net = PeftModel.from_pretrained(load_base(model.base_dir, recipe.model, torch.device("cpu"), for_training=False),
                                        adapter).eval()
        with torch.no_grad():
            c, r, _, _ = preference.row_logps(net, rows, "dpo", tok.pad_token_id)
        return torch.stack([c, r], 1)

    start, end = logps(trained.start_dir), logps(trained.output_dir)
    # the reference was computed under the run's autocast: bf16 rounding differs with the batch's shape
    assert torch.allclose(start, ref, **({"atol": 1e-3} if env.precision == "fp32" else {"rtol": 5e-3, "atol": 0.05}))
    margin = (end[:, 0] - ref[:, 0]) - (end[:, 1] - ref[:, 1])
    assert margin.mean() > 0.2 and (margin > 0).float().mean() > 0.6, margin
    assert ((end[:, 0] > end[:, 1]).float().mean() > (start[:, 0] > start[:, 1]).float().mean())
    base_before = load_file(Path(tiny_model_dir) / "model.safetensors")
    base_after = {k: v for f in Path(model.base_dir).glob("*.safetensors") for k, v in load_file(f).items()}
    assert all(torch.equal(base_before[k], base_after[k]) for k in base_before), "the base weights stay frozen"
    assert trained.objective == "dpo" and Path(trained.start_dir, "adapter_model.safetensors").is_file()

    art = evaluate.fn(recipe.evaluate, recipe.model, data, model, trained, env, ctx)
    assert {"base", "start", "tuned"} <= set(art.preference_accuracy) and art.start_score is not None
    assert "preference accuracy" in Path(art.report_path).read_text()


def test_orpo_from_the_base_raises_the_odds_of_the_chosen_answers(aligned):
    recipe, ctx, data, model, env = aligned(objective="orpo", max_steps=10, beta=1.0)
    fine_tune.fn(recipe.train, recipe.model, data, model, env, ctx)
    log_odds = _history(ctx, "orpo_log_odds")
    nll = _history(ctx, "orpo_nll_loss")
    assert sum(log_odds[-3:]) > sum(log_odds[:3]) and nll[-1] < nll[0]
    assert not Path(ctx.work_dir, "finetune", "reference_logps.pt").exists(), "ORPO uses no reference model"


def test_kto_on_unpaired_preference_rows_separates_desirable_from_undesirable(aligned):
    from peft import PeftModel
    from transformers import AutoTokenizer

    from tunewright.splits import read_split
    from tunewright.train.methods import load_base

    recipe, ctx, data, model, env = aligned(objective="kto", max_steps=24, beta=0.1, learning_rate=5e-3, batch_size=8)
    trained = fine_tune.fn(recipe.train, recipe.model, data, model, env, ctx)
    assert len(_history(ctx, "kto_kl")) == 24
    tok = AutoTokenizer.from_pretrained(model.base_dir)
    ref = torch.load(Path(ctx.work_dir, "finetune", "reference_logps.pt"))[:, 0]
    seen = torch.nonzero(~ref.isnan()).flatten()[:64].tolist()
    every = preference.encode_rows("kto", tok, read_split(data.train_path), recipe.train.max_seq_len)
    rows, ref = [every[i] for i in seen], ref[seen]
    net = PeftModel.from_pretrained(load_base(model.base_dir, recipe.model, torch.device("cpu"), for_training=False),
                                    trained.output_dir).eval()
    with torch.no_grad():
        logps, _ = preference.part_logps(net, rows, "answer", tok.pad_token_id)
    good = torch.tensor([r["desirable"] for r in rows])
    ratio = logps - ref
    # everything may drift (the KL baseline is clamped at 0); what KTO must do is part the two kinds
    assert ratio[good].mean() > ratio[~good].mean() + 0.2, (ratio[good], ratio[~good])


def test_dpo_resumed_from_a_checkpoint_ends_where_an_uninterrupted_run_does(aligned, monkeypatch):
    recipe, ctx, data, model, env = aligned(objective="dpo", sft_steps=2, max_steps=6, checkpoint_every=2)
    straight = fine_tune.fn(recipe.train, recipe.model, data, model, env, ctx)
    expected = load_file(Path(straight.output_dir) / "adapter_model.safetensors")

    resumed = crash_then_resume(monkeypatch, (recipe, ctx, data, model, env), at_step=4)
    assert resumed.resumed_from == 4
    got = load_file(Path(resumed.output_dir) / "adapter_model.safetensors")
    assert all(torch.allclose(expected[k], got[k], atol=1e-6) for k in expected)


def test_own_mistakes_replace_only_wrong_answers():
    from tunewright.scoring.metrics import same_answer

    pair = {"prompt": [{"role": "user", "content": "t"}], "chosen": [{"role": "assistant", "content": '{"a": 1, "b": null}'}],
            "rejected": [{"role": "assistant", "content": '{"a": 2, "b": null}'}]}
    records = [dict(pair, id=i) for i in range(4)]
    answers = {0: '{"b": null,  "a": 1}', 1: 'Sure: {"a": 1, "b": null}', 2: '{"a": 3, "b": null}'}
    out, changed = preference.with_own_mistakes(records, answers)
    assert changed == 2
    assert out[0] is records[0] and out[3] is records[3], "a right answer, or none, keeps the pair's own rejected one"
    assert out[1]["rejected"][0]["content"] == answers[1] and out[2]["rejected"][0]["content"] == answers[2]
    assert records[1]["rejected"] == pair["rejected"], "the input is not modified"
    assert same_answer("yes", " yes ") and not same_answer("yes.", "yes")
    # KTO: rows 2k, 2k + 1 are pair k's chosen and rejected answers, each scored against the completion two rows on
    assert preference.records_of_rows("kto", records, [0, 2, 7]) == [0, 3]
    assert preference.records_of_rows("dpo", records, [3, 1, 3]) == [1, 3]


def test_dpo_on_its_own_mistakes_trains_on_them_and_resumes_on_the_same_pairs(aligned, monkeypatch):
    from transformers import AutoTokenizer

    from tunewright.splits import read_split

    recipe, ctx, data, model, env = aligned(objective="dpo", sft_steps=2, max_steps=6, checkpoint_every=2,
                                            rejected="on_policy", max_new_tokens=8)
    straight = fine_tune.fn(recipe.train, recipe.model, data, model, env, ctx)
    answers = [json.loads(line) for line in
               Path(ctx.work_dir, "finetune", "on_policy_rejected.jsonl").read_text().splitlines()]
    records = read_split(data.train_path)
    # the prompts of every pair the 4 DPO steps of 4 pairs see, answered by the starting model
    assert 8 <= len(answers) <= 16 and all(a["id"] == records[a["row"]]["id"] for a in answers)
    wrong = [a for a in answers if a["wrong"]]
    assert wrong, "the tiny starting model answers wrong"
    # the reference log-probabilities are those of the pairs with the starting model's wrong answers as rejected
    tok = AutoTokenizer.from_pretrained(model.base_dir)
    ref = torch.load(Path(ctx.work_dir, "finetune", "reference_logps.pt"))
    pairs, _ = preference.with_own_mistakes(records, {a["row"]: a["answer"] for a in answers})
    rows = preference.encode_rows("dpo", tok, pairs, recipe.train.max_seq_len)
    from peft import PeftModel

    from tunewright.train.methods import load_base

    start = PeftModel.from_pretrained(load_base(model.base_dir, recipe.model, torch.device("cpu"), for_training=False),
                                      straight.start_dir).eval()
    row = wrong[0]["row"]
    with torch.no_grad():
        c, r, _, _ = preference.row_logps(start, [rows[row]], "dpo", tok.pad_token_id)
    assert torch.allclose(torch.stack([c, r], 1)[0], ref[row], atol=1e-3)

    expected = load_file(Path(straight.output_dir) / "adapter_model.safetensors")
    resumed = crash_then_resume(monkeypatch, (recipe, ctx, data, model, env), at_step=4)
    assert resumed.resumed_from == 4
    got = load_file(Path(resumed.output_dir) / "adapter_model.safetensors")
    assert all(torch.allclose(expected[k], got[k], atol=1e-6) for k in expected)

    art = evaluate.fn(recipe.evaluate, recipe.model, data, model, straight, env, ctx)
    assert {"base_on_policy", "start_on_policy", "tuned_on_policy"} <= set(art.preference_accuracy)
    assert "wrong answers as rejected" in Path(art.report_path).read_text()


def test_alignment_recipes_are_checked_against_their_data_and_settings(aligned, tmp_path, ticket_files, tiny_model_dir):
    import yaml

    from tasks.data import prepare
    from tasks.data.formats import FormatError

    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"name": "x", "data": {"path": str(ticket_files["tickets"])},
                                   "train": {"objective": "dpo", "sft_steps": 60, "max_steps": 60}}))
    with pytest.raises(RecipeError, match="sft_steps"):
        load_recipe(bad)
    bad.write_text(yaml.safe_dump({"name": "x", "data": {"path": str(ticket_files["tickets"])},
                                   "train": {"objective": "orpo", "packing": True}}))
    with pytest.raises(RecipeError, match="packing"):
        load_recipe(bad)
    recipe = load_recipe(bad, ["train.packing=false"])
    with pytest.raises(FormatError, match="preference pairs"):
        prepare(recipe.data, tmp_path / "st", expect_kind=recipe.train.data_kinds())


def test_generated_preference_pairs_reject_a_plausible_wrong_answer():
    gen = load_generator()
    tickets = gen.generate(50, seed=3)
    pairs = gen.generate_preferences(tickets, seed=4)
    assert pairs == gen.generate_preferences(tickets, seed=4), "deterministic"
    for t, p in zip(tickets, pairs):
        assert p["prompt"] == t["messages"][:-1] and p["chosen"] == t["messages"][-1:]
        assert p["rejected"][0]["content"] != p["chosen"][0]["content"]
    prose = [p for p in pairs if not p["rejected"][0]["content"].startswith("{")]
    assert prose and all(json.loads(p["chosen"][0]["content"]) for p in prose)


# --- GRPO -----------------------------------------------------------------------------------------

def test_group_advantages_are_normalised_within_each_group_and_zero_without_spread():
    adv, flat = objectives.group_advantages(torch.tensor([1.0, 0.0, 0.5, 0.5, 2.0, 2.0]), 2)
    assert torch.allclose(adv[:2], torch.tensor([1.0, -1.0]) / (2 ** 0.5 / 2 * 2 ** 0.5 + 1e-4) * (2 ** 0.5 / 2),
                          atol=1e-3)
    assert adv[:2].sum().abs() < 1e-6 and adv[0] > 0
    assert torch.equal(adv[2:], torch.zeros(4)) and flat.tolist() == [False, True, True]


def test_grpo_clip_is_active_only_outside_the_ratio_bounds():
    old = torch.zeros(4)
    rows = torch.arange(4)
    adv = torch.tensor([1.0, 1.0, -1.0, -1.0])
    for new, clipped in (([0.1, -0.1, 0.1, -0.1], 0.0), ([0.5, 0.0, 0.0, -0.5], 0.5)):
        logps = torch.tensor(new, requires_grad=True)
        loss, metrics = objectives.grpo_loss(logps, old, None, adv, rows, 4, beta=0.0, epsilon=0.2)
        loss.backward()
        assert float(metrics["clip_fraction"]) == clipped
        # a clipped token gets no gradient; an unclipped one the plain policy gradient
        ratio = torch.exp(torch.tensor(new))
        outside = ((ratio > 1.2) & (adv > 0)) | ((ratio < 0.8) & (adv < 0))
        expect = torch.where(outside, torch.zeros(4), -adv * ratio / 4)
        assert torch.allclose(logps.grad, expect, atol=1e-6)


def test_grpo_kl_term_pulls_toward_the_reference():
    ref = torch.tensor([-1.0, -2.0])
    logps = torch.tensor([-0.5, -3.0], requires_grad=True)
    loss, metrics = objectives.grpo_loss(logps, logps.detach(), ref, torch.zeros(2), torch.arange(2), 2,
                                         beta=1.0, epsilon=0.2)
    loss.backward()
    assert float(metrics["kl"]) > 0
    # gradient descent moves each log-probability toward the reference's
    assert logps.grad[0] > 0 and logps.grad[1] < 0


def test_grpo_loss_equals_trls_on_the_same_batch():
    from collections import defaultdict

    from trl import GRPOTrainer

    torch.manual_seed(0)
    B, T = 4, 5
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, 3:] = 0
    mask[3, 1:] = 0
    old = -torch.rand(B, T) * 3
    new = (old + torch.randn(B, T) * 0.3).requires_grad_(True)
    ref = old + torch.randn(B, T) * 0.2
    adv = torch.tensor([1.2, -0.4, 0.3, -1.1])

    class Acc:
        sync_gradients, num_processes = True, 1

        def gather(self, x):
            return x

        gather_for_metrics = gather

        def reduce(self, x, reduction="sum"):
            return x

    fake = SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (new, torch.zeros(B, T), None), top_entropy_quantile=1.0,
        off_policy_mask_threshold=None, importance_sampling_level="token", beta=0.04, loss_type="grpo",
        epsilon_low=0.2, epsilon_high=0.2, use_vllm=False, aux_loss_enabled=False, _entropy_bonus_enabled=False,
        current_gradient_accumulation_steps=1, model=SimpleNamespace(training=True), accelerator=Acc(),
        args=SimpleNamespace(delta=None, use_bias_correction_kl=False), _metrics=defaultdict(lambda: defaultdict(list)))
    inputs = {"prompt_ids": torch.zeros(B, 2, dtype=torch.long), "prompt_mask": torch.ones(B, 2, dtype=torch.long),
              "completion_ids": torch.zeros(B, T, dtype=torch.long), "completion_mask": mask, "advantages": adv,
              "old_per_token_logps": old, "ref_per_token_logps": ref}
    theirs = GRPOTrainer._compute_loss(fake, None, inputs)
    sel = mask.bool()
    rows = torch.arange(B).unsqueeze(1).expand(B, T)[sel]
    ours, _ = objectives.grpo_loss(new[sel], old[sel], ref[sel], adv, rows, B, beta=0.04, epsilon=0.2)
    assert torch.allclose(ours, theirs, atol=1e-6)


def test_grpo_raises_the_mean_reward_on_a_toy_reward(aligned, monkeypatch, tmp_path):
    from tunewright.scoring import rewards

    def says_yes(answer: str, reference: str) -> float:  # a toy reward: answer yes, whatever the reference says
        return float(answer.lower().startswith("yes"))

    monkeypatch.setattr(rewards, "get", lambda name: says_yes)
    # supervised steps on half yes, half no make a policy that says either; GRPO must move it to yes
    rows = write_jsonl(tmp_path / "yes-no.jsonl", [
        {"messages": [{"role": "user", "content": f"Is ticket {i} about shipping?"},
                      {"role": "assistant", "content": "yes" if i % 2 else "no"}]} for i in range(80)])
    # (all weights train: a rank-4 adapter on the tiny model cannot move its tied output head far enough)
    recipe, ctx, data, model, env = aligned(data_path=rows, adapter={"method": "full"}, objective="grpo",
                                            sft_steps=10, max_steps=26, beta=0.0, learning_rate=1e-2,
                                            num_generations=4, max_new_tokens=2)
    trained = fine_tune.fn(recipe.train, recipe.model, data, model, env, ctx)
    mean = _history(ctx, "grpo_reward_mean")
    assert len(mean) == 16 and trained.reward == "json_match"
    assert sum(mean[-4:]) / 4 > sum(mean[:4]) / 4 + 0.2, mean


def test_alignment_steps_follow_the_shared_schedule_or_restart_on_their_own():
    from transformers import get_scheduler

    from tasks.finetune.loop import step_learning_rates
    from tunewright.recipe import TrainConfig

    def rates(**kw):
        cfg = TrainConfig(objective="dpo", sft_steps=4, max_steps=12, learning_rate=1e-3, alignment_learning_rate=1e-4,
                          warmup_steps=2, lr_scheduler="linear", **kw)
        opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=cfg.learning_rate)
        sched = get_scheduler("linear", opt, num_warmup_steps=2, num_training_steps=cfg.max_steps)
        out = []
        for step in range(1, cfg.max_steps + 1):
            out.append(step_learning_rates(cfg, sched, step)[0])
            opt.step()
            sched.step()
        return out

    shared, restart = rates(), rates(alignment_schedule="restart")
    # supervised steps 1-4: warmup over 2 steps, then linear decay to 0 at step 13, the same either way
    assert shared[:4] == restart[:4] == pytest.approx([0.0, 5e-4, 1e-3, 0.9e-3])
    # shared: the same line, scaled to the alignment peak, so alignment starts at 8/10 of it
    assert shared[4:] == pytest.approx([1e-4 * (12 - s) / 10 for s in range(4, 12)])
    # restart: the 8 alignment steps warm up over 2 steps to the full alignment peak, then decay over the rest
    assert restart[4:] == pytest.approx([0.0, 0.5e-4, 1e-4, 5e-5 * 5 / 3, 5e-5 * 4 / 3, 5e-5, 5e-5 * 2 / 3, 5e-5 / 3])
    with pytest.raises(ValueError, match="alignment_schedule"):
        TrainConfig(objective="sft", alignment_schedule="restart")
