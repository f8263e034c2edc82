"""The contract between stages: the frozen dataclasses one stage hands the next.

Each holds paths, URIs and numbers, never a model in memory; large things live on disk or in
MLflow. A stage imports only this module from tasks/, never another stage.
"""

from __future__ import annotations

from dataclasses import dataclass, field

@dataclass(frozen=True)
class DataArtifact:
    train_path: str
    val_path: str
    test_path: str
    quarantine_path: str
    report_path: str
    n_train: int
    n_val: int
    n_test: int
    n_rejected: int
    digest: str
    system_prompt: str | None = None
    kind: str = "sft"            # sft | preference | feedback | text
    format: str = "chat"
    summary_path: str = ""       # the whole account of stage 1 (summary.json)
    n_duplicates: int = 0
    cached: bool = False         # reused from an earlier run with the same digest


@dataclass(frozen=True)
class ModelArtifact:
    base_dir: str
    base_source: str
    base_digest: str
    adapter_dir: str
    n_params: int
    n_trainable: int
    resolve_seconds: float
    lineage: dict = field(default_factory=dict)  # a merged starting adapter: its sources, combination, weights


@dataclass(frozen=True)
class EnvironmentArtifact:
    device: str
    precision: str
    cpu_cores: int
    num_threads: int
    bf16_supported: bool
    cuda_devices: tuple[str, ...]
    cuda_memory_gb: tuple[float, ...]
    seed: int
    deepspeed_config: str
    memory_estimate_gb: float = 0.0
    memory_available_gb: float = 0.0
    num_processes: int = 1
    cluster: dict | None = None   # environment.cluster (Ray), when stage 4 trains there
    memory_plan: dict | None = None  # tunewright.train.memory_plan.MemoryPlan, when stage 4 uses one


@dataclass(frozen=True)
class TrainArtifact:
    output_dir: str
    kind: str  # "adapter" (PEFT weights over the base) or "full" (a whole model folder)
    steps: int
    final_loss: float
    val_loss: float | None
    tokens_per_second: float
    train_seconds: float
    resumed_from: int = 0
    stopped_early: bool = False
    objective: str = "sft"           # sft | dpo | orpo | kto
    start_dir: str | None = None     # the model after the supervised warm-up steps, when an alignment run had them
    reward: str | None = None        # GRPO: the programmatic reward it was trained for (stage 5 reports its mean)


@dataclass(frozen=True)
class EvalArtifact:
    metric: str
    base_score: float
    tuned_score: float
    base_loss: float
    tuned_loss: float
    n_examples: int
    base_fields: dict = field(default_factory=dict)
    tuned_fields: dict = field(default_factory=dict)
    predictions_path: str = ""
    report_path: str = ""
    start_score: float | None = None              # the alignment's starting model (after its supervised steps)
    preference_accuracy: dict = field(default_factory=dict)  # base / start / tuned -> share of held-out pairs won
    mean_reward: dict = field(default_factory=dict)          # base / start / tuned -> mean reward of their answers
    scores: dict = field(default_factory=dict)   # base / tuned / champion -> metric -> figure (what gate rules read)
    champion: str | None = None                  # models:/NAME/VERSION of the champion compared, if any
    champion_note: str = ""                      # why none was compared, or where it came from


@dataclass(frozen=True)
class DeployArtifact:
    model_uri: str
    registered_model: str
    version: str
    alias: str
    promoted: bool
    reason: str
    awaiting_approval: bool = False  # the gate passed and the recipe asks a person to approve the move
    registry_before: dict | None = None  # the aliases and model tags before this version: what a later failure restores


@dataclass(frozen=True)
class MonitorArtifact:
    report_path: str
    drift_detected: bool
    drifted_share: float
    n_reference: int
    n_current: int
    columns: dict = field(default_factory=dict)
