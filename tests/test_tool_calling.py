"""Tool calling: rendering tools and calls into the prompt, the loss over calls and final answers, reading calls
back out of generated text, tool-call accuracy, and a tool-calling run from stage 1 to the registered model."""

import json
import subprocess
import sys

import pytest
from transformers import AutoTokenizer

from tests.conftest import load_generator, write_jsonl
from tunewright.chat import (encode_example, parse_tool_calls, prompt_ids, renders_tools, template_messages,
                             template_text, turn_text)
from tunewright.scoring.metrics import score

LOOKUP = {"type": "function", "function": {
    "name": "lookup_order", "description": "Status of an order.",
    "parameters": {"type": "object", "properties": {"order_id": {"type": "string"}}, "required": ["order_id"]}}}
CONVERSATION = [
    {"role": "system", "content": "You are a support assistant."},
    {"role": "user", "content": "Where is order A12345?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "lookup_order", "arguments": '{"order_id": "A12345"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": '{"status": "in transit"}'},
    {"role": "assistant", "content": "Order A12345 is in transit."},
]
# a template that renders tools itself (the shape of Qwen's and Llama 3's): tools listed, calls as JSON
TOOL_TEMPLATE = (
    "{% if tools %}<|im_start|>system\nTOOLS:{% for t in tools %} {{ t.function.name }}{% endfor %}<|im_end|>\n"
    "{% endif %}{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}"
    "{% for c in m.tool_calls or [] %}CALL {{ c.function.name }} {{ c.function.arguments | tojson }}{% endfor %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    return AutoTokenizer.from_pretrained(tokenizer_dir)


def test_without_tools_a_conversation_renders_as_before(tok):
    plain = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    assert template_messages(tok, plain, None) == (plain, {})
    assert prompt_ids(tok, plain) == list(tok.apply_chat_template(plain[:1], add_generation_prompt=True,
                                                                  tokenize=True, return_dict=True)["input_ids"])


def test_the_hermes_layout_declares_tools_writes_calls_and_returns_results_as_a_user_turn(tok):
    assert not renders_tools(tok)  # SmolLM2's template knows nothing of tools
    text = tok.decode(encode_example(tok, CONVERSATION, 512, [LOOKUP])["input_ids"])
    system, rest = text.split("<|im_start|>user", 1)
    assert "You are a support assistant." in system and "<tools>" in system
    assert json.dumps(LOOKUP["function"], separators=(", ", ": ")) in system
    assert ('<|im_start|>assistant\n<tool_call>\n{"name": "lookup_order", "arguments": {"order_id": "A12345"}}\n'
            "</tool_call><|im_end|>") in rest
    assert '<|im_start|>user\n<tool_response>\n{"status": "in transit"}\n</tool_response><|im_end|>' in rest


def test_the_loss_covers_each_assistant_turn_and_never_the_tool_result(tok):
    enc = encode_example(tok, CONVERSATION, 512, [LOOKUP])
    spans, current = [], []
    for token, label in zip(enc["input_ids"], enc["labels"]):
        if label != -100:
            assert label == token
            current.append(token)
        elif current:
            spans.append(tok.decode(current))
            current = []
    spans += [tok.decode(current)] if current else []
    assert spans == ['<tool_call>\n{"name": "lookup_order", "arguments": {"order_id": "A12345"}}\n</tool_call>'
                     "<|im_end|>\n", "Order A12345 is in transit.<|im_end|>\n"]
    # what generation sees before the call is exactly the start of the training row
    before_call = prompt_ids(tok, CONVERSATION[:3], [LOOKUP])
    assert enc["input_ids"][:len(before_call)] == before_call and enc["labels"][len(before_call) - 1] == -100
    assert enc["labels"][len(before_call)] != -100


def test_a_too_long_tool_conversation_loses_the_middle_of_its_prompt_not_its_answers(tok):
    long = [dict(CONVERSATION[0], content="Context. " * 300)] + CONVERSATION[1:]
    enc = encode_example(tok, long, 200, [LOOKUP])
    assert len(enc["input_ids"]) == 200
    kept = tok.decode([t for t in enc["labels"] if t != -100])
    assert "lookup_order" in kept and "Order A12345 is in transit." in kept


def test_a_template_that_renders_tools_gets_them_with_arguments_as_objects(tok):
    native = AutoTokenizer.from_pretrained(tok.name_or_path)
    native.chat_template = TOOL_TEMPLATE
    assert renders_tools(native)
    msgs, extra = template_messages(native, CONVERSATION, [LOOKUP])
    assert extra == {"tools": [LOOKUP]} and msgs[2]["tool_calls"][0]["function"]["arguments"] == {"order_id": "A12345"}
    assert msgs[2]["content"] == "" and msgs[3]["role"] == "tool"
    text = template_text(native, CONVERSATION[:2], [LOOKUP])
    assert text.startswith("<|im_start|>system\nTOOLS: lookup_order<|im_end|>") and text.endswith("assistant\n")
    enc = encode_example(native, CONVERSATION, 512, [LOOKUP])
    labelled = native.decode([t for t in enc["labels"] if t != -100])
    assert 'CALL lookup_order {"order_id": "A12345"}' in labelled and "in transit\"}" not in labelled


def test_calls_are_read_from_each_layout_and_a_malformed_one_stays_text():
    call = {"name": "lookup_order", "arguments": {"order_id": "A12345"}}
    assert parse_tool_calls('<tool_call>\n{"name": "lookup_order", "arguments": {"order_id": "A12345"}}\n</tool_call>'
                            ) == ("", [call])
    # arguments as a JSON string, text before the call, the last block unclosed where generation stopped
    assert parse_tool_calls('Let me check. <tool_call>{"name": "lookup_order", "arguments": "{\\"order_id\\": '
                            '\\"A12345\\"}"}') == ("Let me check.", [call])
    two = parse_tool_calls('<tool_call>{"name": "a", "arguments": {}}</tool_call><tool_call>{"name": "b", '
                           '"arguments": {"x": 1}}</tool_call>')
    assert two == ("", [{"name": "a", "arguments": {}}, {"name": "b", "arguments": {"x": 1}}])
    assert parse_tool_calls('[TOOL_CALLS] [{"name": "lookup_order", "arguments": {"order_id": "A12345"}}]') == ("", [call])
    assert parse_tool_calls('{"name": "lookup_order", "parameters": {"order_id": "A12345"}}') == ("", [call])
    for text in ('<tool_call>{"name": "lookup_order", "arguments": {"order_id": </tool_call>',  # cut-off JSON
                 '<tool_call>{"arguments": {}}</tool_call>',                                    # no name
                 '<tool_call>{"name": "f", "arguments": [1, 2]}</tool_call>',                  # not an object
                 '{"category": "billing", "name": "x"}',                                         # a JSON answer
                 "Your order is in transit."):
        assert parse_tool_calls(text) == (text, None)
    assert turn_text(CONVERSATION[2]) == ('<tool_call>\n{"name": "lookup_order", "arguments": {"order_id": '
                                          '"A12345"}}\n</tool_call>')


def test_tool_call_accuracy_needs_the_right_tool_and_arguments_equal_as_json_and_scores_each_argument():
    ref = turn_text({"role": "assistant", "tool_calls": [{"function": {"name": "create_ticket", "arguments": {
        "category": "billing", "priority": "urgent"}}}]})
    text_ref = "Order A12345 is in transit."
    predictions = [
        '<tool_call>{"arguments": {"priority": "urgent", "category": "billing"}, "name": "create_ticket"}</tool_call>',
        '<tool_call>{"name": "create_ticket", "arguments": {"category": "billing", "priority": "low"}}</tool_call>',
        '<tool_call>{"name": "lookup_order", "arguments": {"order_id": "A12345"}}</tool_call>',
        '<tool_call>{"name": "create_ticket", "arguments": {"category": "billing", "priority": "urgent"',  # cut off
        "Order A12345 is on its way.",                                                  # no call where none is due
        '<tool_call>{"name": "lookup_order", "arguments": {"order_id": "A12345"}}</tool_call>',  # a call not due
    ]
    refs = [ref] * 4 + [text_ref] * 2
    overall, fields, hits = score("tool_call_accuracy", predictions, refs)
    assert hits == [True, False, False, False, True, False] and overall == pytest.approx(2 / 6)
    assert fields["tool"] == pytest.approx(3 / 6)  # the right tools (or none) in 1, 2 and 5
    assert fields["arg_category"] == pytest.approx(2 / 4) and fields["arg_priority"] == pytest.approx(1 / 4)


def tool_dataset(path, n=160):
    gen = load_generator()
    return write_jsonl(path, gen.generate_tools(gen.generate(n, seed=7), seed=9))


def test_the_bundled_tool_task_passes_stage_1_with_its_calls_measured(tmp_path, state):
    from tasks.data import prepare
    from tunewright.recipe import DataConfig

    cfg = DataConfig.model_validate({"path": str(tool_dataset(tmp_path / "tools.jsonl")),
                                     "clean": {"tool_turns": "keep", "contamination": "report"},
                                     "gate": {"min_rows": 50, "max_response_chars": 200}})
    s = prepare(cfg, tmp_path / "state", use_cache=False)
    # every row is kept: a turn that only calls a tool is not empty, and its calls are its answer's length
    assert s["rows_in"] == 160 and s["rows_quarantined"] == 0 and s["rows_kept"] + s["near_duplicates_removed"] == 160
    rows = [json.loads(line) for line in open(s["paths"]["train"], encoding="utf-8")]
    assert all(r["tools"][0]["function"]["name"] == "lookup_order" for r in rows)
    assert {r["messages"][2]["tool_calls"][0]["function"]["name"] for r in rows} == {"lookup_order", "create_ticket"}


def test_a_tool_calling_run_is_scored_on_calls_and_its_registered_model_answers_with_tools_elsewhere(
        prefect_server, tiny_recipe, tmp_path, state):
    """Stages 1 to 7 on the tiny model with the bundled tool task; the registered model, loaded by MLflow in a new
    process and given `messages` and `tools` as JSON columns, answers as stage 5's fine-tuned model did."""
    from flows.finetune import finetune
    from tunewright.recipe import load_recipe

    data = tool_dataset(tmp_path / "tools.jsonl")
    recipe = load_recipe(tiny_recipe, [f"data.path={data}", "data.clean.tool_turns=keep", "train.max_seq_len=512",
                                       "evaluate.metric=tool_call_accuracy", "evaluate.metrics=[token_f1]",
                                       "environment.precision=fp32", "evaluate.max_new_tokens=12"])
    result = finetune(recipe=recipe)
    assert result.scores.metric == "tool_call_accuracy" and 0 <= result.scores.tuned_score <= 1
    assert "tool" in result.scores.tuned_fields and "arg_category" in result.scores.tuned_fields
    rows = [json.loads(line) for line in open(result.scores.predictions_path, encoding="utf-8")]
    assert all(r["tools"] and r["messages"][-1]["role"] in ("user", "tool") for r in rows)
    assert any(r["reference"].startswith("<tool_call>") for r in rows)
    picked = rows[:3]
    code = ("import mlflow, pandas as pd, json, sys; m = mlflow.pyfunc.load_model(sys.argv[1]);"
            "rows = json.loads(sys.argv[2]);"
            "frame = pd.DataFrame({'messages': [json.dumps(r['messages']) for r in rows],"
            " 'tools': [json.dumps(r['tools']) for r in rows]});"
            "print(json.dumps(m.predict(frame, params={'max_new_tokens': int(sys.argv[3])})))")
    out = subprocess.run([sys.executable, "-c", code, f"models:/tiny-tickets/{result.deployed.version}",
                          json.dumps(picked), str(recipe.evaluate.max_new_tokens)],
                         capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == [r["tuned"] for r in picked]


def test_pii_and_secrets_in_call_arguments_and_tool_results_are_redacted_and_counted(tmp_path, state):
    from tasks.data import prepare
    from tunewright.recipe import DataConfig

    notify = {"type": "function", "function": {"name": "notify", "parameters": {
        "type": "object", "properties": {"to": {"type": "string"}, "note": {"type": "object"}}, "required": ["to"]}}}
    rows = [{"tools": [notify], "messages": [
        {"role": "user", "content": f"Tell customer {i} their parcel {i} is late."},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function", "function": {
            "name": "notify", "arguments": json.dumps({"to": f"customer{i}@example.com", "note": {
                "key": "AKIAIOSFODNN7EXAMPLE", "parcel": i}})}}]},
        {"role": "tool", "tool_call_id": "c1", "content": f"sent to customer{i}@example.com"},
        {"role": "assistant", "content": f"Customer {i} has been told about parcel {i}."}]} for i in range(40)]
    cfg = DataConfig.model_validate({"path": str(write_jsonl(tmp_path / "notify.jsonl", rows)),
                                     "clean": {"tool_turns": "keep", "contamination": "report"},
                                     "gate": {"min_rows": 10}})
    s = prepare(cfg, tmp_path / "state", use_cache=False)
    kept = [json.loads(line) for name in ("train", "val", "test") for line in open(s["paths"][name], encoding="utf-8")]
    assert kept and s["redactions"]["email"] >= 2 * len(kept) and s["redactions"]["aws_access_key"] >= len(kept)
    for r in kept:
        args = r["messages"][1]["tool_calls"][0]["function"]["arguments"]
        assert "@example.com" not in json.dumps(r) and "AKIA" not in json.dumps(r)
        assert isinstance(args["note"]["parcel"], int) and args["to"] != "" and set(args) == {"to", "note"}
