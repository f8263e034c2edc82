"""Stage 7, monitoring and maintenance: drift between training prompts and production requests.

In the fine-tuning flow, an evidently report compares the prompts the model was trained on
(reference) with a batch of production requests (current): a baseline, with no event. The
monitoring flow (`flows/monitor.py`) reads windows of what `tunewright serve` logged, judges drift,
latency and errors, and emits `tunewright.drift.detected` at most once per window and once per
cooldown; the `retrain-on-drift` deployment in prefect.yaml is triggered by it.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from dataclasses import dataclass
from typing import Iterator
from pathlib import Path

from prefect import task
from tunewright.logs import stage_logger, transient_io_error

from tasks.artifacts import DataArtifact, MonitorArtifact
from tunewright.splits import read_split
from tunewright.recipe import MonitorConfig
from tunewright.registry.tracking import RunContext, log_to_parent, stage_run

DRIFT_EVENT = "tunewright.drift.detected"


def _prompt(record: dict) -> list[dict]:
    """The turns of a split record: chat `messages`, or the `prompt` of a preference pair or feedback row."""
    return record["messages"] if "messages" in record else record["prompt"]


def _user_text(messages: list[dict]) -> str:
    return "\n".join(m["content"] for m in messages if m["role"] == "user")


def _jsonl(where: str, lines) -> Iterator[tuple[int, dict]]:
    """(line number, record) of each non-blank line; a line that is not JSON is an error naming the file and line."""
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            yield lineno, json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{where} line {lineno}: invalid JSON: {exc}") from None


def request_prompt(rec: dict) -> str | None:
    """The user text of a logged request: its `prompt` (completions), or the user turns of its `messages` (chat)."""
    if "prompt" in rec:
        return str(rec["prompt"])
    if "messages" in rec:
        return _user_text(rec["messages"])
    return None


def read_requests(path: Path) -> list[str]:
    """User prompts from a JSONL of production requests (`prompt` or `messages` per line); requests the server
    refused (a `status` other than 200 in `tunewright serve`'s log) are not traffic the model answered."""
    prompts = []
    with path.open(encoding="utf-8") as fh:
        for lineno, rec in _jsonl(str(path), fh):
            if rec.get("status", 200) != 200:
                continue
            prompt = request_prompt(rec)
            if prompt is None:
                raise ValueError(f"{path} line {lineno}: expected a 'prompt' or 'messages' field")
            prompts.append(prompt)
    return prompts


def _features(prompts: list[str]):
    import pandas as pd

    return pd.DataFrame({
        "prompt": prompts,
        "chars": [len(p) for p in prompts],
        "words": [len(p.split()) for p in prompts],
        "sentences": [max(1, len(re.findall(r"[.!?]+", p))) for p in prompts],
        "digits_share": [sum(ch.isdigit() for ch in p) / max(len(p), 1) for p in prompts],
        "upper_share": [sum(ch.isupper() for ch in p) / max(len(p), 1) for p in prompts],
    })


def drift_report(reference: list[str], current: list[str], drift_share: float, html_path: Path,
                 snapshots: list | None = None, timestamp=None) -> dict:
    """Run the evidently drift preset; save HTML; return per-column and dataset drift (and keep the evidently
    snapshot in `snapshots` when given, for a workspace)."""
    os.environ.setdefault("DO_NOT_TRACK", "1")
    from evidently import DataDefinition, Dataset, Report
    from evidently.presets import DataDriftPreset
    from sklearn.exceptions import ConvergenceWarning

    ref, cur = _features(reference), _features(current)
    definition = DataDefinition(text_columns=["prompt"],
                                numerical_columns=["chars", "words", "sentences", "digits_share", "upper_share"])
    report = Report([DataDriftPreset(drift_share=drift_share, text_method="abs_text_content_drift")],
                    include_tests=True)
    with warnings.catch_warnings():
        # the text domain classifier fails to converge exactly when the sets are alike
        warnings.simplefilter("ignore", ConvergenceWarning)
        snapshot = report.run(current_data=Dataset.from_pandas(cur, data_definition=definition),
                              reference_data=Dataset.from_pandas(ref, data_definition=definition), timestamp=timestamp,
                              tags=["prompts"])
    d, status = _kept(snapshot, html_path, snapshots)
    summary: dict = {"columns": {}}
    for m in d["metrics"]:
        cfg = m["config"]
        if cfg["type"].endswith("ValueDrift"):
            summary["columns"][cfg["column"]] = {"drift_detected": status.get(m["id"]) == "FAIL",
                                                 "score": float(m["value"]), "method": cfg["method"]}
        elif cfg["type"].endswith("DriftedColumnsCount"):
            summary["drifted_share"] = float(m["value"]["share"])
            summary["n_drifted"] = int(m["value"]["count"])
    summary["dataset_drift"] = summary.get("drifted_share", 0.0) >= drift_share
    return summary


def _kept(snapshot, html_path: Path, snapshots: list | None) -> tuple[dict, dict]:
    """Save an evidently snapshot as HTML (and keep it for the workspace); its results and its tests' statuses."""
    snapshot.save_html(str(html_path))
    if snapshots is not None:
        snapshots.append(snapshot)
    d = snapshot.dict()
    return d, {t["metric_config"]["metric_id"]: t["status"] for t in d.get("tests", [])}


@task(name="7-monitor-drift")
def monitor_drift(cfg: MonitorConfig, data: DataArtifact, ctx: RunContext) -> MonitorArtifact:
    """Compare training prompts with production requests; emit a drift event when they part ways."""
    import mlflow

    log = stage_logger()
    with stage_run(ctx, "7-monitor"):
        reference = [_user_text(_prompt(r)) for r in read_split(data.train_path)]
        if cfg.production_path is not None:
            current, source = read_requests(cfg.production_path), str(cfg.production_path)
        else:
            current, source = [_user_text(_prompt(r)) for r in read_split(data.test_path)], "test split"
        if not current:
            raise ValueError(f"monitor: no production requests in {source}")
        out = Path(ctx.work_dir, "monitor")
        out.mkdir(parents=True, exist_ok=True)
        html_path = out / "drift_report.html"
        summary = drift_report(reference, current, cfg.drift_share, html_path)
        (out / "drift_summary.json").write_text(json.dumps(summary, indent=2))
        mlflow.log_artifact(str(html_path), "monitor")
        mlflow.log_artifact(str(out / "drift_summary.json"), "monitor")
        metrics = {"drifted_share": summary.get("drifted_share", 0.0), "dataset_drift": float(summary["dataset_drift"])}
        metrics.update({f"drift_score_{c}": v["score"] for c, v in summary["columns"].items()})
        mlflow.log_metrics(metrics)
        mlflow.log_param("current_source", source)
        log_to_parent(ctx, {"drifted_share": metrics["drifted_share"]})
        drifted = [c for c, v in summary["columns"].items() if v["drift_detected"]]
        log.info("drift: %d/%d columns drifted (%s) between %d training prompts and %d requests from %s",
                 len(drifted), len(summary["columns"]), ", ".join(drifted) or "none", len(reference), len(current), source)
        if summary["dataset_drift"]:
            # a baseline against a fixed file: the same file would show the same drift after every retrain, so no
            # event comes from here; `flows/monitor.py` judges windows of served traffic and emits them
            log.warning("dataset drift between the training prompts and %s (a baseline report; retraining is "
                        "triggered by the monitoring flow on served traffic)", source)
        return MonitorArtifact(report_path=str(html_path), drift_detected=bool(summary["dataset_drift"]),
                               drifted_share=metrics["drifted_share"], n_reference=len(reference),
                               n_current=len(current), columns=summary["columns"])


# ---- windows of served traffic (the monitoring flow) ----

def _window_files(names: list[str], start: float, end: float) -> list[str]:
    """Rotated log files whose window could hold records in [start, end): named by their window start (UTC)."""
    from datetime import datetime, timezone

    keep = []
    for name in names:
        m = re.search(r"requests-(\d{8}T\d{6}Z)", name)
        if m is None:
            continue
        t = datetime.strptime(m.group(1), "%Y%m%dT%H%M%SZ").replace(tzinfo=timezone.utc).timestamp()
        if start - 86400 <= t < end:
            keep.append(name)
    return sorted(keep)


def read_window(source: str, start: float, end: float) -> list[dict]:
    """Request-log records with a timestamp in [start, end): from a .jsonl file, a folder of rotated files, or an
    s3:// prefix (`tunewright serve --request-log`)."""
    texts: list[tuple[str, str]] = []
    if source.startswith("s3://"):
        import boto3

        bucket, _, prefix = source[5:].partition("/")
        s3 = boto3.client("s3")
        names = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
                 for o in page.get("Contents", [])]
        texts = [(f"s3://{bucket}/{k}", s3.get_object(Bucket=bucket, Key=k)["Body"].read().decode("utf-8"))
                 for k in _window_files(names, start, end)]
    else:
        path = Path(source)
        if path.is_dir():
            texts = [(str(path / n), (path / n).read_text(encoding="utf-8"))
                     for n in _window_files([p.name for p in path.glob("requests-*.jsonl")], start, end)]
        elif path.is_file():
            texts = [(str(path), path.read_text(encoding="utf-8"))]
        else:
            raise FileNotFoundError(f"monitor.request_log: {source} not found")
    return [rec for where, text in texts for lineno, rec in _jsonl(where, text.splitlines())
            if start <= _record_time(rec, where, lineno) < end]


def _record_time(rec: dict, where: str, lineno: int) -> float:
    """When a logged request was answered: its ISO `time` as `tunewright serve` writes it (or epoch `_ts`)."""
    from datetime import datetime, timezone

    if "time" in rec:
        try:
            when = datetime.fromisoformat(str(rec["time"]).replace("Z", "+00:00"))
        except ValueError:
            raise ValueError(f"{where} line {lineno}: time {rec['time']!r} is not an ISO 8601 timestamp") from None
        return (when if when.tzinfo else when.replace(tzinfo=timezone.utc)).timestamp()
    if "_ts" in rec:
        return float(rec["_ts"])
    raise ValueError(f"{where} line {lineno}: no `time` field")


def _answer_features(answers: list[str]):
    import pandas as pd

    from tunewright.scoring.metrics import json_valid

    return pd.DataFrame({"answer_chars": [len(a) for a in answers], "answer_words": [len(a.split()) for a in answers],
                         "answer_json_valid": [float(json_valid(a)) for a in answers]})


def service_figures(records: list[dict]) -> dict:
    """Latency percentiles of answered requests, the server-error rate, and refusals by status."""
    import numpy as np

    answered = [r for r in records if r.get("status") == 200]
    latencies = np.array([float(r["latency_ms"]) / 1000 for r in answered if r.get("latency_ms") is not None])
    statuses = [int(r.get("status") or 0) for r in records]
    return {"requests": len(records), "answered": len(answered),
            "p50_seconds": float(np.percentile(latencies, 50)) if len(latencies) else 0.0,
            "p95_seconds": float(np.percentile(latencies, 95)) if len(latencies) else 0.0,
            "error_rate": sum(s >= 500 for s in statuses) / max(len(statuses), 1),
            "refused_429": sum(s == 429 for s in statuses), "client_errors": sum(400 <= s < 500 and s != 429
                                                                                 for s in statuses)}


def judge_window(cfg: MonitorConfig, reference: list[dict], records: list[dict], out: Path,
                 snapshots: list | None = None, timestamp=None, embed_model: str | None = None) -> dict:
    """Drift of the window's prompts and answers against the training data, service levels and answer checks: the
    summary the monitoring flow logs, and `trigger` with its reasons when the window should start a retrain."""
    from tunewright.scoring.safety import pii_leaks, toxicity

    answered = [r for r in records if r.get("status") == 200 and request_prompt(r) is not None]
    prompts = [request_prompt(r) for r in answered]
    answers = [str(r.get("answer") or "") for r in answered]
    service = service_figures(records)
    summary: dict = {"service": service, "n_current": len(answered), "n_reference": len(reference)}
    if len(answered) < cfg.min_requests:
        summary.update(quiet=True, trigger=False, reasons=[f"{len(answered)} answered requests, fewer than "
                                                           f"monitor.min_requests {cfg.min_requests}"])
        return summary
    ref_prompts = [_user_text(_prompt(r)) for r in reference]
    drift = drift_report(ref_prompts, prompts, cfg.drift_share, out / "prompt_drift.html", snapshots, timestamp)
    ref_answers = [(r["messages"][-1]["content"] if "messages" in r else "") for r in reference]
    answer_drift = _numeric_drift(_answer_features(ref_answers), _answer_features(answers), cfg.drift_share,
                                  out / "answer_drift.html", snapshots, timestamp)
    summary.update(quiet=False, prompt_drift=drift, answer_drift=answer_drift, outputs={
        "json_valid": float(_answer_features(answers)["answer_json_valid"].mean()),
        "toxicity": sum(toxicity(answers)) / len(answers),
        "pii_leak_rate": sum(k > 0 for k in pii_leaks(answers, prompts)) / len(answers)})
    summary["vocabulary_drift"] = vocabulary_drift(ref_prompts, prompts, cfg.drift_share, out / "vocabulary_drift.html",
                                                   snapshots, timestamp)
    reasons = []
    if drift["dataset_drift"]:
        reasons.append(f"prompt drift: {drift.get('n_drifted', 0)} of {len(drift['columns'])} columns")
    vocab = summary["vocabulary_drift"]
    if vocab["drift_detected"]:
        reasons.append(f"vocabulary drift ({vocab['method']} {vocab['score']:.2f}): "
                       f"{vocab['unseen_share_current']:.0%} of words unseen in training "
                       f"(reference {vocab['unseen_share_reference']:.0%}), e.g. {', '.join(vocab['new_words'][:5])}")
    if embed_model is not None:
        summary["embedding_drift"] = embedding_drift(embed_model, ref_prompts, prompts)
        if summary["embedding_drift"]["drift_detected"]:
            reasons.append(f"prompt embedding drift: a classifier tells them apart with ROC AUC "
                           f"{summary['embedding_drift']['score']:.2f}")
    if service["p95_seconds"] > cfg.slo_p95_seconds:
        reasons.append(f"p95 latency {service['p95_seconds']:.2f} s above monitor.slo_p95_seconds {cfg.slo_p95_seconds}")
    if service["error_rate"] > cfg.slo_error_rate:
        reasons.append(f"error rate {service['error_rate']:.2%} above monitor.slo_error_rate {cfg.slo_error_rate:.2%}")
    summary.update(trigger=bool(reasons), reasons=reasons)
    return summary


def _numeric_drift(ref, cur, drift_share: float, html_path: Path, snapshots: list | None = None,
                   timestamp=None, tag: str = "answers") -> dict:
    from evidently import DataDefinition, Dataset, Report
    from evidently.presets import DataDriftPreset

    definition = DataDefinition(numerical_columns=list(ref.columns))
    with warnings.catch_warnings():
        # a column constant on both sides (every answer valid JSON) divides by a zero spread: no drift, not an error
        warnings.simplefilter("ignore", RuntimeWarning)
        snapshot = Report([DataDriftPreset(drift_share=drift_share)], include_tests=True).run(
            current_data=Dataset.from_pandas(cur, data_definition=definition),
            reference_data=Dataset.from_pandas(ref, data_definition=definition), timestamp=timestamp, tags=[tag])
    d, status = _kept(snapshot, html_path, snapshots)
    columns = {m["config"]["column"]: {"drift_detected": status.get(m["id"]) == "FAIL", "score": float(m["value"])}
               for m in d["metrics"] if m["config"]["type"].endswith("ValueDrift")}
    return {"columns": columns, "drifted": [c for c, v in columns.items() if v["drift_detected"]]}


_WORD = re.compile(r"[^\W\d_]{2,}")  # words of letters: order numbers are not vocabulary


def _words(text: str) -> list[str]:
    return [w.lower() for w in _WORD.findall(text)]


def vocabulary_drift(reference: list[str], current: list[str], drift_share: float, html_path: Path,
                     snapshots: list | None = None, timestamp=None, top: int = 40, sample: int = 5000,
                     min_reference: int = 400, threshold: float = 0.1) -> dict:
    """Drift of the words the prompts use. The training prompts' vocabulary is built from half of them and the other
    half is the reference, so words the training data holds only once count as unseen on both sides alike. Each
    word of the reference and of the window is one row: one of the `top` commonest words, `(unseen)` when the
    vocabulary lacks it, `(other)` otherwise; evidently judges that distribution by its Jensen-Shannon distance.
    Also the window's commonest unseen words, which name what the traffic now talks about.

    The words of one prompt are not independent draws, so a small reference makes the distance noisy: with fewer
    than `min_reference` training prompts the figures are reported and not judged (measured on the demo's
    generator: 60 prompts of the usual mix against 1,000 training prompts 0.07-0.08, shifted traffic 0.17-0.18;
    against 109, usual traffic already looked different)."""
    from collections import Counter

    import pandas as pd
    from evidently import DataDefinition, Dataset, Report
    from evidently.presets import DataDriftPreset

    vocab = Counter(w for p in reference[0::2] for w in _words(p))
    ref_words = [w for p in reference[1::2] for w in _words(p)]
    cur_words = [w for p in current for w in _words(p)]
    common = {w for w, _ in Counter(ref_words + cur_words).most_common(top) if w in vocab}

    def rows(words: list[str]) -> pd.DataFrame:
        step = max(1, len(words) // sample)
        return pd.DataFrame({"word": [w if w in common else "(unseen)" if w not in vocab else "(other)"
                                      for w in words[::step]]})

    definition = DataDefinition(categorical_columns=["word"])
    snapshot = Report([DataDriftPreset(drift_share=drift_share, cat_method="jensenshannon", cat_threshold=threshold)],
                      include_tests=True).run(
        current_data=Dataset.from_pandas(rows(cur_words), data_definition=definition),
        reference_data=Dataset.from_pandas(rows(ref_words), data_definition=definition), timestamp=timestamp,
        tags=["words"])
    d, status = _kept(snapshot, html_path, snapshots)
    drift = next(m for m in d["metrics"] if m["config"]["type"].endswith("ValueDrift"))
    unseen = Counter(w for w in cur_words if w not in vocab)
    judged = len(reference) >= min_reference
    return {"drift_detected": judged and status.get(drift["id"]) == "FAIL", "score": float(drift["value"]),
            "judged": judged, "note": "" if judged else (f"{len(reference)} training prompts, fewer than "
                                                         f"{min_reference}: reported, not judged"),
            "method": drift["config"]["method"],
            "unseen_share_reference": sum(w not in vocab for w in ref_words) / max(len(ref_words), 1),
            "unseen_share_current": sum(unseen.values()) / max(len(cur_words), 1),
            "new_words": [w for w, _ in unseen.most_common(15)], "vocabulary_size": len(vocab)}


@dataclass(frozen=True)
class WindowVerdict:
    key: str                     # model:window-start/length: one event at most per key
    start: float
    end: float
    summary_path: str
    window_path: str             # the window's answered requests, exported for review and labelling
    trigger: bool                # drift or a service-level breach in a window with enough traffic
    emitted: bool
    reasons: tuple[str, ...] = ()
    suppressed: str = ""         # why a triggering window emitted nothing (already emitted, cooldown)


@task(name="7-monitor-traffic", retries=2, retry_delay_seconds=10, retry_condition_fn=transient_io_error)
def monitor_traffic(cfg: MonitorConfig, registered_model: str, data: DataArtifact, ctx: RunContext, *,
                    request_log: str | None = None, window_end: float | None = None, recipe_path: str = "",
                    overrides: list[str] | None = None, embed_model: str | None = None) -> WindowVerdict:
    """Judge one window of served traffic and emit `tunewright.drift.detected` at most once for it, and not within
    `monitor.cooldown_minutes` of the last event for the same model."""
    import time
    import uuid

    import mlflow
    from mlflow import MlflowClient

    log = stage_logger()
    source = request_log or cfg.request_log
    if not source:
        raise ValueError("monitor.request_log: name where `tunewright serve --request-log` writes (a .jsonl file, a "
                         "folder or s3://bucket/prefix), or pass request_log")
    length = cfg.window_minutes * 60
    end = window_end if window_end is not None else (time.time() // length) * length  # the last whole window
    start = end - length
    from datetime import datetime, timezone

    stamp = datetime.fromtimestamp(start, tz=timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    key = f"{registered_model}:{stamp}/{cfg.window_minutes}m"
    with stage_run(ctx, "7-monitor-traffic"):
        records = [r for r in read_window(source, start, end) if r.get("registered_model") in (registered_model, None)]
        out = Path(ctx.work_dir, "monitor-traffic")
        out.mkdir(parents=True, exist_ok=True)
        snapshots: list = []
        summary = judge_window(cfg, read_split(data.train_path), records, out, snapshots,
                               datetime.fromtimestamp(end, tz=timezone.utc).replace(tzinfo=None), embed_model)
        if snapshots:
            summary["evidently_workspace"] = _keep_in_workspace(Path(ctx.state_dir, "evidently"), registered_model,
                                                                snapshots, log)
        answered = [r for r in records if r.get("status") == 200]
        versions = sorted({str(r["version"]) for r in answered if r.get("version")})
        window_path = (out / "window.jsonl").resolve()
        window_path.write_text("".join(json.dumps({k: r[k] for k in ("time", "model", "version", "prompt", "messages",
                                                                   "answer") if k in r}, ensure_ascii=False) + "\n"
                                       for r in answered), encoding="utf-8")
        summary.update(key=key, source=source, start=start, end=end, versions=versions)
        (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
        service = summary["service"]
        metrics = {f"window_{k}": float(v) for k, v in service.items()}
        metrics |= {f"window_{k}": v for k, v in (summary.get("outputs") or {}).items()}
        if not summary["quiet"]:
            metrics["window_prompt_drifted_share"] = summary["prompt_drift"].get("drifted_share", 0.0)
        if summary.get("embedding_drift"):
            metrics["window_embedding_drift_auc"] = summary["embedding_drift"]["score"]
        mlflow.log_metrics(metrics)
        if summary.get("vocabulary_drift"):
            metrics["window_vocabulary_drift"] = summary["vocabulary_drift"]["score"]
            metrics["window_unseen_word_share"] = summary["vocabulary_drift"]["unseen_share_current"]
        for f in ("summary.json", "window.jsonl", "prompt_drift.html", "answer_drift.html", "vocabulary_drift.html"):
            if (out / f).is_file():
                mlflow.log_artifact(str(out / f), "monitor")
        client = MlflowClient(ctx.tracking_uri)
        client.set_tag(ctx.parent_run_id, "tunewright.window_key", key)
        client.set_tag(ctx.parent_run_id, "tunewright.monitored_model", registered_model)
        suppressed, emitted = "", False
        if summary["trigger"]:
            suppressed = _suppressed(client, ctx, key, registered_model, cfg.cooldown_minutes)
            if not suppressed:
                from prefect.events import emit_event

                labelled = label_window(cfg.label_command, window_path, log) if cfg.label_command else ""
                if labelled:
                    mlflow.log_artifact(labelled, "monitor")

                emit_event(event=DRIFT_EVENT, id=uuid.uuid5(uuid.NAMESPACE_URL, f"tunewright:{key}"),
                           resource={"prefect.resource.id": f"tunewright.model.{registered_model}",
                                     "prefect.resource.name": registered_model},
                           payload={"window": key, "reasons": summary["reasons"], "versions": versions,
                                    "service": service, "outputs": summary.get("outputs"),
                                    "window_export": str(window_path), "labelled_export": labelled,
                                    "recipe_path": recipe_path,
                                    "overrides": list(overrides or []), "mlflow_run_id": ctx.parent_run_id})
                client.set_tag(ctx.parent_run_id, "tunewright.emitted", "true")
                emitted = True
                log.warning("window %s: %s; emitted %s", key, "; ".join(summary["reasons"]), DRIFT_EVENT)
            else:
                client.set_tag(ctx.parent_run_id, "tunewright.suppressed", suppressed)
                log.info("window %s: %s, but no event: %s", key, "; ".join(summary["reasons"]), suppressed)
        else:
            log.info("window %s: %d requests, %d answered, p95 %.2f s, errors %.2f%%: %s", key, service["requests"],
                     service["answered"], service["p95_seconds"], 100 * service["error_rate"],
                     "; ".join(summary["reasons"]) or "no drift, within service levels")
        try:
            from prefect.artifacts import create_markdown_artifact

            create_markdown_artifact(key="monitor-window", description=f"Served traffic {key}", markdown=(
                f"### Window {key}\n\n| | |\n|---|---|\n| requests / answered | {service['requests']} / "
                f"{service['answered']} |\n| p50 / p95 latency | {service['p50_seconds']:.2f} s / "
                f"{service['p95_seconds']:.2f} s |\n| server errors | {service['error_rate']:.2%} |\n| verdict | "
                f"{'; '.join(summary['reasons']) or 'quiet'} |\n| event | "
                f"{'emitted' if emitted else suppressed or 'none'} |\n\nMLflow run {ctx.parent_run_id}"))
        except Exception as exc:  # outside a Prefect run there is nowhere to put it
            log.debug("no Prefect artifact: %s", exc)
        return WindowVerdict(key=key, start=start, end=end, summary_path=str(out / "summary.json"),
                             window_path=str(window_path), trigger=bool(summary["trigger"]), emitted=emitted,
                             reasons=tuple(summary["reasons"]), suppressed=suppressed)


def _suppressed(client, ctx: RunContext, key: str, model: str, cooldown_minutes: int) -> str:
    """Why a triggering window must not emit: its event was sent already, or the model's last one is too recent."""
    import time

    same = client.search_runs([ctx.experiment_id], max_results=1, filter_string=(
        f"tags.`tunewright.window_key` = '{key}' and tags.`tunewright.emitted` = 'true'"))
    if same:
        return f"the event for window {key} was emitted already (MLflow run {same[0].info.run_id})"
    last = client.search_runs([ctx.experiment_id], max_results=1, order_by=["attributes.start_time DESC"],
                              filter_string=(f"tags.`tunewright.monitored_model` = '{model}' and "
                                             "tags.`tunewright.emitted` = 'true'"))
    if last and cooldown_minutes:
        age = time.time() - last[0].info.start_time / 1000
        if age < cooldown_minutes * 60:
            return (f"cooldown: the last event for {model} was {age / 60:.0f} min ago (monitor.cooldown_minutes "
                    f"{cooldown_minutes})")
    return ""


def label_window(command: str, window_path: Path, log) -> str:
    """Run the recipe's labelling job on an exported window; return the labelled file, or "" when it failed (the
    event still goes out: the retrain then waits for a person to write the file)."""
    import shlex
    import subprocess
    import sys

    labelled = labelled_path(str(window_path))
    args = [a.format(python=sys.executable, window=str(window_path), labelled=str(labelled))
            for a in shlex.split(command)]
    try:
        done = subprocess.run(args, capture_output=True, text=True, timeout=1800)
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.warning("monitor.label_command %r did not run: %s", command, exc)
        return ""
    if done.returncode != 0 or not labelled.is_file():
        log.warning("monitor.label_command exited with %d and %s: %s", done.returncode,
                    "wrote the labels" if labelled.is_file() else f"no {labelled}",
                    (done.stderr or done.stdout).strip()[-2000:])
        return ""
    log.info("monitor.label_command: %s", done.stdout.strip()[-500:] or f"wrote {labelled}")
    return str(labelled)


def labelled_path(window_export: str) -> Path:
    """Where the reviewed answers of an exported window go: `window.jsonl` -> `window.labelled.jsonl`."""
    path = Path(window_export)
    return path.with_name(path.stem + ".labelled.jsonl")


def with_labelled_window(recipe_path: str, overrides: list[str] | str | None, window: str | None,
                         window_export: str | None) -> list[str] | None:
    """The overrides a retrain runs with: as given for a scheduled run; for a drifted window, the recipe's sources
    plus the window's labelled export, or None (train nothing) while nobody has labelled it.

    Retraining on the window's own served answers would teach the model what it already says, and retraining on the
    recipe's data alone would find the same drift again, so a window counts only once a person (or a labelling job)
    has written `<window>.labelled.jsonl` in the training data's format beside the export.
    """
    import logging

    from tunewright.recipe import load_recipe

    if isinstance(overrides, str):  # the trigger renders the event's list as JSON
        overrides = json.loads(overrides) if overrides.strip() else []
    overrides = list(overrides or [])
    log = logging.getLogger("tunewright.retrain")
    try:
        from prefect.logging import get_run_logger

        log = get_run_logger()
    except Exception:  # noqa: BLE001  outside a flow run
        pass
    if not window_export:
        return overrides
    labelled = labelled_path(window_export)
    if not labelled.is_file():
        log.warning("window %s: no labelled export at %s yet; nothing is trained (label the exported requests in "
                    "%s and write them there, then start this deployment again)", window, labelled, window_export)
        return None
    recipe = load_recipe(recipe_path, overrides)
    sources = [s.model_dump(mode="json", exclude_defaults=True) for s in recipe.data.sources] or [
        {"path": recipe.data.path, "format": recipe.data.format}]
    sources.append({"path": str(labelled), "name": f"window {window}"})
    log.info("window %s: training on %s plus its %d labelled requests", window,
             ", ".join(str(s["path"]) for s in sources[:-1]),
             sum(1 for line in labelled.open(encoding="utf-8") if line.strip()))
    return overrides + ["data.path=null", f"data.sources={json.dumps(sources)}"]


def _keep_in_workspace(path: Path, model: str, snapshots: list, log) -> str:
    """Add a window's evidently snapshots to the local workspace, one project per model, so `evidently ui
    --workspace PATH` shows every window's reports and the drift share over time on the project's dashboard."""
    from evidently.sdk.models import PanelMetric
    from evidently.sdk.panels import line_plot_panel
    from evidently.ui.workspace import Workspace

    ws = Workspace.create(str(path))
    name = f"tunewright {model}"
    found = ws.search_project(name)
    project = found[0] if found else ws.create_project(name, description=f"Windows of {model}'s served traffic")
    if not found:
        for kind, what in (("prompts", "length, digits, case, text"), ("answers", "length, words, JSON validity")):
            project.dashboard.add_panel(line_plot_panel(f"{kind.capitalize()}: share of drifted columns ({what})", [
                PanelMetric(legend=kind, tags=[kind], metric="DriftedColumnsCount",
                            metric_labels={"value_type": "share"})]))
        project.dashboard.add_panel(line_plot_panel(
            "Word distribution per window (Jensen-Shannon distance to the training prompts)", [
                PanelMetric(legend="words", tags=["words"], metric="ValueDrift", metric_labels={"column": "word"})]))
    for snapshot in snapshots:
        ws.add_run(project.id, snapshot, include_data=False)
    log.info("evidently: %d reports added to project '%s' in %s (evidently ui --workspace %s)", len(snapshots), name,
             path, path)
    return str(path)


def embedding_drift(model_dir: str, reference: list[str], current: list[str], sample: int = 300) -> dict:
    """Drift of the prompts' meaning: base-model embeddings of the training prompts (at most `sample`, evenly
    spaced) against the window's, judged by evidently's classifier method (ROC AUC against a bootstrapped null)."""
    import pandas as pd
    from evidently.legacy.metrics.data_drift.embedding_drift_methods import model

    from tunewright.scoring.embeddings import embed

    step = max(1, len(reference) // sample)
    ref, cur = embed(model_dir, reference[::step][:sample]), embed(model_dir, current[:sample])
    columns = [f"e{i}" for i in range(ref.shape[1])]
    score, drifted, method = model(bootstrap=True)(pd.DataFrame(cur, columns=columns),
                                                   pd.DataFrame(ref, columns=columns))
    return {"score": float(score), "drift_detected": bool(drifted), "method": method, "n_reference": len(ref),
            "n_current": len(cur)}
