"""Reward models and value heads: a scalar head over the base (and its adapter) reading the final hidden state.

A reward model (`train.objective: reward`) scores a prompt and answer by the head's output at the
answer's last token, trained on preference pairs so the chosen answer scores above the rejected
(the Bradley-Terry loss of TRL's RewardTrainer). Its stage-4 folder is the adapter plus
`reward_head.safetensors`; stage 6 registers it as an MLflow model that scores (prompt, answer)
rows, and GRPO and PPO load it by `train.reward_model`. PPO's critic is the same kind of head
over the policy's hidden states, read at every answer token.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

HEAD_FILE = "reward_head.safetensors"
VALUE_HEAD_FILE = "value_head.safetensors"
META_FILE = "tunewright_reward_model.json"


def scalar_head(hidden_size: int, device: Any = None, bias: bool = False):
    """A linear map from the final hidden state to one number (fp32), initialised small. Without a bias it is
    the `score` layer of HF's sequence-classification models (a reward's offset cancels in every comparison);
    a value head keeps one."""
    import torch

    head = torch.nn.Linear(hidden_size, 1, bias=bias, device=device)
    torch.nn.init.normal_(head.weight, std=1 / (hidden_size + 1) ** 0.5)
    if bias:
        torch.nn.init.zeros_(head.bias)
    return head


def hidden_size(net: Any) -> int:
    lm = net.get_base_model() if hasattr(net, "get_base_model") else net
    return int(lm.config.hidden_size)


def final_hidden(net: Any, batch: dict[str, Any]) -> Any:
    """The decoder's last hidden states (rows, width, hidden), the adapter active, without the LM head."""
    lm = net.get_base_model() if hasattr(net, "get_base_model") else net
    peft_cfg = getattr(net, "active_peft_config", None)
    if getattr(peft_cfg, "is_prompt_learning", False):
        raise ValueError("a reward or value head needs a LoRA-family, IA3, full or hft method, not soft prompts")
    return lm.get_decoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                            use_cache=False).last_hidden_state


def sequence_scores(net: Any, head: Any, batch: dict[str, Any]) -> Any:
    """The head's score of each right-padded row, read at its last real token."""
    import torch

    hidden = final_hidden(net, batch)
    last = batch["attention_mask"].sum(dim=1) - 1
    picked = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    return head(picked.float()).squeeze(-1)


def reward_loss(chosen: Any, rejected: Any) -> tuple[Any, dict]:
    """Bradley-Terry: -log sigmoid(score(chosen) - score(rejected)), averaged over the pairs."""
    import torch.nn.functional as F

    margin = chosen - rejected
    return -F.logsigmoid(margin).mean(), {
        "rewards_chosen": chosen.detach().mean(), "rewards_rejected": rejected.detach().mean(),
        "reward_margin": margin.detach().mean(), "preference_accuracy": (margin.detach() > 0).float().mean()}


def pair_scores(net: Any, head: Any, rows: list[dict], pad_id: int) -> tuple[Any, Any]:
    """Scores of the chosen and rejected parts of encoded preference rows, in one forward."""
    from tunewright.chat import pad_batch

    device = next(net.parameters()).device
    batch = pad_batch([r["chosen"] for r in rows] + [r["rejected"] for r in rows], pad_id)
    scores = sequence_scores(net, head, {k: v.to(device) for k, v in batch.items()})
    return scores[: len(rows)], scores[len(rows):]


def save_head(head: Any, out: Path, file: str = HEAD_FILE, meta: dict | None = None) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}, str(out / file))
    if meta is not None:
        (out / META_FILE).write_text(json.dumps(meta, indent=2))


def load_head(folder: Path, size: int, device: Any = None, file: str = HEAD_FILE):
    from safetensors.torch import load_file

    state = load_file(str(Path(folder) / file))
    head = scalar_head(size, device, bias="bias" in state)
    head.load_state_dict(state)
    return head.eval()


def is_reward_model(folder: str | Path) -> bool:
    return (Path(folder) / HEAD_FILE).is_file()


class RewardScorer:
    """A trained reward model loaded for scoring: base, adapter and head, in eval mode."""

    def __init__(self, base_dir: str, folder: str, device: Any = None, max_len: int = 1024, batch_size: int = 8):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if not is_reward_model(folder):
            raise ValueError(f"{folder}: not a reward model (no {HEAD_FILE}; train one with train.objective: reward)")
        self.device = device or torch.device("cpu")
        self.tokenizer = AutoTokenizer.from_pretrained(base_dir)
        net = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).to(self.device)
        if (Path(folder) / "adapter_config.json").is_file():
            from peft import PeftModel

            net = PeftModel.from_pretrained(net, folder)
        self.net = net.eval()
        self.head = load_head(Path(folder), hidden_size(net), self.device)
        self.max_len, self.batch_size = max_len, batch_size

    def score_pairs(self, records: list[dict]) -> tuple[list[float], list[float]]:
        """Scores of the chosen and of the rejected answer of each preference pair."""
        import torch

        from tunewright.preference import encode_rows

        rows = encode_rows("reward", self.tokenizer, records, self.max_len)
        chosen: list[float] = []
        rejected: list[float] = []
        with torch.no_grad():
            for start in range(0, len(rows), self.batch_size):
                a, b = pair_scores(self.net, self.head, rows[start:start + self.batch_size], self.tokenizer.pad_token_id)
                chosen.extend(a.float().cpu().tolist())
                rejected.extend(b.float().cpu().tolist())
        return chosen, rejected

    def score(self, prompts: list[list[dict]], answers: list[str]) -> list[float]:
        """One score per (prompt messages, answer text)."""
        import torch

        from tunewright.chat import encode_example, pad_batch

        out: list[float] = []
        rows = [encode_example(self.tokenizer, list(p) + [{"role": "assistant", "content": a}], self.max_len)
                for p, a in zip(prompts, answers)]
        with torch.no_grad():
            for start in range(0, len(rows), self.batch_size):
                batch = pad_batch(rows[start:start + self.batch_size], self.tokenizer.pad_token_id)
                scores = sequence_scores(self.net, self.head, {k: v.to(self.device) for k, v in batch.items()})
                out.extend(scores.float().cpu().tolist())
        return out


def load_scorer(ref: str, device: Any = None) -> RewardScorer:
    """A reward model by MLflow model URI (`models:/NAME@ALIAS`, `models:/NAME/VERSION`, `runs:/...`) or by the
    folder stage 4 of a reward run wrote."""
    if ref.startswith(("models:/", "runs:/", "mlflow-artifacts:")):
        import mlflow

        try:
            model = mlflow.pyfunc.load_model(ref)
        except Exception as exc:  # MLflow raises several kinds for a missing model, version or alias
            raise ValueError(f"train.reward_model '{ref}': cannot be loaded from MLflow ({exc})") from exc
        scorer = getattr(model.unwrap_python_model(), "scorer", None)
        if not isinstance(scorer, RewardScorer):
            raise ValueError(f"train.reward_model '{ref}': not a reward model (register one with a recipe whose "
                             "train.objective is reward)")
        return scorer
    folder = Path(ref)
    if not folder.is_dir():
        raise ValueError(f"train.reward_model '{ref}': no such folder or MLflow model URI")
    config = folder / "adapter_config.json"
    base = json.loads(config.read_text())["base_model_name_or_path"] if config.is_file() else str(folder)
    return RewardScorer(base, str(folder), device)
