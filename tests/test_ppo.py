"""Reward models and PPO: the reward loss equals TRL's, GAE matches a hand-computed episode, the clip and the KL
penalty act as PPO needs, and on the tiny model the value head learns returns while the mean reward rises."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from tasks.evaluate import evaluate
from tasks.finetune import fine_tune, objectives
from tests.conftest import crash_then_resume
from tests.conftest import metric_history as _history
from tests.conftest import write_jsonl
from tunewright.scoring import reward_model


# --- reward model -----------------------------------------------------------------------------------

def test_reward_loss_equals_trls_on_the_same_batch(tiny_model_dir):
    """Our score head read at the last token is HF's sequence-classification head; TRL's RewardTrainer loss on it
    equals ours."""
    from transformers import AutoTokenizer, LlamaForCausalLM, LlamaForSequenceClassification
    from trl import RewardTrainer

    from tunewright import preference

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    torch.manual_seed(0)
    lm = LlamaForCausalLM.from_pretrained(tiny_model_dir)
    head = reward_model.scalar_head(lm.config.hidden_size)
    cls = LlamaForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1)
    # HF pools at the last token that is not the pad id; SmolLM2 pads with the end-of-turn token every answer ends
    # with, which we read (the state after the whole answer): pad both with an id no row holds, so both read it
    pad = tok.convert_tokens_to_ids("<|endoftext|>")
    cls.config.pad_token_id = pad
    with torch.no_grad():
        cls.score.weight.copy_(head.weight)
    pairs = [{"prompt": [{"role": "user", "content": f"ticket {i}: my kettle{' is broken' * i}"}],
              "chosen": [{"role": "assistant", "content": '{"category": "technical"}'}],
              "rejected": [{"role": "assistant", "content": f"It is about billing {i}."}]} for i in range(4)]
    rows = preference.encode_rows("reward", tok, pairs, 128)
    assert all(pad not in r[part]["input_ids"] for r in rows for part in r)
    chosen, rejected = reward_model.pair_scores(lm, head, rows, pad)
    ours, metrics = reward_model.reward_loss(chosen, rejected)

    from tunewright.chat import pad_batch

    batch = pad_batch([r["chosen"] for r in rows] + [r["rejected"] for r in rows], pad)
    fake = SimpleNamespace(model=SimpleNamespace(training=False), args=SimpleNamespace(center_rewards_coefficient=None),
                           accelerator=SimpleNamespace(gather=lambda x: x, gather_for_metrics=lambda x: x),
                           _metrics={"eval": {k: [] for k in ("min_reward", "mean_reward", "max_reward", "accuracy",
                                                              "margin", "num_tokens")}},
                           _total_train_tokens=0, _tp_size=1)
    theirs = RewardTrainer.compute_loss(fake, cls, {"input_ids": batch["input_ids"],
                                                    "attention_mask": batch["attention_mask"]})
    assert torch.allclose(ours, theirs, atol=1e-5), (ours, theirs)
    assert metrics["preference_accuracy"] == pytest.approx(fake._metrics["eval"]["accuracy"][0])


def test_reward_model_learns_to_score_chosen_above_rejected_and_is_registered(aligned, tmp_path):
    from tasks.deploy import deploy

    # a preference the tiny model can learn in a few steps: answers that confirm, over answers that refuse
    pairs = write_jsonl(tmp_path / "confirm.jsonl", [
        {"prompt": [{"role": "user", "content": f"Can you check order A{10000 + i}?"}],
         "chosen": [{"role": "assistant", "content": f"Yes, order A{10000 + i} is on its way."}],
         "rejected": [{"role": "assistant", "content": "No."}]} for i in range(80)])
    recipe, ctx, data, model, env = aligned(data_path=pairs, objective="reward", max_steps=20, learning_rate=1e-2)
    trained = fine_tune.fn(recipe.train, recipe.model, data, model, env, ctx)
    assert reward_model.is_reward_model(trained.output_dir)
    acc = _history(ctx, "reward_preference_accuracy")
    margin = _history(ctx, "reward_reward_margin")
    assert len(acc) == 20 and sum(acc[-5:]) / 5 > 0.9, acc
    assert sum(margin[-5:]) > sum(margin[:5]) + 1, margin
    scores = evaluate.fn(recipe.evaluate, recipe.model, data, model, trained, env, ctx)
    assert scores.metric == "preference_accuracy" and scores.tuned_score == 1.0, scores
    deployed = deploy.fn(recipe.deploy, recipe.evaluate, recipe.model, scores, trained, model, data, env, ctx)
    # GRPO and PPO load the registered version by URI and get the scores evaluation measured
    scorer = reward_model.load_scorer(f"models:/{deployed.registered_model}/{deployed.version}")
    import json

    first = json.loads(Path(scores.predictions_path).read_text().splitlines()[0])
    got = scorer.score([first["messages"]] * 2, [first["reference"], first["rejected"]])
    assert got == pytest.approx([first["chosen_score"], first["rejected_score"]], abs=1e-4)


# --- PPO properties -----------------------------------------------------------------------------------

def test_gae_advantages_and_returns_on_a_hand_computed_episode():
    rewards = torch.tensor([[0.0, 0.0, 1.0], [2.0, 0.0, 0.0]])
    values = torch.tensor([[0.5, 0.6, 0.7], [0.4, 9.0, 9.0]])  # row 2 has one real token; the rest is padding
    mask = torch.tensor([[True, True, True], [True, False, False]])
    adv, returns = objectives.gae(rewards, values, mask, gamma=0.9, lam=0.8)
    # t=2: 1 - 0.7 = 0.3; t=1: 0.9*0.7 - 0.6 + 0.72*0.3 = 0.246; t=0: 0.9*0.6 - 0.5 + 0.72*0.246 = 0.21712
    assert adv[0].tolist() == pytest.approx([0.21712, 0.246, 0.3])
    assert returns[0].tolist() == pytest.approx([0.71712, 0.846, 1.0])
    assert adv[1].tolist() == pytest.approx([1.6, 0, 0]) and returns[1].tolist() == pytest.approx([2.0, 0, 0])


def test_ppo_clip_is_active_only_outside_the_ratio_bounds():
    old = torch.zeros(4)
    new = torch.log(torch.tensor([1.1, 1.5, 0.5, 0.9])).requires_grad_()
    adv = torch.tensor([1.0, 1.0, -1.0, -1.0])  # tokens 2 and 3 moved past the bound in their advantage's direction
    values = torch.zeros(4, requires_grad=True)
    loss, metrics = objectives.ppo_loss(new, old, values, torch.zeros(4), adv, torch.zeros(4), epsilon=0.2,
                                        value_clip=0.2, value_coef=0.1)
    loss.backward()
    assert new.grad[1] == 0 and new.grad[2] == 0, "clipped tokens give no gradient"
    assert new.grad[0] != 0 and new.grad[3] != 0, "tokens inside the bounds do"
    assert metrics["clip_fraction"] == pytest.approx(0.5)


def test_ppo_value_loss_is_clipped_around_the_sampled_values():
    values = torch.tensor([0.1, 1.0], requires_grad=True)
    returns = torch.tensor([1.0, 1.0])
    loss, metrics = objectives.ppo_loss(torch.zeros(2), torch.zeros(2), values, torch.zeros(2), torch.zeros(2),
                                        returns, epsilon=0.2, value_clip=0.2, value_coef=1.0)
    loss.backward()
    # value 0.1 is inside the clip band: it learns; value 1.0 moved 1.0 past the sampled 0: the clipped loss rules
    assert values.grad[0] < 0 and values.grad[1] == 0
    assert metrics["value_clip_fraction"] == pytest.approx(0.5)


def test_kl_penalty_pulls_the_policy_toward_the_reference():
    """A token the policy finds likelier than the reference gets a negative reward, so PPO's step lowers it."""
    kl = torch.tensor([[0.5, -0.5, 0.0]])
    rewards = -0.2 * kl
    adv, _ = objectives.gae(rewards, torch.zeros(1, 3), torch.ones(1, 3, dtype=torch.bool), gamma=1.0, lam=0.0)
    logps = torch.zeros(3, requires_grad=True)
    loss, _ = objectives.ppo_loss(logps, torch.zeros(3), torch.zeros(3), torch.zeros(3), adv[0], torch.zeros(3),
                                  epsilon=0.2, value_clip=0.2, value_coef=0.1)
    loss.backward()
    step = -logps.grad
    assert step[0] < 0 < step[1] and step[2] == 0


@pytest.mark.parametrize("baseline", ["none", "reference", "group"])
def test_each_baseline_is_subtracted_from_the_score_per_prompt(tiny_model_dir, baseline):
    """`reference`: each sampled answer is rewarded by its score minus its prompt's reference answer's score;
    `group`: minus the mean score of the prompt's other sampled answers; `none`: by its score. No KL term and
    lambda 1: every answer token's return is that reward."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    net = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    head = reward_model.scalar_head(reward_model.hidden_size(net), bias=True)
    rows = [{"prompt": [{"role": "user", "content": f"ticket {i}"}], "reference": "x" * (i + 1)} for i in range(3)]
    group = 3 if baseline == "group" else 1

    def score(prompts, answers, refs):
        return [float(len(a)) for a in answers]

    out = objectives.ppo_rollout(net, head, tok, rows, score, 1.0, 4, 0.0, 1.0, 1.0, seed=0, baseline=baseline,
                                 group=group)
    assert len(out["texts"]) == 3 * group
    scores = torch.tensor([len(t) for t in out["texts"]], dtype=torch.float32)
    if baseline == "reference":
        want = scores - torch.tensor([1.0, 2.0, 3.0])
    elif baseline == "group":  # by hand: each answer against the mean of its two siblings
        s = scores.view(3, 3)
        want = torch.stack([s[:, 0] - (s[:, 1] + s[:, 2]) / 2, s[:, 1] - (s[:, 0] + s[:, 2]) / 2,
                            s[:, 2] - (s[:, 0] + s[:, 1]) / 2], dim=1).reshape(-1)
        assert abs(float(want.sum())) < 1e-4  # leave-one-out differences of a group sum to zero
    else:
        want = scores
    lengths = out["batch"]["labels"].ne(-100).sum(dim=1).tolist()
    firsts = torch.tensor([sum(lengths[:i]) for i in range(len(lengths))])
    assert torch.allclose(out["returns"][firsts], want, atol=1e-5)
    assert out["metrics"]["reward_mean"] == pytest.approx(float(scores.mean()))
    assert ("reward_vs_reference" in out["metrics"]) == (baseline == "reference")


def test_the_group_baseline_needs_more_than_one_answer_per_prompt(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    net = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    head = reward_model.scalar_head(reward_model.hidden_size(net), bias=True)
    rows = [{"prompt": [{"role": "user", "content": "ticket"}], "reference": "x"}]
    with pytest.raises(ValueError, match="num_generations >= 2"):
        objectives.ppo_rollout(net, head, tok, rows, lambda p, a, r: [0.0] * len(a), 1.0, 4, 0.0, 1.0, 1.0,
                               baseline="group", group=1)


def _yes_no(tmp_path):
    return write_jsonl(tmp_path / "yes-no.jsonl", [
        {"messages": [{"role": "user", "content": f"Is ticket {i} about shipping?"},
                      {"role": "assistant", "content": "yes" if i % 2 else "no"}]} for i in range(80)])


def test_ppo_raises_the_mean_reward_and_its_value_head_learns_the_returns(aligned, monkeypatch, tmp_path):
    from tunewright.scoring import rewards

    monkeypatch.setattr(rewards, "get", lambda name: lambda answer, reference: float(answer.lower().startswith("yes")))
    recipe, ctx, data, model, env = aligned(data_path=_yes_no(tmp_path), adapter={"method": "full"}, objective="ppo",
                                            sft_steps=10, max_steps=40, beta=0.0, learning_rate=1e-2,
                                            batch_size=8, max_new_tokens=2, ppo_epochs=2)
    trained = fine_tune.fn(recipe.train, recipe.model, data, model, env, ctx)
    assert (Path(trained.output_dir) / reward_model.VALUE_HEAD_FILE).is_file()
    mean = _history(ctx, "ppo_reward_mean")
    value_loss = _history(ctx, "ppo_value_loss")
    assert len(mean) == 30
    assert sum(mean[-6:]) / 6 > sum(mean[:6]) / 6 + 0.2, mean
    assert sum(value_loss[-6:]) / 6 < sum(value_loss[:6]) / 6 / 2, value_loss


def test_ppo_with_a_kl_penalty_resumes_from_a_checkpoint_as_if_never_stopped(aligned, monkeypatch):
    """The KL reference is the starting adapter frozen beside the trained one; a run killed between the two updates
    of one rollout trains on the same samples after resuming."""
    recipe, ctx, data, model, env = aligned(objective="ppo", sft_steps=2, max_steps=7, checkpoint_every=3,
                                            beta=0.1, ppo_epochs=2, max_new_tokens=6, reward="json_valid")
    straight = fine_tune.fn(recipe.train, recipe.model, data, model, env, ctx)
    expected = load_file(Path(straight.output_dir) / "adapter_model.safetensors")
    assert _history(ctx, "ppo_kl")[0] == pytest.approx(0.0, abs=1e-4), "the policy starts at the reference"

    resumed = crash_then_resume(monkeypatch, (recipe, ctx, data, model, env), at_step=3)  # between the two updates of the rollout made at step 3
    assert resumed.resumed_from == 3
    got = load_file(Path(resumed.output_dir) / "adapter_model.safetensors")
    assert all(torch.allclose(expected[k], got[k], atol=1e-6) for k in expected)
    assert torch.allclose(load_file(Path(straight.output_dir) / reward_model.VALUE_HEAD_FILE)["weight"],
                          load_file(Path(resumed.output_dir) / reward_model.VALUE_HEAD_FILE)["weight"], atol=1e-6)
