"""Stage 5's report: the chart and HTML page comparing the models, and the tables MLflow and Prefect show."""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

from tasks.artifacts import EvalArtifact
from tasks.evaluate.scoring import perplexity
from tunewright.registry.tracking import RunContext, run_link

_COLOURS = {"base": "#9aa5b1", "tuned": "#2f7ed8", "champion": "#e8a33d"}
_NAMES = {"base": "base", "tuned": "fine-tuned", "champion": "champion"}

UNBOUNDED = ("answer_loss", "perplexity")  # figures that are not shares: tabled, not drawn on the 0-1 chart
REPORT_FILES = ("evaluation.html", "evaluation.png", "predictions.jsonl")  # what stage 5 logs under evaluation/


def write_predictions(out: Path, rows: list[dict]) -> Path:
    """One JSON line per test example: its prompt, reference and every model's answer."""
    predictions = out / "predictions.jsonl"
    predictions.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return predictions


def write_report(out: Path, art: EvalArtifact, rows: list[dict], fields: list[str]) -> None:
    """The chart (`evaluation.png`) and the HTML page that shows it beside the figures and the first predictions."""
    chart_png = _chart(art.scores, art.metric, fields)
    (out / "evaluation.png").write_bytes(chart_png)
    _page(Path(art.report_path), art, chart_png, rows)


def log_report(out: Path) -> None:
    """The report's files to the active MLflow run, under `evaluation/`."""
    import mlflow

    for f in REPORT_FILES:
        mlflow.log_artifact(str(out / f), "evaluation")


def _chart(scores: dict[str, dict[str, float]], metric: str, fields: list[str]) -> bytes:
    """Bars per model: the correctness metric, each JSON field, and the 0-1 metrics the recipe chose."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [metric] + [f"field_{k}" for k in fields] + [
        k for k in scores["tuned"] if k not in (metric, *UNBOUNDED) and not k.startswith("field_")]
    labels = [k.replace("field_", "field: ") for k in shown]
    models = list(scores)
    width = 0.8 / len(models)
    fig, ax = plt.subplots(figsize=(max(7, 0.6 * len(shown) + 2), 3.4))
    for j, who in enumerate(models):
        xs = [i - 0.4 + width * (j + 0.5) for i in range(len(shown))]
        ax.bar(xs, [scores[who].get(k, 0) for k in shown], width=width, label=_NAMES[who], color=_COLOURS[who])
    ax.set_xticks(list(range(len(shown))), labels, rotation=25, ha="right", fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("share / score (0-1)")
    ax.legend(loc="upper left", fontsize=8)
    ax.set_title("Held-out split: " + " vs ".join(_NAMES[m] for m in models))
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def _extra_rows(art: EvalArtifact) -> str:
    """Table rows for what only some runs measure: preference accuracy, mean reward, the starting point."""
    extra = ""
    if art.preference_accuracy:
        extra += (f"<tr><td>preference accuracy (held-out pairs)</td><td>{art.preference_accuracy.get('base', 0):.1%}</td>"
                  f"<td>{art.preference_accuracy.get('tuned', 0):.1%}</td></tr>")
    if "tuned_on_policy" in art.preference_accuracy:
        extra += ("<tr><td>preference accuracy (held-out pairs, the starting point's wrong answers as rejected; "
                  f"starting point {art.preference_accuracy['start_on_policy']:.1%})</td>"
                  f"<td>{art.preference_accuracy['base_on_policy']:.1%}</td>"
                  f"<td>{art.preference_accuracy['tuned_on_policy']:.1%}</td></tr>")
    if art.mean_reward:
        extra += (f"<tr><td>mean reward of the answers</td><td>{art.mean_reward.get('base', 0):.3f}</td>"
                  f"<td>{art.mean_reward.get('tuned', 0):.3f}</td></tr>")
    if art.start_score is not None:
        start_pref = art.preference_accuracy.get("start")
        extra += (f"<tr><td>starting point (after supervised steps)</td><td colspan=2>{art.metric} "
                  f"{art.start_score:.1%}" + (f", preference accuracy {start_pref:.1%}" if start_pref is not None
                                               else "") + "</td></tr>")
    return extra


def _page(path: Path, art: EvalArtifact, chart_png: bytes, rows: list[dict]) -> None:
    def cell(text: str, ok: bool) -> str:
        return f"<td class='{'ok' if ok else 'bad'}'><code>{html.escape(text)}</code></td>"

    models = list(art.scores) or ["base", "tuned"]
    body = "".join(
        f"<tr><td>{html.escape(str(r['id']))}</td><td>{html.escape(r['prompt'])}</td><td><code>{html.escape(r['reference'])}</code></td>"
        + "".join(cell(r[who], r[f"{who}_correct"]) for who in models if who in r) + "</tr>"
        for r in rows[:100]
    )
    head = "".join(f"<th>{_NAMES.get(who, who)}</th>" for who in models)
    fields = "".join(
        f"<tr><td>{html.escape(k.replace('field_', 'field: '))}</td>"
        + "".join(f"<td>{art.scores[who].get(k, float('nan')):.3f}</td>" for who in models) + "</tr>"
        for k in art.scores.get("tuned", {}) if k not in (art.metric, *UNBOUNDED))
    extra = _extra_rows(art)
    path.write_text(f"""<html><head><meta charset="utf-8"><title>Evaluation</title><style>
body{{font-family:sans-serif;margin:2em}} table{{border-collapse:collapse}} td,th{{border:1px solid #ddd;padding:4px;vertical-align:top;font-size:13px}}
td.ok{{background:#e8f7ea}} td.bad{{background:#fbeaea}}</style></head><body>
<h1>Evaluation on the held-out split ({art.n_examples} examples)</h1>
<p>Champion: {html.escape(art.champion or art.champion_note or "none")}</p>
<table><tr><th></th>{head}</tr>
<tr><td>{art.metric}</td>{"".join(f"<td>{art.scores[w][art.metric]:.1%}</td>" for w in models) if art.scores else
 f"<td>{art.base_score:.1%}</td><td>{art.tuned_score:.1%}</td>"}</tr>
<tr><td>answer loss</td>{"".join(f"<td>{art.scores[w]['answer_loss']:.4f}</td>" for w in models) if art.scores else
 f"<td>{art.base_loss:.4f}</td><td>{art.tuned_loss:.4f}</td>"}</tr>
<tr><td>perplexity (answer tokens)</td>{"".join(f"<td>{art.scores[w].get('perplexity', perplexity(art.scores[w]['answer_loss'])):.2f}</td>"
 for w in models) if art.scores else f"<td>{perplexity(art.base_loss):.2f}</td><td>{perplexity(art.tuned_loss):.2f}</td>"}</tr>{fields}{extra}</table>
<p><img src="data:image/png;base64,{base64.b64encode(chart_png).decode()}"></p>
<h2>Predictions (first 100)</h2><table><tr><th>id</th><th>prompt</th><th>reference</th>{head}</tr>{body}</table>
</body></html>""", encoding="utf-8")


def log_tables(rows: list[dict], scores: dict[str, dict[str, float]], art: EvalArtifact, ctx: RunContext,
               log) -> None:
    """The per-example table to MLflow (`log_table`, viewable in the run's Evaluation tab), and the figures per model
    as a Prefect table artifact linking to the run."""
    import mlflow
    import pandas as pd

    mlflow.log_table(data=pd.DataFrame(rows), artifact_file="evaluation/examples.json")
    models = list(scores)
    table = [{"metric": k} | {who: round(scores[who][k], 4) if k in scores[who] else None for who in models}
             for k in scores["tuned"]]
    link = run_link(ctx.tracking_uri, ctx.experiment_id, mlflow.active_run().info.run_id)
    try:
        from prefect.artifacts import create_table_artifact

        create_table_artifact(table=table, key="evaluation",
                              description=f"Stage 5 on {art.n_examples} test examples: "
                                          f"{', '.join(models)}{f' ({art.champion})' if art.champion else ''}. "
                                          f"Per-example answers and scores: {link}, artifact evaluation/examples.json")
    except Exception as exc:  # outside a Prefect run (a task called with .fn) there is nowhere to put it
        log.debug("no Prefect artifact: %s", exc)
