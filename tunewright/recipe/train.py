"""Stage 4's section: the objective and its settings, then the steps, batches, schedule and checkpoints every
objective shares."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from tunewright.recipe.names import DATA_KINDS, ON_POLICY, Objective, Reward
from tunewright.recipe.section import Section


class TrainConfig(Section):
    objective: Objective = Field(
        "sft", description="`sft`: supervised answers (chat data). `dpo` and `orpo`: preference pairs "
        "(prompt/chosen/rejected). `kto`: unpaired feedback (prompt/completion/label) or preference pairs. "
        "DPO and KTO keep the model as alignment starts as their frozen reference. `grpo`: the model samples "
        "`num_generations` answers per prompt, scored by `reward` (or `reward_model`) against the reference "
        "answer. `reward`: a reward model (a scalar head over the base and its adapter) trained on preference "
        "pairs to score chosen above rejected. `ppo`: the policy samples one answer per prompt, scored by "
        "`reward_model` (or `reward`), with a value head as critic, GAE advantages and the clipped objective.")
    # the alignment objectives' settings
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
    reward: Reward = Field(
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
    # what every objective shares
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
    memory_plan: Literal["auto", "on", "off"] = Field(
        "auto", description="Cut each step's batch_size x grad_accum rows into micro-batches by a token budget that "
        "fills the device (stage 3's memory estimate), checkpointing only as many layers as that needs (replacing "
        "gradient_checkpointing); the step's loss is the mean over all its answer tokens. `auto`: on CUDA, for the "
        "supervised steps of a one-process run; `on`: on any device; `off`: the recipe's micro-batches.")
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
    def _alignment_leaves_steps_and_scores_whole_answers(self) -> "TrainConfig":
        if self.objective == "sft":
            return self
        if self.beta == 0 and self.objective not in ON_POLICY + ("reward",):
            raise ValueError(f"beta must be above 0 for {self.objective}")
        if self.sft_steps >= self.max_steps:
            raise ValueError(f"sft_steps ({self.sft_steps}) leaves no {self.objective} steps of max_steps "
                             f"({self.max_steps})")
        if self.packing:
            raise ValueError(f"packing applies to objective sft; {self.objective} scores whole answers")
        if self.loss != "cross_entropy":
            raise ValueError(f"loss '{self.loss}' applies to objective sft, not {self.objective}")
        return self

    @model_validator(mode="after")
    def _sft_takes_no_alignment_settings(self) -> "TrainConfig":
        if self.objective != "sft":
            return self
        if self.sft_steps:
            raise ValueError("sft_steps is the supervised warm-up of an alignment objective (dpo, orpo, kto, grpo, ppo)")
        if self.alignment_schedule != "shared":
            raise ValueError("alignment_schedule applies to the alignment steps of dpo, orpo, kto, grpo or ppo")
        return self

    @model_validator(mode="after")
    def _options_of_one_objective(self) -> "TrainConfig":
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
