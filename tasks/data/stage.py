"""Stage 1, data preparation: load, normalise to chat messages, gate, split.

The gate (a great-expectations suite) runs before any model is loaded. Rows it rejects are
kept in `quarantine.jsonl` with their reasons; above the recipe's tolerance the stage fails and
names the expectations that failed.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from prefect import task
from tunewright.logs import stage_logger

from tasks.artifacts import DataArtifact

from tunewright.recipe import DataConfig, GateConfig
from tunewright.tracking import RunContext, stage_run

COLUMNS = ["id", "source_line", "messages", "prompt", "response", "n_turns", "prompt_chars",
           "min_turn_chars", "last_role", "roles_ok"]
VALID_ROLES = {"system", "user", "assistant"}


class DataGateError(RuntimeError):
    """The dataset failed its data gate; nothing downstream ran."""


def _normalise(record: Any, system_prompt: str | None) -> list[dict[str, str]]:
    """Chat messages from the supported record shapes; ValueError names what is wrong."""
    if not isinstance(record, dict):
        raise ValueError(f"record is {type(record).__name__}, expected an object")
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            raise ValueError("field 'messages' must be a list of {role, content} objects")
        messages = [{"role": str(m.get("role", "")), "content": m.get("content")} for m in messages]
    elif "prompt" in record and ("response" in record or "completion" in record):
        messages = [{"role": "user", "content": record["prompt"]},
                    {"role": "assistant", "content": record.get("response", record.get("completion"))}]
    elif "instruction" in record and "output" in record:
        user = record["instruction"] + (f"\n\n{record['input']}" if record.get("input") else "")
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": record["output"]}]
    else:
        raise ValueError(f"unknown record shape with keys {sorted(record)}; expected 'messages', "
                         "'prompt'+'response' or 'instruction'+'output'")
    if system_prompt and (not messages or messages[0]["role"] != "system"):
        messages = [{"role": "system", "content": system_prompt}] + messages
    return messages


def _row(rid: str, line: int, messages: list[dict]) -> dict:
    contents = [m["content"] if isinstance(m["content"], str) else None for m in messages]
    last = messages[-1] if messages else {"role": "", "content": None}
    return {
        "id": rid,
        "source_line": line,
        "messages": json.dumps(messages, ensure_ascii=False),
        "prompt": "\n".join(c or "" for c in contents[:-1]) or None,
        "response": last["content"] if last["role"] == "assistant" and isinstance(last["content"], str) else None,
        "n_turns": len(messages),
        "prompt_chars": sum(len(c or "") for c in contents[:-1]),
        "min_turn_chars": min((len(c.strip()) if c else 0) for c in contents) if contents else 0,
        "last_role": last["role"],
        "roles_ok": all(m["role"] in VALID_ROLES for m in messages),
    }


def _load(path: Path, system_prompt: str | None, limit: int | None) -> tuple[list[dict], list[dict]]:
    """Rows for the gate, and records that could not even be parsed (with reasons)."""
    rows, broken = [], []
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            if limit is not None and len(rows) + len(broken) >= limit:
                break
            try:
                record = json.loads(line)
                messages = _normalise(record, system_prompt)
            except (json.JSONDecodeError, ValueError, TypeError, KeyError) as exc:
                broken.append({"source_line": lineno, "raw": line.rstrip("\n")[:2000],
                               "reasons": [f"{path.name} line {lineno}: {exc}"]})
                continue
            rid = str(record.get("id") or f"{path.stem}-{lineno}")
            rows.append(_row(rid, lineno, messages))
    return rows, broken


def _suite(gate: GateConfig):
    import great_expectations as gx
    import great_expectations.expectations as gxe

    suite = gx.ExpectationSuite(name="tunewright_chat_data")
    for exp in [
        gxe.ExpectTableColumnsToMatchSet(column_set=COLUMNS, exact_match=True),
        gxe.ExpectTableRowCountToBeBetween(min_value=gate.min_rows),
        gxe.ExpectColumnValuesToNotBeNull(column="id"),
        gxe.ExpectColumnValuesToBeUnique(column="id"),
        gxe.ExpectColumnValuesToNotBeNull(column="prompt"),
        gxe.ExpectColumnValuesToNotBeNull(column="response"),
        gxe.ExpectColumnValueLengthsToBeBetween(column="response", min_value=1, max_value=gate.max_response_chars),
        gxe.ExpectColumnValuesToBeBetween(column="prompt_chars", min_value=1, max_value=gate.max_prompt_chars),
        gxe.ExpectColumnValuesToBeBetween(column="n_turns", min_value=2),
        gxe.ExpectColumnValuesToBeBetween(column="min_turn_chars", min_value=1),
        gxe.ExpectColumnValuesToBeInSet(column="last_role", value_set=["assistant"]),
        gxe.ExpectColumnValuesToBeInSet(column="roles_ok", value_set=[True]),
    ]:
        suite.add_expectation(exp)
    return suite


def _validate(df, gate: GateConfig):
    """Run the suite; return (failed expectations, {row index: [reasons]})."""
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    batch_def = (context.data_sources.add_pandas("tunewright").add_dataframe_asset("examples")
                 .add_batch_definition_whole_dataframe("all"))
    suite = context.suites.add(_suite(gate))
    result = batch_def.get_batch(batch_parameters={"dataframe": df}).validate(
        suite, result_format={"result_format": "COMPLETE"}
    )
    failed, reasons = [], {}
    for r in result.results:
        if r.success:
            continue
        cfg = r.expectation_config
        kwargs = {k: v for k, v in cfg.kwargs.items() if k not in ("batch_id",)}
        rows = r.result.get("unexpected_index_list")
        entry = {"expectation": cfg.type, "kwargs": kwargs,
                 "unexpected_count": r.result.get("unexpected_count"),
                 "observed_value": r.result.get("observed_value")}
        failed.append(entry)
        for i in rows or []:
            reasons.setdefault(i, []).append(f"{cfg.type}({kwargs.get('column', '')})")
    return failed, reasons, result.describe_dict() if hasattr(result, "describe_dict") else None


def _bucket(seed: int, rid: str) -> float:
    h = hashlib.sha256(f"{seed}:{rid}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2**64


def _write_jsonl(path: Path, records: list[dict]) -> None:
    with path.open("w", encoding="utf-8") as fh:
        for rec in records:
            fh.write(json.dumps(rec, ensure_ascii=False) + "\n")


def _gate_html(path: Path, source: Path, n_rows: int, failed: list[dict], quarantine: list[dict]) -> None:
    import html

    items = "".join(
        f"<tr><td>{html.escape(f['expectation'])}</td><td>{html.escape(json.dumps(f['kwargs'], default=str))}</td>"
        f"<td>{f['unexpected_count'] if f['unexpected_count'] is not None else html.escape(str(f['observed_value']))}</td></tr>"
        for f in failed
    ) or "<tr><td colspan=3>all expectations met</td></tr>"
    rejected = "".join(
        f"<tr><td>{q.get('id', '')}</td><td>{q['source_line']}</td><td>{html.escape('; '.join(q['reasons']))}</td></tr>"
        for q in quarantine[:200]
    )
    path.write_text(
        f"<html><head><meta charset='utf-8'><title>Data gate</title><style>body{{font-family:sans-serif}}"
        f"td,th{{border:1px solid #ccc;padding:4px}}table{{border-collapse:collapse}}</style></head><body>"
        f"<h1>Data gate: {html.escape(source.name)}</h1><p>{n_rows} rows read, {len(quarantine)} quarantined.</p>"
        f"<h2>Failed expectations</h2><table><tr><th>expectation</th><th>arguments</th><th>unexpected</th></tr>{items}</table>"
        f"<h2>Quarantined rows (first 200)</h2><table><tr><th>id</th><th>line</th><th>reasons</th></tr>{rejected}</table>"
        f"</body></html>", encoding="utf-8")


@task(name="1-prepare-data")
def prepare_data(cfg: DataConfig, ctx: RunContext) -> DataArtifact:
    """Load, normalise and gate the dataset, then split it deterministically."""
    import mlflow
    import pandas as pd

    log = stage_logger()
    out = Path(ctx.work_dir, "data")
    out.mkdir(parents=True, exist_ok=True)
    with stage_run(ctx, "1-data"):
        rows, broken = _load(cfg.path, cfg.system_prompt, cfg.max_examples)
        log.info("read %d records from %s (%d unparseable)", len(rows) + len(broken), cfg.path, len(broken))
        df = pd.DataFrame(rows, columns=COLUMNS)
        failed, reasons, _ = _validate(df, cfg.gate)
        quarantine = [dict(broken_row) for broken_row in broken]
        for i, why in sorted(reasons.items()):
            rec = df.loc[i]
            quarantine.append({"id": rec["id"], "source_line": int(rec["source_line"]),
                               "messages": json.loads(rec["messages"]), "reasons": why})
        quarantine_path = out / "quarantine.jsonl"
        _write_jsonl(quarantine_path, quarantine)
        report_path = out / "data_gate.html"
        _gate_html(report_path, cfg.path, len(rows) + len(broken), failed, quarantine)
        (out / "data_gate.json").write_text(json.dumps({"failed": failed}, indent=2, default=str))
        n_total = len(rows) + len(broken)
        rejected_fraction = len(quarantine) / max(n_total, 1)
        mlflow.log_metrics({"rows_read": n_total, "rows_rejected": len(quarantine),
                            "rejected_fraction": rejected_fraction})
        mlflow.log_artifact(str(report_path), "data_gate")
        mlflow.log_artifact(str(out / "data_gate.json"), "data_gate")
        if quarantine:
            mlflow.log_artifact(str(quarantine_path), "data_gate")
        table_level = [f for f in failed if "column" not in f["kwargs"]]
        if table_level or rejected_fraction > cfg.gate.max_rejected_fraction:
            lines = [f"data gate failed for {cfg.path}: {len(quarantine)} of {n_total} rows rejected "
                     f"(allowed fraction {cfg.gate.max_rejected_fraction}); quarantined rows with reasons: "
                     f"{quarantine_path}"]
            for f in failed:
                col = f["kwargs"].get("column")
                what = f"{f['unexpected_count']} rows" if f["unexpected_count"] is not None else f"observed {f['observed_value']}"
                lines.append(f"  - {f['expectation']}" + (f" on '{col}'" if col else "") + f": {what}")
            for q in broken[:5]:
                lines.append(f"  - {q['reasons'][0]}")
            raise DataGateError("\n".join(lines))

        clean = df.drop(index=list(reasons)).reset_index(drop=True)
        splits: dict[str, list[dict]] = {"train": [], "val": [], "test": []}
        for rec in clean.itertuples():
            b = _bucket(cfg.split.seed, rec.id)
            name = "test" if b < cfg.split.test_fraction else (
                "val" if b < cfg.split.test_fraction + cfg.split.val_fraction else "train")
            splits[name].append({"id": rec.id, "messages": json.loads(rec.messages)})
        paths = {}
        for name, recs in splits.items():
            paths[name] = out / f"{name}.jsonl"
            _write_jsonl(paths[name], recs)
        digest = hashlib.sha256(paths["train"].read_bytes() + paths["test"].read_bytes()).hexdigest()[:16]
        for name, context in (("train", "training"), ("test", "evaluation")):
            frame = pd.DataFrame([{"id": r["id"], "messages": json.dumps(r["messages"])} for r in splits[name]])
            dataset = mlflow.data.from_pandas(frame, source=str(cfg.path), name=f"{cfg.path.stem}-{name}")
            mlflow.log_input(dataset, context=context)
            _log_input_on_parent(ctx, dataset, context)
        mlflow.log_metrics({f"n_{k}": len(v) for k, v in splits.items()})
        mlflow.set_tag("tunewright.dataset_digest", digest)
        log.info("data gate passed: train=%d val=%d test=%d quarantined=%d",
                 len(splits["train"]), len(splits["val"]), len(splits["test"]), len(quarantine))
        return DataArtifact(
            train_path=str(paths["train"]), val_path=str(paths["val"]), test_path=str(paths["test"]),
            quarantine_path=str(quarantine_path), report_path=str(report_path),
            n_train=len(splits["train"]), n_val=len(splits["val"]), n_test=len(splits["test"]),
            n_rejected=len(quarantine), digest=digest, system_prompt=_common_system_prompt(splits["train"]),
        )


def _common_system_prompt(records: list[dict]) -> str | None:
    """The system turn most training records start with; serving puts it before user prompts."""
    from collections import Counter

    found = Counter(r["messages"][0]["content"] for r in records if r["messages"][0]["role"] == "system")
    return found.most_common(1)[0][0] if found else None


def _log_input_on_parent(ctx: RunContext, dataset, context: str) -> None:
    """The parent run lists its datasets too, so the experiment table shows them."""
    from mlflow import MlflowClient
    from mlflow.entities import DatasetInput, InputTag

    tag = InputTag(key="mlflow.data.context", value=context)
    MlflowClient(ctx.tracking_uri).log_inputs(
        ctx.parent_run_id, datasets=[DatasetInput(dataset._to_mlflow_entity(), tags=[tag])]
    )
