"""Stage 2's section: the base, the adapter or full fine-tune, quantisation, and a merge of adapters to start from.

A merge's adapters are checked here only as the recipe writes them (their number, weights and the options their
combination takes, and the form of a registered reference); what the adapter folders hold is checked when the
merge is set up (`tunewright.registry.merging.check_sources`), and registered or S3 adapters once fetched.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator, model_validator

from tunewright.recipe.names import WITH_DENSITY, WITH_SIGN_ELECTION, WITH_SVD, Combination, Method
from tunewright.recipe.section import Section

EMBEDDED_BASE = "smollm2-135m-instruct"

_REGISTERED = re.compile(r"^models:/(?P<name>[^/@]+)(?:/(?P<version>\d+)|@(?P<alias>[^/]+))/?$")


def registered_reference(ref: str) -> tuple[str, str | None, str | None]:
    """(name, version, alias) of `models:/NAME/VERSION` or `models:/NAME@ALIAS`; ValueError for anything else."""
    match = _REGISTERED.match(ref)
    if not match:
        raise ValueError(f"{ref}: expected models:/NAME/VERSION or models:/NAME@ALIAS")
    return match["name"], match["version"], match["alias"]


class AdapterConfig(Section):
    method: Method = Field(
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
    combination: Combination = Field(
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
    def _registered_references_are_well_formed(cls, v: list[str]) -> list[str]:
        for ref in v:
            if ref.startswith("models:/"):
                registered_reference(ref)
        return v

    @model_validator(mode="after")
    def _consistent(self) -> "MergeConfig":
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
