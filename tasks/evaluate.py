"""Stage 5, evaluation and validation: base vs fine-tuned on the held-out split.

Both models answer every test prompt with batched greedy generation; the task metric is exact
match (on parsed JSON, with per-field accuracy, for structured tasks) plus the answer loss. A
reward model is judged instead by how often it scores the held-out chosen answer above the
rejected one, against the base model's own log-probabilities as the baseline.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
from pathlib import Path

from prefect import task
from tunewright.logs import stage_logger

from tasks.artifacts import DataArtifact, EnvironmentArtifact, EvalArtifact, ModelArtifact, TrainArtifact
from tunewright import preference
from tunewright.scoring import rewards
from tunewright.chat import autocast_dtype, generate
from tunewright.train.loss import Kernels, answer_loss
from tunewright.train.methods import load_base
from tunewright.scoring.metrics import score, text_scores
from tunewright.scoring.safety import safety_scores
from tunewright.seeding import seed_everything
from tunewright.splits import read_split
from tunewright.recipe import EvaluateConfig, ModelConfig
from tunewright.registry.tracking import RunContext, log_to_parent, run_link, stage_run


_COLOURS = {"base": "#9aa5b1", "tuned": "#2f7ed8", "champion": "#e8a33d"}
_NAMES = {"base": "base", "tuned": "fine-tuned", "champion": "champion"}


UNBOUNDED = ("answer_loss", "perplexity")  # figures that are not shares: tabled, not drawn on the 0-1 chart


def perplexity(loss: float) -> float:
    """exp(mean cross-entropy per answer token): the perplexity of the reference answers under the model."""
    return math.exp(min(loss, 700.0))


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


def _report(path: Path, art: EvalArtifact, chart_png: bytes, rows: list[dict]) -> None:
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


@task(name="5-evaluate")
def evaluate(cfg: EvaluateConfig, model_cfg: ModelConfig, data: DataArtifact, model: ModelArtifact,
             trained: TrainArtifact, env: EnvironmentArtifact, ctx: RunContext,
             champion: str | None = None) -> EvalArtifact:
    """Score the base, the fine-tuned model and the registry's `champion` (a `models:/NAME@ALIAS` reference, when
    given and registered) on the test split with every metric the recipe names; report them side by side."""
    import mlflow
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log = stage_logger()
    seed_everything(env.seed)
    device = torch.device("cuda" if env.device == "cuda" else "cpu")
    amp = autocast_dtype(env.precision)
    with stage_run(ctx, "5-evaluate"):
        records = read_split(data.test_path)[: cfg.max_examples]
        if not records:
            raise ValueError(f"{data.test_path}: the test split is empty; raise data.split.test_fraction")
        if trained.objective == "reward":
            return _reward_model_scores(cfg, records, model, trained, env, ctx, device, amp, log)
        # preference pairs and feedback are scored by the task metric on their good answers
        test = [r for r in records if "messages" in r or "chosen" in r or r.get("label") is True]
        convs = preference.sft_conversations(test)
        refs = [c[-1]["content"] for c in convs]
        tokenizer = AutoTokenizer.from_pretrained(model.base_dir)

        def progress(label):
            return lambda done, total: log.info("%s: generated %d/%d answers", label, done, total)

        kwargs = {"max_new_tokens": cfg.max_new_tokens, "batch_size": cfg.batch_size, "autocast_dtype": amp}
        # the JSON metric reads only the first JSON object of an answer: generation stops once it has closed
        scored = kwargs | {"stop_after_json": cfg.metric == "json_exact_match"}
        cache = _base_cache_path(ctx, model, model_cfg, env, convs, scored)

        def base_answers(m) -> tuple[list[str], float]:
            if cache.is_file():
                found = json.loads(cache.read_text(encoding="utf-8"))
                log.info("base: answers and answer loss for these %d test prompts read from %s (same base weights, "
                         "test split and generation settings)", len(convs), cache.name)
                return found["answers"], found["loss"]
            answers = generate(m, tokenizer, convs, progress=progress("base"), **scored)
            loss = answer_loss(m, tokenizer, convs, max_len=1024, batch_size=cfg.batch_size, autocast_dtype=amp)
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_suffix(f".tmp-{os.getpid()}")
            tmp.write_text(json.dumps({"answers": answers, "loss": loss}), encoding="utf-8")
            tmp.replace(cache)
            return answers, loss

        if trained.kind == "adapter":
            # the base model is the same network with the adapter switched off (and, for QLoRA, as quantised)
            base = load_base(model.base_dir, model_cfg, device, for_training=False, precision=env.precision)
            net = PeftModel.from_pretrained(base, trained.output_dir).eval()
            with net.disable_adapter():
                base_out, base_loss = base_answers(net)
        else:
            if cache.is_file():
                base_out, base_loss = base_answers(None)
            else:
                net = AutoModelForCausalLM.from_pretrained(model.base_dir, dtype=torch.float32).to(device).eval()
                base_out, base_loss = base_answers(net)
            net = AutoModelForCausalLM.from_pretrained(trained.output_dir, dtype=torch.float32).to(device).eval()
        tuned_out = generate(net, tokenizer, convs, progress=progress("fine-tuned"), **scored)
        tuned_loss = answer_loss(net, tokenizer, convs, max_len=1024, batch_size=cfg.batch_size, autocast_dtype=amp)
        if champion:  # if this version becomes champion, the next run reads these
            from tunewright.registry.adapters import model_weights_digest, weights_digest

            digest = (weights_digest if trained.kind == "adapter" else model_weights_digest)(trained.output_dir)
            _write_cache(_base_cache_path(ctx, model, model_cfg, env, convs, scored, who={
                "champion": digest, "base": model.base_digest, "same_base": True}), tuned_out, tuned_loss)
        base_score, base_fields, base_hits = score(cfg.metric, base_out, refs)
        tuned_score, tuned_fields, tuned_hits = score(cfg.metric, tuned_out, refs)
        outs = {"base": base_out, "tuned": tuned_out}
        losses = {"base": base_loss, "tuned": tuned_loss}
        champ = _champion_answers(champion, cfg, model_cfg, model, env, ctx, tokenizer, convs, scored, device, amp,
                                  log) if champion and cfg.champion else None
        if champ is not None:
            outs["champion"], losses["champion"] = champ["answers"], champ["loss"]
        pref: dict[str, float] = {}
        start_score, start_out = None, []
        if any("chosen" in r for r in records):
            def accuracy(m, pairs=records) -> float:
                return preference.preference_accuracy(m, tokenizer, pairs, 1024, cfg.batch_size, amp)[0]

            pref["tuned"] = accuracy(net)
            if trained.kind == "adapter":
                with net.disable_adapter():
                    pref["base"] = accuracy(net)
            else:
                pref["base"] = accuracy(AutoModelForCausalLM.from_pretrained(model.base_dir, dtype=torch.float32)
                                        .to(device).eval())
        if trained.start_dir:
            if trained.kind == "adapter":
                net.load_adapter(trained.start_dir, adapter_name="start")
                net.set_adapter("start")
                start = net
            else:
                start = AutoModelForCausalLM.from_pretrained(trained.start_dir, dtype=torch.float32).to(device).eval()
            start_out = generate(start, tokenizer, convs, progress=progress("starting point"), **kwargs)
            start_score = score(cfg.metric, start_out, refs)[0]
            if pref:
                pref["start"] = accuracy(start)
                pref.update(_on_policy_accuracy(accuracy, test, start_out, net, start, trained, model, device, log))
        mean_reward: dict[str, float] = {}
        if trained.reward:
            fn = rewards.scorer(trained.reward, device)
            rewarded = {"base": base_out, "tuned": tuned_out} | ({"start": start_out} if trained.start_dir else {})
            mean_reward = {k: sum(fn([c[:-1] for c in convs], v, refs)) / len(refs) for k, v in rewarded.items()}
            log.info("mean %s reward of greedy answers to %d held-out prompts: %s", trained.reward, len(refs),
                     ", ".join(f"{k} {v:.3f}" for k, v in mean_reward.items()))
        if pref:
            log.info("held-out preference accuracy (chosen more likely than rejected) on %d pairs: %s",
                     sum("chosen" in r for r in records),
                     ", ".join(f"{k} {v:.1%}" for k, v in pref.items()))

        prompts = ["\n".join(m["content"] for m in c[:-1] if m["role"] == "user") for c in convs]
        scores, per_example = _score_models(cfg, outs, losses, refs, prompts, log)
        out = Path(ctx.work_dir, "evaluate")
        out.mkdir(parents=True, exist_ok=True)
        hits = {"base": base_hits, "tuned": tuned_hits}
        if champ is not None:
            hits["champion"] = score(cfg.metric, outs["champion"], refs)[2]
        rows = []
        for i, (r, ref) in enumerate(zip(test, refs)):
            row = {"id": r["id"], "prompt": prompts[i], "reference": ref}
            for who, answers in outs.items():
                row[who] = answers[i]
                row[f"{who}_correct"] = hits[who][i]
                row.update({f"{who}_{k}": v[i] for k, v in per_example[who].items()})
            rows.append(row)
        predictions = out / "predictions.jsonl"
        predictions.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        art = EvalArtifact(metric=cfg.metric, base_score=base_score, tuned_score=tuned_score, base_loss=base_loss,
                           tuned_loss=tuned_loss, n_examples=len(test), base_fields=base_fields,
                           tuned_fields=tuned_fields, predictions_path=str(predictions),
                           report_path=str(out / "evaluation.html"), start_score=start_score,
                           preference_accuracy=pref, mean_reward=mean_reward, scores=scores,
                           champion=champ["resolved"] if champ else None,
                           champion_note=champ["note"] if champ else ("no champion compared" if not champion else
                                                                      "evaluate.champion is off"))
        chart = _chart(scores, cfg.metric, list(tuned_fields))
        (out / "evaluation.png").write_bytes(chart)
        _report(Path(art.report_path), art, chart, rows)
        metrics = {f"{who}_{k}": v for who, figures in scores.items() for k, v in figures.items()}
        metrics["improvement"] = tuned_score - base_score
        metrics.update({f"{k}_preference_accuracy": v for k, v in pref.items()})
        metrics.update({f"{k}_mean_reward": v for k, v in mean_reward.items()})
        if start_score is not None:
            metrics[f"start_{cfg.metric}"] = start_score
        mlflow.log_metrics(metrics)
        for f in ("evaluation.html", "evaluation.png", "predictions.jsonl"):
            mlflow.log_artifact(str(out / f), "evaluation")
        _log_tables(rows, scores, art, ctx, log)
        log_to_parent(ctx, {k: metrics[k] for k in (f"base_{cfg.metric}", f"tuned_{cfg.metric}", "improvement",
                                                     "tuned_answer_loss")}
                      | {k: v for k, v in metrics.items()
                         if k.endswith(("preference_accuracy", "mean_reward")) or k.startswith(("start_", "champion_"))})
        log.info("%s on %d test examples: base %.1f%% -> fine-tuned %.1f%% (answer loss %.3f -> %.3f)%s",
                 cfg.metric, len(test), 100 * base_score, 100 * tuned_score, base_loss, tuned_loss,
                 f"; champion {art.champion} {100 * scores['champion'][cfg.metric]:.1f}%" if champ else "")
        return art


def _score_models(cfg: EvaluateConfig, outs: dict[str, list[str]], losses: dict[str, float], refs: list[str],
                  prompts: list[str], log) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, list]]]:
    """(model -> metric -> figure, model -> per-example values) for every model's answers to the same test set."""
    schema = json.loads(cfg.json_schema.read_text(encoding="utf-8")) if cfg.json_schema else None
    scores: dict[str, dict[str, float]] = {}
    per_example: dict[str, dict[str, list]] = {}
    for who, answers in outs.items():
        main, fields, _ = score(cfg.metric, answers, refs)
        text, text_rows = text_scores(cfg.metrics, answers, refs, label_field=cfg.label_field, schema=schema)
        safe, safe_rows = safety_scores(cfg.safety, answers, prompts, cfg.toxic_threshold)
        scores[who] = ({cfg.metric: main, "answer_loss": losses[who], "perplexity": perplexity(losses[who])}
                       | {f"field_{k}": v for k, v in fields.items()} | text | safe)
        per_example[who] = text_rows | safe_rows
    if cfg.judge.enabled:
        from tunewright.scoring.judge import judge

        means, grades, judge_model = judge(cfg.judge, prompts, refs, outs, log)
        for who in outs:
            scores[who]["judge_score"] = means[who]
            per_example[who]["judge_score"] = grades[who]
    for who, figures in scores.items():
        log.info("%s: %s", who, ", ".join(f"{k} {v:.3f}" for k, v in figures.items() if not k.startswith("field_")))
    return scores, per_example


def _log_tables(rows: list[dict], scores: dict[str, dict[str, float]], art: EvalArtifact, ctx: RunContext,
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


def _champion_answers(ref: str, cfg: EvaluateConfig, model_cfg: ModelConfig, model: ModelArtifact,
                      env: EnvironmentArtifact, ctx: RunContext, tokenizer, convs: list, gen: dict, device, amp,
                      log) -> dict | None:
    """The registry's current champion answering the same test conversations: {resolved, answers, loss, note}, or
    None when there is no champion yet or it cannot be compared (said in the log). An adapter or a full fine-tune;
    answers are cached by the champion's weights digest, like the base's."""
    import torch
    from peft import PeftModel

    from tunewright.registry.adapters import fetch, registered_base

    cache_dir = Path(ctx.state_dir, "registry_cache")
    try:
        src = fetch(ref, cache_dir, log, what="evaluate.champion", whole_ok=True)
    except ValueError as exc:
        log.info("no champion to compare with: %s", str(exc).splitlines()[0])
        return None
    same_base = src.base_digest == model.base_digest
    cache = _base_cache_path(ctx, model, model_cfg, env, convs, gen,
                             who={"champion": src.sha256, "base": src.base_digest, "same_base": same_base})
    note = f"{src.resolved} ({ref})"
    if cache.is_file():
        found = json.loads(cache.read_text(encoding="utf-8"))
        log.info("champion %s: answers for these %d test prompts read from %s", src.resolved, len(convs), cache.name)
        return {"resolved": src.resolved, "answers": found["answers"], "loss": found["loss"], "note": note}
    # a full fine-tune as it was saved; an adapter over our base as this run loads it when the champion was trained
    # over the same weights, else over its own
    if src.whole:
        from transformers import AutoModelForCausalLM

        base = None
        net = AutoModelForCausalLM.from_pretrained(src.local_dir, dtype=torch.float32).to(device).eval()
    else:
        if same_base:
            base = load_base(model.base_dir, model_cfg, device, for_training=False, precision=env.precision)
        else:
            from transformers import AutoModelForCausalLM

            base = AutoModelForCausalLM.from_pretrained(registered_base(src, cache_dir, log),
                                                        dtype=torch.float32).to(device)
        net = PeftModel.from_pretrained(base, src.local_dir).eval()
    answers = generate(net, tokenizer, convs, progress=lambda d, t: log.info("champion: generated %d/%d answers", d, t),
                       **gen)
    loss = answer_loss(net, tokenizer, convs, max_len=1024, batch_size=gen["batch_size"], autocast_dtype=amp)
    _write_cache(cache, answers, loss)
    del net, base
    return {"resolved": src.resolved, "answers": answers, "loss": loss, "note": note}


def _write_cache(cache: Path, answers: list[str], loss: float) -> None:
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(f".tmp-{os.getpid()}")
    tmp.write_text(json.dumps({"answers": answers, "loss": loss}), encoding="utf-8")
    tmp.replace(cache)


def _base_cache_path(ctx: RunContext, model: ModelArtifact, model_cfg: ModelConfig, env: EnvironmentArtifact,
                     convs: list, gen: dict, who: dict | None = None) -> Path:
    """Where the base model's answers to these test prompts are kept, named by everything they depend on: the base
    weights' digest and how they are loaded, the test conversations, the generation settings and the libraries."""
    import hashlib

    import torch
    import transformers

    key = json.dumps({"base": model.base_digest, "bits": model_cfg.load_bits(),
                      "quantization": model_cfg.quantization.model_dump(mode="json"), "device": env.device,
                      "precision": env.precision, "convs": convs, "max_new_tokens": gen["max_new_tokens"],
                      "batch_size": gen["batch_size"], "stop_after_json": gen["stop_after_json"],
                      "torch": torch.__version__, "transformers": transformers.__version__, "layout": 2}
                     | ({"who": who} if who else {}),
                     sort_keys=True, default=str)
    kind = "champion" if who else "base"
    return Path(ctx.state_dir, "eval_cache", f"{kind}-{hashlib.sha256(key.encode()).hexdigest()[:32]}.json")


def _on_policy_accuracy(accuracy, test: list[dict], start_out: list[str], net, start, trained: TrainArtifact,
                        model: ModelArtifact, device, log) -> dict[str, float]:
    """Held-out preference accuracy on the starting point's own mistakes: each pair's rejected answer replaced by the
    starting model's greedy answer wherever that is wrong (what `train.rejected: on_policy` trains on), for the
    base, the starting point and the aligned model. Empty when the starting point answered every pair right."""
    import torch
    from transformers import AutoModelForCausalLM

    pairs, changed = preference.with_own_mistakes(test, dict(enumerate(start_out)))
    if not changed:
        return {}
    out = {"start_on_policy": accuracy(start, pairs)}
    if trained.kind == "adapter":
        net.set_adapter("default")
        out["tuned_on_policy"] = accuracy(net, pairs)
        with net.disable_adapter():
            out["base_on_policy"] = accuracy(net, pairs)
    else:
        out["tuned_on_policy"] = accuracy(net, pairs)
        out["base_on_policy"] = accuracy(AutoModelForCausalLM.from_pretrained(model.base_dir, dtype=torch.float32)
                                         .to(device).eval(), pairs)
    log.info("held-out preference accuracy on the starting point's own mistakes (%d of %d pairs take its wrong answer "
             "as the rejected one): base %.1f%%, start %.1f%%, aligned %.1f%%", changed, len(pairs),
             100 * out["base_on_policy"], 100 * out["start_on_policy"], 100 * out["tuned_on_policy"])
    return out


def _reward_model_scores(cfg: EvaluateConfig, records: list[dict], model: ModelArtifact, trained: TrainArtifact,
                         env: EnvironmentArtifact, ctx: RunContext, device, amp, log) -> EvalArtifact:
    """A reward model on held-out pairs: the share it scores chosen above rejected (`preference_accuracy`), beside
    the base model's log-probabilities ranking the same pairs; the losses are the pairs' Bradley-Terry losses."""
    import math

    import mlflow
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    from tunewright.scoring.reward_model import RewardScorer

    pairs = [r for r in records if "chosen" in r]
    if not pairs:
        raise ValueError("a reward model is evaluated on held-out preference pairs; the test split has none")
    scorer = RewardScorer(model.base_dir, trained.output_dir, device, batch_size=cfg.batch_size)
    chosen, rejected = scorer.score_pairs(pairs)
    tokenizer = scorer.tokenizer
    del scorer
    base_net = AutoModelForCausalLM.from_pretrained(model.base_dir, dtype=torch.float32).to(device).eval()
    tokenizer_rows = preference.encode_rows("dpo", tokenizer, pairs, 1024)
    base_margin: list[float] = []
    with torch.no_grad(), torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
        for start in range(0, len(tokenizer_rows), cfg.batch_size):
            a, b, _, _ = preference.row_logps(base_net, tokenizer_rows[start:start + cfg.batch_size], "dpo",
                                              tokenizer.pad_token_id, Kernels().in_one_head_call())
            base_margin.extend((a - b).float().cpu().tolist())
    margin = [c - r for c, r in zip(chosen, rejected)]

    def bt(ms: list[float]) -> float:
        return float(-F.logsigmoid(torch.tensor(ms)).mean()) if ms else math.nan

    base_score = sum(m > 0 for m in base_margin) / len(pairs)
    tuned_score = sum(m > 0 for m in margin) / len(pairs)
    out = Path(ctx.work_dir, "evaluate")
    out.mkdir(parents=True, exist_ok=True)
    rows = [{"id": str(r["id"]), "prompt": "\n".join(m["content"] for m in r["prompt"] if m["role"] == "user"),
             "messages": r["prompt"], "reference": r["chosen"][-1]["content"],
             "rejected": r["rejected"][-1]["content"],
             "base": f"log-prob margin {bm:+.2f}", "tuned": f"chosen {c:+.3f}, rejected {rj:+.3f}",
             "chosen_score": c, "rejected_score": rj, "base_correct": bm > 0, "tuned_correct": c > rj}
            for r, bm, c, rj in zip(pairs, base_margin, chosen, rejected)]
    predictions = out / "predictions.jsonl"
    predictions.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    metric = "preference_accuracy"
    art = EvalArtifact(metric=metric, base_score=base_score, tuned_score=tuned_score, base_loss=bt(base_margin),
                       tuned_loss=bt(margin), n_examples=len(pairs), predictions_path=str(predictions),
                       report_path=str(out / "evaluation.html"),
                       preference_accuracy={"base": base_score, "tuned": tuned_score},
                       scores={"base": {metric: base_score, "answer_loss": bt(base_margin)},
                               "tuned": {metric: tuned_score, "answer_loss": bt(margin)}})
    chart = _chart(art.scores, metric, [])
    (out / "evaluation.png").write_bytes(chart)
    _report(Path(art.report_path), art, chart, rows)
    metrics = {f"base_{metric}": base_score, f"tuned_{metric}": tuned_score, "improvement": tuned_score - base_score,
               "base_pairwise_loss": art.base_loss, "tuned_pairwise_loss": art.tuned_loss,
               "tuned_reward_margin": sum(margin) / len(margin),
               "tuned_reward_chosen": sum(chosen) / len(chosen), "tuned_reward_rejected": sum(rejected) / len(rejected)}
    mlflow.log_metrics(metrics)
    for f in ("evaluation.html", "evaluation.png", "predictions.jsonl"):
        mlflow.log_artifact(str(out / f), "evaluation")
    log_to_parent(ctx, {k: metrics[k] for k in (f"base_{metric}", f"tuned_{metric}", "improvement",
                                                 "tuned_reward_margin")})
    log.info("reward model on %d held-out pairs: chosen scored above rejected %.1f%% (the base's log-probabilities: "
             "%.1f%%), mean margin %.3f", len(pairs), 100 * tuned_score, 100 * base_score, metrics["tuned_reward_margin"])
    return art


@task(name="5-summarise-folds")
def summarise_folds(folds: list[EvalArtifact], ctx: RunContext) -> dict:
    """Mean, spread and range of every model's figures across the folds of a cross-validation, on the parent run
    (`cv_<model>_<metric>_mean` / `_std`), as a JSON artifact and a Prefect table."""
    import statistics

    from mlflow import MlflowClient

    log = stage_logger()
    summary: dict[str, dict[str, dict[str, float]]] = {}
    for who in folds[0].scores:
        for metric in folds[0].scores[who]:
            values = [f.scores[who][metric] for f in folds if metric in f.scores.get(who, {})]
            summary.setdefault(who, {})[metric] = {
                "mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                "min": min(values), "max": max(values), "folds": len(values)}
    client = MlflowClient(ctx.tracking_uri)
    for who, figures in summary.items():
        for metric, stats in figures.items():
            client.log_metric(ctx.parent_run_id, f"cv_{who}_{metric}_mean", stats["mean"])
            client.log_metric(ctx.parent_run_id, f"cv_{who}_{metric}_std", stats["std"])
    client.log_dict(ctx.parent_run_id, {"folds": [f.scores for f in folds], "summary": summary},
                    "crossvalidation/summary.json")
    table = [{"metric": m} | {f"{who} mean": round(summary[who][m]["mean"], 4) for who in summary}
             | {f"{who} std": round(summary[who][m]["std"], 4) for who in summary} for m in summary["tuned"]]
    try:
        from prefect.artifacts import create_table_artifact

        create_table_artifact(table=table, key="crossvalidation",
                              description=f"{len(folds)}-fold cross-validation, MLflow run {ctx.parent_run_id}")
    except Exception as exc:  # outside a Prefect run there is nowhere to put it
        log.debug("no Prefect artifact: %s", exc)
    main = folds[0].metric
    log.info("%d-fold cross-validation: %s base %.3f ± %.3f -> fine-tuned %.3f ± %.3f", len(folds), main,
             summary["base"][main]["mean"], summary["base"][main]["std"], summary["tuned"][main]["mean"],
             summary["tuned"][main]["std"])
    return summary
