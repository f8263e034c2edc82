"""One base model in memory and several adapters over it, each answering under its own name.

PEFT loads every adapter into the same network under an internal name; a request switches to its
adapter (`set_adapter`) and generates while holding the engine's lock, so requests for different
adapters never mix. The base itself can be served too, with every adapter switched off.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunewright.adapters import AdapterSource, check_same_base, read_config


@dataclass(frozen=True)
class ServedModel:
    """A name clients send as `model`, and where its adapter came from."""

    name: str
    source: AdapterSource | None  # None: the base with every adapter off
    internal: str = ""            # the adapter's name inside the PEFT model (PEFT names cannot hold dots)

    def card(self) -> dict:
        """What `/v1/models` says about it beyond the OpenAI fields."""
        if self.source is None:
            return {"adapter": None}
        s = self.source
        out = {"adapter": s.resolved, "sha256": s.sha256}
        out.update({k: v for k, v in (("registered_model", s.registered_model), ("version", s.version),
                                      ("run_id", s.run_id)) if v})
        return out


@dataclass
class Completion:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str
    logprobs: list[dict] = field(default_factory=list)


def message_text(content: Any) -> str:
    """An OpenAI message's content as text: a string, or the text parts of a list of parts."""
    if isinstance(content, str):
        return content
    if content is None:
        return ""
    return "".join(part.get("text", "") for part in content if isinstance(part, dict) and part.get("type") == "text")


class Engine:
    """The base and the adapters, loaded once; `complete` answers one conversation with one of them."""

    def __init__(self, base_dir: str | Path, adapters: list[tuple[str, AdapterSource]], *, precision: str = "fp32",
                 serve_base: str | None = None, device: str | None = None):
        import torch
        from peft import PeftModel
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if not adapters:
            raise ValueError("nothing to serve: give at least one adapter")
        names = [n for n, _ in adapters] + ([serve_base] if serve_base else [])
        if len(set(names)) != len(names):
            raise ValueError(f"model names must differ: {names}")
        configs = [(s.uri, read_config(s.local_dir)) for _, s in adapters]
        check_same_base(configs, "serving them together")
        kinds = {ref: cfg.get("peft_type") for ref, cfg in configs}
        if len(set(kinds.values())) > 1:
            listing = ", ".join(f"{ref}: {kind}" for ref, kind in kinds.items())
            raise ValueError(f"one server holds adapters of one PEFT type ({listing})")
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.autocast = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
        tokenizer_dir = base_dir if Path(base_dir, "tokenizer_config.json").is_file() else adapters[0][1].local_dir
        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        net = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).to(self.device)
        self.models: dict[str, ServedModel] = {}
        for i, (name, source) in enumerate(adapters):
            internal = f"adapter_{i}"
            if i == 0:
                net = PeftModel.from_pretrained(net, source.local_dir, adapter_name=internal)
            else:
                net.load_adapter(source.local_dir, adapter_name=internal)
            self.models[name] = ServedModel(name, source, internal)
        if serve_base:
            self.models[serve_base] = ServedModel(serve_base, None)
        self.net = net.eval()
        self.lock = threading.Lock()

    def system_prompt(self, name: str) -> str | None:
        source = self.models[name].source
        return source.system_prompt if source else None

    def complete(self, name: str, messages: list[dict], *, max_tokens: int, temperature: float = 0.0,
                 top_p: float = 1.0, seed: int | None = None, stop: list[str] | None = None,
                 top_logprobs: int | None = None) -> Completion:
        """Answer a conversation with the named model: greedy when temperature is 0 (as evaluation decodes)."""
        import contextlib

        import torch

        served = self.models[name]
        messages = [{"role": m["role"], "content": message_text(m.get("content"))} for m in messages]
        if served.source and served.source.system_prompt and not any(m["role"] == "system" for m in messages):
            messages = [{"role": "system", "content": served.source.system_prompt}] + messages
        enc = self.tokenizer.apply_chat_template([messages], add_generation_prompt=True, return_tensors="pt",
                                                 return_dict=True).to(self.device)
        sample = temperature > 0
        kwargs = {"do_sample": True, "temperature": temperature, "top_p": top_p} if sample else {"do_sample": False}
        with self.lock:
            if served.source is None:
                switch = self.net.disable_adapter()
            else:
                self.net.set_adapter(served.internal)
                switch = contextlib.nullcontext()
            if seed is not None:
                torch.manual_seed(seed)
            with switch, torch.no_grad(), torch.autocast(self.device.type, dtype=self.autocast or torch.float32,
                                                         enabled=self.autocast is not None):
                out = self.net.generate(**enc, max_new_tokens=max_tokens, pad_token_id=self.tokenizer.pad_token_id,
                                        eos_token_id=self.tokenizer.eos_token_id, return_dict_in_generate=True,
                                        output_logits=top_logprobs is not None, **kwargs)
        width = enc["input_ids"].shape[1]
        new = out.sequences[0, width:].tolist()
        eos = self.tokenizer.eos_token_id
        finish = "stop" if new and new[-1] == eos else ("length" if len(new) >= max_tokens else "stop")
        text = self.tokenizer.decode(new, skip_special_tokens=True).strip()
        for s in stop or []:
            if s and s in text:
                text, finish = text[: text.index(s)], "stop"
        logprobs = self._logprobs(new, out.logits, top_logprobs) if top_logprobs is not None else []
        return Completion(text, width, len(new), finish, logprobs)

    def _logprobs(self, tokens: list[int], logits: tuple, top: int) -> list[dict]:
        """OpenAI's `logprobs.content`: each generated token's log-probability under the model (before sampling
        adjustments), with the `top` likeliest alternatives."""
        import torch

        def entry(token_id: int, value: float) -> dict:
            text = self.tokenizer.decode([token_id])
            return {"token": text, "logprob": value, "bytes": list(text.encode("utf-8"))}

        out = []
        for token_id, step in zip(tokens, logits):
            logp = torch.log_softmax(step[0].float(), dim=-1)
            item = entry(token_id, float(logp[token_id]))
            values, ids = logp.topk(top) if top else (torch.empty(0), torch.empty(0, dtype=torch.long))
            item["top_logprobs"] = [entry(int(i), float(v)) for v, i in zip(values, ids)]
            out.append(item)
        return out


def name_and_reference(spec: str) -> tuple[str | None, str]:
    """`NAME=REFERENCE` or a bare reference (named by default_name)."""
    head, sep, tail = spec.partition("=")
    if sep and head and "/" not in head and ":" not in head:
        return head, tail
    return None, spec


def default_name(ref: str) -> str:
    """What clients call an adapter given without a name: `NAME@ALIAS` or `NAME/VERSION` for a registered one,
    else its folder's name (a stage 4 `adapter` folder is named by its run)."""
    if ref.startswith("models:/"):
        return ref.removeprefix("models:/").rstrip("/")
    path = Path(ref.rstrip("/"))
    if path.name == "adapter" and path.parent.name == "finetune":  # runs/<run id>/finetune/adapter
        return path.parent.parent.name
    return path.name


def resolve(specs: list[str], base: str | None, cache: Path, log) -> tuple[Path, list[tuple[str, AdapterSource]]]:
    """Fetch the adapters the command line names and find the one base they share.

    The base is `base` when given; else the base weights logged with the first registered adapter (every
    registered adapter must name the same base digest); else the folder the first adapter was trained over.
    """
    from tunewright.adapters import fetch, registered_base

    named = []
    for spec in specs:
        name, ref = name_and_reference(spec)
        named.append((name or default_name(ref), fetch(ref, cache, log, what=f"serve {spec}")))
    digests = {s.base_digest for _, s in named if s.base_digest}
    if len(digests) > 1:
        listing = ", ".join(f"{n}: {s.base_digest}" for n, s in named if s.base_digest)
        raise ValueError(f"the registered adapters were trained over different bases ({listing})")
    if base is not None:
        base_dir = Path(base).expanduser()
        if not (base_dir / "config.json").is_file():
            raise FileNotFoundError(f"--base {base}: not a Hugging Face model folder (no config.json)")
        return base_dir, named
    registered = [s for _, s in named if s.registered_model]
    if registered:
        return registered_base(registered[0], cache, log), named
    trained_over = Path(str(read_config(named[0][1].local_dir).get("base_model_name_or_path") or ""))
    if not (trained_over / "config.json").is_file():
        raise FileNotFoundError(f"{named[0][1].uri} was trained over {trained_over}, which is not on this machine; "
                                "name the base with --base")
    return trained_over, named
