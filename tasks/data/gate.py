"""The gate: great-expectations suites over the prepared examples, and the report of stage 1.

Two suites run. `rows` checks every example (schema, non-empty turns, role order, answer last,
lengths, no PII left, a label where one is asked for) and the duplicate rate; the rows it flags
are quarantined with the expectation as the reason. `dataset` checks what is left (enough rows,
unique ids, the label set, no contamination) and fails the gate as a whole.
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
from pathlib import Path

from tunewright.chat import turn_text
from tunewright.recipe import DataConfig

COLUMNS = {
    "sft": ["id", "where", "n_turns", "prompt_chars", "response_chars", "min_turn_chars", "last_role", "roles_ok",
            "tokens", "pii_left", "label", "dedup_key"],
    "preference": ["id", "where", "prompt_chars", "chosen_chars", "rejected_chars", "min_turn_chars", "roles_ok",
                   "chosen_differs", "score_margin", "tokens", "pii_left", "label", "dedup_key"],
    "feedback": ["id", "where", "prompt_chars", "response_chars", "min_turn_chars", "roles_ok", "label", "tokens",
                 "pii_left", "dedup_key"],
    "text": ["id", "where", "text_chars", "tokens", "pii_left", "label", "dedup_key"],
}


def _role_order_ok(prompt: list[dict], answers_start: int | None = None) -> bool:
    """System turns first, then user and assistant alternating from a user turn; an assistant turn calling tools
    is followed by tool turns (one or more), then by the assistant again."""
    i = 0
    while i < len(prompt) and prompt[i]["role"] == "system":
        i += 1
    prev = None
    for m in prompt[i:]:
        role = m["role"]
        if role not in _NEXT[prev]:
            return False
        prev = "call" if role == "assistant" and m.get("tool_calls") else role
    return i < len(prompt)


# the roles that may follow each (None: the start; "call": an assistant turn calling tools)
_NEXT = {None: ("user",), "user": ("assistant",), "assistant": ("user",), "call": ("tool",),
         "tool": ("tool", "assistant")}


def _said(m: dict) -> int:
    """A turn's length for `min_turn_chars`: a tool call is not an empty turn though it says nothing besides."""
    n = len(m["content"].strip())
    return n or (1 if m.get("tool_calls") else 0)


def features(ex: dict) -> dict:
    """The columns the suites check, for one example."""
    kind = ex["kind"]
    row = {"id": ex["id"], "where": ex["where"], "tokens": ex.get("tokens"), "pii_left": ex.get("pii_left", 0),
           "label": ex.get("class"), "dedup_key": ex.get("dedup_key")}
    if kind == "sft":
        msgs = ex["messages"]
        # a turn that calls tools counts as the text the model writes for it (its <tool_call> blocks)
        contents = [turn_text(m) if m.get("tool_calls") else m["content"] for m in msgs]
        last = msgs[-1]
        row.update(n_turns=len(msgs), prompt_chars=sum(map(len, contents[:-1])),
                   response_chars=len(contents[-1]) if last["role"] == "assistant" else None,
                   min_turn_chars=min(map(_said, msgs)) if msgs else 0,
                   last_role=last["role"], roles_ok=_role_order_ok(msgs))
    elif kind == "preference":
        prompt, chosen, rejected = ex["prompt"], ex["chosen"], ex["rejected"]
        contents = [m["content"] for m in prompt + chosen + rejected]
        row.update(prompt_chars=sum(len(m["content"]) for m in prompt),
                   chosen_chars=sum(len(m["content"]) for m in chosen),
                   rejected_chars=sum(len(m["content"]) for m in rejected),
                   min_turn_chars=min(len(c.strip()) for c in contents),
                   roles_ok=prompt[-1]["role"] == "user" and chosen[0]["role"] == "assistant"
                   and rejected[0]["role"] == "assistant",
                   chosen_differs=[m["content"] for m in chosen] != [m["content"] for m in rejected],
                   score_margin=None if ex.get("score_chosen") is None else ex["score_chosen"] - ex["score_rejected"])
    elif kind == "feedback":
        prompt, completion = ex["prompt"], ex["completion"]
        contents = [m["content"] for m in prompt + completion]
        row.update(prompt_chars=sum(len(m["content"]) for m in prompt),
                   response_chars=sum(len(m["content"]) for m in completion),
                   min_turn_chars=min(len(c.strip()) for c in contents),
                   roles_ok=prompt[-1]["role"] == "user" and completion[0]["role"] == "assistant",
                   label=str(ex["label"]).lower())
    else:
        row.update(text_chars=len(ex["text"].strip()))
    return row


def _row_suite(kind: str, cfg: DataConfig, has_labels: bool, has_tokens: bool):
    import great_expectations as gx
    import great_expectations.expectations as gxe

    g = cfg.gate
    exps = [gxe.ExpectTableColumnsToMatchSet(column_set=COLUMNS[kind], exact_match=True),
            gxe.ExpectColumnValuesToNotBeNull(column="id"),
            gxe.ExpectColumnValuesToBeBetween(column="pii_left", max_value=0),
            gxe.ExpectColumnProportionOfUniqueValuesToBeBetween(column="dedup_key",
                                                                 min_value=1 - g.max_duplicate_fraction)]
    if kind == "sft":
        exps += [gxe.ExpectColumnValuesToBeBetween(column="n_turns", min_value=2),
                 gxe.ExpectColumnValuesToBeBetween(column="prompt_chars", min_value=1, max_value=g.max_prompt_chars),
                 gxe.ExpectColumnValuesToNotBeNull(column="response_chars"),
                 gxe.ExpectColumnValuesToBeBetween(column="response_chars", min_value=1, max_value=g.max_response_chars),
                 gxe.ExpectColumnValuesToBeBetween(column="min_turn_chars", min_value=1),
                 gxe.ExpectColumnValuesToBeInSet(column="last_role", value_set=["assistant"]),
                 gxe.ExpectColumnValuesToBeInSet(column="roles_ok", value_set=[True])]
    elif kind == "preference":
        exps += [gxe.ExpectColumnValuesToBeBetween(column="prompt_chars", min_value=1, max_value=g.max_prompt_chars),
                 gxe.ExpectColumnValuesToBeBetween(column="chosen_chars", min_value=1, max_value=g.max_response_chars),
                 gxe.ExpectColumnValuesToBeBetween(column="rejected_chars", min_value=1, max_value=g.max_response_chars),
                 gxe.ExpectColumnValuesToBeBetween(column="min_turn_chars", min_value=1),
                 gxe.ExpectColumnValuesToBeInSet(column="roles_ok", value_set=[True]),
                 gxe.ExpectColumnValuesToBeInSet(column="chosen_differs", value_set=[True])]
    elif kind == "feedback":
        exps += [gxe.ExpectColumnValuesToBeBetween(column="prompt_chars", min_value=1, max_value=g.max_prompt_chars),
                 gxe.ExpectColumnValuesToBeBetween(column="response_chars", min_value=1, max_value=g.max_response_chars),
                 gxe.ExpectColumnValuesToBeBetween(column="min_turn_chars", min_value=1),
                 gxe.ExpectColumnValuesToBeInSet(column="roles_ok", value_set=[True]),
                 gxe.ExpectColumnValuesToBeInSet(column="label", value_set=["true", "false"])]
    else:
        exps += [gxe.ExpectColumnValuesToBeBetween(column="text_chars", min_value=1)]
    if has_labels and kind != "feedback":
        exps.append(gxe.ExpectColumnValuesToNotBeNull(column="label"))
    if has_tokens:
        exps.append(gxe.ExpectColumnValuesToBeBetween(column="tokens", min_value=cfg.clean.min_tokens,
                                                      max_value=cfg.clean.max_tokens))
    suite = gx.ExpectationSuite(name=f"tunewright_{kind}_rows")
    for e in exps:
        suite.add_expectation(e)
    return suite


def _dataset_suite(cfg: DataConfig, has_labels: bool):
    import great_expectations as gx
    import great_expectations.expectations as gxe

    exps = [gxe.ExpectTableRowCountToBeBetween(min_value=cfg.gate.min_rows),
            gxe.ExpectColumnValuesToBeUnique(column="id")]
    if has_labels and cfg.gate.labels:
        exps.append(gxe.ExpectColumnDistinctValuesToBeInSet(column="label", value_set=list(cfg.gate.labels)))
    if cfg.clean.contamination == "fail":
        exps.append(gxe.ExpectColumnValuesToBeInSet(column="contaminated", value_set=[False]))
    suite = gx.ExpectationSuite(name="tunewright_dataset")
    for e in exps:
        suite.add_expectation(e)
    return suite


def preload() -> None:
    """Import great-expectations (seconds of work) ahead of the gate, e.g. while rows are being cleaned."""
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")
    import great_expectations  # noqa: F401
    import great_expectations.expectations  # noqa: F401


def _run(df, make_suite) -> tuple[list[dict], dict[int, list[str]]]:
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig
    from great_expectations.validator.v1_validator import Validator

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    batch_def = (context.data_sources.add_pandas("tunewright").add_dataframe_asset("examples")
                 .add_batch_definition_whole_dataframe("all"))
    suite = context.suites.add(make_suite())
    # what Batch.validate runs, without first building a batch it would then build again (each build hashes
    # the whole frame for its fingerprint, which is slow on a large frame)
    result = Validator(batch_definition=batch_def, batch_parameters={"dataframe": df},
                       result_format={"result_format": "COMPLETE"}).validate_expectation_suite(suite)
    checked, reasons = [], {}
    for r in result.results:
        cfg = r.expectation_config
        kwargs = {k: v for k, v in cfg.kwargs.items() if k != "batch_id"}
        rows = r.result.get("unexpected_index_list") or []
        entry = {"expectation": cfg.type, "column": kwargs.get("column"), "kwargs": kwargs, "success": bool(r.success),
                 "unexpected_count": r.result.get("unexpected_count"), "observed_value": r.result.get("observed_value"),
                 "examples": [str(df.iloc[i]["where"]) for i in rows[:5]] if "where" in df.columns else [],
                 "row_level": "unexpected_index_list" in r.result}
        if r.exception_info and r.exception_info.get("raised_exception"):
            entry["error"] = r.exception_info.get("exception_message")
        checked.append(entry)
        if not r.success:
            for i in rows:
                reasons.setdefault(i, []).append(f"{cfg.type}({kwargs.get('column', '')})")
    return checked, reasons


def check_rows(rows: list[dict] | dict[str, list], kind: str, cfg: DataConfig, has_labels: bool, has_tokens: bool):
    """Row-level suite over every example; (expectation results, {example index: [reasons]}).

    `rows` are the examples, or their `features` as columns (a list per column of COLUMNS[kind]).
    """
    import pandas as pd

    if isinstance(rows, dict):
        df = pd.DataFrame(rows, columns=COLUMNS[kind])
    else:
        df = pd.DataFrame([ex.get("features") or features(ex) for ex in rows], columns=COLUMNS[kind])
    return _run(df, lambda: _row_suite(kind, cfg, has_labels, has_tokens))


def check_dataset(kept: list[dict], cfg: DataConfig, has_labels: bool):
    import pandas as pd

    df = pd.DataFrame({"id": [ex["id"] for ex in kept], "where": [ex["where"] for ex in kept],
                       "label": [ex.get("class") for ex in kept],
                       "contaminated": [bool(ex.get("contaminated")) for ex in kept]})
    checked, _ = _run(df, lambda: _dataset_suite(cfg, has_labels))
    for entry in checked:  # these judge the dataset as a whole: any failure fails the gate
        entry["row_level"] = False
    return checked


def describe_failure(summary: dict, quarantine_path: str) -> str:
    """The error message of a failed gate: each failing expectation with example rows."""
    lines = [f"data gate failed: {summary['rows_quarantined']} of {summary['rows_in']} rows quarantined; "
             f"{summary['rows_kept']} kept; quarantined rows with reasons: {quarantine_path}"]
    for f in summary["expectations"]:
        if f["success"]:
            continue
        what = (f"{f['unexpected_count']} rows" if f["unexpected_count"] is not None
                else f"observed {f['observed_value']}")
        where = f" e.g. {', '.join(f['examples'])}" if f["examples"] else ""
        col = f" on '{f['column']}'" if f["column"] else ""
        lines.append(f"  - {f['expectation']}{col}: {what}{where}")
    for why in summary.get("gate_reasons", []):
        lines.append(f"  - {why}")
    for q in summary["quarantine"][:5]:
        if q.get("unparseable"):
            lines.append(f"  - {q['where']}: {'; '.join(q['reasons'])}")
    return "\n".join(lines)


def _chart(counts: dict[str, int], title: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 0.35 * len(counts) + 1.2))
    labels = list(counts)[:30]
    ax.barh(labels[::-1], [counts[k] for k in labels][::-1], color="#4c78a8")
    ax.set_title(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def html_report(path: Path, summary: dict) -> None:
    """The stage 1 report: accounting per source, cleaning, the gate, classes, quarantine."""
    e = html.escape
    s = summary
    status = "<b style='color:#2a7d2a'>PASSED</b>" if s["passed"] else "<b style='color:#b22'>FAILED</b>"
    acc = "".join(
        f"<tr><td>{e(name)}</td><td>{e(src['format'])}</td><td>{src['rows_in']}</td><td>{src['rows_kept']}</td>"
        f"<td>{src['rows_quarantined']}</td><td>{src['duplicates_removed']}</td><td>{src['near_duplicates_removed']}</td></tr>"
        for name, src in s["sources"].items())
    acc += (f"<tr><th>total</th><th>{e(s['format'])}</th><th>{s['rows_in']}</th><th>{s['rows_kept']}</th>"
            f"<th>{s['rows_quarantined']}</th><th>{s['duplicates_removed']}</th><th>{s['near_duplicates_removed']}</th></tr>")
    steps = "".join(f"<tr><td>{e(k)}</td><td>{v}</td></tr>" for k, v in s["cleaning"].items()) or \
        "<tr><td colspan=2>nothing changed</td></tr>"
    red = "".join(f"<tr><td>{e(k)}</td><td>{v}</td></tr>" for k, v in s["redactions"].items()) or \
        "<tr><td colspan=2>none found</td></tr>"
    exps = "".join(
        f"<tr class='{'ok' if f['success'] else 'bad'}'><td>{'pass' if f['success'] else 'FAIL'}</td>"
        f"<td>{e(f['expectation'])}</td><td>{e(str(f['column'] or ''))}</td>"
        f"<td>{e(json.dumps({k: v for k, v in f['kwargs'].items() if k != 'column'}, default=str))}</td>"
        f"<td>{f['unexpected_count'] if f['unexpected_count'] is not None else e(str(f['observed_value']))}</td>"
        f"<td>{e(', '.join(f['examples']))}</td></tr>" for f in s["expectations"])
    other = "".join(f"<li>{e(r)}</li>" for r in s.get("gate_reasons", []))
    quarantine = "".join(
        f"<tr><td>{e(q['where'])}</td><td>{e(str(q.get('id', '')))}</td><td>{e('; '.join(q['reasons']))}</td></tr>"
        for q in s["quarantine"][:300])
    dups = "".join(
        f"<tr><td>{e(d['where'])}</td><td>{e(d['kind'])}</td><td>{e(d['duplicate_of'])}</td>"
        f"<td>{d.get('similarity', 1.0):.2f}</td></tr>" for d in s.get("duplicates_sample", [])[:100])
    notes = "".join(f"<tr><td>{e(n['where'])}</td><td>{e(n['note'])}</td></tr>" for n in s.get("repairs", [])[:200])
    classes = ""
    if s.get("classes"):
        dist = s["classes"]["distribution"]
        classes = (f"<h2>Classes ({e(str(s['classes'].get('label_field') or 'label'))})</h2>"
                   f"<img src='data:image/png;base64,{_chart(dist, 'examples per class (kept)')}'/>"
                   f"<p>class weights for stage 4: {e(json.dumps(s['classes']['weights']))}</p>"
                   f"<p>balancing: {e(json.dumps(s['classes'].get('resampling') or 'none'))}; "
                   f"augmentation: {e(json.dumps(s['classes'].get('augmentation') or 'none'))}</p>")
    splits = ", ".join(f"{k}: {v}" for k, v in s.get("splits", {}).items())
    path.write_text(
        "<html><head><meta charset='utf-8'><title>Data gate</title><style>body{font-family:sans-serif;max-width:1200px}"
        "td,th{border:1px solid #ccc;padding:3px 6px;font-size:13px}table{border-collapse:collapse;margin-bottom:1em}"
        "tr.bad td{background:#fde8e8}</style></head><body>"
        f"<h1>Data gate {status}</h1><p>format <b>{e(s['format'])}</b> &middot; digest <code>{e(s['digest'])}</code>"
        f" &middot; splits: {e(splits)}</p>"
        f"<h2>Accounting (rows in = kept + quarantined + duplicates removed)</h2><table><tr><th>source</th><th>format</th>"
        f"<th>rows in</th><th>kept</th><th>quarantined</th><th>exact duplicates</th><th>near duplicates</th></tr>{acc}</table>"
        f"<h2>Expectations</h2><table><tr><th></th><th>expectation</th><th>column</th><th>arguments</th>"
        f"<th>unexpected / observed</th><th>example rows</th></tr>{exps}</table>"
        f"{'<ul>' + other + '</ul>' if other else ''}"
        f"<h2>Cleaning (rows changed per step)</h2><table>{steps}</table>"
        f"<h2>PII and secrets redacted (placeholders inserted)</h2><table>{red}</table>{classes}"
        f"<h2>Quarantined rows</h2><table><tr><th>where</th><th>id</th><th>reasons</th></tr>{quarantine}</table>"
        f"<h2>Duplicates removed (first 100)</h2><table><tr><th>where</th><th>kind</th><th>duplicate of</th>"
        f"<th>similarity</th></tr>{dups}</table>"
        f"<h2>Repairs</h2><table>{notes}</table></body></html>", encoding="utf-8")


def markdown(summary: dict) -> str:
    """A short summary for the Prefect UI."""
    s = summary
    lines = [f"## Data gate: {'passed' if s['passed'] else 'FAILED'}", "",
             f"format **{s['format']}**, digest `{s['digest']}`", "",
             "| source | rows in | kept | quarantined | duplicates | near duplicates |", "|---|---|---|---|---|---|"]
    for name, src in s["sources"].items():
        lines.append(f"| {name} | {src['rows_in']} | {src['rows_kept']} | {src['rows_quarantined']} | "
                     f"{src['duplicates_removed']} | {src['near_duplicates_removed']} |")
    lines.append(f"| **total** | {s['rows_in']} | {s['rows_kept']} | {s['rows_quarantined']} | "
                 f"{s['duplicates_removed']} | {s['near_duplicates_removed']} |")
    failed = [f for f in s["expectations"] if not f["success"]]
    if failed:
        lines += ["", "Failing expectations:"] + [f"- `{f['expectation']}` {f['column'] or ''}" for f in failed]
    if s["redactions"]:
        lines += ["", "PII and secrets redacted: " + ", ".join(f"{k} {v}" for k, v in s["redactions"].items())]
    return "\n".join(lines)
