"""Stage 1 in depth: sources, formats, cleaning, duplicates, PII, balancing, the gate, caching, S3, the CLI."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tasks.data import DataGateError, prepare
from tasks.data.formats import FormatError
from tasks.data.sources import SourceError
from tunewright.recipe import DataConfig
from tests.conftest import ROOT, load_generator, write_jsonl

GATE = {"min_rows": 5}


def cfg(path, **kw) -> DataConfig:
    data = {"path": str(path), "gate": GATE, **kw}
    return DataConfig.model_validate(data)


def run(path, tmp_path, **kw) -> dict:
    return prepare(cfg(path, **kw), tmp_path / "state", use_cache=False)


def reconciles(s: dict) -> bool:
    parts = ("rows_kept", "rows_quarantined", "duplicates_removed", "near_duplicates_removed")
    return all(v["rows_in"] == sum(v[k] for k in parts) for v in [s, *s["sources"].values()])


def lines(path: str) -> list[dict]:
    return [json.loads(x) for x in open(path, encoding="utf-8")]


def qa(i: int) -> tuple[str, str]:
    return f"Customer {i} asks where parcel {i * 7} went after leaving depot {i % 5}", f"It is in transit, ref {i}."


# --- formats -------------------------------------------------------------------------------

def test_alpaca_json_array_and_object_holding_one_are_read(tmp_path):
    rows = [{"instruction": qa(i)[0], "input": "" if i % 2 else "extra", "output": qa(i)[1]} for i in range(20)]
    (tmp_path / "a.json").write_text(json.dumps(rows))
    (tmp_path / "b.json").write_text(json.dumps({"meta": {"v": 1}, "data": rows}))
    for name in ("a.json", "b.json"):
        s = run(tmp_path / name, tmp_path)
        assert s["format"] == "alpaca" and s["rows_kept"] == 20 and reconciles(s)
    rec = lines(s["paths"]["train"])[0]
    assert [m["role"] for m in rec["messages"]] == ["user", "assistant"]


def test_sharegpt_roles_are_mapped_and_a_trailing_question_is_dropped_and_reported(tmp_path):
    rows = [{"conversations": [{"from": "system", "value": "Be kind."}, {"from": "human", "value": qa(i)[0]},
                               {"from": "gpt", "value": qa(i)[1]}]} for i in range(20)]
    rows[3]["conversations"].append({"from": "human", "value": "thanks, and one more thing?"})
    rows[4]["conversations"] = [{"from": "human", "value": "only a question"}]
    s = run(write_jsonl(tmp_path / "sg.jsonl", rows), tmp_path, gate={"min_rows": 5, "max_rejected_fraction": 0.1})
    assert s["format"] == "sharegpt" and s["rows_quarantined"] == 1 and reconciles(s)
    assert any("no assistant turn" in r for r in s["quarantine"][0]["reasons"])
    assert s["repairs"][0]["where"] == "sg.jsonl line 4" and "dropped 1 trailing turn" in s["repairs"][0]["note"]
    kept = {r["id"]: r for name in ("train", "val", "test") for r in lines(s["paths"][name])}
    assert [m["role"] for m in kept["sg.jsonl-4"]["messages"]] == ["system", "user", "assistant"]


def test_chat_keeps_system_multi_turn_and_names_and_rejects_tool_turns_with_a_reason(tmp_path):
    rows = [{"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": qa(i)[0], "name": "ann"},
                          {"role": "assistant", "content": "Which parcel?"}, {"role": "user", "content": f"#{i}"},
                          {"role": "assistant", "content": qa(i)[1]}]} for i in range(12)]
    rows[2]["messages"][2]["tool_calls"] = [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]
    rows[2]["messages"].insert(3, {"role": "tool", "content": "{}", "tool_call_id": "c1"})
    rows[2]["messages"].insert(4, {"role": "assistant", "content": "Which parcel, then?"})
    s = run(write_jsonl(tmp_path / "chat.jsonl", rows), tmp_path, gate={"min_rows": 5, "max_rejected_fraction": 0.2})
    assert s["rows_quarantined"] == 1 and "tool call (data.clean.tool_turns: reject)" in s["quarantine"][0]["reasons"][0]
    rec = lines(s["paths"]["train"])[0]
    assert len(rec["messages"]) == 5 and rec["messages"][1]["name"] == "ann"
    kept = run(write_jsonl(tmp_path / "chat.jsonl", rows), tmp_path, clean={"tool_turns": "keep"})
    assert kept["rows_quarantined"] == 0


TRACK = {"type": "function", "function": {"name": "track_parcel", "description": "Where a parcel is",
                                          "parameters": {"type": "object", "required": ["parcel"],
                                                         "properties": {"parcel": {"type": "integer"}}}}}


def tool_rows(n: int) -> list[dict]:
    """Rows of OpenAI's function-calling fine-tuning format: a call, its result, then the answer."""
    return [{"tools": [TRACK], "messages": [
        {"role": "user", "content": qa(i)[0]},
        {"role": "assistant", "content": None, "tool_calls": [{"id": f"call_{i}", "type": "function", "function": {
            "name": "track_parcel", "arguments": json.dumps({"parcel": i * 7})}}]},
        {"role": "tool", "tool_call_id": f"call_{i}", "content": json.dumps({"status": "in transit", "ref": i})},
        {"role": "assistant", "content": qa(i)[1]}]} for i in range(n)]


def test_openai_tool_calling_rows_are_kept_with_their_calls_results_and_tools(tmp_path):
    path = write_jsonl(tmp_path / "tools.jsonl", tool_rows(30))
    s = run(path, tmp_path, clean={"tool_turns": "keep"})
    assert s["rows_in"] == 30 and s["rows_kept"] == 30 and reconciles(s)
    recs = {r["id"]: r for name in ("train", "val", "test") for r in lines(s["paths"][name])}
    rec = recs["tools.jsonl-4"]
    call, result = rec["messages"][1], rec["messages"][2]
    assert call["role"] == "assistant" and call["content"] == "" and call["tool_calls"] == [
        {"id": "call_3", "type": "function", "function": {"name": "track_parcel", "arguments": {"parcel": 21}}}]
    assert result == {"role": "tool", "content": json.dumps({"status": "in transit", "ref": 3}), "tool_call_id": "call_3"}
    assert rec["tools"] == [TRACK] and all(r["tools"] == [TRACK] for r in recs.values())
    with pytest.raises(DataGateError):  # the default still quarantines every row with a tool call
        run(path, tmp_path, clean={"tool_turns": "reject"})


def test_bad_tool_calls_are_quarantined_naming_the_row_and_call(tmp_path):
    rows = tool_rows(20)
    rows[1]["messages"][1]["tool_calls"][0]["function"]["name"] = "cancel_parcel"
    rows[2]["messages"][1]["tool_calls"][0]["function"]["arguments"] = '{"parcel": 14'
    rows[3]["messages"][1]["tool_calls"][0]["function"]["arguments"] = '{"parcel": "fourteen"}'
    rows[4]["messages"][2]["tool_call_id"] = "call_99"
    s = run(write_jsonl(tmp_path / "bad.jsonl", rows), tmp_path, clean={"tool_turns": "keep"},
            gate={"min_rows": 5, "max_rejected_fraction": 0.25})
    assert s["rows_kept"] == 16 and s["rows_quarantined"] == 4 and reconciles(s)
    why = {q["where"]: q["reasons"][0] for q in s["quarantine"]}
    assert why["bad.jsonl line 2"].startswith("bad.jsonl line 2: 'messages' turn 1 call 0 ('call_1', cancel_parcel) "
                                              "names a tool not declared in 'tools' (track_parcel)")
    assert "turn 1 call 0 (track_parcel): arguments do not parse as JSON" in why["bad.jsonl line 3"]
    assert "call 0 ('call_3', track_parcel): arguments do not satisfy its parameters: 'fourteen' is not of type " \
        "'integer'" in why["bad.jsonl line 4"]
    assert "turn 2 is a tool turn answering tool_call_id 'call_99', which no earlier call has" in why["bad.jsonl line 5"]


def test_sharegpt_function_calls_and_observations_read_as_tool_calls_and_tool_turns(tmp_path):
    rows = [{"tools": json.dumps([TRACK["function"]]), "conversations": [
        {"from": "human", "value": qa(i)[0]},
        {"from": "function_call", "value": json.dumps({"name": "track_parcel", "arguments": {"parcel": i}})},
        {"from": "observation", "value": "in transit"}, {"from": "gpt", "value": qa(i)[1]}]} for i in range(12)]
    s = run(write_jsonl(tmp_path / "sg.jsonl", rows), tmp_path, clean={"tool_turns": "keep"})
    assert s["rows_kept"] == 12 and reconciles(s)
    rec = {r["id"]: r for name in ("train", "val", "test") for r in lines(s["paths"][name])}["sg.jsonl-6"]
    assert rec["messages"][1]["tool_calls"] == [
        {"id": "call_1", "type": "function", "function": {"name": "track_parcel", "arguments": {"parcel": 5}}}]
    assert rec["messages"][2] == {"role": "tool", "content": "in transit", "tool_call_id": "call_1"}
    assert rec["tools"] == [TRACK]


def test_csv_with_quoted_newlines_tsv_and_parquet_read_the_same_rows(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"prompt": f"line one {i}\nline two of {qa(i)[0]}", "completion": qa(i)[1]} for i in range(15)]
    with open(tmp_path / "d.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, ["prompt", "completion"])
        w.writeheader()
        w.writerows(rows)
    with open(tmp_path / "d.tsv", "w", newline="") as fh:
        w = csv.DictWriter(fh, ["prompt", "completion"], delimiter="\t")
        w.writeheader()
        w.writerows(rows)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    seen = []
    for name in ("d.csv", "d.tsv", "d.parquet"):
        s = run(tmp_path / name, tmp_path)
        assert s["format"] == "prompt_completion" and s["rows_kept"] == 15, name
        seen.append(sorted(r["messages"][0]["content"] for n in ("train", "val", "test") for r in lines(s["paths"][n])))
    assert seen[0] == seen[1] == seen[2] and "\nline two" in seen[0][0]


def test_csv_row_with_wrong_field_count_is_quarantined_naming_row_and_line(tmp_path):
    text = "prompt,response\n" + "".join(f'"{qa(i)[0]}","{qa(i)[1]}"\n' for i in range(10)) + "a,b,c\n"
    (tmp_path / "bad.csv").write_text(text)
    s = prepare(cfg(tmp_path / "bad.csv", gate={"min_rows": 5, "max_rejected_fraction": 0.2}), tmp_path / "st")
    assert s["quarantine"][0]["where"] == "bad.csv row 11 (line 12)"
    assert "3 fields where the header has 2" in s["quarantine"][0]["reasons"][0]


def test_hf_datasets_folder_and_a_folder_of_files(tmp_path):
    from datasets import Dataset

    rows = [{"text": qa(i)[0], "label": "late" if i % 3 else "lost"} for i in range(18)]
    Dataset.from_list(rows).save_to_disk(str(tmp_path / "hf"))
    s = run(tmp_path / "hf", tmp_path)
    assert s["format"] == "labelled" and s["rows_kept"] == 18 and s["classes"]["distribution"] == {"late": 12, "lost": 6}
    folder = tmp_path / "many"
    folder.mkdir()
    write_jsonl(folder / "a.jsonl", rows[:9])
    write_jsonl(folder / "b.jsonl", rows[9:])
    s = run(folder, tmp_path)
    assert s["rows_in"] == 18 and {q for q in ("many/a.jsonl", "many/b.jsonl")} <= {
        r["where"].split(" line")[0] for n in ("train", "val", "test") for r in lines(s["paths"][n])}


def test_preference_pairs_as_strings_and_as_messages_and_kto_feedback(tmp_path):
    as_strings = [{"prompt": qa(i)[0], "chosen": qa(i)[1], "rejected": "No idea."} for i in range(10)]
    as_messages = [{"prompt": [{"role": "user", "content": qa(i)[0]}],
                    "chosen": [{"role": "assistant", "content": qa(i)[1]}],
                    "rejected": [{"role": "assistant", "content": "No idea."}]} for i in range(10, 20)]
    for rows in (as_strings, as_messages):
        s = run(write_jsonl(tmp_path / "p.jsonl", rows), tmp_path, clean={"near_dedupe": False})
        assert s["format"] == "preference" and s["kind"] == "preference" and s["rows_kept"] == 10
        rec = lines(s["paths"]["train"])[0]
        assert rec["prompt"][-1]["role"] == "user" and rec["chosen"][0]["role"] == rec["rejected"][0]["role"] == "assistant"
    same = [{"prompt": qa(i)[0], "chosen": "x", "rejected": "x"} for i in range(6)]
    with pytest.raises(DataGateError, match="chosen_differs"):
        run(write_jsonl(tmp_path / "same.jsonl", same), tmp_path, gate={"min_rows": 1, "max_rejected_fraction": 0.5})
    kto = [{"prompt": qa(i)[0], "completion": qa(i)[1], "label": ["true", "false", 1, 0][i % 4]} for i in range(12)]
    s = run(write_jsonl(tmp_path / "k.jsonl", kto), tmp_path)
    assert s["format"] == "kto" and {r["label"] for r in lines(s["paths"]["train"])} == {True, False}


def kept(s: dict) -> list[dict]:
    return [r for n in ("train", "val", "test") for r in lines(s["paths"][n])]


def test_ultrafeedback_pairs_take_their_shared_turns_as_prompt_and_keep_their_scores(tmp_path):
    """UltraFeedback-binarized rows (`prompt`, and `chosen`/`rejected` conversations repeating it, plus `messages`)."""
    def turns(i: int, answer: str) -> list[dict]:
        return [{"role": "user", "content": qa(i)[0]}, {"role": "assistant", "content": answer}]

    rows = [{"prompt": qa(i)[0], "prompt_id": f"p{i}", "chosen": turns(i, qa(i)[1]),
             "rejected": turns(i, f"No idea about parcel {i}."), "messages": turns(i, qa(i)[1]),
             "score_chosen": 8.0, "score_rejected": float(i % 7)} for i in range(30)]
    for row in rows[1::2]:  # the rows had no `messages`
        del row["messages"]
    s = run(write_jsonl(tmp_path / "uf.jsonl", rows), tmp_path, clean={"near_dedupe": False})
    assert s["format"] == "preference" and s["rows_in"] == s["rows_kept"] == 30 and reconciles(s)
    for rec in kept(s):
        i = int(rec["id"].rsplit("-", 1)[1]) - 1
        assert rec["prompt"] == [{"role": "user", "content": qa(i)[0]}]
        assert rec["chosen"] == [{"role": "assistant", "content": qa(i)[1]}]
        assert rec["rejected"] == [{"role": "assistant", "content": f"No idea about parcel {i}."}]
        assert (rec["score_chosen"], rec["score_rejected"]) == (8.0, float(i % 7))
    rows[0]["prompt"] = "a question neither answer starts with"
    s = run(write_jsonl(tmp_path / "uf.jsonl", rows), tmp_path, clean={"near_dedupe": False},
            gate={"min_rows": 5, "max_rejected_fraction": 0.1})
    assert s["rows_kept"] == 29 and reconciles(s) and "'prompt' is not among" in s["quarantine"][0]["reasons"][0]


def test_hh_rlhf_transcripts_are_split_into_turns_with_the_shared_ones_as_prompt(tmp_path):
    """HH-RLHF: `chosen`/`rejected` transcripts and no prompt; and Anthropic's prompt ending on "Assistant:"."""
    def said(i: int, answer: str) -> str:
        return f"\n\nHuman: {qa(i)[0]}\n\nAssistant: Let me look.\n\nHuman: Thanks, please do.\n\nAssistant: {answer}"

    rows = [{"chosen": said(i, qa(i)[1]), "rejected": said(i, f"No idea about parcel {i}.")} for i in range(30)]
    s = run(write_jsonl(tmp_path / "hh.jsonl", rows), tmp_path, clean={"near_dedupe": False})
    assert s["format"] == "preference" and s["rows_in"] == s["rows_kept"] == 30 and reconciles(s)
    for rec in kept(s):
        i = int(rec["id"].rsplit("-", 1)[1]) - 1
        assert rec["prompt"] == [{"role": "user", "content": qa(i)[0]}, {"role": "assistant", "content": "Let me look."},
                                 {"role": "user", "content": "Thanks, please do."}]
        assert rec["chosen"] == [{"role": "assistant", "content": qa(i)[1]}]
        assert rec["rejected"] == [{"role": "assistant", "content": f"No idea about parcel {i}."}]
        assert rec["score_chosen"] is None and rec["score_rejected"] is None
    explicit = [{"prompt": f"\n\nHuman: {qa(i)[0]}\n\nAssistant:", "chosen": f" {qa(i)[1]}",
                 "rejected": f" No idea about parcel {i}."} for i in range(30)]
    s = run(write_jsonl(tmp_path / "hh_prompt.jsonl", explicit), tmp_path, clean={"near_dedupe": False})
    assert s["rows_kept"] == 30 and reconciles(s)
    assert all(r["prompt"] == [{"role": "user", "content": qa(int(r["id"].rsplit("-", 1)[1]) - 1)[0]}]
               for r in kept(s))


def test_sharegpt_pairs_take_conversations_as_the_prompt_and_from_value_answers(tmp_path):
    """LLaMA-Factory's ShareGPT preference layout: `conversations` is the prompt, `chosen`/`rejected` {from, value}."""
    rows = [{"conversations": [{"from": "human", "value": qa(i)[0]}], "system": "Be brief.",
             "chosen": {"from": "gpt", "value": qa(i)[1]}, "rejected": {"from": "gpt", "value": f"No idea about {i}."}}
            for i in range(30)]
    rows[3]["chosen"] = {"from": "martian", "value": "?"}
    s = run(write_jsonl(tmp_path / "sg.jsonl", rows), tmp_path, clean={"near_dedupe": False},
            gate={"min_rows": 5, "max_rejected_fraction": 0.1})
    assert s["format"] == "preference" and s["rows_kept"] == 29 and reconciles(s)
    assert "'chosen' turn 0 is from 'martian'" in s["quarantine"][0]["reasons"][0]
    for rec in kept(s):
        i = int(rec["id"].rsplit("-", 1)[1]) - 1
        assert rec["prompt"] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": qa(i)[0]}]
        assert rec["chosen"] == [{"role": "assistant", "content": qa(i)[1]}]
        assert rec["rejected"] == [{"role": "assistant", "content": f"No idea about {i}."}]


def test_min_score_margin_quarantines_close_pairs_with_the_reason_and_keeps_pairs_without_scores(tmp_path):
    """Pairs under `clean.min_score_margin` are quarantined naming their margin, without failing the gate; pairs
    without scores are kept and counted as `no_scores`; rating fields are read as scores."""
    rows = []
    for i in range(30):
        row = {"prompt": qa(i)[0], "chosen": qa(i)[1], "rejected": f"No idea about parcel {i}."}
        if i % 3 == 0:
            row.update(score_chosen=7, score_rejected=5)
        elif i % 3 == 1:
            row.update(chosen_rating=4.5, rejected_rating=4)
        rows.append(row)
    path = write_jsonl(tmp_path / "scored.jsonl", rows)
    s = run(path, tmp_path, clean={"near_dedupe": False, "min_score_margin": 1.0})
    assert s["passed"] and s["rows_in"] == 30 and s["rows_kept"] == 20 and s["rows_quarantined"] == 10
    assert reconciles(s) and s["cleaning"] == {"below_score_margin": 10, "no_scores": 10}
    quarantined = lines(s["paths"]["quarantine"])
    assert len(quarantined) == 10 and all((q["row"] - 1) % 3 == 1 and "score margin 0.5 (score_chosen 4.5 - score_rejected 4)" in q["reasons"][0]
               and "min_score_margin 1" in q["reasons"][0] for q in quarantined)
    assert {(r["score_chosen"], r["score_rejected"]) for r in kept(s)} == {(7.0, 5.0), (None, None)}
    assert run(path, tmp_path, clean={"near_dedupe": False})["rows_kept"] == 30  # no minimum: every pair kept
    with pytest.raises(ValueError, match="greater than or equal to 0"):
        cfg(path, clean={"min_score_margin": -1})


def test_raw_text_and_unknown_shapes(tmp_path):
    s = run(write_jsonl(tmp_path / "t.jsonl", [{"text": qa(i)[0] + " " + qa(i)[1]} for i in range(8)]), tmp_path)
    assert s["format"] == "text" and s["kind"] == "text"
    with pytest.raises(FormatError, match="cannot tell the format.*fields seen: answer, question"):
        run(write_jsonl(tmp_path / "u.jsonl", [{"question": "q", "answer": "a"}] * 3), tmp_path)
    write_jsonl(tmp_path / "u.jsonl", [{"question": qa(i)[0], "answer": qa(i)[1]} for i in range(8)])
    s = prepare(DataConfig.model_validate(
        {"sources": [{"path": str(tmp_path / "u.jsonl"), "columns": {"question": "prompt", "answer": "response"}}],
         "gate": GATE}), tmp_path / "st", use_cache=False)
    assert s["format"] == "prompt_completion" and s["rows_kept"] == 8


def test_unreadable_sources_raise_naming_the_file(tmp_path):
    (tmp_path / "broken.json").write_text('[{"a": 1},\n  {"b": ]')
    with pytest.raises(SourceError, match=r"broken.json: not valid JSON \(line 2"):
        run(tmp_path / "broken.json", tmp_path)
    (tmp_path / "x.xlsx").write_text("?")
    with pytest.raises(SourceError, match="unknown file kind '.xlsx'"):
        run(tmp_path / "x.xlsx", tmp_path)


# --- cleaning -------------------------------------------------------------------------------

def test_each_cleaning_step_repairs_and_is_counted(tmp_path):
    rows = [{"prompt": qa(i)[0], "response": qa(i)[1]} for i in range(10)]
    rows[0]["prompt"] = "The caf\u00c3\u00a9 order \u00e2\u20ac\u201c where is it?"      # mojibake
    rows[1]["prompt"] = "zero\u200bwidth and bell\x07 here please"
    rows[2]["prompt"] = "  too    many   spaces \n\n\n\n here  "
    rows[3]["prompt"] = "<p>Where is <b>my</b> order&amp;parcel?</p>"
    rows[4]["prompt"] = "Patient had an MI last year; mi casa is fine"
    s = run(write_jsonl(tmp_path / "c.jsonl", rows), tmp_path,
            clean={"strip_html": True, "replacements": {"MI": "myocardial infarction"}, "near_dedupe": False})
    got = {r["where"]: r["messages"][0]["content"] for n in ("train", "val", "test") for r in lines(s["paths"][n])}
    assert got["c.jsonl line 1"] == "The café order – where is it?"
    assert got["c.jsonl line 2"] == "zerowidth and bell here please"
    assert got["c.jsonl line 3"] == "too many spaces\n\n here"
    assert got["c.jsonl line 4"] == "Where is my order&parcel?"
    assert got["c.jsonl line 5"] == "Patient had an myocardial infarction last year; mi casa is fine"
    # the HTML row also loses the newline its closing </p> became
    assert s["cleaning"] == {"unicode": 1, "control_chars": 1, "whitespace": 2, "html": 1, "replacements": 1}


def test_pii_is_redacted_by_kind_with_checksums(tmp_path):
    text = ("Mail jane.doe@example.co.uk, call +44 20 7946 0958, card 4111 1111 1111 1111 (not 4111 1111 1111 1112), "
            "from 192.168.10.24, IBAN GB82 WEST 1234 5698 7654 32, staff EMP-123456, order 2024-05-01")
    rows = [{"prompt": qa(i)[0], "response": qa(i)[1]} for i in range(8)] + [{"prompt": text, "response": "ok"}]
    s = run(write_jsonl(tmp_path / "pii.jsonl", rows), tmp_path, clean={"pii_patterns": {"employee_id": r"EMP-\d{6}"}})
    assert s["redactions"] == {"email": 1, "phone": 1, "card": 1, "ip": 1, "iban": 1, "employee_id": 1}
    red = [r for n in ("train", "val", "test") for r in lines(s["paths"][n]) if r["messages"][1]["content"] == "ok"][0]
    out = red["messages"][0]["content"]
    assert "[EMAIL]" in out and "[PHONE]" in out and "[CARD]" in out and "[IP]" in out and "[IBAN]" in out
    assert "4111 1111 1111 1112" in out and "2024-05-01" in out and "[EMPLOYEE_ID]" in out


def test_exact_duplicates_on_normalised_content_and_near_duplicates_are_removed_and_listed(tmp_path):
    rows = [{"prompt": qa(i)[0], "response": qa(i)[1]} for i in range(20)]
    rows.append({"prompt": qa(3)[0].upper().replace(" ", "  "), "response": qa(3)[1].upper(), "id": "shouting"})
    words = (qa(5)[0] + " because the tracking page has said the same thing for nine days now").split()
    rows[5]["prompt"] = " ".join(words)
    rows.append({"prompt": " ".join(words[:-1] + ["today"]), "response": qa(5)[1], "id": "near"})
    s = run(write_jsonl(tmp_path / "d.jsonl", rows), tmp_path)
    assert s["duplicates_removed"] == 1 and s["near_duplicates_removed"] == 1 and reconciles(s)
    dups = {d["id"]: d for d in lines(s["paths"]["duplicates"])}
    assert dups["shouting"]["duplicate_of"] == "d.jsonl-4" and dups["near"]["duplicate_of"] == "d.jsonl-6"
    assert 0.8 <= dups["near"]["similarity"] < 1


def test_token_length_filter_uses_the_recipe_tokenizer(tmp_path, tokenizer_dir):
    rows = [{"prompt": qa(i)[0], "response": qa(i)[1]} for i in range(10)]
    rows[7]["prompt"] = " ".join(f"word{i}" for i in range(300))
    c = cfg(write_jsonl(tmp_path / "len.jsonl", rows), clean={"max_tokens": 120, "tokenizer": str(tokenizer_dir)},
            gate={"min_rows": 5, "max_rejected_fraction": 0.2})
    s = prepare(c, tmp_path / "st", use_cache=False)
    assert s["rows_quarantined"] == 1 and "tokens" in s["quarantine"][0]["reasons"][0]
    assert s["quarantine"][0]["where"] == "len.jsonl line 8"


def test_test_examples_seen_in_training_are_removed_or_reported(tmp_path):
    rows = [{"prompt": qa(i)[0] + f" and it was shipped with carrier number {i} on monday", "response": qa(i)[1]}
            for i in range(200)]
    for i in range(200, 240):  # near copies of row 0..39 with the answer changed: overlap without being duplicates
        rows.append({"prompt": rows[i - 200]["prompt"], "response": f"A different answer entirely for {i}"})
    c = dict(clean={"near_dedupe": False}, gate={"min_rows": 5})
    removed = run(write_jsonl(tmp_path / "ct.jsonl", rows), tmp_path, **c)
    assert removed["contaminated"] > 0 and reconciles(removed)
    assert all("contamination" in q["reasons"][0] for q in removed["quarantine"])
    reported = run(write_jsonl(tmp_path / "ct.jsonl", rows), tmp_path, **{**c, "clean": {"near_dedupe": False,
                                                                                           "contamination": "report"}})
    assert reported["contaminated"] == removed["contaminated"] and reported["rows_quarantined"] == 0
    with pytest.raises(DataGateError, match="contaminated"):
        run(write_jsonl(tmp_path / "ct.jsonl", rows), tmp_path, clean={"near_dedupe": False, "contamination": "fail"},
            gate={"min_rows": 5})


# --- balancing, splits, folds ---------------------------------------------------------------

def tickets(n: int, seed: int = 5) -> list[dict]:
    return load_generator().generate(n, seed=seed)


def test_labels_from_an_answer_field_give_a_distribution_weights_and_stratified_stable_splits(tmp_path):
    rows = tickets(300)
    base = dict(balance={"label_field": "category", "kfolds": 5}, gate={"min_rows": 5, "labels": [
        "billing", "shipping", "refund", "technical", "account"]})
    s = run(write_jsonl(tmp_path / "t.jsonl", rows), tmp_path, **base)
    dist = s["classes"]["distribution"]
    assert set(dist) == {"billing", "shipping", "refund", "technical", "account"} and sum(dist.values()) == s["rows_kept"]
    assert abs(sum(s["classes"]["weights"][k] * v for k, v in dist.items()) / s["rows_kept"] - 1) < 1e-3
    split = {r["id"]: (n, r["fold"]) for n in ("train", "val", "test") for r in lines(s["paths"][n])}
    extra = [{**r, "id": f"new-{i}"} for i, r in enumerate(tickets(100, seed=99))]
    more = run(write_jsonl(tmp_path / "t.jsonl", rows + extra), tmp_path, **base)
    split2 = {r["id"]: (n, r["fold"]) for n in ("train", "val", "test") for r in lines(more["paths"][n])}
    assert all(split2[k] == v for k, v in split.items() if k in split2)  # appending rows moves no existing row
    with pytest.raises(DataGateError, match="expect_column_distinct_values_to_be_in_set"):
        run(write_jsonl(tmp_path / "t.jsonl", rows), tmp_path, **{**base, "gate": {"min_rows": 5, "labels": ["billing"]}})


def test_oversampling_undersampling_and_augmentation_touch_only_the_training_split(tmp_path):
    rows = [{"text": f"{qa(i)[0]} with some extra broken damaged words", "label": "rare" if i < 12 else "common"}
            for i in range(120)]
    path = write_jsonl(tmp_path / "l.jsonl", rows)
    over = run(path, tmp_path, balance={"strategy": "oversample"}, clean={"near_dedupe": False})
    after = over["classes"]["resampling"]["after"]
    assert after["rare"] == after["common"] == over["classes"]["resampling"]["before"]["common"]
    assert not any("copy_of" in r for n in ("val", "test") for r in lines(over["paths"][n]))
    under = run(path, tmp_path, balance={"strategy": "undersample", "target_ratio": 0.5}, clean={"near_dedupe": False})
    u = under["classes"]["resampling"]
    assert u["after"]["common"] == 2 * u["before"]["rare"] and len(lines(under["paths"]["undersampled"])) > 0
    aug = run(path, tmp_path, balance={"augment_to": 20}, clean={"near_dedupe": False})
    added = [r for r in lines(aug["paths"]["train"]) if "augmented_from" in r]
    assert len(added) == 20 - aug["classes"]["resampling"].get("before", {}).get("rare", sum(
        1 for r in lines(aug["paths"]["train"]) if r["label"] == "rare" and "augmented_from" not in r))
    src = {r["id"]: r for r in lines(aug["paths"]["train"])}
    for r in added:
        assert r["messages"][1]["content"] == "rare" and r["messages"][0]["content"] != src[r["augmented_from"]][
            "messages"][0]["content"]


def test_paraphrase_rewrites_are_kept_only_when_new_and_faithful_to_what_the_answer_needs():
    from tasks.data.paraphrase import keeps

    protected = {"4512", "refund"}
    original = "Order 4512 arrived broken, I want a refund"
    assert keeps(original, "  ", protected) == "empty"
    assert keeps(original, "order 4512 arrived  broken, i want a REFUND", protected) == "unchanged"
    assert keeps(original, "My parcel came damaged and I would like my money back", protected).startswith("lost")
    assert keeps(original, "Parcel 4512 came damaged; please refund me", protected) is None
    with pytest.raises(ValueError, match="paraphrase needs paraphrase_model"):
        DataConfig.model_validate({"path": __file__, "balance": {"augment_to": 5, "augment_method": "paraphrase"}})


def test_paraphrase_augmentation_runs_the_named_model_and_accounts_for_every_attempt(tmp_path, tiny_model_dir):
    rows = [{"text": f"{qa(i)[0]} with some extra broken damaged words", "label": "rare" if i < 12 else "common"}
            for i in range(120)]
    path = write_jsonl(tmp_path / "l.jsonl", rows)
    s = run(path, tmp_path, clean={"near_dedupe": False},
            balance={"augment_to": 14, "augment_method": "paraphrase", "paraphrase_model": str(tiny_model_dir),
                     "paraphrase_max_new_tokens": 12})
    aug = s["classes"]["augmentation"]
    assert aug["method"] == "paraphrase" and aug["model"] == str(tiny_model_dir)
    assert aug["attempts"] == aug["added"] + sum(aug["rejected"].values()) and aug["attempts"] > 0
    train = lines(s["paths"]["train"])
    src = {r["id"]: r for r in train}
    added = [r for r in train if "augmented_from" in r]
    assert len(added) == aug["added"] and {r["label"] for r in added} <= {"rare"}
    for r in added:  # the label (the answer) is untouched; the user turn is the model's rewrite
        assert r["messages"][-1] == src[r["augmented_from"]]["messages"][-1]
        assert r["messages"][-2]["content"] != src[r["augmented_from"]]["messages"][-2]["content"]


# --- the gate, accounting, mixing, caching, S3, CLI -----------------------------------------

def test_several_sources_mix_by_weight_and_cap_and_every_count_reconciles(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"prompt": qa(i)[0], "response": qa(i)[1]} for i in range(100)])
    b = write_jsonl(tmp_path / "b.jsonl", [{"instruction": f"Task {i}: {qa(i + 500)[0]}", "output": "done"}
                                          for i in range(100)])
    c = write_jsonl(tmp_path / "c.jsonl", [{"prompt": f"Other {qa(i + 900)[0]}", "response": "x"} for i in range(50)])
    data = DataConfig.model_validate({"sources": [{"path": str(a), "weight": 3}, {"path": str(b), "weight": 1},
                                                  {"path": str(c), "max_rows": 10}], "gate": GATE})
    s = prepare(data, tmp_path / "st", use_cache=False)
    src = s["sources"]
    assert src["a.jsonl"]["rows_in"] == 100 and src["b.jsonl"]["rows_in"] == 33 and src["c.jsonl"]["rows_in"] == 10
    assert src["b.jsonl"]["rows_sampled_out"] == 67 and s["format"] == "alpaca+prompt_completion" and reconciles(s)
    again = prepare(data, tmp_path / "st2", use_cache=False)
    assert [r["id"] for r in lines(again["paths"]["train"])] == [r["id"] for r in lines(s["paths"]["train"])]


def test_failing_gate_reports_each_expectation_with_example_rows_and_keeps_the_rows(tmp_path):
    rows = [{"prompt": qa(i)[0], "response": qa(i)[1]} for i in range(4)] + [{"prompt": "x", "response": ""}]
    with pytest.raises(DataGateError) as err:
        run(write_jsonl(tmp_path / "few.jsonl", rows), tmp_path, gate={"min_rows": 10})
    msg, s = str(err.value), err.value.summary
    assert "expect_table_row_count_to_be_between" in msg and "few.jsonl line 5" in msg
    assert not s["passed"] and reconciles(s) and lines(s["paths"]["quarantine"])[0]["record"]["messages"]
    assert "FAILED" in Path(s["paths"]["report"]).read_text()


def test_result_is_reused_by_digest_and_recomputed_when_data_or_recipe_change(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", tickets(80))
    first = prepare(cfg(path), tmp_path / "st")
    second = prepare(cfg(path), tmp_path / "st")
    assert second["cached"] and second["digest"] == first["digest"]
    changed = prepare(cfg(path, split={"seed": 3}), tmp_path / "st")
    assert not changed["cached"] and changed["digest"] != first["digest"]
    write_jsonl(path, tickets(81))
    assert prepare(cfg(path), tmp_path / "st")["digest"] != first["digest"]


def test_s3_prefix_is_read_through_a_real_s3_endpoint(tmp_path, s3_endpoint):
    import boto3

    s3 = boto3.client("s3")
    s3.create_bucket(Bucket="datasets")
    rows = tickets(40)
    for part in range(2):
        body = "".join(json.dumps(r) + "\n" for r in rows[part * 20:(part + 1) * 20])
        s3.put_object(Bucket="datasets", Key=f"tickets/part-{part}.jsonl", Body=body.encode())
    s = prepare(cfg("s3://datasets/tickets"), tmp_path / "st")
    assert s["rows_in"] == 40 and s["format"] == "chat" and reconciles(s)
    assert prepare(cfg("s3://datasets/tickets"), tmp_path / "st")["cached"]
    with pytest.raises(SourceError, match="nothing at s3://datasets/nothing"):
        prepare(cfg("s3://datasets/nothing"), tmp_path / "st")


def _cli(*args, env_home: Path) -> subprocess.CompletedProcess:
    import os

    env = {**os.environ, "TUNEWRIGHT_HOME": str(env_home)}
    return subprocess.run([sys.executable, "-m", "tunewright.cli", "data", "check", *args], capture_output=True,
                          text=True, env=env, cwd=ROOT, timeout=300)


def test_cli_data_check_json_and_exit_codes(tmp_path):
    rows = [{"messages": [{"role": "user", "content": qa(i)[0]}, {"role": "assistant", "content": qa(i)[1]}]}
            for i in range(60)]
    rows.append(rows[3])
    rows.append({"messages": [{"role": "user", "content": "Reach me at a.b@example.org or 415-555-0132"},
                              {"role": "assistant", "content": "Noted."}]})
    good = write_jsonl(tmp_path / "chat.jsonl", rows)
    ok = _cli(str(good), "--json", env_home=tmp_path / "h")
    assert ok.returncode == 0, ok.stderr
    out = json.loads(ok.stdout)
    assert out["format"] == "chat" and out["passed"] and out["rows_in"] == 62 and out["duplicates_removed"] == 1
    assert out["redactions"] == {"email": 1, "phone": 1} and out["rows_kept"] + out["rows_quarantined"] + \
        out["duplicates_removed"] + out["near_duplicates_removed"] == out["rows_in"]
    bad = _cli(str(write_jsonl(tmp_path / "few.jsonl", rows[:3])), env_home=tmp_path / "h")
    assert bad.returncode == 1 and "gate: FAILED" in bad.stdout and "expect_table_row_count_to_be_between" in bad.stdout
    missing = _cli(str(tmp_path / "nope.jsonl"), "--json", env_home=tmp_path / "h")
    assert missing.returncode == 2 and "not found" in json.loads(missing.stdout)["error"]
    recipe = _cli(str(ROOT / "recipes/demo.yaml"), "--json", env_home=tmp_path / "h")
    assert recipe.returncode == 0 and json.loads(recipe.stdout)["rows_in"] == 1200


# --- fast paths: each gives what the plain path gives ---------------------------------------

TRICKY = ["caf\u00c3\u00a9 \u00e2\u20ac\u201c", "zero\u200bwidth", "bell\x07", "tab\there", "nbsp\u00a0x", "  lead", "trail  ",
          "a\n\n\n\nb", "line\u2028sep", "<p>Hi</p>&amp;", "\ufb01ne", "\uff26\uff55\uff4c\uff4c", "Stra\u00dfe", "\u0130stanbul",
          "e\u0301", "\U0001F600", "sep\x1fhere", "\x1cfile\x1dgroup", "a.b+c@ex-ample.co.uk", "+44 20 7946 0958",
          "4111 1111 1111 1111", "4111 1111 1111 1112", "192.168.10.24", "GB82 WEST 1234 5698 7654 32", "2024-05-01",
          "415-555-0132", "1234567", "\u0660\u0661\u0662\u0663\u0664\u0665\u0666", "\uff11\uff12\uff13\uff14\uff15\uff16\uff17",
          "under_score", "MiXeD CaSe", ""]


def tricky_rows(n: int, seed: int = 0) -> list[dict]:
    """Chat rows mixing odd Unicode, PII, repeats, near repeats and rows the gate or the reader rejects."""
    import random

    rng = random.Random(seed)
    words = "order parcel refund late broken missing please help today again courier screen".split()
    rows = []
    for i in range(n):
        if rows and rng.random() < 0.04:
            row = json.loads(json.dumps(rng.choice(rows)))
            turn = row["messages"][-2]
            turn["content"] = turn["content"].upper() if rng.random() < 0.5 else turn["content"] + " " + rng.choice(words)
            row["id"] = f"again-{i}"
            rows.append(row)
            continue
        text = " ".join(rng.choice(words) for _ in range(rng.randint(4, 20)))
        for _ in range(rng.choice((0, 1, 2))):
            text += " " + rng.choice(TRICKY)
        msgs = [{"role": rng.choice(["system", "developer"]), "content": "Be kind."}] if rng.random() < 0.7 else []
        msgs += [{"role": "user", "content": f"Q{i} {text}"},
                 {"role": "assistant", "content": rng.choice(["", json.dumps({"category": rng.choice("ab")}), text[::-1]])}]
        if rng.random() < 0.01:
            msgs.append({"role": "robot", "content": "?"})
        rows.append({"id": f"r{i}", "messages": msgs})
    return rows


def _write_lines(path: Path, rows: list[dict], newline: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps(r, ensure_ascii=i % 2 == 0) for i, r in enumerate(rows)]
    lines[5:5] = ["", '{"messages": [broken', "[1, 2]", '{"question": "q"}']
    path.write_bytes(newline.join(lines).encode() + newline.encode())
    return path


def test_json_lines_read_by_worker_processes_give_the_same_output_as_lines_read_here(tmp_path):
    """Byte for byte: a JSON-lines file cut into ranges that worker processes read, detect and clean, and the
    same rows with CRLF line ends read line by line in this process (`max_examples` takes that path)."""
    rows = tricky_rows(21_000)
    settings = dict(gate={"min_rows": 5, "max_rejected_fraction": 0.5},
                    balance={"kfolds": 3}, clean={"contamination_ngram": 3})
    fast = run(_write_lines(tmp_path / "lf" / "t.jsonl", rows, "\n"), tmp_path / "a", workers=2, **settings)
    here = run(_write_lines(tmp_path / "crlf" / "t.jsonl", rows, "\r\n"), tmp_path / "b", workers=1,
               max_examples=10 ** 6, **settings)
    for name in ("train", "val", "test", "quarantine", "duplicates"):
        assert Path(fast["paths"][name]).read_bytes() == Path(here["paths"][name]).read_bytes(), name
    differ = {"digest", "digest_full", "paths", "seconds", "sources", "cleaning"}
    assert {k: v for k, v in fast.items() if k not in differ} == {k: v for k, v in here.items() if k not in differ}
    assert fast["cleaning"] == here["cleaning"] and fast["near_duplicates_removed"] > 0 and fast["contaminated"] > 0
    assert fast["redactions"]["email"] > 0 and fast["rows_quarantined"] > 0 and fast["repairs"]


def test_a_format_change_deep_in_a_large_file_is_refused_as_in_a_small_one(tmp_path):
    """Worker processes each see part of the file; the source is still refused naming both formats, as when
    it is read here (with CRLF line ends)."""
    rows = [{"text": f"row {i}"} for i in range(21_000)] + [{"text": "late", "label": "x"}] * 3
    for newline, here in (("\n", None), ("\r\n", 10 ** 6)):
        with pytest.raises(FormatError, match=r"rows of more than one format: text \(21000 rows, e.g. t.jsonl line 1, "
                                              r"t.jsonl line 2, t.jsonl line 3\); labelled \(3 rows"):
            run(_write_lines(tmp_path / newline.encode().hex() / "t.jsonl", rows, newline), tmp_path, workers=2,
                max_examples=here)


def test_cleaning_fast_paths_match_the_regular_expressions_and_unicode_folding():
    """ASCII shortcuts (word split, case and space folding, digit-run screen) agree with the general path."""
    import hashlib
    import random
    import re
    import unicodedata

    import numpy as np
    from rensa import RMinHash

    from tasks.data import cleaning
    from tunewright.scoring import pii

    rng = random.Random(1)
    texts = TRICKY + ["".join(chr(rng.randrange(128)) for _ in range(60)) for _ in range(2000)] + [
        " ".join(rng.choice(TRICKY) for _ in range(5)) for _ in range(500)]
    word = re.compile(r"\w+")
    expected = cleaning.Ragged.from_lists(RMinHash.hash_token_sets([word.findall(t.casefold()) for t in texts]))
    for _ in range(2):  # the second time from the hash cache
        got = cleaning.word_hashes(texts)
        assert np.array_equal(got.flat, expected.flat) and np.array_equal(got.offsets, expected.offsets)
    for t in texts:
        assert cleaning.fold(t) == " ".join(unicodedata.normalize("NFKC", t).casefold().split())
        assert cleaning.exact_key({"kind": "text", "text": t}) == hashlib.blake2b(
            cleaning.fold(t).encode(), digest_size=16).hexdigest()
        assert pii.has_digit_run(t) == (pii.DIGIT_RUN.search(t) is not None)


def test_overlap_and_near_duplicates_match_a_plain_reference():
    """The hashed, screened train/test overlap equals a direct count; LSH with precomputed band keys equals LSH
    computing its own."""
    import random

    import numpy as np

    from tasks.data import cleaning

    rng = random.Random(2)
    for _ in range(200):
        vocab = rng.choice([3, 20, 1000])
        train = [[rng.randrange(vocab) for _ in range(rng.choice([0, 1, 3, 12]))] for _ in range(rng.randrange(30))]
        test = [[rng.randrange(vocab) for _ in range(rng.choice([0, 1, 3, 12]))] for _ in range(rng.randrange(30))]
        threshold = rng.choice([0.2, 0.5, 1.0])
        first = {}
        for t, grams in enumerate(train):
            for g in grams:
                first.setdefault(g, t)
        expected = {}
        for i, grams in enumerate(test):
            distinct = set(grams)
            owners = sorted(first[g] for g in distinct if g in first)
            share = len(owners) / len(distinct) if distinct else 0.0
            if owners and share >= threshold:
                expected[i] = (max(sorted(set(owners)), key=owners.count), share)
        as_ragged = lambda rows: cleaning.Ragged.from_lists([[np.uint64(g * 0x9E3779B97F4A7C15 % 2**64) for g in r]
                                                             for r in rows])
        assert cleaning.overlap(as_ragged(train), as_ragged(test), threshold) == expected
    digests = np.random.default_rng(3).integers(0, 2**32, size=(3000, 128), dtype=np.uint32)
    digests[1000:1500] = digests[:500]
    digests[1000:1500, :40] = 7
    active = np.ones(3000, dtype=bool)
    found = cleaning.near_duplicates(digests, active, 0.6)
    assert len(found) == 500 and found == cleaning.near_duplicates(digests, active, 0.6,
                                                                   cleaning.band_keys(digests, 0.6))
