"""Stage 4's memory plan: micro-batches sized by a token budget from stage 3's estimate, checkpointing only as many
layers as the budget needs, and the step's gradient that of one batch of all its rows however they were cut."""

from __future__ import annotations

import pytest

from tunewright.train import memory_plan

LLAMA_8B = {"hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32, "vocab_size": 128256}
GiB = 2**30


def test_the_plan_checkpoints_nothing_where_memory_allows_and_only_what_it_must_elsewhere():
    kw = dict(precision="bf16", max_seq_len=2048, step_rows=8)
    fixed = 17 * GiB  # an 8B model's bf16 weights, LoRA's gradients and optimiser states, a chunk of logits
    roomy = memory_plan.plan(LLAMA_8B, fixed, 141 * GiB, **kw)
    assert roomy.checkpointed_layers == 0 and roomy.micro_batch_tokens == 8 * 2048  # the whole step fits in one
    tight = memory_plan.plan(LLAMA_8B, fixed, 40 * GiB, **kw)
    assert 0 < tight.checkpointed_layers < 32 and tight.micro_batch_tokens >= 8 * 2048
    # one fewer checkpointed layer would not have given the tokens wanted
    assert (0.9 * 40 * GiB - fixed) // memory_plan.token_bytes(LLAMA_8B, tight.checkpointed_layers - 1, "bf16") \
        < 8 * 2048
    tighter = memory_plan.plan(LLAMA_8B, fixed, 24 * GiB, **kw)
    assert tighter.checkpointed_layers == 32 and 2048 <= tighter.micro_batch_tokens < 8 * 2048
    with pytest.raises(memory_plan.PlanError, match="train.max_seq_len 2048"):
        memory_plan.plan(LLAMA_8B, fixed, 19.5 * GiB, **kw)
    with pytest.raises(memory_plan.PlanError, match="leave no activation memory"):
        memory_plan.plan(LLAMA_8B, fixed, 16 * GiB, **kw)


def test_rows_are_cut_longest_first_within_the_budget():
    lengths = [100, 900, 300, 300, 2000, 50, 400]
    groups = memory_plan.split_by_tokens(lengths, 1000)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))  # every row once
    assert groups[0] == [4]  # longer than the budget: alone
    for g in groups:
        assert len(g) * max(lengths[i] for i in g) <= 1000 or len(g) == 1
    assert [lengths[g[0]] for g in groups] == sorted((lengths[g[0]] for g in groups), reverse=True)


def test_checkpointing_the_first_layers_only(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    layers = model.get_decoder().layers
    assert memory_plan.checkpoint_layers(model, 1) == 1
    assert model.is_gradient_checkpointing and [layer.gradient_checkpointing for layer in layers] == \
        [True] + [False] * (len(layers) - 1)
    assert memory_plan.checkpoint_layers(model, 0) == 0 and not model.is_gradient_checkpointing


def _grads(net):
    return {n: p.grad.detach().clone() for n, p in net.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("loss", ["cross_entropy", "class_weighted"])
def test_a_planned_step_has_the_gradient_of_one_batch_of_its_rows(tiny_model_dir, loss):
    """A step of 2 x 3 rows cut by a 3-row token budget into micro-batches of other sizes: the loss and gradient of
    the step are those of the 6 rows as one batch (the mean over all their answer tokens, class weights included)."""
    from types import SimpleNamespace

    from transformers import AutoTokenizer

    from tasks.finetune import loop
    from tests.test_shared_prefix import _lora, assert_same_loss_and_gradients
    from tests.test_unpadded import _rows
    from tunewright.chat import pad_batch
    from tunewright.recipe import TrainConfig
    from tunewright.train.loss import Kernels, token_loss

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    encoded = _rows(tok)[:6]
    if loss == "class_weighted":
        for i, e in enumerate(encoded):
            e["token_weight"] = [0.5 + i % 3] * len(e["input_ids"])
    cfg = TrainConfig(batch_size=3, grad_accum=2, loss=loss)
    net = _lora(tiny_model_dir)
    module = loop.step_loss_module(net, None, cfg, tok, None, None, Kernels())
    batches = loop.RankSlice(loop.Batches(encoded, 3, seed=0, pad_id=tok.pad_token_id), 0, 3)
    budget = 3 * max(len(e["input_ids"]) for e in encoded) - 1  # fewer than 3 of the longest rows
    run = SimpleNamespace(cfg=cfg, module=module, batches=batches, micro_tokens=budget)
    inputs = loop._step_inputs(run, SimpleNamespace(rank=0), 1, aligning=False)
    rows = [i for b in (0, 1) for i in batches.rows(b)]
    assert sorted(rows) == list(range(6)) and len(inputs) not in (1, 2)  # cut otherwise than the recipe's 2 x 3
    net.zero_grad(set_to_none=True)
    step_loss = 0.0
    for micro, share in inputs:
        part = module(**micro) * share
        part.backward()
        step_loss += float(part)
    planned = _grads(net)
    net.zero_grad(set_to_none=True)
    whole = token_loss(net, pad_batch([encoded[i] for i in rows], tok.pad_token_id), kernels=Kernels())
    whole.backward()
    assert_same_loss_and_gradients(float(whole), _grads(net), step_loss, planned)


def test_stage_3_plans_and_stage_4_trains_by_the_plan(run_ctx):
    """`train.memory_plan: on` with little memory: stage 3 checkpoints some layers and sizes micro-batches by
    tokens; stage 4 trains so, keeping the recipe's rows per step, and records it."""
    import json
    from pathlib import Path

    import mlflow

    from tasks.data import prepare_data
    from tasks.environment import setup_environment
    from tasks.finetune.stage import fine_tune
    from tasks.model import initialise_model

    recipe, ctx = run_ctx
    data = prepare_data.fn(recipe.data, ctx)
    model = initialise_model.fn(recipe.model, recipe.environment.seed, ctx)
    train = recipe.train.model_copy(update={"memory_plan": "on", "max_steps": 3, "batch_size": 4, "grad_accum": 2,
                                            "max_seq_len": 256})
    roomy = setup_environment.fn(recipe.environment, train, recipe.model, model, ctx)
    assert roomy.memory_plan["checkpointed_layers"] == 0  # a tiny model in a machine's memory: nothing to recompute
    assert roomy.memory_plan["micro_batch_tokens"] == 8 * 256  # the whole step in one micro-batch
    # what the weights, gradients, optimiser states and logits take, from the roomy plan's budget
    fixed = 0.9 * roomy.memory_available_gb * GiB - roomy.memory_plan["activation_budget_gb"] * GiB
    config = json.loads(Path(model.base_dir, "config.json").read_text())
    layers = config["num_hidden_layers"]
    between = 8 * 256 * (memory_plan.token_bytes(config, 0, roomy.precision) +
                         memory_plan.token_bytes(config, layers, roomy.precision)) / 2
    tight = setup_environment.fn(recipe.environment, train, recipe.model, model, ctx,
                                 available_bytes=(fixed + between) / 0.9)
    plan = tight.memory_plan
    assert plan["micro_batch_tokens"] >= 8 * 256 and 1 <= plan["checkpointed_layers"] <= layers
    trained = fine_tune.fn(train, recipe.model, data, model, tight, ctx)
    assert trained.steps == 3
    run = mlflow.search_runs(experiment_ids=[ctx.experiment_id],
                             filter_string="tags.`tunewright.stage` = '4-fine-tune'").iloc[0]
    assert run["params.effective_batch"] == "8"
    assert setup_environment.fn(recipe.environment, recipe.train, recipe.model, model, ctx).memory_plan is None
