"""Stage 7's section: drift against the training prompts, service levels of served traffic, and the retrain trigger."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, field_validator

from tunewright.recipe.section import Section


class MonitorConfig(Section):
    production_path: Path | None = Field(None, description="JSONL of production requests (`prompt` or `messages`) compared with the training prompts in stage 7's baseline report (it emits no event).")
    drift_share: float = Field(0.5, gt=0, le=1, description="Share of drifted columns that counts as dataset drift.")
    request_log: str | None = Field(None, description="Where `tunewright serve --request-log` writes: a .jsonl file, a folder of rotated files or s3://bucket/prefix; the monitoring flow reads its windows.")
    window_minutes: int = Field(60, ge=1, description="Length of the window of served traffic one monitoring run reads.")
    min_requests: int = Field(20, ge=1, description="A window with fewer answered requests is too quiet to judge: it emits nothing.")
    slo_p95_seconds: float = Field(2.0, gt=0, description="Service level: 95th percentile latency of answered requests.")
    slo_error_rate: float = Field(0.001, ge=0, le=1, description="Service level: share of requests that failed on the server (5xx).")
    cooldown_minutes: int = Field(360, ge=0, description="After an event, no other for the same model for this long (one retrain at a time, not a loop).")
    label_command: str | None = Field(None, description="A labelling job run on a drifted window before its event is sent, so the retrain finds labels: a command with {window} (the exported requests), {labelled} (where it writes training-format records) and {python}, run in the working folder (the repository for the CLI and the workers). Without one, a person writes the labelled file and starts the retrain again.")

    @field_validator("label_command")
    @classmethod
    def _placeholders(cls, v: str | None) -> str | None:
        import string

        if v is not None:
            names = {name for _, name, _, _ in string.Formatter().parse(v) if name is not None}
            unknown = names - {"python", "window", "labelled"}
            if unknown:
                raise ValueError(f"unknown placeholder {{{sorted(unknown)[0]}}}: use {{window}}, {{labelled}} and {{python}}")
            if "labelled" not in names:
                raise ValueError("the command must write {labelled}")
        return v

    @field_validator("production_path")
    @classmethod
    def _exists(cls, v: Path | None) -> Path | None:
        if v is not None and not v.is_file():
            raise ValueError(f"file not found: {v}")
        return v
