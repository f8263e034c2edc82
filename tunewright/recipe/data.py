"""Stage 1's section: the sources, cleaning, balancing, splits and the data gate."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from tunewright.recipe.names import PII_KINDS, DataFormat, PiiKind
from tunewright.recipe.section import Section


class SplitConfig(Section):
    val_fraction: float = Field(0.05, ge=0, lt=0.5, description="Share of examples held out for validation loss.")
    test_fraction: float = Field(0.1, gt=0, lt=0.5, description="Share of examples held out for the final evaluation.")
    seed: int = Field(0, description="Salt of the hash that assigns examples to splits; same seed, same split.")



class SourceConfig(Section):
    path: str = Field(description="A JSONL, JSON, CSV/TSV or Parquet file, a `datasets` folder written by `save_to_disk`, "
                      "a folder of such files, or `s3://bucket/prefix` (endpoint and credentials from the AWS environment).")
    format: DataFormat = Field(
        "auto", description="Record format; `auto` detects it from the fields and refuses a source that mixes formats.")
    columns: dict[str, str] = Field(
        {}, description="Rename source fields before detection, e.g. `{question: prompt, answer: response}`.")
    weight: float | None = Field(
        None, gt=0, description="Share of the mixed dataset this source provides, relative to the other weighted sources.")
    max_rows: int | None = Field(None, ge=1, description="Take at most N rows of this source (chosen by content hash, not order).")
    name: str | None = Field(None, description="Name in reports and MLflow (default: the file or prefix name).")

    @field_validator("path")
    @classmethod
    def _exists(cls, v: str) -> str:
        if not v.startswith("s3://") and not Path(v).expanduser().exists():
            raise ValueError(f"file or folder not found: {v}")
        return v

    def label(self) -> str:
        return self.name or Path(self.path.rstrip("/")).name or self.path


class CleanConfig(Section):
    fix_unicode: bool = Field(True, description="Repair mojibake and normalise Unicode to NFC (ftfy).")
    strip_control: bool = Field(True, description="Remove control and zero-width characters (newlines and tabs stay).")
    normalize_whitespace: bool = Field(True, description="Trim turns, collapse runs of spaces and of more than two newlines.")
    strip_html: bool = Field(False, description="Remove HTML tags and decode entities.")
    dedupe: bool = Field(True, description="Drop exact duplicates (same content after case and whitespace folding).")
    near_dedupe: bool = Field(True, description="Drop near-duplicates with MinHash LSH over the non-system turns.")
    near_dedupe_threshold: float = Field(0.7, gt=0, le=1, description="Estimated Jaccard similarity of word 3-gram shingles at which two rows are near-duplicates.")
    tokenizer: str | None = Field(None, description="Base whose tokenizer counts tokens for the length filter (default: the recipe's model.base).")
    min_tokens: int | None = Field(None, ge=1, description="Quarantine examples shorter than this many tokens (chat template included).")
    max_tokens: int | None = Field(None, ge=1, description="Quarantine examples longer than this many tokens (the model's context for training).")
    redact_pii: list[PiiKind] = Field(
        list(PII_KINDS), description="PII kinds replaced by typed placeholders such as `[EMAIL]` (cards Luhn-checked, IBANs mod-97-checked).")
    pii_patterns: dict[str, str] = Field(
        {}, description="Extra PII: placeholder kind -> regular expression, e.g. `{employee_id: 'EMP-\\d{6}'}` gives `[EMPLOYEE_ID]`.")
    redact_secrets: bool = Field(
        True, description="Replace credentials with typed placeholders such as `[AWS_ACCESS_KEY]`, `[PRIVATE_KEY]` (the whole block), `[GITHUB_TOKEN]`, `[PASSWORD]`: detect-secrets' known-format detectors plus keyword assignments; high-entropy strings alone are not secrets.")
    secret_patterns: dict[str, str] = Field(
        {}, description="Extra secrets: placeholder kind -> regular expression, e.g. `{internal_token: 'itk_[A-Za-z0-9]{32}'}` gives `[INTERNAL_TOKEN]`.")

    @field_validator("pii_patterns", "secret_patterns")
    @classmethod
    def _patterns(cls, v: dict[str, str]) -> dict[str, str]:
        for name, pattern in v.items():
            if not re.fullmatch(r"[A-Za-z_]+", name):
                raise ValueError(f"{name!r}: a placeholder kind is letters and underscores "
                                 f"(it becomes [{name.upper()}])")
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"{name}: {pattern!r} is not a regular expression: {exc}") from None
        return v

    replacements: dict[str, str] = Field(
        {}, description="Domain normalisation: whole-word term -> replacement, e.g. `{MI: myocardial infarction}`. "
        "Matching is case-sensitive unless `replacements_ignore_case`.")
    replacements_ignore_case: bool = Field(False, description="Match `replacements` terms in any case.")
    tool_turns: Literal["keep", "reject"] = Field("reject", description="Chat rows with `tool` turns or tool calls: keep them (with the row's `tools`; a call to an undeclared tool, arguments off its schema or a tool turn answering no call quarantines the row), or quarantine the row.")
    contamination: Literal["remove", "report", "fail"] = Field(
        "remove", description="Validation and test examples made largely of training text: quarantine them, only report them, or fail the gate.")
    contamination_ngram: int = Field(8, ge=3, description="Word n-gram length of the train/test overlap check.")
    contamination_threshold: float = Field(
        0.5, gt=0, le=1, description="Share of an example's word n-grams found in training at which it counts as seen in training.")
    min_score_margin: float | None = Field(
        None, ge=0, allow_inf_nan=False, description="Preference pairs only: quarantine pairs whose chosen score is less than "
        "this above the rejected one (`score_chosen`/`score_rejected`, or `chosen_rating`/`rejected_rating`, "
        "`chosen_score`/`rejected_score`); pairs without scores are kept and counted as `no_scores`.")


class BalanceConfig(Section):
    label_field: str | None = Field(
        None, description="The label: a JSON field of the answer (e.g. `category`); labelled-text and KTO data use their own label.")
    strategy: Literal["none", "oversample", "undersample"] = Field(
        "none", description="Resample the training split so every class reaches `target_ratio` of the largest (oversample) or the smallest is not outnumbered more than 1/target_ratio (undersample).")
    target_ratio: float = Field(1.0, gt=0, le=1, description="Smallest class size over the largest after balancing.")
    augment_to: int = Field(0, ge=0, description="Augmented copies are added to training classes with fewer rows than this (0: off).")
    augment_method: Literal["synonyms", "paraphrase"] = Field(
        "synonyms", description="How copies are made: `synonyms` (Moby thesaurus, ships with the package) or `paraphrase` (the user turns rewritten by `paraphrase_model`).")
    augment_rate: float = Field(0.15, gt=0, le=1, description="Share of eligible words replaced by a synonym in an augmented copy.")
    paraphrase_model: str | None = Field(
        None, description="Causal LM that rewrites user turns when augment_method is `paraphrase`: a local model folder, a .gguf file, or `smollm2-135m-instruct` (nothing is downloaded).")
    paraphrase_max_new_tokens: int = Field(128, ge=8, description="Longest rewrite the paraphrase model may generate.")
    paraphrase_temperature: float = Field(0.7, ge=0, le=2, description="Sampling temperature of the paraphrase model (0: greedy).")
    kfolds: int = Field(0, ge=0, description="Assign every kept example a fold 0..k-1 (by content hash, stratified by label) for cross-validation.")

    @field_validator("kfolds")
    @classmethod
    def _folds(cls, v: int) -> int:
        if v == 1:
            raise ValueError("k-fold needs at least 2 folds (0 turns it off)")
        return v

    @model_validator(mode="after")
    def _paraphrase_needs_a_model(self) -> "BalanceConfig":
        if self.augment_method == "paraphrase" and not self.paraphrase_model:
            raise ValueError("augment_method: paraphrase needs paraphrase_model (a local model folder, a .gguf file "
                             "or smollm2-135m-instruct); models are never downloaded")
        return self


class GateConfig(Section):
    min_rows: int = Field(50, ge=1, description="Fewest examples that must remain after cleaning and the gate.")
    max_prompt_chars: int = Field(8000, ge=1, description="Longest prompt (all non-assistant turns) allowed.")
    max_response_chars: int = Field(4000, ge=1, description="Longest assistant answer allowed.")
    max_rejected_fraction: float = Field(
        0.0, ge=0, le=1,
        description="Share of rows the gate may quarantine and still pass; above it the flow stops.",
    )
    max_duplicate_fraction: float = Field(0.5, ge=0, le=1, description="Share of rows that may be exact or near duplicates.")
    labels: list[str] | None = Field(None, description="The allowed label set (with a label); another label fails the gate.")


class DataConfig(Section):
    path: str | None = Field(None, description="One source (shorthand for `sources: [{path: ...}]`): a file, folder or s3:// prefix.")
    format: DataFormat = Field(
        "auto", description="Format of `path` (`auto` detects it).")
    sources: list[SourceConfig] = Field([], description="Several sources, each with its format, weight or row cap; mixed deterministically.")
    system_prompt: str | None = Field(None, description="System turn added to conversations that have none.")
    max_examples: int | None = Field(None, ge=1, description="Use only the first N records of each source (quick trials).")
    workers: int | None = Field(None, ge=1, description="Processes for the per-row work of sources of 20,000 rows or more (default: one per core, at most 8; 1 keeps it in the stage's process). Results do not depend on it.")
    clean: CleanConfig = CleanConfig()
    balance: BalanceConfig = BalanceConfig()
    split: SplitConfig = SplitConfig()
    gate: GateConfig = GateConfig()

    @model_validator(mode="after")
    def _one_way(self) -> "DataConfig":
        if self.sources and self.path:
            raise ValueError("give either data.path or data.sources, not both")
        if not self.sources and not self.path:
            raise ValueError("data needs a path or a list of sources")
        return self

    @field_validator("path")
    @classmethod
    def _exists(cls, v: str | None) -> str | None:
        if v is not None and not v.startswith("s3://") and not Path(v).expanduser().exists():
            raise ValueError(f"file or folder not found: {v}")
        return v

    def all_sources(self) -> list[SourceConfig]:
        """The sources to read, `path` included."""
        if self.sources:
            return list(self.sources)
        if self.path is None:
            raise ValueError("data: give a path or a list of sources")
        return [SourceConfig(path=self.path, format=self.format)]

