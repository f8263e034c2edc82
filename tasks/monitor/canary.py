"""The canary decision: the champion and the challenger compared on the same span of served traffic, and the
challenger promoted or rolled back, once per canary.

`tunewright serve` sends a share of a served alias's traffic to `challenger` (canary mode) or copies every request
to it off the user's path (shadow mode, logged with `shadow: true`); the request log says which version answered.
Over the traffic since the challenger took its alias, each arm's figures are computed (requests, server-error rate,
p95 latency, the share of answers that parse as JSON, toxicity, PII leaks, and the task's score on requests a
labelling job has labelled) and `decide` says:

- `rollback` at once when the challenger did not pass its promotion gate: a canary promotes only a version that did
  (a person may still promote it by hand, `tunewright promote --force`);
- `wait` while either arm has fewer than `min_requests`: nothing is decided on too few requests;
- `rollback` when the challenger is worse than the champion by more than a margin on any figure: the `challenger`
  alias is removed, so the served alias's traffic all goes back to the champion;
- `wait` while the challenger has held its alias for less than `min_minutes`;
- `promote` otherwise: `champion` moves to the challenger's version and the `challenger` alias is removed.

A decision is made once per canary, keyed on (model, champion version, challenger version): it is recorded as tags
on both versions (`tunewright.canary.*`) before anything else could decide again, and announced with a Prefect
event (`tunewright.canary.promoted` or `tunewright.canary.rolled-back`).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from prefect import task

from tunewright.logs import stage_logger, transient_io_error
from tunewright.recipe import CanaryConfig
from tunewright.registry.tracking import RunContext, stage_run

PROMOTED_EVENT = "tunewright.canary.promoted"
ROLLED_BACK_EVENT = "tunewright.canary.rolled-back"
EVENTS = {"promote": PROMOTED_EVENT, "rollback": ROLLED_BACK_EVENT}


@dataclass(frozen=True)
class CanaryVerdict:
    key: str                 # model:champion->challenger: one decision at most per key
    decision: str            # promote, rollback, wait, decided (earlier), or none (no canary running)
    reasons: tuple[str, ...]
    champion: str | None
    challenger: str | None
    figures_path: str = ""
    emitted: bool = False


def split_arms(records: list[dict], champion: str, challenger: str) -> tuple[list[dict], list[dict]]:
    """The champion's records (answers users got from it) and the challenger's (its canary share, or its shadow
    answers); records of other versions, and refusals no version answered, are in neither."""
    champ = [r for r in records if str(r.get("version")) == champion and not r.get("shadow")]
    chall = [r for r in records if str(r.get("version")) == challenger]
    return champ, chall


def arm_figures(records: list[dict], labels: dict[str, str] | None = None, metric: str = "json_exact_match") -> dict:
    """One arm's figures: requests, server errors and latency (as the monitoring window's), and over its answered
    requests the share of answers that parse as JSON, the mean toxicity, the share leaking personal data the prompt
    did not hold, and the task's `metric` on requests whose user text has a label."""
    from tasks.monitor.traffic import request_prompt, service_figures
    from tunewright.scoring.metrics import json_valid, score
    from tunewright.scoring.safety import pii_leaks, toxicity

    figures = service_figures(records)
    answered = [r for r in records if r.get("status") == 200]
    answers = [str(r.get("answer") or "") for r in answered]
    prompts = [request_prompt(r) or "" for r in answered]
    if answers:
        figures.update(json_valid=sum(json_valid(a) for a in answers) / len(answers),
                       toxicity=sum(toxicity(answers)) / len(answers),
                       pii_leak_rate=sum(k > 0 for k in pii_leaks(answers, prompts)) / len(answers))
    labelled = [(a, labels[p]) for a, p in zip(answers, prompts) if labels and p in labels]
    if labelled:
        figures.update(score=score(metric, [a for a, _ in labelled], [ref for _, ref in labelled])[0],
                       labelled=len(labelled))
    return figures


def decide(cfg: CanaryConfig, champ: dict, chall: dict, held_minutes: float,
           gate: str = "passed") -> tuple[str, list[str]]:
    """(promote | rollback | wait, reasons) from the two arms' figures, how long the challenger has held its alias
    and its gate result; see the module docstring for the order of the rules."""
    if gate != "passed":
        return "rollback", [f"the challenger did not pass its promotion gate ({gate or 'no gate result'}): a canary "
                            "promotes only a version that did"]
    few = [f"{arm} answered {figs['requests']} requests, fewer than deploy.canary.min_requests {cfg.min_requests}"
           for arm, figs in (("the champion", champ), ("the challenger", chall)) if figs["requests"] < cfg.min_requests]
    if few:
        return "wait", few
    worse = []
    if chall["error_rate"] > champ["error_rate"] + cfg.max_error_rate_increase:
        worse.append(f"error rate {chall['error_rate']:.2%} against the champion's {champ['error_rate']:.2%} "
                     f"(deploy.canary.max_error_rate_increase {cfg.max_error_rate_increase})")
    if champ["p95_seconds"] and chall["p95_seconds"] > champ["p95_seconds"] * cfg.max_p95_ratio:
        worse.append(f"p95 latency {chall['p95_seconds']:.2f} s against the champion's {champ['p95_seconds']:.2f} s "
                     f"(deploy.canary.max_p95_ratio {cfg.max_p95_ratio})")
    for key, what, field, higher_is_worse in (
            ("json_valid", "valid JSON answers", "max_json_valid_drop", False),
            ("toxicity", "mean toxicity", "max_toxicity_increase", True),
            ("pii_leak_rate", "answers leaking personal data", "max_pii_leak_increase", True),
            ("score", "task score on labelled requests", "max_score_drop", False)):
        if key not in champ or key not in chall:
            continue
        margin = getattr(cfg, field)
        gap = chall[key] - champ[key] if higher_is_worse else champ[key] - chall[key]
        if gap > margin:
            worse.append(f"{what} {chall[key]:.2%} against the champion's {champ[key]:.2%} "
                         f"(deploy.canary.{field} {margin})")
    if worse:
        return "rollback", worse
    if held_minutes < cfg.min_minutes:
        return "wait", [f"the challenger has held its alias {held_minutes:.0f} min, less than "
                        f"deploy.canary.min_minutes {cfg.min_minutes:g}"]
    return "promote", [f"no worse than the champion over {chall['requests']} requests and {held_minutes:.0f} min"]


def canary_config(recipe_cfg: CanaryConfig | None, registered_model: str, client) -> CanaryConfig | None:
    """The canary settings the decision uses: the recipe's `deploy.canary`, else (for a canary started with
    `tunewright canary NAME`) the defaults with the registered model's share and mode; None when neither is set."""
    from tunewright.registry.canary import canary_setting

    setting = canary_setting(registered_model, client)
    if recipe_cfg is None:
        return CanaryConfig(**setting) if setting else None
    return recipe_cfg.model_copy(update=setting) if setting else recipe_cfg


@task(name="7-decide-canary", retries=2, retry_delay_seconds=10, retry_condition_fn=transient_io_error)
def decide_canary(cfg: CanaryConfig | None, registered_model: str, source: str | None, window_end: float | None,
                  ctx: RunContext, *, labelled_export: str = "", metric: str = "json_exact_match") -> CanaryVerdict:
    """Compare the champion and the challenger on the traffic since the challenger took its alias (up to
    `window_end`, default now) and promote it, roll it back or wait; at most one decision per canary."""
    from mlflow import MlflowClient

    from tasks.monitor.traffic import read_window
    from tunewright.registry.aliases import alias_holder

    log = stage_logger()
    client = MlflowClient(ctx.tracking_uri)
    cfg = canary_config(cfg, registered_model, client)
    champion = alias_holder(registered_model, "champion", client)
    challenger = alias_holder(registered_model, "challenger", client)
    key = f"{registered_model}:{champion}->{challenger}"
    if cfg is None or champion is None or challenger is None or champion == challenger:
        why = ("no canary is set (deploy.canary or `tunewright canary`)" if cfg is None else
               f"no canary running: champion {champion}, challenger {challenger}")
        log.info("canary of %s: %s", registered_model, why)
        return CanaryVerdict(key, "none", (why,), champion, challenger)
    version = client.get_model_version(registered_model, challenger)
    done = version.tags or {}
    if done.get("tunewright.canary.key") == key and done.get("tunewright.canary.decision"):
        why = f"decided already: {done['tunewright.canary.decision']} at {done.get('tunewright.canary.at', '?')}"
        log.info("canary %s: %s", key, why)
        return CanaryVerdict(key, "decided", (why,), champion, challenger)
    if not source:
        raise ValueError("monitor.request_log: name where `tunewright serve --request-log` writes, to decide the "
                         f"canary of {registered_model}")
    with stage_run(ctx, "7-decide-canary"):
        started = _held_since(version)
        end = window_end if window_end is not None else time.time()
        records = [r for r in read_window(source, started, end) if r.get("registered_model") in (registered_model, None)]
        labels = _labels(labelled_export)
        arms = {role: arm_figures(recs, labels, metric)
                for role, recs in zip(("champion", "challenger"), split_arms(records, champion, challenger))}
        gate = "passed" if done.get("tunewright.gate") == "passed" else done.get("tunewright.promotion", "")
        decision, reasons = decide(cfg, arms["champion"], arms["challenger"], (end - started) / 60, gate)
        figures = {"key": key, "mode": cfg.mode, "share": cfg.share, "decision": decision, "reasons": reasons,
                   "since": started, "until": end, "champion": {"version": champion, **arms["champion"]},
                   "challenger": {"version": challenger, **arms["challenger"]}}
        out = Path(ctx.work_dir, "canary")
        out.mkdir(parents=True, exist_ok=True)
        (out / "canary.json").write_text(json.dumps(figures, indent=2, default=str))
        _log_arms(arms, out)
        if decision == "wait":
            log.info("canary %s: waiting: %s", key, "; ".join(reasons))
            return CanaryVerdict(key, decision, tuple(reasons), champion, challenger, str(out / "canary.json"))
        _act(decision, registered_model, champion, challenger, reasons, client)
        _record(figures, registered_model, champion, challenger, client, ctx)
        _emit(figures, registered_model, ctx)
        log.warning("canary %s: %s: %s", key, decision, "; ".join(reasons))
        return CanaryVerdict(key, decision, tuple(reasons), champion, challenger, str(out / "canary.json"), True)


def _held_since(mv) -> float:
    """When the model version `mv` took the `challenger` alias (its recorded move), else when it was registered."""
    from datetime import datetime, timezone

    at = (mv.tags or {}).get("tunewright.challenger.at")
    if at:
        return datetime.strptime(at, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc).timestamp()
    return mv.creation_timestamp / 1000


def _labels(labelled_export: str) -> dict[str, str]:
    """User text -> the labelled answer, from a labelling job's export in the training format (`messages` ending
    with the assistant's answer); empty when nothing is labelled."""
    from tasks.monitor.traffic import user_text

    path = Path(labelled_export) if labelled_export else None
    if path is None or not path.is_file():
        return {}
    labels = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            rec = json.loads(line)
            messages = rec.get("messages") or []
            if messages and messages[-1].get("role") == "assistant":
                labels[user_text(messages)] = str(messages[-1].get("content") or "")
    return labels


def _act(decision: str, name: str, champion: str, challenger: str, reasons: list[str], client) -> None:
    """Promote: `champion` to the challenger's version; either way the `challenger` alias is removed, so the served
    alias's traffic goes to the champion alone."""
    from tunewright.registry.aliases import promote, retire_alias

    why = "; ".join(reasons)
    if decision == "promote":
        promote(name, challenger, "champion", reason=f"canary against version {champion}: {why}",
                by="tunewright canary", client=client)
    retire_alias(name, "challenger", reason=f"canary {decision}: {why}", by="tunewright canary",
                 action=f"canary-{decision}", client=client)


def _record(figures: dict, name: str, champion: str, challenger: str, client, ctx: RunContext) -> None:
    """The decision and its figures as tags on both versions and on the monitoring run; the challenger's `key` tag
    is what keeps a later run from deciding this canary again."""
    at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    text = json.dumps({k: figures[k] for k in ("champion", "challenger", "since", "until")}, default=str)
    for version, role in ((champion, "champion"), (challenger, "challenger")):
        for key, value in (("decision", figures["decision"]), ("reasons", "; ".join(figures["reasons"])),
                           ("figures", text), ("at", at), ("role", role), ("mode", figures["mode"]),
                           ("key", figures["key"])):
            client.set_model_version_tag(name, version, f"tunewright.canary.{key}", value[:4900])
    client.set_tag(ctx.parent_run_id, "tunewright.canary.key", figures["key"])
    client.set_tag(ctx.parent_run_id, "tunewright.canary.decision", figures["decision"])


def _emit(figures: dict, name: str, ctx: RunContext) -> None:
    """The decision's Prefect event, its id from the canary's key (a retried run sends the same event)."""
    import uuid

    from prefect.events import emit_event

    emit_event(event=EVENTS[figures["decision"]], id=uuid.uuid5(uuid.NAMESPACE_URL, f"tunewright:canary:{figures['key']}"),
               resource={"prefect.resource.id": f"tunewright.model.{name}", "prefect.resource.name": name},
               payload={**figures, "mlflow_run_id": ctx.parent_run_id})


def _log_arms(arms: dict, out: Path) -> None:
    """Both arms' figures to the stage's MLflow run, and the decision's file as an artifact."""
    import mlflow

    mlflow.log_metrics({f"canary_{role}_{k}": float(v) for role, figs in arms.items() for k, v in figs.items()})
    mlflow.log_artifact(str(out / "canary.json"), "monitor")
