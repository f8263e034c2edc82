"""What gets trained: the base (full precision or bitsandbytes 4/8-bit) and the method on top."""

from __future__ import annotations

import random
from typing import Any

from tunewright.recipe import PEFT_METHODS, AdapterConfig, ModelConfig
from tunewright.train import attention, fused_lora, fused_rmsnorm, liger, quantization


def peft_config(cfg: AdapterConfig):
    """The PEFT config for an adapter method (LoRA family, IA3, prompt or prefix tuning)."""
    from peft import IA3Config, LoraConfig, PrefixTuningConfig, PromptTuningConfig

    if cfg.method in ("lora", "dora", "qlora"):
        return LoraConfig(
            r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, task_type="CAUSAL_LM",
            target_modules=cfg.target_modules, target_parameters=cfg.target_parameters or None,
            use_rslora=cfg.use_rslora, use_dora=cfg.method == "dora" or cfg.use_dora,
        )
    if cfg.method == "ia3":
        # all-linear: let PEFT pick its per-architecture defaults (attention k/v and the MLP down projection)
        targets = None if cfg.target_modules == "all-linear" else cfg.target_modules
        ff = None if targets is None else [t for t in targets if "down" in t or "mlp" in t or "fc" in t]
        return IA3Config(task_type="CAUSAL_LM", target_modules=targets, feedforward_modules=ff)
    if cfg.method == "prompt_tuning":
        return PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=cfg.num_virtual_tokens)
    if cfg.method == "prefix_tuning":
        return PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=cfg.num_virtual_tokens)
    raise ValueError(f"model.adapter.method '{cfg.method}' has no PEFT adapter")


def bnb_config(cfg: ModelConfig):
    """bitsandbytes settings for the recipe's base, or None for a full-precision base."""
    q = cfg.quantization
    return quantization.bnb_config(cfg.load_bits(), q.quant_type, q.double_quant, q.compute_dtype)


def load_base(base_dir: str, cfg: ModelConfig, device: Any, gradient_checkpointing: bool = False,
              for_training: bool = True, precision: str = "fp32"):
    """The base model, quantised if the recipe says so and prepared for k-bit training.

    `precision` is the run's autocast precision from stage 3: under 16-bit autocast a 4-bit base
    keeps its embeddings and head in the compute dtype (see `quantization.place_unquantised`).
    """
    import torch
    from transformers import AutoModelForCausalLM

    quant = bnb_config(cfg)
    kwargs = {"trust_remote_code": cfg.trust_remote_code}
    if quant is not None:
        kwargs.update(quantization_config=quant, device_map={"": device.index or 0} if device.type == "cuda" else {"": "cpu"})
        model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32, **kwargs)
        if for_training:
            from peft import prepare_model_for_kbit_training

            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
        if for_training:
            attention.use_for_training(model, device)
            liger.use_for_training(model, device)
        if cfg.load_bits() == 4 and precision in ("bf16", "fp16"):
            quantization.place_unquantised(model, cfg.quantization.compute_dtype)
        return model
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32, **kwargs).to(device)
    if for_training:
        attention.use_for_training(model, device)
        fused_rmsnorm.use_for_training(model, device)
        liger.use_for_training(model, device)
    if gradient_checkpointing and for_training:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    return model


def build(base_dir: str, adapter_dir: str | None, cfg: ModelConfig, device: Any, gradient_checkpointing: bool,
          precision: str = "fp32", cast_frozen: bool = True):
    """The trainable network for the recipe's method, every other weight frozen.

    `cast_frozen`: under 16-bit autocast keep the frozen base's linear weights 16-bit
    (`frozen_linear_weights_in_autocast_dtype`); DeepSpeed's processes pass False (ZeRO partitions
    parameters of one dtype)."""
    method = cfg.adapter.method
    base = load_base(base_dir, cfg, device, gradient_checkpointing, precision=precision)
    if method in PEFT_METHODS:
        from peft import PeftConfig, PeftModel, get_peft_model, load_peft_weights, set_peft_model_state_dict

        config = PeftConfig.from_pretrained(adapter_dir)
        if not config.is_prompt_learning:
            net = PeftModel.from_pretrained(base, adapter_dir, is_trainable=True)
            if precision in ("bf16", "fp16"):
                keep_adapter_inputs_in_autocast_dtype(net)
                if cast_frozen and cfg.load_bits() is None and not (cfg.adapter.method == "dora" or cfg.adapter.use_dora):
                    frozen_linear_weights_in_autocast_dtype(net, precision)
            fused_lora.use_for_training(net, device)
            return net
        # PEFT refuses to reopen soft prompts as trainable; build them fresh and load the saved values
        config.inference_mode = False
        net = get_peft_model(base, config)
        set_peft_model_state_dict(net, load_peft_weights(adapter_dir))
        return net
    for p in base.parameters():
        p.requires_grad_(True)
    return base


def keep_adapter_inputs_in_autocast_dtype(net: Any) -> Any:
    """Stop PEFT casting each adapter's input up to the fp32 adapter weights (16-bit autocast runs only).

    Under autocast the adapter matmul runs in 16 bits anyway (bf16 -> fp32 -> bf16 is exact), so the
    cast changes no number; it only makes every adapted layer save an fp32 copy of its input for
    backward, which for a 4-bit base is most of the activation memory.
    """
    for module in net.modules():
        if hasattr(module, "cast_input_dtype_enabled"):
            module.cast_input_dtype_enabled = False
    return net


def frozen_linear_weights_in_autocast_dtype(net: Any, precision: str) -> int:
    """Keep the frozen base's linear weights in the autocast dtype (16-bit autocast runs of adapter methods).

    Autocast casts a weight that does not require grad afresh on every call (its cast cache holds only
    leaves that require grad), so an fp32 frozen base pays a copy of every weight in every forward and
    backward. Cast once, those matmuls read the very 16-bit values autocast would have made: the loss and
    gradients do not change. Trainable weights (the adapter), norms, embeddings and any weight tied to
    them (SmolLM2's head is its embedding matrix) stay fp32. Returns how many layers were cast.
    """
    import torch

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    tied = {id(net.get_input_embeddings().weight)}
    n = 0
    for module in net.modules():
        if type(module) is not torch.nn.Linear or module.weight.requires_grad or id(module.weight) in tied:
            continue
        if module.weight.dtype != torch.float32 or (module.bias is not None and module.bias.requires_grad):
            continue
        module.weight.data = module.weight.data.to(dtype)
        if module.bias is not None:
            module.bias.data = module.bias.data.to(dtype)
        n += 1
    return n


def optimizer(params: list, lr: float, weight_decay: float) -> Any:
    """AdamW, fused (one kernel over all adapter tensors instead of a dozen ops per tensor) where torch has it
    for the device; the update is AdamW's either way."""
    import torch

    devices = {p.device.type for p in params}
    fused = len(devices) == 1 and devices <= {"cpu", "cuda"} and all(p.dtype.is_floating_point for p in params)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=fused or None)


class HalfFineTuning:
    """Half Fine-Tuning: each round, a seeded random half of the parameter groups trains, the rest is frozen.

    Groups are the weight matrices of each decoder layer (attention and MLP projections) and the
    norms; embeddings and the output head stay frozen. Frozen groups get no gradient, so AdamW
    leaves them and their optimiser state untouched for the round.
    """

    def __init__(self, model: Any, seed: int, round_steps: int):
        self.groups: dict[str, list[Any]] = {}
        for name, param in model.named_parameters():
            if ".layers." not in name:
                param.requires_grad_(False)
                continue
            key = name.rsplit(".", 1)[0]  # one group per module: layers.3.self_attn.q_proj
            self.groups.setdefault(key, []).append(param)
        self.names = sorted(self.groups)
        self.seed, self.round_steps = seed, round_steps
        self.active: list[str] = []

    def parameters(self) -> list[Any]:
        return [p for k in self.names for p in self.groups[k]]

    def select(self, step: int) -> list[str]:
        """Unfreeze the half chosen for the round that `step` (1-based) falls in."""
        rnd = (step - 1) // self.round_steps
        chosen = set(random.Random(self.seed * 100_003 + rnd).sample(self.names, len(self.names) // 2))
        for key in self.names:
            for p in self.groups[key]:
                p.requires_grad_(key in chosen)
                if key not in chosen:
                    p.grad = None
        self.active = sorted(chosen)
        return self.active
