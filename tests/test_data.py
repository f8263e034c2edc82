"""Stage 1: normalisation, the great-expectations gate with quarantine, deterministic splits."""

import json

import pytest

from tasks.data import DataGateError, prepare_data
from tunewright.splits import read_split
from tests.conftest import load_generator, write_jsonl


def test_splits_are_deterministic_disjoint_and_complete(run_ctx):
    recipe, ctx = run_ctx
    first = prepare_data.fn(recipe.data, ctx)
    second = prepare_data.fn(recipe.data, ctx)
    ids = {name: [r["id"] for r in read_split(getattr(first, f"{name}_path"))] for name in ("train", "val", "test")}
    assert sum(map(len, ids.values())) + first.n_rejected + first.n_duplicates == 160
    assert second.cached and not first.cached
    assert not (set(ids["train"]) & set(ids["test"])) and not (set(ids["val"]) & set(ids["test"]))
    assert [r["id"] for r in read_split(second.test_path)] == ids["test"]
    assert first.digest == second.digest
    assert first.system_prompt and first.system_prompt.startswith("Ticket to JSON")


def test_other_record_shapes_are_normalised_to_chat_messages(run_ctx, tmp_path):
    recipe, ctx = run_ctx
    rows = [{"prompt": f"question number {i} about the parcel", "response": f"answer {i}"} for i in range(30)]
    path = write_jsonl(tmp_path / "pc.jsonl", rows)
    cfg = recipe.data.model_copy(update={"path": str(path), "system_prompt": "Be brief.",
                                         "gate": recipe.data.gate.model_copy(update={"min_rows": 10})})
    art = prepare_data.fn(cfg, ctx)
    rec = read_split(art.train_path)[0]
    assert art.format == "prompt_completion" and art.kind == "sft"
    assert [m["role"] for m in rec["messages"]] == ["system", "user", "assistant"]
    assert rec["messages"][0]["content"] == "Be brief."


def test_a_source_mixing_formats_is_refused_naming_both(run_ctx, tmp_path):
    from tasks.data.formats import FormatError

    recipe, ctx = run_ctx
    rows = [{"prompt": f"q{i}", "response": f"a{i}"} for i in range(30)]
    rows += [{"instruction": f"do {i}", "input": "x", "output": f"done {i}"} for i in range(30)]
    path = write_jsonl(tmp_path / "mixed.jsonl", rows)
    with pytest.raises(FormatError, match=r"prompt_completion \(30 rows, e.g. mixed.jsonl line 1.*alpaca \(30 rows, e.g. mixed.jsonl line 31"):
        prepare_data.fn(recipe.data.model_copy(update={"path": str(path)}), ctx)


def test_gate_stops_on_bad_rows_and_quarantines_them_with_reasons(run_ctx, tmp_path):
    recipe, ctx = run_ctx
    rows = load_generator().generate(80, seed=3)
    rows[5]["messages"][-1]["content"] = ""                     # empty answer
    rows[9]["messages"] = rows[9]["messages"][:-1]              # no assistant turn
    rows[12]["messages"] = rows[12]["messages"][1:2] + rows[12]["messages"][1:]  # user, user, assistant
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with path.open("a") as fh:
        fh.write("{not json\n")
    cfg = recipe.data.model_copy(update={"path": str(path)})
    with pytest.raises(DataGateError) as err:
        prepare_data.fn(cfg, ctx)
    msg = str(err.value)
    assert "expect_column_values_to_be_between on 'response_chars'" in msg
    assert "expect_column_values_to_be_in_set on 'roles_ok'" in msg and "bad.jsonl line 13" in msg
    assert "bad.jsonl line 81: not JSON" in msg
    quarantine = [json.loads(line) for line in open(f"{ctx.work_dir}/data/quarantine.jsonl")]
    reasons = {q.get("id", q["row"]): q["reasons"] for q in quarantine}
    assert any("response_chars" in r for r in reasons[rows[5]["id"]])
    assert any("last_role" in r for r in reasons[rows[9]["id"]])
    assert any("roles_ok" in r for r in reasons[rows[12]["id"]])
    assert len(quarantine) == 4  # empty answer, missing answer, broken role order, unparseable line


def test_gate_tolerance_lets_a_few_bad_rows_through_but_keeps_them(run_ctx, tmp_path):
    recipe, ctx = run_ctx
    rows = load_generator().generate(80, seed=3)
    rows[5]["messages"][-1]["content"] = "   "
    path = write_jsonl(tmp_path / "one_bad.jsonl", rows)
    gate = recipe.data.gate.model_copy(update={"max_rejected_fraction": 0.05})
    art = prepare_data.fn(recipe.data.model_copy(update={"path": str(path), "gate": gate}), ctx)
    assert art.n_rejected == 1 and art.n_train + art.n_val + art.n_test == 79


def test_too_few_rows_fails_the_table_level_expectation(run_ctx, tmp_path):
    recipe, ctx = run_ctx
    path = write_jsonl(tmp_path / "few.jsonl", load_generator().generate(10, seed=1))
    with pytest.raises(DataGateError, match="expect_table_row_count_to_be_between"):
        prepare_data.fn(recipe.data.model_copy(update={"path": str(path)}), ctx)
