"""Stage 7 on served traffic: one window of `tunewright serve`'s request log judged against the training data for
drift, service levels and answer checks; a window that should start a retrain emits the retrain trigger's event."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from prefect import task
from tunewright.logs import stage_logger, transient_io_error

from tasks.artifacts import DataArtifact
from tasks.monitor.canary import CanaryVerdict
from tasks.monitor.drift import answer_features, drift_report, embedding_drift, numeric_drift, vocabulary_drift
from tasks.monitor.retrain import emit_drift_event, suppressed
from tasks.monitor.traffic import read_window, request_prompt, service_figures, split_prompt
from tunewright.recipe import MonitorConfig
from tunewright.registry.tracking import RunContext, stage_run
from tunewright.splits import read_split


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
    canary: CanaryVerdict | None = None  # the canary decided on the same traffic, when the flow decided one


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
    ref_prompts = [split_prompt(r) for r in reference]
    drift = drift_report(ref_prompts, prompts, cfg.drift_share, out / "prompt_drift.html", snapshots, timestamp)
    ref_answers = [(r["messages"][-1]["content"] if "messages" in r else "") for r in reference]
    answer_drift = numeric_drift(answer_features(ref_answers), answer_features(answers), cfg.drift_share,
                                 out / "answer_drift.html", snapshots, timestamp)
    summary.update(quiet=False, prompt_drift=drift, answer_drift=answer_drift, outputs={
        "json_valid": float(answer_features(answers)["answer_json_valid"].mean()),
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


@task(name="7-monitor-traffic", retries=2, retry_delay_seconds=10, retry_condition_fn=transient_io_error)
def monitor_traffic(cfg: MonitorConfig, registered_model: str, data: DataArtifact, ctx: RunContext, *,
                    request_log: str | None = None, window_end: float | None = None, recipe_path: str = "",
                    overrides: list[str] | None = None, embed_model: str | None = None) -> WindowVerdict:
    """Judge one window of served traffic and emit `tunewright.drift.detected` at most once for it, and not within
    `monitor.cooldown_minutes` of the last event for the same model."""
    from datetime import datetime, timezone

    log = stage_logger()
    source = request_log or cfg.request_log
    if not source:
        raise ValueError("monitor.request_log: name where `tunewright serve --request-log` writes (a .jsonl file, a "
                         "folder or s3://bucket/prefix), or pass request_log")
    start, end, key = _window(cfg.window_minutes, registered_model, window_end)
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
        window_path, versions = _export_window(records, out)
        summary.update(key=key, source=source, start=start, end=end, versions=versions)
        (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
        _log_window(summary, out)
        emitted, why_not = _act_on(cfg, summary, key, registered_model, window_path, versions, recipe_path, overrides,
                                   ctx, log)
        _window_artifact(key, summary, emitted, why_not, ctx, log)
        return WindowVerdict(key=key, start=start, end=end, summary_path=str(out / "summary.json"),
                             window_path=str(window_path), trigger=bool(summary["trigger"]), emitted=emitted,
                             reasons=tuple(summary["reasons"]), suppressed=why_not)


def _window(window_minutes: int, registered_model: str, window_end: float | None) -> tuple[float, float, str]:
    """(start, end, key) of the window: the one ending at `window_end`, else the last whole one; the key names the
    model and the window, one event at most per key."""
    import time
    from datetime import datetime, timezone

    length = window_minutes * 60
    end = window_end if window_end is not None else (time.time() // length) * length  # the last whole window
    start = end - length
    stamp = datetime.fromtimestamp(start, tz=timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return start, end, f"{registered_model}:{stamp}/{window_minutes}m"


def _export_window(records: list[dict], out: Path) -> tuple[Path, list[str]]:
    """The window's answered requests as `window.jsonl` (for review and labelling), and the model versions that
    answered them."""
    answered = [r for r in records if r.get("status") == 200]
    versions = sorted({str(r["version"]) for r in answered if r.get("version")})
    window_path = (out / "window.jsonl").resolve()
    window_path.write_text("".join(json.dumps({k: r[k] for k in ("time", "model", "version", "prompt", "messages",
                                                               "answer") if k in r}, ensure_ascii=False) + "\n"
                                   for r in answered), encoding="utf-8")
    return window_path, versions


def _log_window(summary: dict, out: Path) -> None:
    """The window's figures and reports to the stage's MLflow run."""
    import mlflow

    metrics = {f"window_{k}": float(v) for k, v in summary["service"].items()}
    metrics |= {f"window_{k}": v for k, v in (summary.get("outputs") or {}).items()}
    if not summary["quiet"]:
        metrics["window_prompt_drifted_share"] = summary["prompt_drift"].get("drifted_share", 0.0)
    if summary.get("embedding_drift"):
        metrics["window_embedding_drift_auc"] = summary["embedding_drift"]["score"]
    mlflow.log_metrics(metrics)
    for f in ("summary.json", "window.jsonl", "prompt_drift.html", "answer_drift.html", "vocabulary_drift.html"):
        if (out / f).is_file():
            mlflow.log_artifact(str(out / f), "monitor")


def _act_on(cfg: MonitorConfig, summary: dict, key: str, registered_model: str, window_path: Path,
            versions: list[str], recipe_path: str, overrides: list[str] | None, ctx: RunContext,
            log) -> tuple[bool, str]:
    """Tag the parent run with the window, and emit the retrain trigger's event when the window calls for one and it
    is not suppressed: (emitted, why it was suppressed)."""
    from mlflow import MlflowClient

    client = MlflowClient(ctx.tracking_uri)
    client.set_tag(ctx.parent_run_id, "tunewright.window_key", key)
    client.set_tag(ctx.parent_run_id, "tunewright.monitored_model", registered_model)
    service = summary["service"]
    if not summary["trigger"]:
        log.info("window %s: %d requests, %d answered, p95 %.2f s, errors %.2f%%: %s", key, service["requests"],
                 service["answered"], service["p95_seconds"], 100 * service["error_rate"],
                 "; ".join(summary["reasons"]) or "no drift, within service levels")
        return False, ""
    why_not = suppressed(client, ctx, key, registered_model, cfg.cooldown_minutes)
    if why_not:
        client.set_tag(ctx.parent_run_id, "tunewright.suppressed", why_not)
        log.info("window %s: %s, but no event: %s", key, "; ".join(summary["reasons"]), why_not)
        return False, why_not
    emit_drift_event(cfg, key, registered_model, summary, window_path, versions, recipe_path, overrides, ctx, client,
                     log)
    return True, ""


def _window_artifact(key: str, summary: dict, emitted: bool, why_not: str, ctx: RunContext, log) -> None:
    """The window's verdict as a Prefect markdown artifact on the flow run."""
    service = summary["service"]
    try:
        from prefect.artifacts import create_markdown_artifact

        create_markdown_artifact(key="monitor-window", description=f"Served traffic {key}", markdown=(
            f"### Window {key}\n\n| | |\n|---|---|\n| requests / answered | {service['requests']} / "
            f"{service['answered']} |\n| p50 / p95 latency | {service['p50_seconds']:.2f} s / "
            f"{service['p95_seconds']:.2f} s |\n| server errors | {service['error_rate']:.2%} |\n| verdict | "
            f"{'; '.join(summary['reasons']) or 'quiet'} |\n| event | "
            f"{'emitted' if emitted else why_not or 'none'} |\n\nMLflow run {ctx.parent_run_id}"))
    except Exception as exc:  # outside a Prefect run there is nowhere to put it
        log.debug("no Prefect artifact: %s", exc)


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
