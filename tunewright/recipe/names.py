"""The lists of names a recipe chooses from, each written once.

A section's field takes the `Literal` type; code that needs the names as values takes the tuple beside it, read
from that type, so a name added to the type is known everywhere.
"""

from __future__ import annotations

from typing import Literal, get_args

# stage 1: record formats (`auto` detects them) and the PII kinds cleaning redacts
DataFormat = Literal["auto", "chat", "sharegpt", "alpaca", "prompt_completion", "preference", "kto", "text", "labelled"]
DATA_FORMATS: tuple[str, ...] = get_args(DataFormat)
PiiKind = Literal["email", "phone", "card", "ip", "iban"]
PII_KINDS: tuple[str, ...] = get_args(PiiKind)

# stage 2: what is trained (the PEFT methods train an adapter; `full` and `hft` the model's own weights)
PeftMethod = Literal["lora", "dora", "qlora", "ia3", "prompt_tuning", "prefix_tuning"]
PEFT_METHODS: tuple[str, ...] = get_args(PeftMethod)
Method = Literal["full", "hft", PeftMethod]
METHODS: tuple[str, ...] = get_args(Method)

# stage 2: PEFT's weighted merging combinations, and what each needs
Combination = Literal["cat", "linear", "svd", "ties", "ties_svd", "dare_linear", "dare_ties", "dare_linear_svd",
                      "dare_ties_svd", "magnitude_prune", "magnitude_prune_svd"]
COMBINATIONS: tuple[str, ...] = get_args(Combination)
SAME_RANK = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")  # A and B combined entry by entry
WITH_DENSITY = tuple(c for c in COMBINATIONS if c.startswith(("ties", "dare", "magnitude")))
WITH_SIGN_ELECTION = ("ties", "ties_svd", "dare_ties", "dare_ties_svd")
WITH_SVD = tuple(c for c in COMBINATIONS if c.endswith("svd"))

# stage 4: training objectives, and the programmatic rewards GRPO and PPO score sampled answers with
Objective = Literal["sft", "dpo", "orpo", "kto", "grpo", "reward", "ppo"]
OBJECTIVES: tuple[str, ...] = get_args(Objective)
ON_POLICY = ("grpo", "ppo")  # they sample answers during training
# the stage 1 data kinds each objective trains on (KTO also takes preference pairs, unpaired; GRPO takes the
# prompts of conversations or pairs and scores its own answers against their reference answer)
DATA_KINDS = {"sft": ("sft",), "dpo": ("preference",), "orpo": ("preference",), "kto": ("feedback", "preference"),
              "grpo": ("sft", "preference"), "reward": ("preference",), "ppo": ("sft", "preference")}
Reward = Literal["json_match", "json_valid", "exact_match"]
REWARDS: tuple[str, ...] = get_args(Reward)

# stage 5: the metrics scored beside the correctness metric
EvalMetric = Literal["token_f1", "rouge_l", "bleu", "chrf", "accuracy", "macro_f1", "json_valid", "schema_valid"]
EVAL_METRICS: tuple[str, ...] = get_args(EvalMetric)

# search: the values a search can optimise (stage 4's validation loss, or a stage 5 result); losses go down by
# default, scores up
SearchMetric = Literal["val_loss", "answer_loss", "score", "improvement", "preference_accuracy", "mean_reward"]
SEARCH_METRICS: tuple[str, ...] = get_args(SearchMetric)
LOSSES = ("val_loss", "answer_loss")
