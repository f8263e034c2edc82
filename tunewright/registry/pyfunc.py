"""The registered model: an MLflow pyfunc that answers chat prompts with base + adapter.

Load it anywhere MLflow runs:

    model = mlflow.pyfunc.load_model("models:/tunewright-demo@champion")
    model.predict(pd.DataFrame({"prompt": ["My Orbit Mouse will not turn on. Order A12345."]}))

Input columns: `prompt` (the user turn; the training system prompt is added) or `messages`
(a list of {role, content}), and optionally `tools` (each row's OpenAI tool list, rendered into its prompt; calls
come back in the answer as `<tool_call>` blocks, read by `tunewright.chat.parse_tool_calls`). Output: one answer
string per row.
"""

from __future__ import annotations

from typing import Any

import mlflow.pyfunc


class ChatAdapterModel(mlflow.pyfunc.PythonModel):
    """Base weights and the fine-tuned adapter (or a fully fine-tuned model), stored inside the logged model."""

    def load_context(self, context: Any) -> None:
        import torch
        from peft import PeftModel
        from transformers import AutoModelForCausalLM, AutoTokenizer

        cfg = context.model_config or {}
        self.system_prompt = cfg.get("system_prompt")
        self.max_new_tokens = int(cfg.get("max_new_tokens", 64))
        self.batch_size = int(cfg.get("batch_size", 16))
        self.precision = cfg.get("precision", "fp32")
        if self.precision == "bf16" and not _bf16_ok():
            self.precision = "fp32"
        if "model" in context.artifacts:  # full or half fine-tuning: a whole model folder
            self.tokenizer = AutoTokenizer.from_pretrained(context.artifacts["model"])
            self.model = AutoModelForCausalLM.from_pretrained(context.artifacts["model"], dtype=torch.float32).eval()
        else:
            self.tokenizer = AutoTokenizer.from_pretrained(context.artifacts["adapter"])
            quant = _quantization(cfg.get("quantization"))
            kwargs = {"quantization_config": quant, "device_map": {"": "cuda" if torch.cuda.is_available() else "cpu"}} if quant else {}
            base = AutoModelForCausalLM.from_pretrained(base_folder(context, cfg), dtype=torch.float32, **kwargs)
            if quant is not None and cfg["quantization"].get("bits") == 4 and self.precision in ("bf16", "fp16"):
                from tunewright.train.quantization import place_unquantised  # as training placed them

                place_unquantised(base, cfg["quantization"].get("compute_dtype", "bf16"))
            model = PeftModel.from_pretrained(base, context.artifacts["adapter"])
            # An adapter trained over a quantised base answers as trained only over that same base, so it
            # stays unmerged there; LoRA-family and IA3 weights otherwise fold into the base for speed.
            keep = quant is not None or model.active_peft_config.is_prompt_learning
            self.model = (model if keep else model.merge_and_unload()).eval()

    def _conversations(self, model_input: Any) -> list[list[dict[str, str]]]:
        return _conversations(model_input, self.system_prompt)

    def predict(self, context, model_input, params=None):  # untyped: MLflow reads hints as a schema
        from tunewright.chat import autocast_dtype, generate

        params = params or {}
        frame = _frame(model_input)
        tools = [_listed(t) or None for t in frame["tools"]] if "tools" in frame.columns else None
        return generate(self.model, self.tokenizer, self._conversations(frame),
                        max_new_tokens=int(params.get("max_new_tokens", self.max_new_tokens)),
                        batch_size=self.batch_size, autocast_dtype=autocast_dtype(self.precision), tools=tools)


def base_folder(context: Any, cfg: dict) -> str:
    """The base weights: logged inside the model (versions before content-addressed bases), or fetched once per
    machine from the registry's store by the URI and digest the model config names."""
    if "base_model" in context.artifacts:
        return context.artifacts["base_model"]
    from tunewright.registry.bases import fetch_base

    return str(fetch_base(cfg["base_uri"], cfg["base_digest"]))


def _frame(model_input: Any):
    import pandas as pd

    return model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)


def _conversations(model_input: Any, system_prompt: str | None) -> list[list[dict[str, str]]]:
    """The prompt of each input row as messages: its `messages`, or its `prompt` after the training system prompt."""
    frame = _frame(model_input)
    if "messages" in frame.columns and not frame["messages"].isna().all():
        return [_listed(m) for m in frame["messages"]]
    if "prompt" not in frame.columns:
        raise ValueError(f"input needs a 'prompt' or 'messages' column, got {list(frame.columns)}")
    system = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return [system + [{"role": "user", "content": str(p)}] for p in frame["prompt"]]


def _listed(value: Any) -> list:
    """A list cell (messages, tools) as a list: given as one, or as its JSON text; empty when missing."""
    import json

    if isinstance(value, str):
        value = json.loads(value) if value.strip() else []
    return [] if value is None or (isinstance(value, float) and value != value) else list(value)


class RewardScorerModel(mlflow.pyfunc.PythonModel):
    """A reward model (base, adapter and score head): one score per (prompt, answer) row, higher is better.

    Input columns: `prompt` (the user turn; the training system prompt is added) or `messages`, and `answer`.
    GRPO and PPO load it with `train.reward_model: models:/NAME@ALIAS`.
    """

    def load_context(self, context: Any) -> None:
        from tunewright.scoring.reward_model import RewardScorer

        cfg = context.model_config or {}
        self.system_prompt = cfg.get("system_prompt")
        self.scorer = RewardScorer(context.artifacts["base_model"], context.artifacts["reward_model"],
                                   batch_size=int(cfg.get("batch_size", 8)))

    def predict(self, context, model_input, params=None):  # untyped: MLflow reads hints as a schema
        frame = _frame(model_input)
        if "answer" not in frame.columns:
            raise ValueError(f"input needs an 'answer' column beside the prompt, got {list(frame.columns)}")
        return self.scorer.score(_conversations(frame, self.system_prompt), [str(a) for a in frame["answer"]])


def _quantization(spec: dict | None):
    """The bitsandbytes config the adapter was trained over, or None for a full-precision base."""
    from tunewright.train.quantization import bnb_config

    return bnb_config(**spec) if spec else None


def _bf16_ok() -> bool:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    return bool(getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()
                or getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())
