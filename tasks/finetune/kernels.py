"""What a run's training step uses, said once in the stage log and as MLflow params: the shared prompt prefix,
the attention, the vocabulary projection, unpadded decoding, the last layer's read positions, fused LoRA and
RMSNorm layers, and why each that stands aside does."""

from __future__ import annotations

from tasks.finetune.loop import RankSlice
from tunewright.chat import pad_batch
from tunewright.recipe import TrainConfig
from tunewright.train import attention, fused_lora, fused_rmsnorm, liger
from tunewright.train.cross_entropy import LOGIT_CHUNK_TOKENS
from tunewright.train.forward import MIN_SHARED_PREFIX, last_layer_rows_why_not, shared_prefix_length
from tunewright.train.loss import Kernels


def log_shared_prefix(cfg: TrainConfig, why_not: str, batches: RankSlice | None, align: RankSlice | None,
                      method: str, log) -> None:
    """Say whether the shared-prefix forward is used and why not, with what the first batch shares."""
    import mlflow

    why = why_not or ("train.packing: packed rows restart their positions" if cfg.packing else
                      "train.gradient_checkpointing keeps no cache to share" if cfg.gradient_checkpointing else
                      f"adapter method {method} prepends soft prompts" if method in ("prompt_tuning", "prefix_tuning")
                      else "")
    first = None
    if batches is not None:
        first = batches.batches(0)
    elif align is not None and align.encoded and ("chosen" in align.encoded[0] or "answer" in align.encoded[0]):
        part = "chosen" if "chosen" in align.encoded[0] else "answer"
        first = pad_batch([align.encoded[i][part] for i in align.rows(0)], align.pad_id)
    shared = shared_prefix_length(first) if first is not None and not why else 0
    if why:
        log.info("shared prefix: not used (%s); the plain forward runs every token of every row", why)
    elif shared:
        width = first["input_ids"].shape[1]
        log.info("shared prefix: the first batch's rows share %d of their %d positions; they run through the "
                 "model once per batch, not once per row", shared, width)
    else:
        log.info("shared prefix: the first batch's rows share fewer than %d prompt tokens; batches that do share "
                 "them still use it", MIN_SHARED_PREFIX)
    mlflow.log_param("shared_prefix_tokens_first_batch", shared)


def log_kernels(net, cfg: TrainConfig, device, amp, kernels: Kernels, log) -> None:
    """Say which of the step's speed-ups this run uses, and why not where one stands aside."""
    import mlflow

    lm = net.get_base_model() if hasattr(net, "get_base_model") else net
    attn = getattr(lm.config, "_attn_implementation", "?")
    log.info("attention: %s%s", attn, " (the plain product on the CPU for short rows, sdpa for long ones)"
             if attn == attention.NAME else " (padding-free rows through torch's variable-length kernel)"
             if attn == attention.VARLEN_NAME else f" ({' and '.join(attention.unpadded_names())} are for sdpa models)")
    own_decode = _log_head(net, lm, amp, log)
    unpadded = own_decode and attn in attention.unpadded_names() and not cfg.packing and kernels.unpadded
    why = "packed rows have no padding" if cfg.packing else (f"it needs the {' or '.join(attention.unpadded_names())} "
                                                             "attention and the model's own decoder and head")
    log.info("padding: %s", "each batch decoded unpadded (its rows' real tokens as one sequence, apart only in "
             "attention); left-padded batches and sliding-window models decode padded" if unpadded
             else f"batches decoded padded ({why})")
    if unpadded:
        last_why = last_layer_rows_why_not(lm.get_decoder()) or ("" if kernels.last_layer_rows else "switched off")
        log.info("last layer: %s", f"every position ({last_why})" if last_why else "query and output projections "
                 "and MLP on the positions that reach the loss only (the others give keys and values)")
        mlflow.log_param("last_layer_read_positions_only", not last_why)
    fused = fused_lora.fused_layers(net)
    log.info("LoRA layers: %s", f"{fused} fused (base product, rank-r adapter and sum in one function, the scale "
             "applied at rank r)" if fused else "PEFT's forward" + (" (the fused layer is for CPU and CUDA training)"
                                                                     if device.type not in ("cpu", "cuda") else ""))
    norms = fused_rmsnorm.fused_layers(net)
    log.info("RMSNorm layers: %s", f"{norms} fused (one function each, written in the dtype their linear layers "
             "read)" if norms else "the model's own" + (" (the fused norm is for CPU training)"
                                                         if device.type != "cpu" else ""))
    liger_why = "" if liger.applied(net) else liger.why_not(lm, device)
    log.info("fused kernels: %s", "Liger's RMSNorm, RoPE and SwiGLU" if not liger_why else f"none ({liger_why})")
    mlflow.log_params({"attention": attn, "unpadded": unpadded, "fused_lora_layers": fused,
                       "fused_rmsnorm_layers": norms, "liger_kernels": not liger_why})


def _log_head(net, lm, amp, log) -> bool:
    """Say how the vocabulary projection runs; True where the loss decodes with the model's own decoder and head."""
    import torch

    head = lm.get_output_embeddings()
    special = any(getattr(lm.config, k, None) for k in ("final_logit_softcapping", "logit_scale"))
    own_decode = type(head) is torch.nn.Linear and not special and not getattr(
        getattr(net, "active_peft_config", None), "is_prompt_learning", False)
    if own_decode:
        log.info("vocabulary projection: answer positions only, fused with the cross-entropy, %d positions at a time%s",
                 LOGIT_CHUNK_TOKENS, "; the frozen head kept in the autocast dtype" if amp is not None
                 and not head.weight.requires_grad else "")
    else:
        log.info("vocabulary projection: the model's own head on every position (%s)",
                 "soft prompts" if head is not None and not special else "a head that is not a plain projection")
    return own_decode
