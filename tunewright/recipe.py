"""Recipe schema: one pydantic model per stage section, validated once at the edge.

A recipe is YAML. Unknown keys, wrong types and missing files are errors that name the key,
the file and the line; nothing runs until the whole recipe is valid.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import re
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

EMBEDDED_BASE = "smollm2-135m-instruct"


class RecipeError(ValueError):
    """A recipe that cannot run; the message names the file, the line and the key."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SplitConfig(Section):
    val_fraction: float = Field(0.05, ge=0, lt=0.5, description="Share of examples held out for validation loss.")
    test_fraction: float = Field(0.1, gt=0, lt=0.5, description="Share of examples held out for the final evaluation.")
    seed: int = Field(0, description="Salt of the hash that assigns examples to splits; same seed, same split.")


DATA_FORMATS = ("auto", "chat", "sharegpt", "alpaca", "prompt_completion", "preference", "kto", "text", "labelled")
PII_KINDS = ("email", "phone", "card", "ip", "iban")


class SourceConfig(Section):
    path: str = Field(description="A JSONL, JSON, CSV/TSV or Parquet file, a `datasets` folder written by `save_to_disk`, "
                      "a folder of such files, or `s3://bucket/prefix` (endpoint and credentials from the AWS environment).")
    format: Literal["auto", "chat", "sharegpt", "alpaca", "prompt_completion", "preference", "kto", "text", "labelled"] = Field(
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
    redact_pii: list[Literal["email", "phone", "card", "ip", "iban"]] = Field(
        list(PII_KINDS), description="PII kinds replaced by typed placeholders such as `[EMAIL]` (cards Luhn-checked, IBANs mod-97-checked).")
    pii_patterns: dict[str, str] = Field(
        {}, description="Extra PII: placeholder kind -> regular expression, e.g. `{employee_id: 'EMP-\\d{6}'}` gives `[EMPLOYEE_ID]`.")
    replacements: dict[str, str] = Field(
        {}, description="Domain normalisation: whole-word term -> replacement, e.g. `{MI: myocardial infarction}`. "
        "Matching is case-sensitive unless `replacements_ignore_case`.")
    replacements_ignore_case: bool = Field(False, description="Match `replacements` terms in any case.")
    tool_turns: Literal["keep", "reject"] = Field("reject", description="Chat rows with `tool` turns or tool calls: keep them, or quarantine the row.")
    contamination: Literal["remove", "report", "fail"] = Field(
        "remove", description="Validation and test examples made largely of training text: quarantine them, only report them, or fail the gate.")
    contamination_ngram: int = Field(8, ge=3, description="Word n-gram length of the train/test overlap check.")
    contamination_threshold: float = Field(
        0.5, gt=0, le=1, description="Share of an example's word n-grams found in training at which it counts as seen in training.")


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
    format: Literal["auto", "chat", "sharegpt", "alpaca", "prompt_completion", "preference", "kto", "text", "labelled"] = Field(
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


METHODS = ("full", "hft", "lora", "dora", "qlora", "ia3", "prompt_tuning", "prefix_tuning")
PEFT_METHODS = ("lora", "dora", "qlora", "ia3", "prompt_tuning", "prefix_tuning")


class AdapterConfig(Section):
    method: Literal["full", "hft", "lora", "dora", "qlora", "ia3", "prompt_tuning", "prefix_tuning"] = Field(
        "lora",
        description="`full` trains every weight; `hft` (Half Fine-Tuning) trains half of the parameter groups per "
        "round; `lora`, `dora`, `qlora` (4-bit base + LoRA), `ia3`, `prompt_tuning`, `prefix_tuning` train a PEFT adapter.",
    )
    r: int = Field(16, ge=1, description="LoRA/DoRA rank.")
    alpha: float = Field(32, gt=0, description="LoRA scaling numerator (scale = alpha / r, or alpha / sqrt(r) with rsLoRA).")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the LoRA input.")
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear", description="Module names to adapt, or `all-linear` (LoRA, DoRA, QLoRA, IA3)."
    )
    target_parameters: list[str] = Field(
        [], description="Parameter names (not modules) to adapt with LoRA, e.g. fused MoE expert weights `gate_up_proj`.")
    use_rslora: bool = Field(False, description="Rank-stabilised LoRA scaling (alpha / sqrt(r)).")
    use_dora: bool = Field(False, description="Weight-decomposed LoRA; implied by `dora`, optional with `qlora`.")
    num_virtual_tokens: int = Field(16, ge=1, description="Soft tokens for prompt and prefix tuning.")
    hft_round_steps: int = Field(10, ge=1, description="Half Fine-Tuning: steps before a new half of the groups is unfrozen.")


class QuantizationConfig(Section):
    bits: Literal[4, 8] | None = Field(None, description="Load the base in 4-bit or 8-bit (bitsandbytes); `qlora` implies 4.")
    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type.")
    double_quant: bool = Field(True, description="Quantise the 4-bit quantisation constants too.")
    compute_dtype: Literal["bf16", "fp16", "fp32"] = Field("bf16", description="Dtype the 4-bit layers compute in.")


class MergeConfig(Section):
    adapters: list[str] = Field(
        min_length=2, description="The LoRA adapters to merge, all trained over this recipe's base: local adapter "
        "folders (what stage 4 writes), `s3://bucket/prefix` folders, or registered versions `models:/NAME/VERSION` "
        "or `models:/NAME@ALIAS` (only their adapter is downloaded; an alias is recorded as the version it named).")
    weights: list[float] = Field(description="One weight per adapter (negative subtracts an adapter's effect).")
    combination: Literal["cat", "linear", "svd", "ties", "ties_svd", "dare_linear", "dare_ties", "dare_linear_svd",
                         "dare_ties_svd", "magnitude_prune", "magnitude_prune_svd"] = Field(
        "cat", description="PEFT's merge: `cat` is exact (update = sum of weight x each adapter's update; rank = sum "
        "of ranks); `svd` the same sum truncated to `svd_rank`; `linear`, `ties`, `dare_linear`, `dare_ties`, "
        "`magnitude_prune` combine the A and B matrices separately (adapters of one rank; cross terms make it "
        "approximate); `*_svd` prune and elect signs on full updates, then factor.")
    density: float | None = Field(
        None, gt=0, le=1, description="TIES, DARE and magnitude pruning: share of each adapter's entries kept "
        "(required for those; 1 keeps all).")
    majority_sign_method: Literal["total", "frequency"] = Field(
        "total", description="TIES and DARE-TIES: elect each entry's sign by the summed values or by the count of signs.")
    svd_rank: int | None = Field(None, ge=1, description="`svd` and `*_svd`: rank of the merged adapter (default: the "
                                 "largest source rank).")
    svd_clamp: float | None = Field(None, gt=0, le=1, description="`svd` and `*_svd`: clamp the factors at this "
                                    "quantile of their values (default: no clamping).")

    @field_validator("adapters")
    @classmethod
    def _local_ones_exist(cls, v: list[str]) -> list[str]:
        from tunewright.registry.adapters import is_remote, read_config, registered_reference

        for ref in v:
            if ref.startswith("models:/"):
                registered_reference(ref)
            elif not is_remote(ref):
                if not Path(ref).expanduser().is_dir():
                    raise ValueError(f"adapter folder not found: {ref}")
                read_config(Path(ref).expanduser())
        return v

    @model_validator(mode="after")
    def _consistent(self) -> "MergeConfig":
        from tunewright.registry.adapters import (WITH_DENSITY, WITH_SIGN_ELECTION, WITH_SVD, check_mergeable, is_remote,
                                         read_config)

        c = self.combination
        if len(self.weights) != len(self.adapters):
            raise ValueError(f"weights: {len(self.weights)} given for {len(self.adapters)} adapters (one per adapter)")
        if c in WITH_DENSITY and self.density is None:
            raise ValueError(f"combination '{c}' needs density (the share of entries kept, in (0, 1])")
        if c not in WITH_DENSITY and self.density is not None:
            raise ValueError(f"density applies to {', '.join(WITH_DENSITY)}; combination '{c}' keeps every entry")
        if c not in WITH_SIGN_ELECTION and "majority_sign_method" in self.model_fields_set:
            raise ValueError(f"majority_sign_method applies to {', '.join(WITH_SIGN_ELECTION)}, not '{c}'")
        if c not in WITH_SVD and ({"svd_rank", "svd_clamp"} & self.model_fields_set):
            raise ValueError(f"svd_rank and svd_clamp apply to {', '.join(WITH_SVD)}, not '{c}'")
        # remote adapters are checked the same way by stage 2 once fetched
        check_mergeable([(ref, read_config(Path(ref).expanduser())) for ref in self.adapters if not is_remote(ref)], c)
        return self


class ModelConfig(Section):
    base: str = Field(
        EMBEDDED_BASE,
        description="`smollm2-135m-instruct` (embedded), a local Hugging Face folder, a .gguf file, or a hub id.",
    )
    gguf_file: str | None = Field(None, description="GGUF file name inside `base` when `base` is a folder of GGUF files.")
    trust_remote_code: bool = Field(False, description="Allow model code from the base's folder or hub repo.")
    adapter: AdapterConfig = AdapterConfig()
    quantization: QuantizationConfig = QuantizationConfig()
    merge: MergeConfig | None = Field(
        None, description="Start from several LoRA adapters merged into one instead of a fresh adapter; with "
        "train.max_steps 0 the merged adapter is evaluated and deployed as it is. Needs adapter.method lora or "
        "qlora; the merged adapter's rank comes from its sources, not adapter.r.")

    def load_bits(self) -> int | None:
        """Bits the base is loaded in for training: `qlora` means 4 unless 8 is asked for."""
        if self.adapter.method == "qlora":
            return self.quantization.bits or 4
        return self.quantization.bits

    @field_validator("merge")
    @classmethod
    def _merge_needs_lora(cls, v: MergeConfig | None, info) -> MergeConfig | None:
        adapter = info.data.get("adapter")
        if v is not None and adapter is not None and adapter.method not in ("lora", "qlora"):
            raise ValueError(f"merging makes a LoRA adapter; adapter.method '{adapter.method}' cannot start from it "
                             "(use lora, or qlora over a 4-bit base)")
        return v

    @field_validator("quantization")
    @classmethod
    def _quantised_needs_adapter(cls, v: QuantizationConfig, info) -> QuantizationConfig:
        adapter = info.data.get("adapter")
        if v.bits and adapter is not None and adapter.method in ("full", "hft"):
            raise ValueError(f"a {v.bits}-bit base cannot be trained with method '{adapter.method}'; use lora, dora or qlora")
        return v


class EnvironmentConfig(Section):
    seed: int = Field(42, description="Seed for Python, NumPy and torch; same seed, same run.")
    precision: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto", description="`auto` picks bf16 where the hardware has it, else fp32."
    )
    num_threads: int | None = Field(None, ge=1, description="CPU threads for torch (default: OMP_NUM_THREADS when set, else all cores).")
    num_processes: int = Field(1, ge=1, description="Training processes; above 1, stage 4 launches them with torchrun and DeepSpeed ZeRO.")
    deepspeed_stage: Literal[0, 1, 2, 3] = Field(0, description="ZeRO stage of the DeepSpeed config written for the run.")
    offload_optimizer: bool = Field(False, description="ZeRO: keep optimiser states in CPU memory.")
    offload_params: bool = Field(False, description="ZeRO-3: keep parameters in CPU memory.")


OBJECTIVES = ("sft", "dpo", "orpo", "kto", "grpo", "reward", "ppo")
# the stage 1 data kinds each objective trains on (KTO also takes preference pairs, unpaired; GRPO takes the
# prompts of conversations or pairs and scores its own answers against their reference answer)
DATA_KINDS = {"sft": ("sft",), "dpo": ("preference",), "orpo": ("preference",), "kto": ("feedback", "preference"),
              "grpo": ("sft", "preference"), "reward": ("preference",), "ppo": ("sft", "preference")}
ON_POLICY = ("grpo", "ppo")


class TrainConfig(Section):
    objective: Literal["sft", "dpo", "orpo", "kto", "grpo", "reward", "ppo"] = Field(
        "sft", description="`sft`: supervised answers (chat data). `dpo` and `orpo`: preference pairs "
        "(prompt/chosen/rejected). `kto`: unpaired feedback (prompt/completion/label) or preference pairs. "
        "DPO and KTO keep the model as alignment starts as their frozen reference. `grpo`: the model samples "
        "`num_generations` answers per prompt, scored by `reward` (or `reward_model`) against the reference "
        "answer. `reward`: a reward model (a scalar head over the base and its adapter) trained on preference "
        "pairs to score chosen above rejected. `ppo`: the policy samples one answer per prompt, scored by "
        "`reward_model` (or `reward`), with a value head as critic, GAE advantages and the clipped objective.")
    beta: float = Field(0.1, ge=0, description="DPO and KTO: how hard the policy is held to the reference (higher "
                        "stays closer). ORPO: weight of the odds-ratio term beside the chosen answers' NLL. GRPO: "
                        "weight of the KL penalty to the base (0: none, no reference pass).")
    reward_model: str | None = Field(
        None, description="GRPO and PPO: score sampled answers with a reward model trained by objective `reward`: "
        "`models:/NAME@ALIAS`, `models:/NAME/VERSION`, or the folder stage 4 of a reward run wrote. Replaces "
        "`reward`.")
    ppo_epochs: int = Field(2, ge=1, description="PPO: optimiser steps on each batch of sampled answers (the clip "
                            "guards the steps after the first).")
    gae_gamma: float = Field(1.0, gt=0, le=1, description="PPO: discount of later rewards.")
    gae_lambda: float = Field(0.95, ge=0, le=1, description="PPO: GAE's bias/variance trade-off.")
    value_coef: float = Field(0.1, gt=0, description="PPO: weight of the value head's loss.")
    reward_baseline: Literal["group", "reference", "none"] = Field(
        "reference", description="PPO: `group` samples `num_generations` answers per prompt and rewards each by its "
        "score minus the mean score of the prompt's other answers (leave-one-out); `reference` samples one and "
        "rewards it by its score minus the score of the prompt's reference answer; `none` by its score. A baseline "
        "keeps the same best policy with far less noise from how hard each prompt is.")
    value_clip: float = Field(0.2, gt=0, description="PPO: new values are clipped to the sampled ones +/- this.")
    reward: Literal["json_match", "json_valid", "exact_match"] = Field(
        "json_match", description="GRPO's and PPO's programmatic reward for a sampled answer: `json_match` (share of the reference's JSON "
        "fields right, halved for prose around the JSON), `json_valid` (the answer is one JSON object), "
        "`exact_match`.")
    num_generations: int = Field(4, ge=2, description="GRPO, and PPO with `reward_baseline: group`: answers "
                                 "sampled per prompt (the group).")
    temperature: float = Field(1.0, gt=0, description="GRPO: sampling temperature.")
    max_new_tokens: int = Field(64, ge=1, description="GRPO: length limit of a sampled answer.")
    clip_epsilon: float = Field(0.2, gt=0, lt=1, description="GRPO: the probability ratio is clipped to 1 +/- this.")
    sft_steps: int = Field(0, ge=0, description="Supervised steps on the chosen (or desirable) answers before the "
                           "alignment objective; their model is the reference and stage 5's starting point. Counted "
                           "in max_steps.")
    rejected: Literal["dataset", "on_policy"] = Field(
        "dataset", description="DPO, ORPO and KTO on preference pairs: `on_policy` makes the model as alignment starts "
        "(after `sft_steps`) answer every prompt training will see, greedily, and uses its answer as the pair's "
        "rejected one wherever it is wrong (not the chosen answer; JSON compared as parsed), so alignment trains "
        "away from the mistakes this model makes; pairs it answers right keep their own rejected answer.")
    alignment_learning_rate: float | None = Field(
        None, gt=0, description="Peak learning rate of the alignment steps after the supervised ones (default: "
        "learning_rate); preference objectives usually want a smaller one.")
    alignment_schedule: Literal["shared", "restart"] = Field(
        "shared", description="How the alignment steps' learning rate moves: `shared` follows the one schedule over "
        "all max_steps (so alignment starts part-way down it); `restart` gives the alignment steps a schedule of their "
        "own (lr_scheduler, with warmup_steps of warmup) that starts at alignment_learning_rate and spans the "
        "steps after sft_steps.")
    kto_desirable_weight: float = Field(1.0, gt=0, description="KTO: weight of the desirable answers' loss.")
    kto_undesirable_weight: float = Field(1.0, gt=0, description="KTO: weight of the undesirable answers' loss.")
    max_steps: int = Field(60, ge=0, description="Optimiser steps (0, with model.merge: the merged adapter as it is).")
    batch_size: int = Field(8, ge=1, description="Examples per micro-batch.")
    grad_accum: int = Field(1, ge=1, description="Micro-batches per optimiser step.")
    learning_rate: float = Field(1e-3, gt=0, description="Peak learning rate.")
    lr_scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = Field("cosine", description="Learning-rate schedule after warmup.")
    warmup_steps: int = Field(5, ge=0, description="Linear warmup steps.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping norm.")
    max_seq_len: int = Field(512, ge=8, description="Longer examples are truncated (the prompt keeps its start).")
    log_every: int = Field(1, ge=1, description="Log metrics every N steps.")
    checkpoint_every: int = Field(0, ge=0, description="Write a checkpoint every N steps (0: none).")
    keep_checkpoints: int = Field(2, ge=1, description="Complete checkpoints kept on disk (the newest N).")
    gradient_checkpointing: bool = Field(False, description="Recompute activations in the backward pass to save memory.")
    eval_every: int = Field(0, ge=0, description="Validation loss every N steps (0: only at the end).")
    early_stopping_patience: int = Field(0, ge=0, description="Stop after N validations without improvement (0: off; needs eval_every).")
    retries: int = Field(0, ge=0, description="Prefect retries of the fine-tune task; each retry resumes from the last checkpoint.")
    packing: bool = Field(False, description="Pack several examples per row up to max_seq_len; packed examples never attend to each other.")
    shared_prefix: bool = Field(True, description="Run the prompt tokens every row of a batch shares (a system prompt) through the model once; the same loss and gradients as the plain forward, faster. Not used with packing, gradient checkpointing, soft prompts or ZeRO-3.")
    loss: Literal["cross_entropy", "focal", "class_weighted"] = Field(
        "cross_entropy", description="`focal` down-weights easy tokens; `class_weighted` weights examples by inverse label frequency.")
    focal_gamma: float = Field(2.0, ge=0, description="Focusing exponent of the focal loss.")
    label_field: str | None = Field(
        None, description="For class_weighted: the JSON field of the answer that is the label (default: the whole answer).")


    @model_validator(mode="after")
    def _objective_fits(self) -> "TrainConfig":
        if self.objective != "sft":
            if self.beta == 0 and self.objective not in ON_POLICY + ("reward",):
                raise ValueError(f"beta must be above 0 for {self.objective}")
            if self.sft_steps >= self.max_steps:
                raise ValueError(f"sft_steps ({self.sft_steps}) leaves no {self.objective} steps of max_steps "
                                 f"({self.max_steps})")
            if self.packing:
                raise ValueError(f"packing applies to objective sft; {self.objective} scores whole answers")
            if self.loss != "cross_entropy":
                raise ValueError(f"loss '{self.loss}' applies to objective sft, not {self.objective}")
        elif self.sft_steps:
            raise ValueError("sft_steps is the supervised warm-up of an alignment objective (dpo, orpo, kto, grpo, ppo)")
        elif self.alignment_schedule != "shared":
            raise ValueError("alignment_schedule applies to the alignment steps of dpo, orpo, kto, grpo or ppo")
        if self.objective == "reward" and self.sft_steps:
            raise ValueError("sft_steps: a reward model trains its score head on pairs from the start (set 0)")
        if self.rejected == "on_policy" and self.objective not in ("dpo", "orpo", "kto"):
            raise ValueError(f"rejected: on_policy replaces preference pairs' rejected answers for dpo, orpo or kto, "
                             f"not {self.objective}")
        if self.reward_model and self.objective not in ON_POLICY:
            raise ValueError(f"reward_model scores sampled answers of grpo or ppo, not {self.objective}")
        return self

    def data_kinds(self) -> tuple[str, ...]:
        return DATA_KINDS[self.objective]


EVAL_METRICS = ("token_f1", "rouge_l", "bleu", "chrf", "accuracy", "macro_f1", "json_valid", "schema_valid")


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
    metric: Literal["json_exact_match", "exact_match"] = Field(
        "json_exact_match", description="The correctness metric: `json_exact_match` compares parsed JSON (and scores each field); `exact_match` compares text."
    )
    metrics: list[Literal[EVAL_METRICS]] = Field(  # type: ignore[valid-type]
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


def _gate_rules(rules: list[str]) -> list[str]:
    from tunewright.registry.promotion_rules import parse_rule

    for rule in rules:
        parse_rule(rule)
    return rules


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


class TrackingConfig(Section):
    experiment: str = Field("tunewright", description="MLflow experiment name.")
    tracking_uri: str | None = Field(None, description="MLflow tracking URI (default: SQLite in the state folder; MLFLOW_TRACKING_URI wins).")
    state_dir: str | None = Field(None, description="State folder (default ./.tunewright; TUNEWRIGHT_HOME wins).")


# the values a search can optimise, and which way by default: stage 4's validation loss, or a stage 5 result
SEARCH_METRICS = {"val_loss": "minimize", "answer_loss": "minimize", "score": "maximize",
                  "improvement": "maximize", "preference_accuracy": "maximize", "mean_reward": "maximize"}
_NOT_SEARCHABLE = ("name", "description", "tracking", "search")


class ParamSpace(Section):
    type: Literal["float", "int", "categorical"] = Field(
        description="`float` and `int` are drawn from `low`..`high` (or from `choices`); `categorical` from `choices`.")
    low: float | None = Field(None, description="Smallest value (float and int).")
    high: float | None = Field(None, description="Largest value, included (float and int).")
    log: bool = Field(False, description="Draw on a log scale (needs low > 0; not with step).")
    step: float | None = Field(None, gt=0, description="Spacing of the values from `low` (int: default 1; float: "
                               "continuous unless given).")
    choices: list[Any] | None = Field(None, min_length=1, description="The values to try, of any YAML type (lists "
                                      "too, e.g. target_modules).")

    @model_validator(mode="before")
    @classmethod
    def _numbers_from_yaml(cls, data: Any) -> Any:
        # YAML reads `1e-5` (no dot) as a string; numeric choices of a float or int parameter are numbers
        if isinstance(data, dict) and data.get("type") in ("float", "int") and isinstance(data.get("choices"), list):
            def number(c: Any) -> Any:
                try:
                    return float(c) if isinstance(c, str) else c
                except ValueError:
                    return c
            data = {**data, "choices": [number(c) for c in data["choices"]]}
        return data

    @model_validator(mode="after")
    def _shape(self) -> "ParamSpace":
        if self.choices is not None:
            if self.low is not None or self.high is not None or self.step is not None or self.log:
                raise ValueError("give either choices or low/high (with step or log), not both")
            numbers = [c for c in self.choices if isinstance(c, (int, float)) and not isinstance(c, bool)]
            if self.type == "float" and len(numbers) != len(self.choices):
                raise ValueError(f"float choices must be numbers, got {self.choices}")
            if self.type == "int" and (len(numbers) != len(self.choices) or any(float(c) != int(c) for c in numbers)):
                raise ValueError(f"int choices must be whole numbers, got {self.choices}")
            if len({json.dumps(c, sort_keys=True) for c in self.choices}) != len(self.choices):
                raise ValueError(f"choices repeat a value: {self.choices}")
            return self
        if self.type == "categorical":
            raise ValueError("categorical needs choices")
        if self.low is None or self.high is None:
            raise ValueError(f"{self.type} needs low and high (or choices)")
        if self.low > self.high:
            raise ValueError(f"low ({self.low}) is above high ({self.high})")
        if self.log and self.low <= 0:
            raise ValueError("a log scale needs low > 0")
        if self.log and self.step is not None:
            raise ValueError("log and step cannot be combined")
        if self.type == "int" and any(v is not None and not float(v).is_integer() for v in (self.low, self.high, self.step)):
            raise ValueError("int low, high and step must be whole numbers")
        return self

    def grid(self) -> list | None:
        """Every value this parameter can take, or None when it is continuous (a float without step)."""
        if self.choices is not None:
            return list(self.choices)
        if self.type == "int":
            return list(range(int(self.low), int(self.high) + 1, int(self.step or 1)))
        if self.step is not None:
            n = int((self.high - self.low) / self.step + 1e-9)
            return [round(self.low + i * self.step, 12) for i in range(n + 1)]
        return None


class PrunerConfig(Section):
    type: Literal["median", "percentile", "threshold", "none"] = Field(
        "median", description="What stops an unpromising trial early, judged on the validation loss stage 4 reports "
        "every `train.eval_every` steps (lower is better, whatever the metric): `median` (worse than the median of "
        "the completed trials at the same step), `percentile`, `threshold` (above `upper`), or `none`.")
    n_startup_trials: int = Field(2, ge=0, description="median, percentile: completed trials before any is pruned.")
    n_warmup_steps: int = Field(0, ge=0, description="Optimiser steps a trial runs before it can be pruned.")
    interval_steps: int = Field(1, ge=1, description="Judge a trial at most once per this many optimiser steps.")
    percentile: float | None = Field(None, gt=0, lt=100, description="percentile: prune a trial whose best "
                                     "validation loss so far is worse than this percentile of the completed "
                                     "trials' at the same step (25 prunes more than the median, 50).")
    upper: float | None = Field(None, description="threshold: prune a trial whose validation loss is above this "
                                "(or not a number).")

    @model_validator(mode="after")
    def _fields_fit_the_type(self) -> "PrunerConfig":
        fits = {"median": {"n_startup_trials", "n_warmup_steps", "interval_steps"},
                "percentile": {"n_startup_trials", "n_warmup_steps", "interval_steps", "percentile"},
                "threshold": {"n_warmup_steps", "interval_steps", "upper"}, "none": set()}[self.type]
        if extra := sorted(self.model_fields_set - fits - {"type"}):
            raise ValueError(f"{', '.join(extra)} do{'es' if len(extra) == 1 else ''} not apply to pruner "
                             f"'{self.type}'" + (f" (it takes {', '.join(sorted(fits))})" if fits else ""))
        if self.type == "percentile" and self.percentile is None:
            raise ValueError("pruner 'percentile' needs percentile")
        if self.type == "threshold" and self.upper is None:
            raise ValueError("pruner 'threshold' needs upper (the validation loss above which a trial stops)")
        return self


def _recipe_field(path: str) -> str | None:
    """Why `path` does not name one value of a recipe, or None when it does."""
    parts = path.split(".")
    if parts[0] in _NOT_SEARCHABLE:
        return f"'{parts[0]}' is not searched"
    model: Any = Recipe
    for i, part in enumerate(parts):
        model = _section_of(model)
        fields = model.model_fields if isinstance(model, type) and issubclass(model, BaseModel) else None
        if fields is None:
            return f"'{'.'.join(parts[:i])}' is a value, not a section"
        if part not in fields:
            near = difflib.get_close_matches(part, list(fields), n=3)
            where = ".".join(parts[:i]) or "a recipe"
            return (f"not a recipe value (did you mean {' or '.join('.'.join(parts[:i] + [n]) for n in near)}?)" if near
                    else f"not a recipe value ({where} has: {', '.join(fields)})")
        model = fields[part].annotation
    model = _section_of(model)
    if isinstance(model, type) and issubclass(model, BaseModel):
        return f"is a section; name one of its keys ({', '.join(model.model_fields)})"
    return None


def _searchable(path: str) -> str:
    if why := _recipe_field(path):
        raise ValueError(why)
    return path


class SearchConfig(Section):
    """A hyperparameter search over a recipe (`tunewright tune`): a `search` section, or a file of its own."""

    sampler: Literal["grid", "random", "tpe"] = Field(
        "tpe", description="`grid` tries every combination (every parameter needs choices, int bounds or a step), "
        "`random` draws independently, `tpe` (Optuna's Tree-structured Parzen Estimator) draws near the best trials "
        "so far.")
    params: dict[Annotated[str, AfterValidator(_searchable)], ParamSpace] = Field(
        min_length=1, description="The recipe values to search, by path (`train.learning_rate`, `model.adapter.r`), "
        "each with its space; every trial sets them as `--set path=value` would.")
    n_trials: int | None = Field(
        None, ge=1, description="Complete and pruned trials in the study, counted over every worker that joins it "
        "and every re-run (default: the whole grid for `grid`, else 20); a failed trial is replaced. Raise it to "
        "continue a study.")
    metric: Literal["val_loss", "answer_loss", "score", "improvement", "preference_accuracy", "mean_reward"] = Field(
        "val_loss", description="What a trial is judged by: `val_loss` (stage 4's final validation loss; trials "
        "then run stages 1-4), or a stage 5 result on the held-out split: `answer_loss`, `score` (evaluate.metric), "
        "`improvement` (score over the base's), `preference_accuracy`, `mean_reward`.")
    direction: Literal["minimize", "maximize"] | None = Field(
        None, description="Default: minimize losses, maximize scores.")
    pruner: PrunerConfig = PrunerConfig()
    seed: int | None = Field(None, description="Sampler seed (default: environment.seed). A worker joining a study "
                             "that already has trials shifts it by their number, so workers do not repeat each other.")
    evaluate: bool | None = Field(None, description="Run stage 5 in every trial (default: only when the metric "
                                  "comes from it).")
    study: str | None = Field(None, description="Optuna study name (default: the recipe name and a digest of recipe "
                              "and search, so every worker running the same search joins the same study).")
    storage: str | None = Field(
        None, description="SQLAlchemy URL of the study database, e.g. `postgresql://tunewright@db/optuna` (default: "
        "SQLite in the state folder; TUNEWRIGHT_STUDY_STORAGE wins). Passwords belong in that variable, not here.")

    @field_validator("params")
    @classmethod
    def _grid_is_finite(cls, v: dict[str, ParamSpace], info) -> dict[str, ParamSpace]:
        continuous = [path for path, space in v.items() if space.grid() is None]
        if info.data.get("sampler") == "grid" and continuous:
            raise ValueError(f"sampler 'grid' needs a finite set of values: give {', '.join(continuous)} choices or "
                             "a step")
        return v

    @field_validator("storage")
    @classmethod
    def _no_password(cls, v: str | None) -> str | None:
        if v and re.search(r"://[^/@]*:[^/@]*@", v):
            raise ValueError("holds a password; give the URL in TUNEWRIGHT_STUDY_STORAGE (or --storage) instead")
        return v

    def goal(self) -> str:
        return self.direction or SEARCH_METRICS[self.metric]

    def grid_size(self) -> int | None:
        if self.sampler != "grid":
            return None
        size = 1
        for space in self.params.values():
            size *= len(space.grid())
        return size

    def trials(self) -> int:
        """Trials the study holds when the search is done."""
        size = self.grid_size()
        if size is not None:
            return min(self.n_trials or size, size)
        return self.n_trials or 20

    def runs_evaluation(self) -> bool:
        return self.evaluate if self.evaluate is not None else self.metric != "val_loss"


class Recipe(Section):
    """A whole fine-tuning run: one section per stage plus tracking."""

    name: str = Field(description="Run name shown in Prefect and MLflow.")
    description: str = ""
    data: DataConfig
    model: ModelConfig = ModelConfig()
    environment: EnvironmentConfig = EnvironmentConfig()
    train: TrainConfig = TrainConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    deploy: DeployConfig = DeployConfig()
    monitor: MonitorConfig = MonitorConfig()
    tracking: TrackingConfig = TrackingConfig()
    search: SearchConfig | None = Field(
        None, description="Hyperparameter search for `tunewright tune` (instead of --space); `run` ignores it.")

    @field_validator("name")
    @classmethod
    def _name_not_blank(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must not be empty")
        return v

    @field_validator("environment")
    @classmethod
    def _one_process_methods(cls, v: EnvironmentConfig, info) -> EnvironmentConfig:
        model = info.data.get("model")
        if v.num_processes > 1 and model is not None and model.adapter.method == "hft":
            raise ValueError("num_processes > 1 with model.adapter.method 'hft': Half Fine-Tuning runs in one "
                             "process (its per-round freezing is not ZeRO-partition-aware)")
        return v

    @model_validator(mode="after")
    def _gate_names_what_stage_5_scores(self) -> "Recipe":
        from tunewright.registry.promotion_rules import parse_rule

        known = self.evaluate.metric_names()
        for rule in self.deploy.gate:
            unknown = sorted(m for m in parse_rule(rule).metrics()
                             if m not in known and not (m.startswith("field_") and self.evaluate.metric == "json_exact_match"))
            if unknown:
                raise ValueError(f"deploy.gate {rule!r} names {', '.join(unknown)}, which stage 5 does not score "
                                 f"with this recipe (it scores {', '.join(sorted(known))}, and field_NAME per JSON field; add it to "
                                 "evaluate.metrics or evaluate.safety)")
        return self

    @model_validator(mode="after")
    def _steps_or_merge(self) -> "Recipe":
        if self.train.max_steps == 0 and self.model.merge is None:
            raise ValueError("train.max_steps: 0 trains nothing; it is for evaluating a merged adapter as it is "
                             "(model.merge)")
        if self.train.max_steps == 0 and self.environment.num_processes > 1:
            raise ValueError("environment.num_processes > 1 with train.max_steps 0: there is no training to share")
        return self

    @model_validator(mode="after")
    def _alignment_processes(self) -> "Recipe":
        if (self.environment.num_processes > 1 and self.environment.deepspeed_stage == 3
                and self.train.objective in ON_POLICY):
            raise ValueError(f"environment.deepspeed_stage 3 with num_processes > 1 and train.objective "
                             f"'{self.train.objective}': GRPO and PPO sample answers during training, which ZeRO-3 "
                             "cannot share out (every rank would gather the weights for every generated token); "
                             "use deepspeed_stage 0-2 (sft, dpo, orpo, kto and reward run under all four)")
        if self.environment.num_processes > 1 and getattr(self.train, "rejected", "dataset") == "on_policy":
            raise ValueError("environment.num_processes > 1 with train.rejected: on_policy: the starting model's own "
                             "answers are generated in one process (set num_processes: 1, or rejected: dataset)")
        if (self.train.objective in ON_POLICY and self.train.beta > 0
                and self.model.adapter.method not in PEFT_METHODS):
            raise ValueError(f"train.beta > 0 with {self.train.objective.upper()} measures the KL to the base with the adapter switched off; "
                             f"model.adapter.method '{self.model.adapter.method}' has no adapter (set beta: 0)")
        return self

    def flat(self) -> dict[str, str]:
        """The recipe as `section.key: value` strings, for MLflow params."""
        out: dict[str, str] = {}

        def walk(prefix: str, value: Any) -> None:
            if isinstance(value, dict):
                for k, v in value.items():
                    walk(f"{prefix}.{k}" if prefix else k, v)
            else:
                out[prefix] = str(value)

        walk("", self.model_dump(mode="json", exclude={"search"}))
        return out

    def digest(self) -> str:
        # the search section says how to look for values, not what a run trains: it leaves the digest alone
        blob = json.dumps(self.model_dump(mode="json", exclude={"search"}), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


# --- loading -------------------------------------------------------------------------------

_RELATIVE_PATHS = (("data", "path"), ("monitor", "production_path"), ("monitor", "request_log"),
                   ("evaluate", "json_schema"))


def _resolve(value: Any, base: Path) -> Any:
    if isinstance(value, str) and not value.startswith("s3://") and not Path(value).expanduser().is_absolute():
        return str((base / value).resolve())
    return value


def _line_of(node: yaml.Node | None, loc: tuple[Any, ...]) -> int | None:
    """1-based line of the deepest YAML node on `loc` that exists."""
    line = None
    for key in loc:
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                if k.value == key:
                    line, node = k.start_mark.line + 1, v
                    break
            else:
                return line
        elif isinstance(node, yaml.SequenceNode) and isinstance(key, int) and key < len(node.value):
            node = node.value[key]
            line = node.start_mark.line + 1
        else:
            return line
    return line


def _set_dotted(data: dict, dotted: str, raw: str) -> None:
    keys = dotted.split(".")
    target = data
    for key in keys[:-1]:
        target = target.setdefault(key, {})
        if not isinstance(target, dict):
            raise RecipeError(f"--set {dotted}={raw}: '{key}' is not a section")
    target[keys[-1]] = yaml.safe_load(raw)


def _read_mapping(path: Path, what: str, shape: str) -> tuple[Any, dict]:
    """A YAML file's node tree (for line numbers in errors) and its data, which must be a mapping."""
    if not path.is_file():
        raise RecipeError(f"{path}: {what} not found")
    text = path.read_text(encoding="utf-8")
    try:
        root = yaml.compose(text)
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise RecipeError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: {shape}, got {type(data).__name__}")
    return root, data


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read, override and validate a recipe; raise RecipeError naming file, line and key."""
    path = Path(path)
    root, data = _read_mapping(path, "recipe file", "a recipe is a mapping of sections")
    set_keys = set()
    for item in overrides or []:
        if "=" not in item:
            raise RecipeError(f"--set {item}: expected section.key=value")
        dotted, raw = item.split("=", 1)
        _set_dotted(data, dotted.strip(), raw)
        set_keys.add(tuple(dotted.strip().split(".")))
    base = path.resolve().parent
    for section, key in _RELATIVE_PATHS:
        if isinstance(data.get(section), dict) and key in data[section]:
            data[section][key] = _resolve(data[section][key], base)
    sources = data.get("data", {}).get("sources") if isinstance(data.get("data"), dict) else None
    for src in sources if isinstance(sources, list) else []:
        if isinstance(src, dict) and "path" in src:
            src["path"] = _resolve(src["path"], base)
    merge = data["model"].get("merge") if isinstance(data.get("model"), dict) else None
    if isinstance(merge, dict) and isinstance(merge.get("adapters"), list):
        merge["adapters"] = [a if str(a).startswith("models:/") else _resolve(a, base) for a in merge["adapters"]]
    try:
        return Recipe.model_validate(data)
    except ValidationError as exc:
        raise RecipeError(_describe(path, root, exc, set_keys)) from None


def load_space(path: str | Path) -> SearchConfig:
    """Read and validate a search space file (a `search` section on its own); errors name file, line and key."""
    path = Path(path)
    root, data = _read_mapping(path, "search space file", "a search space is a mapping (params, sampler, ...)")
    try:
        return SearchConfig.model_validate(data)
    except ValidationError as exc:
        raise RecipeError(_describe(path, root, exc, set(), what="search space", model=SearchConfig)) from None


def _section_of(annotation: Any) -> Any:
    """The section class of an optional section (`X | None`); other annotations as they are."""
    if get_origin(annotation) in (Union, UnionType):
        sections = [a for a in get_args(annotation) if isinstance(a, type) and issubclass(a, BaseModel)]
        return sections[0] if sections else annotation
    return annotation


def _inner(annotation: Any, part: Any) -> Any:
    """The type one step below `annotation` at `part`: a field of a section, a mapping's value, a list's item."""
    annotation = _section_of(annotation)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        field = annotation.model_fields.get(str(part))
        return field.annotation if field else None
    if get_origin(annotation) in (dict, list):
        return get_args(annotation)[-1]
    return None


def _describe(path: Path, root: yaml.Node | None, exc: ValidationError, set_keys: set, what: str = "recipe",
              model: type[BaseModel] | None = None) -> str:
    lines = [f"{path}: invalid {what} ({exc.error_count()} problem{'s' if exc.error_count() > 1 else ''})"]
    for err in exc.errors():
        loc = tuple(err["loc"])
        loc = loc[:-1] if loc[-1:] == ("[key]",) else loc  # a mapping's key that is wrong: name the key
        key = ".".join(str(p) for p in loc) or f"({what})"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
            parent: Any = model or Recipe
            for part in loc[:-1]:
                parent = _inner(parent, part)
            parent = _section_of(parent)
            if isinstance(parent, type) and issubclass(parent, BaseModel):
                msg += f" (allowed: {', '.join(parent.model_fields)})"
        if any(loc[: len(s)] == s for s in set_keys):
            where = f"{path} (--set)"
        else:
            line = _line_of(root, loc)
            where = f"{path}:{line}" if line else str(path)
        lines.append(f"  {where}: {key}: {msg}")
    return "\n".join(lines)
