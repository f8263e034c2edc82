"""Stages 4 and 5 on the tiny model: what training changes, and how answers are scored."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tasks.data import prepare_data
from tasks.environment import setup_environment
from tasks.evaluate import evaluate
from tunewright.scoring.metrics import parse_json_answer, score
from tasks.finetune import fine_tune
from tasks.model import initialise_model
from tunewright.chat import encode_example


@pytest.fixture()
def stages_1_to_3(run_ctx):
    recipe, ctx = run_ctx
    data = prepare_data.fn(recipe.data, ctx)
    model = initialise_model.fn(recipe.model, recipe.environment.seed, ctx)
    env = setup_environment.fn(recipe.environment, recipe.train, recipe.model, model, ctx)
    return recipe, ctx, data, model, env


def test_labels_cover_the_answer_only(tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "hello there"},
            {"role": "assistant", "content": '{"a": 1}'}]
    enc = encode_example(tok, msgs, max_len=256)
    answer = [t for t, l in zip(enc["input_ids"], enc["labels"]) if l != -100]
    assert tok.decode(answer) == '{"a": 1}' + tok.eos_token
    assert enc["labels"][: len(enc["labels"]) - len(answer)] == [-100] * (len(enc["labels"]) - len(answer))


def test_truncation_keeps_the_answer_and_the_assistant_header(tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    msgs = [{"role": "user", "content": "word " * 300}, {"role": "assistant", "content": "yes"}]
    enc = encode_example(tok, msgs, max_len=64)
    assert len(enc["input_ids"]) == 64
    assert tok.decode(enc["input_ids"]).endswith("<|im_start|>assistant\nyes" + tok.eos_token)


def test_fine_tune_moves_lora_weights_and_leaves_the_base_frozen(stages_1_to_3, tiny_model_dir):
    recipe, ctx, data, model, env = stages_1_to_3
    before = load_file(Path(model.adapter_dir) / "adapter_model.safetensors")
    trained = fine_tune.fn(recipe.train, recipe.model, data, model, env, ctx)
    after = load_file(Path(trained.output_dir) / "adapter_model.safetensors")
    assert set(before) == set(after)
    moved = [k for k in before if not torch.equal(before[k], after[k])]
    assert len(moved) == len(before), "every LoRA matrix should have been updated"
    base_before = load_file(Path(tiny_model_dir) / "model.safetensors")
    base_files = list(Path(model.base_dir).glob("*.safetensors"))
    base_after = {k: v for f in base_files for k, v in load_file(f).items()}
    assert all(torch.equal(base_before[k], base_after[k]) for k in base_before)
    assert trained.steps == recipe.train.max_steps and trained.val_loss is not None


def test_training_loss_falls_on_a_repeated_batch(stages_1_to_3):
    recipe, ctx, data, model, env = stages_1_to_3
    import mlflow

    cfg = recipe.train.model_copy(update={"max_steps": 12, "learning_rate": 1e-2, "lr_scheduler": "constant"})
    fine_tune.fn(cfg, recipe.model, data, model, env, ctx)
    runs = mlflow.search_runs(experiment_ids=[ctx.experiment_id],
                              filter_string="tags.`tunewright.stage` = '4-fine-tune'")
    history = mlflow.MlflowClient().get_metric_history(runs.iloc[0]["run_id"], "train_loss")
    losses = [m.value for m in sorted(history, key=lambda m: m.step)]
    assert len(losses) == 12 and sum(losses[-3:]) < sum(losses[:3])


def test_evaluate_scores_both_models_and_writes_a_report(stages_1_to_3):
    recipe, ctx, data, model, env = stages_1_to_3
    trained = fine_tune.fn(recipe.train, recipe.model, data, model, env, ctx)
    art = evaluate.fn(recipe.evaluate, recipe.model, data, model, trained, env, ctx)
    assert art.n_examples == min(recipe.evaluate.max_examples, data.n_test)
    assert 0 <= art.base_score <= 1 and art.tuned_loss > 0
    rows = [json.loads(line) for line in open(art.predictions_path)]
    assert len(rows) == art.n_examples and {"base", "tuned", "reference"} <= set(rows[0])
    assert "Evaluation on the held-out split" in Path(art.report_path).read_text()


def test_a_rerun_reads_the_base_models_answers_from_the_cache(stages_1_to_3, monkeypatch):
    import tasks.evaluate.answers as ev

    recipe, ctx, data, model, env = stages_1_to_3
    trained = fine_tune.fn(recipe.train, recipe.model, data, model, env, ctx)
    first = evaluate.fn(recipe.evaluate, recipe.model, data, model, trained, env, ctx)
    cached = list(Path(ctx.state_dir, "eval_cache").glob("base-*.json"))
    assert len(cached) == 1
    calls = []
    real = ev.generate
    monkeypatch.setattr(ev, "generate", lambda *a, **k: calls.append(k["progress"]) or real(*a, **k))
    again = evaluate.fn(recipe.evaluate, recipe.model, data, model, trained, env, ctx)
    assert len(calls) == 1  # the fine-tuned model only
    assert again.base_score == first.base_score and again.base_loss == first.base_loss
    base = [json.loads(line)["base"] for line in open(again.predictions_path)]
    assert base == json.loads(cached[0].read_text())["answers"]
    longer = recipe.evaluate.model_copy(update={"max_new_tokens": recipe.evaluate.max_new_tokens + 1})
    evaluate.fn(longer, recipe.model, data, model, trained, env, ctx)  # other settings: answered afresh
    assert len(calls) == 3 and len(list(Path(ctx.state_dir, "eval_cache").glob("base-*.json"))) == 2


def test_json_object_closed_reads_braces_outside_strings():
    from tunewright.chat import json_object_closed

    assert not json_object_closed("Sure, here it is")
    assert not json_object_closed('{"a": "}"')
    assert json_object_closed('{"a": "}"}')
    assert json_object_closed('prose {"a": {"b": 1}} more')
    assert not json_object_closed('{"a": {"b": 1}')
    assert json_object_closed('{"a": "say \\"}\\" "}')


def test_generation_stopped_at_the_closed_json_scores_as_the_full_answer(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunewright.chat import generate, json_object_closed

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    convs = [[{"role": "user", "content": f"ticket {i} " + "x " * i}] for i in range(6)]
    full = generate(model, tok, convs, max_new_tokens=24, batch_size=3)
    stopped = generate(model, tok, convs, max_new_tokens=24, batch_size=3, stop_after_json=True)
    for f, st in zip(full, stopped):
        assert f.startswith(st)  # the same greedy tokens, cut where the first object closed
        assert parse_json_answer(f) == parse_json_answer(st)
        if not json_object_closed(f):
            assert st == f


def test_the_stopping_criterion_ends_only_the_rows_whose_json_has_closed(tokenizer_dir):
    from transformers import AutoTokenizer

    from tunewright.chat import _stop_when, json_object_closed

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    prompt = tok("prompt:", add_special_tokens=False)["input_ids"]
    rows = ['{"category": "billing"}', '{"category": "bill', "I think the category"]
    ids = [prompt + tok(r, add_special_tokens=False)["input_ids"] for r in rows]
    width = max(map(len, ids))
    batch = torch.tensor([[tok.pad_token_id] * (width - len(x)) + x for x in ids])
    assert _stop_when(tok, 0, json_object_closed)(batch, None).tolist() == [True, False, False]


def test_json_exact_match_compares_parsed_objects_and_scores_each_field():
    refs = ['{"a": 1, "b": "x"}'] * 4
    preds = ['{"b": "x", "a": 1}', 'Sure! {"a": 1, "b": "y"} hope it helps', "no json here", '{"a": 1, "b": "x"']
    total, fields, hits = score("json_exact_match", preds, refs)
    assert hits == [True, False, False, False] and total == 0.25
    assert fields == {"a": 0.5, "b": 0.25}
    assert parse_json_answer('x {"k": [1]} y') == {"k": [1]}
    assert score("exact_match", [" yes", "no"], ["yes", "yes"])[0] == 0.5


def test_answer_only_head_loss_equals_the_models_own_loss(tiny_model_dir):
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunewright.train.methods import peft_config
    from tests.conftest import load_generator
    from tunewright.chat import pad_batch
    from tunewright.recipe import AdapterConfig
    from tunewright.train.loss import token_loss

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), peft_config(AdapterConfig(r=4)))
    rows = load_generator().generate(4, seed=5)
    batch = pad_batch([encode_example(tok, r["messages"], 128) for r in rows], tok.pad_token_id)
    with torch.no_grad():
        assert torch.allclose(token_loss(model, batch), model(**batch).loss, atol=1e-5)


def _tiny(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval(), AutoTokenizer.from_pretrained(tiny_model_dir)


def test_packed_examples_do_not_attend_to_each_other(tiny_model_dir):
    """The loss of a packed row equals the token-weighted losses of its examples computed alone."""
    from tests.conftest import load_generator
    from tunewright.chat import pack, pad_batch
    from tunewright.train.loss import token_loss

    model, tok = _tiny(tiny_model_dir)
    encoded = [encode_example(tok, r["messages"], 160) for r in load_generator().generate(3, seed=11)]
    rows = pack(encoded, max_len=1000)
    assert len(rows) == 1 and rows[0]["position_ids"].count(0) == 3
    with torch.no_grad():
        packed = token_loss(model, pad_batch(rows, tok.pad_token_id), reduction="sum")
        alone = sum(token_loss(model, pad_batch([e], tok.pad_token_id), reduction="sum") for e in encoded)
    assert torch.allclose(packed, alone, rtol=1e-4)


def test_focal_loss_is_below_cross_entropy_and_weights_scale_tokens(tiny_model_dir):
    from tests.conftest import load_generator
    from tunewright.chat import pad_batch
    from tunewright.train.loss import token_loss

    model, tok = _tiny(tiny_model_dir)
    encoded = [encode_example(tok, r["messages"], 160) for r in load_generator().generate(2, seed=12)]
    batch = pad_batch(encoded, tok.pad_token_id)
    with torch.no_grad():
        ce, focal = token_loss(model, batch), token_loss(model, batch, focal_gamma=2.0)
        assert 0 < focal < ce
        encoded[0]["token_weight"] = [3.0] * len(encoded[0]["input_ids"])
        encoded[1]["token_weight"] = [0.0] * len(encoded[1]["input_ids"])
        only_first = token_loss(model, pad_batch(encoded, tok.pad_token_id))
        assert torch.allclose(only_first, token_loss(model, pad_batch(encoded[:1], tok.pad_token_id)), rtol=1e-5)


def test_class_weights_balance_labels_and_read_a_json_field():
    from tasks.finetune.loop import class_weights, label as _label

    weights = class_weights(["a", "a", "a", "b"])
    assert weights == {"a": 4 / 6, "b": 2.0}
    record = {"id": "x", "messages": [{"role": "assistant", "content": '{"category": "billing"}'}]}
    assert _label(record, "category") == "billing"
    with pytest.raises(ValueError, match="train.label_field 'priority': record x"):
        _label(record, "priority")


def test_training_with_packing_and_class_weighted_loss(stages_1_to_3):
    recipe, ctx, data, model, env = stages_1_to_3
    cfg = recipe.train.model_copy(update={"packing": True, "loss": "class_weighted", "label_field": "category",
                                          "max_seq_len": 400, "batch_size": 2})
    trained = fine_tune.fn(cfg, recipe.model, data, model, env, ctx)
    assert trained.steps == cfg.max_steps and trained.final_loss > 0


def test_same_seed_same_adapter(stages_1_to_3):
    recipe, ctx, data, model, env = stages_1_to_3
    a = load_file(Path(fine_tune.fn(recipe.train, recipe.model, data, model, env, ctx).output_dir) / "adapter_model.safetensors")
    b = load_file(Path(fine_tune.fn(recipe.train, recipe.model, data, model, env, ctx).output_dir) / "adapter_model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_early_stopping_ends_training_when_val_loss_stops_improving(stages_1_to_3):
    recipe, ctx, data, model, env = stages_1_to_3
    cfg = recipe.train.model_copy(update={"max_steps": 40, "learning_rate": 0.5, "lr_scheduler": "constant",
                                          "eval_every": 1, "early_stopping_patience": 2, "warmup_steps": 0})
    trained = fine_tune.fn(cfg, recipe.model, data, model, env, ctx)
    assert trained.stopped_early and trained.steps < 40
