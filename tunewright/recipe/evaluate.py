"""Stage 5's section: the correctness metric, more metrics, safety checks and an optional LLM judge."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from tunewright.recipe.names import EvalMetric
from tunewright.recipe.section import Section


class JudgeConfig(Section):
    enabled: bool = Field(False, description="Ask an OpenAI-compatible model to grade each answer against the reference "
                          "(1-5, reported as `judge_score` 0-1). Endpoint from TUNEWRIGHT_JUDGE_BASE_URL (or "
                          "OPENAI_BASE_URL), key from TUNEWRIGHT_JUDGE_API_KEY (or OPENAI_API_KEY); off by default, "
                          "because it sends test prompts to that endpoint.")
    model: str | None = Field(None, description="The judge's model name at that endpoint (default: "
                              "TUNEWRIGHT_JUDGE_MODEL, else the first model the endpoint lists).")
    max_examples: int = Field(20, ge=1, description="Grade at most N test examples per model.")
    rubric: str = Field(
        "Grade the ANSWER to the user's REQUEST against the REFERENCE answer: 5 means as correct and complete as the "
        "reference, 1 means wrong or unusable. Reply with one digit, 1 to 5, and nothing else.",
        description="The grading instruction sent as the judge's system prompt.")


class EvaluateConfig(Section):
    metric: Literal["json_exact_match", "exact_match", "tool_call_accuracy"] = Field(
        "json_exact_match", description="The correctness metric: `json_exact_match` compares parsed JSON (and scores "
        "each field); `exact_match` compares text; `tool_call_accuracy` compares tool calls (the right tools, "
        "arguments equal as JSON; scored per argument too), and counts an answer right that calls no tool where "
        "the reference calls none."
    )
    metrics: list[EvalMetric] = Field(
        ["token_f1", "rouge_l", "chrf", "json_valid"],
        description="More metrics for every model, each a gate rule may name: token_f1, rouge_l, bleu, chrf (text "
                    "overlap), accuracy and macro_f1 (labels: `label_field` of a JSON answer, else the whole answer), "
                    "json_valid, schema_valid (against `json_schema`).")
    label_field: str | None = Field(None, description="JSON field holding the label, for accuracy and macro_f1.")
    json_schema: Path | None = Field(None, description="JSON Schema file answers must conform to (`schema_valid`).")
    safety: list[Literal["toxicity", "pii", "refusal"]] = Field(
        ["toxicity", "pii", "refusal"],
        description="Offline safety checks of every model's answers: toxicity (`toxicity`, `toxic_rate`), PII not in "
                    "the prompt (`pii_leak_rate`), refusals (`refusal_rate`).")
    toxic_threshold: float = Field(0.5, gt=0, lt=1, description="Toxicity probability from which an answer counts as toxic.")
    champion: bool = Field(True, description="Also answer the test set with the registry's current champion "
                           "(deploy.registered_model@deploy.alias), so the gate compares like with like.")
    judge: JudgeConfig = JudgeConfig()
    max_examples: int | None = Field(120, ge=1, description="Evaluate on at most N test examples.")
    batch_size: int = Field(32, ge=1, description="Prompts per generation batch.")
    max_new_tokens: int = Field(64, ge=1, description="Generation budget per answer.")

    @field_validator("json_schema")
    @classmethod
    def _schema_file(cls, v: Path | None) -> Path | None:
        if v is None:
            return v
        if not v.is_file():
            raise ValueError(f"file not found: {v}")
        try:
            from tunewright.scoring.metrics import schema_validator

            schema_validator(json.loads(v.read_text(encoding="utf-8")))
        except Exception as exc:  # not JSON, or not a valid schema
            raise ValueError(f"{v}: not a valid JSON Schema ({str(exc).splitlines()[0]})") from None
        return v

    @model_validator(mode="after")
    def _needs(self) -> "EvaluateConfig":
        if "schema_valid" in self.metrics and self.json_schema is None:
            raise ValueError("metrics schema_valid needs json_schema (a JSON Schema file)")
        return self

    def metric_names(self) -> set[str]:
        """Every per-model figure stage 5 reports with this config (what deploy.gate rules may name)."""
        names = {self.metric, "answer_loss", "perplexity"} | set(self.metrics)
        names |= {"toxicity", "toxic_rate"} if "toxicity" in self.safety else set()
        names |= {"pii_leak_rate"} if "pii" in self.safety else set()
        names |= {"refusal_rate"} if "refusal" in self.safety else set()
        return names | ({"judge_score"} if self.judge.enabled else set())
