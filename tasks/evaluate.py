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
import os
from pathlib import Path

from prefect import task
from tunewright.logs import stage_logger

from tasks.artifacts import DataArtifact, EnvironmentArtifact, EvalArtifact, ModelArtifact, TrainArtifact
from tunewright import preference, rewards
from tunewright.chat import answer_loss, autocast_dtype, generate
from tunewright.methods import load_base
from tunewright.metrics import score
from tunewright.seeding import seed_everything
from tunewright.splits import read_split
from tunewright.recipe import EvaluateConfig, ModelConfig
from tunewright.tracking import RunContext, log_to_parent, stage_run


def _chart(base: dict, tuned: dict, base_score: float, tuned_score: float, metric: str) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [metric] + [f"field: {k}" for k in tuned]
    b = [base_score] + [base.get(k, 0) for k in tuned]
    t = [tuned_score] + [tuned[k] for k in tuned]
    fig, ax = plt.subplots(figsize=(7, 3.2))
    xs = range(len(labels))
    ax.bar([x - 0.2 for x in xs], b, width=0.4, label="base", color="#9aa5b1")
    ax.bar([x + 0.2 for x in xs], t, width=0.4, label="fine-tuned", color="#2f7ed8")
    ax.set_xticks(list(xs), labels, rotation=20, ha="right", fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("accuracy")
    ax.legend(loc="upper left", fontsize=8)
    ax.set_title("Held-out split: base vs fine-tuned")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def _report(path: Path, art: EvalArtifact, chart_png: bytes, rows: list[dict]) -> None:
    def cell(text: str, ok: bool) -> str:
        return f"<td class='{'ok' if ok else 'bad'}'><code>{html.escape(text)}</code></td>"

    body = "".join(
        f"<tr><td>{html.escape(r['id'])}</td><td>{html.escape(r['prompt'])}</td><td><code>{html.escape(r['reference'])}</code></td>"
        f"{cell(r['base'], r['base_correct'])}{cell(r['tuned'], r['tuned_correct'])}</tr>"
        for r in rows[:100]
    )
    fields = "".join(f"<tr><td>{html.escape(k)}</td><td>{art.base_fields.get(k, 0):.1%}</td><td>{v:.1%}</td></tr>"
                     for k, v in art.tuned_fields.items())
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
<table><tr><th></th><th>base</th><th>fine-tuned</th></tr>
<tr><td>{art.metric}</td><td>{art.base_score:.1%}</td><td>{art.tuned_score:.1%}</td></tr>
<tr><td>answer loss</td><td>{art.base_loss:.4f}</td><td>{art.tuned_loss:.4f}</td></tr>{fields}{extra}</table>
<p><img src="data:image/png;base64,{base64.b64encode(chart_png).decode()}"></p>
<h2>Predictions (first 100)</h2><table><tr><th>id</th><th>prompt</th><th>reference</th><th>base</th><th>fine-tuned</th></tr>{body}</table>
</body></html>""", encoding="utf-8")


@task(name="5-evaluate")
def evaluate(cfg: EvaluateConfig, model_cfg: ModelConfig, data: DataArtifact, model: ModelArtifact,
             trained: TrainArtifact, env: EnvironmentArtifact, ctx: RunContext) -> EvalArtifact:
    """Score base and fine-tuned models on the test split; write a report with both side by side."""
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
        base_score, base_fields, base_hits = score(cfg.metric, base_out, refs)
        tuned_score, tuned_fields, tuned_hits = score(cfg.metric, tuned_out, refs)
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
            outs = {"base": base_out, "tuned": tuned_out} | ({"start": start_out} if trained.start_dir else {})
            mean_reward = {k: sum(fn([c[:-1] for c in convs], v, refs)) / len(refs) for k, v in outs.items()}
            log.info("mean %s reward of greedy answers to %d held-out prompts: %s", trained.reward, len(refs),
                     ", ".join(f"{k} {v:.3f}" for k, v in mean_reward.items()))
        if pref:
            log.info("held-out preference accuracy (chosen more likely than rejected) on %d pairs: %s",
                     sum("chosen" in r for r in records),
                     ", ".join(f"{k} {v:.1%}" for k, v in pref.items()))

        out = Path(ctx.work_dir, "evaluate")
        out.mkdir(parents=True, exist_ok=True)
        rows = [{"id": r["id"], "prompt": "\n".join(m["content"] for m in c[:-1] if m["role"] == "user"),
                 "reference": ref, "base": b, "tuned": t, "base_correct": bh, "tuned_correct": th}
                for r, c, ref, b, t, bh, th in zip(test, convs, refs, base_out, tuned_out, base_hits, tuned_hits)]
        predictions = out / "predictions.jsonl"
        predictions.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        art = EvalArtifact(metric=cfg.metric, base_score=base_score, tuned_score=tuned_score, base_loss=base_loss,
                           tuned_loss=tuned_loss, n_examples=len(test), base_fields=base_fields,
                           tuned_fields=tuned_fields, predictions_path=str(predictions),
                           report_path=str(out / "evaluation.html"), start_score=start_score,
                           preference_accuracy=pref, mean_reward=mean_reward)
        chart = _chart(base_fields, tuned_fields, base_score, tuned_score, cfg.metric)
        (out / "evaluation.png").write_bytes(chart)
        _report(Path(art.report_path), art, chart, rows)
        metrics = {f"base_{cfg.metric}": base_score, f"tuned_{cfg.metric}": tuned_score,
                   "base_answer_loss": base_loss, "tuned_answer_loss": tuned_loss,
                   "improvement": tuned_score - base_score}
        metrics.update({f"tuned_field_{k}": v for k, v in tuned_fields.items()})
        metrics.update({f"base_field_{k}": v for k, v in base_fields.items()})
        metrics.update({f"{k}_preference_accuracy": v for k, v in pref.items()})
        metrics.update({f"{k}_mean_reward": v for k, v in mean_reward.items()})
        if start_score is not None:
            metrics[f"start_{cfg.metric}"] = start_score
        mlflow.log_metrics(metrics)
        for f in ("evaluation.html", "evaluation.png", "predictions.jsonl"):
            mlflow.log_artifact(str(out / f), "evaluation")
        log_to_parent(ctx, {k: metrics[k] for k in (f"base_{cfg.metric}", f"tuned_{cfg.metric}", "improvement",
                                                     "tuned_answer_loss")}
                      | {k: v for k, v in metrics.items()
                         if k.endswith(("preference_accuracy", "mean_reward")) or k.startswith("start_")})
        log.info("%s on %d test examples: base %.1f%% -> fine-tuned %.1f%% (answer loss %.3f -> %.3f)",
                 cfg.metric, len(test), 100 * base_score, 100 * tuned_score, base_loss, tuned_loss)
        return art


def _base_cache_path(ctx: RunContext, model: ModelArtifact, model_cfg: ModelConfig, env: EnvironmentArtifact,
                     convs: list, gen: dict) -> Path:
    """Where the base model's answers to these test prompts are kept, named by everything they depend on: the base
    weights' digest and how they are loaded, the test conversations, the generation settings and the libraries."""
    import hashlib

    import torch
    import transformers

    key = json.dumps({"base": model.base_digest, "bits": model_cfg.load_bits(),
                      "quantization": model_cfg.quantization.model_dump(mode="json"), "device": env.device,
                      "precision": env.precision, "convs": convs, "max_new_tokens": gen["max_new_tokens"],
                      "batch_size": gen["batch_size"], "stop_after_json": gen["stop_after_json"],
                      "torch": torch.__version__, "transformers": transformers.__version__, "layout": 2},
                     sort_keys=True, default=str)
    return Path(ctx.state_dir, "eval_cache", f"base-{hashlib.sha256(key.encode()).hexdigest()[:32]}.json")


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

    from tunewright.reward_model import RewardScorer

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
                                              tokenizer.pad_token_id, logit_chunk=0)
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
                       preference_accuracy={"base": base_score, "tuned": tuned_score})
    chart = _chart({}, {}, base_score, tuned_score, "chosen scored above rejected")
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
