"""Stage 6's section: the registered model, the promotion gate, approval, the exports checked before promotion, and
the canary that lets a new version meet live traffic before it takes all of it."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, Field

from tunewright.recipe.section import Section


def _gate_rules(rules: list[str]) -> list[str]:
    from tunewright.registry.promotion_rules import parse_rule

    for rule in rules:
        parse_rule(rule)
    return rules


class CanaryConfig(Section):
    """How a challenger meets live traffic before it becomes champion, and when the monitoring flow decides."""

    share: float = Field(0.1, gt=0, le=1, description="Share of the served alias's live traffic answered by "
                         "`challenger` (canary mode); in shadow mode every request is copied to it.")
    mode: Literal["canary", "shadow"] = Field("canary", description="canary: the challenger answers its share of the "
                                              "users; shadow: the champion answers every user and the challenger "
                                              "answers a copy off the user's path, logged with `shadow: true`.")
    min_requests: int = Field(50, ge=1, description="Answered-or-failed requests each arm needs before anything is "
                              "decided; with fewer the canary waits (it never promotes on too few).")
    min_minutes: float = Field(30, ge=0, description="Minutes the challenger must have held its alias before it may "
                               "be promoted.")
    max_error_rate_increase: float = Field(0.01, ge=0, le=1, description="Rolled back when its server-error rate is "
                                           "above the champion's by more than this.")
    max_p95_ratio: float = Field(1.5, ge=1, description="Rolled back when its p95 latency is above the champion's "
                                 "times this.")
    max_json_valid_drop: float = Field(0.05, ge=0, le=1, description="Rolled back when its share of answers that parse "
                                       "as JSON is below the champion's by more than this (only where the champion "
                                       "answers JSON at all).")
    max_toxicity_increase: float = Field(0.02, ge=0, le=1, description="Rolled back when its mean toxicity is above "
                                         "the champion's by more than this.")
    max_pii_leak_increase: float = Field(0.01, ge=0, le=1, description="Rolled back when its share of answers leaking "
                                         "personal data not in the prompt is above the champion's by more than this.")
    max_score_drop: float = Field(0.05, ge=0, le=1, description="Rolled back when its task score on labelled "
                                  "requests (`expected` in the log) is below the champion's by more than this.")


class DeployConfig(Section):
    registered_model: str = Field("tunewright-demo", description="MLflow registered model name.")
    alias: str = Field("champion", description="Alias moved to the new version when the gate passes.")
    min_improvement: float = Field(0.1, description="Promote only if fine-tuned beats base by at least this (metric units, 0-1).")
    min_score: float = Field(0.0, ge=0, le=1, description="Promote only if the fine-tuned score reaches this.")
    gate: Annotated[list[str], AfterValidator(_gate_rules)] = Field(
        [], description="More promotion rules, all of which must pass, e.g. `json_exact_match >= 0.6`, "
                        "`json_exact_match >= champion.json_exact_match + 0.02`, `toxic_rate <= base.toxic_rate`. A bare "
                        "metric is the candidate's; `base.` and `champion.` name the others (a rule naming the "
                        "champion passes while there is none).")
    approval: bool = Field(False, description="After the gate passes, pause the flow run until a person approves in the "
                           "Prefect UI (a form: approve, reviewer, comment); the alias moves only then. Needs a "
                           "Prefect server the reviewer can reach (PREFECT_API_URL).")
    approval_timeout: int = Field(3600, ge=1, description="Seconds to wait for approval; then the champion stays as it was.")
    verify_samples: int = Field(3, ge=0, description="Test prompts answered by the registered model in a fresh process before promotion.")
    exports: list[Literal["merged", "int8"]] = Field(
        [], description="Deployment exports logged with the version (adapter runs): `merged` (adapter folded into the "
                        "base, safetensors) and `int8` (the merged model in bitsandbytes 8-bit). Each must answer "
                        "test prompts as the adapter does, at least as often as the floors below.")
    export_prompts: int = Field(20, ge=1, description="Test prompts each export answers beside the adapter.")
    merged_min_agreement: float = Field(0.95, ge=0, le=1, description="Share of those the merged export must answer "
                                        "exactly as the adapter (folding in the adapter changes rounding only).")
    int8_min_agreement: float = Field(0.6, ge=0, le=1, description="Share the 8-bit export must answer exactly as "
                                      "the adapter (8-bit weights change some near-tied answers).")
    canary: CanaryConfig | None = Field(None, description="When set, a version that passes the gate becomes "
                                        "`challenger` and meets a share of live traffic (or a shadow copy of it); "
                                        "the monitoring flow promotes it or rolls it back on what it served.")
