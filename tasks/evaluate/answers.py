"""Who answers the held-out prompts in stage 5: the base (its answers cached by everything they depend on), the
fine-tuned model, its starting point and the registry's champion, all greedy and with the same settings."""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from tasks.artifacts import EnvironmentArtifact, ModelArtifact, TrainArtifact
from tunewright import preference
from tunewright.chat import generate, turn_text
from tunewright.files import write_atomic
from tunewright.recipe import EvaluateConfig, ModelConfig
from tunewright.registry.tracking import RunContext
from tunewright.train.loss import answer_loss
from tunewright.train.methods import load_base


@dataclass(frozen=True)
class Answers:
    """Every compared model's answers to the test conversations, and the loaded fine-tuned model to ask more of."""
    convs: list[list[dict]]
    refs: list[str]
    tokenizer: Any
    net: Any                       # the fine-tuned model; for an adapter, the base is `net` with the adapter off
    settings: dict                 # generation settings: max_new_tokens, batch_size, autocast_dtype
    outs: dict[str, list[str]]     # base, tuned and (when compared) champion -> answers
    losses: dict[str, float]       # the same models -> answer loss
    champion: dict | None          # `champion_answers`' result, when a champion was compared


def load_full(folder: str, device):
    """A whole model folder (a base or a full fine-tune) in fp32, for evaluation."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).to(device).eval()


def _progress(log, label: str):
    return lambda done, total: log.info("%s: generated %d/%d answers", label, done, total)


def answer_test_set(cfg: EvaluateConfig, model_cfg: ModelConfig, test: list[dict], model: ModelArtifact,
                    trained: TrainArtifact, env: EnvironmentArtifact, ctx: RunContext, champion: str | None, device,
                    amp, log) -> Answers:
    """The base's, the fine-tuned model's and (when asked for and registered) the champion's answers and answer
    losses on the test conversations."""
    from transformers import AutoTokenizer

    pairs = preference.sft_with_tools(test)
    convs = [c for c, _ in pairs]
    refs = [turn_text(c[-1]) for c in convs]  # a reference that calls tools reads as its <tool_call> blocks
    tokenizer = AutoTokenizer.from_pretrained(model.base_dir)
    settings = {"max_new_tokens": cfg.max_new_tokens, "batch_size": cfg.batch_size, "autocast_dtype": amp}
    if any(t for _, t in pairs):
        settings["tools"] = [t for _, t in pairs]
    # the JSON metric reads only the first JSON object of an answer: generation stops once it has closed
    scored = settings | {"stop_after_json": cfg.metric == "json_exact_match"}
    cache = base_cache_path(ctx, model, model_cfg, env, convs, scored)
    base_answers = partial(_base_answers, cache=cache, tokenizer=tokenizer, convs=convs, gen=scored, log=log)
    net, base_out, base_loss = _tuned_net_and_base_answers(model_cfg, model, trained, env, device, cache,
                                                           base_answers)
    tuned_out = generate(net, tokenizer, convs, progress=_progress(log, "fine-tuned"), **scored)
    tuned_loss = answer_loss(net, tokenizer, convs, max_len=1024, batch_size=cfg.batch_size, autocast_dtype=amp,
                             tools=settings.get("tools"))
    if champion:  # if this version becomes champion, the next run reads these
        from tunewright.registry.adapters import model_weights_digest, weights_digest

        digest = (weights_digest if trained.kind == "adapter" else model_weights_digest)(trained.output_dir)
        write_cache(base_cache_path(ctx, model, model_cfg, env, convs, scored, who={
            "champion": digest, "base": model.base_digest, "same_base": True}), tuned_out, tuned_loss)
    outs = {"base": base_out, "tuned": tuned_out}
    losses = {"base": base_loss, "tuned": tuned_loss}
    champ = champion_answers(champion, cfg, model_cfg, model, env, ctx, tokenizer, convs, scored, device, amp,
                             log) if champion and cfg.champion else None
    if champ is not None:
        outs["champion"], losses["champion"] = champ["answers"], champ["loss"]
    return Answers(convs=convs, refs=refs, tokenizer=tokenizer, net=net, settings=settings, outs=outs,
                   losses=losses, champion=champ)


def _tuned_net_and_base_answers(model_cfg: ModelConfig, model: ModelArtifact, trained: TrainArtifact,
                                env: EnvironmentArtifact, device, cache: Path, base_answers) -> tuple[Any, list, float]:
    """The fine-tuned model, loaded, with the base's answers and answer loss; a full fine-tune's base is loaded only
    when its answers are not cached."""
    from peft import PeftModel

    if trained.kind == "adapter":
        # the base model is the same network with the adapter switched off (and, for QLoRA, as quantised)
        base = load_base(model.base_dir, model_cfg, device, for_training=False, precision=env.precision)
        net = PeftModel.from_pretrained(base, trained.output_dir).eval()
        with net.disable_adapter():
            base_out, base_loss = base_answers(net)
        return net, base_out, base_loss
    base_out, base_loss = base_answers(None if cache.is_file() else load_full(model.base_dir, device))
    return load_full(trained.output_dir, device), base_out, base_loss


def _base_answers(net, *, cache: Path, tokenizer, convs: list, gen: dict, log) -> tuple[list[str], float]:
    """The base's answers and answer loss: read from `cache` when the same base answered the same prompts with the
    same settings before, else generated and kept there."""
    if cache.is_file():
        found = json.loads(cache.read_text(encoding="utf-8"))
        log.info("base: answers and answer loss for these %d test prompts read from %s (same base weights, "
                 "test split and generation settings)", len(convs), cache.name)
        return found["answers"], found["loss"]
    answers = generate(net, tokenizer, convs, progress=_progress(log, "base"), **gen)
    loss = answer_loss(net, tokenizer, convs, max_len=1024, batch_size=gen["batch_size"],
                       autocast_dtype=gen["autocast_dtype"], tools=gen.get("tools"))
    write_cache(cache, answers, loss)
    return answers, loss


def start_point_answers(trained: TrainArtifact, ans: Answers, device, log) -> tuple[Any, list[str]]:
    """The starting point of an alignment (the model after its supervised steps), loaded, and its answers."""
    if trained.kind == "adapter":
        ans.net.load_adapter(trained.start_dir, adapter_name="start")
        ans.net.set_adapter("start")
        start = ans.net
    else:
        start = load_full(trained.start_dir, device)
    return start, generate(start, ans.tokenizer, ans.convs, progress=_progress(log, "starting point"), **ans.settings)


def champion_answers(ref: str, cfg: EvaluateConfig, model_cfg: ModelConfig, model: ModelArtifact,
                     env: EnvironmentArtifact, ctx: RunContext, tokenizer, convs: list, gen: dict, device, amp,
                     log) -> dict | None:
    """The registry's current champion answering the same test conversations: {resolved, answers, loss, note}, or
    None when there is no champion yet or it cannot be compared (said in the log). An adapter or a full fine-tune;
    answers are cached by the champion's weights digest, like the base's."""
    from tunewright.registry.adapters import fetch

    cache_dir = Path(ctx.state_dir, "registry_cache")
    try:
        src = fetch(ref, cache_dir, log, what="evaluate.champion", whole_ok=True)
    except ValueError as exc:
        log.info("no champion to compare with: %s", str(exc).splitlines()[0])
        return None
    same_base = src.base_digest == model.base_digest
    cache = base_cache_path(ctx, model, model_cfg, env, convs, gen,
                            who={"champion": src.sha256, "base": src.base_digest, "same_base": same_base})
    note = f"{src.resolved} ({ref})"
    if cache.is_file():
        found = json.loads(cache.read_text(encoding="utf-8"))
        log.info("champion %s: answers for these %d test prompts read from %s", src.resolved, len(convs), cache.name)
        return {"resolved": src.resolved, "answers": found["answers"], "loss": found["loss"], "note": note}
    net = _champion_net(src, same_base, model_cfg, model, env, cache_dir, device, log)
    answers = generate(net, tokenizer, convs, progress=_progress(log, "champion"), **gen)
    loss = answer_loss(net, tokenizer, convs, max_len=1024, batch_size=gen["batch_size"], autocast_dtype=amp,
                       tools=gen.get("tools"))
    write_cache(cache, answers, loss)
    del net
    return {"resolved": src.resolved, "answers": answers, "loss": loss, "note": note}


def _champion_net(src, same_base: bool, model_cfg: ModelConfig, model: ModelArtifact, env: EnvironmentArtifact,
                  cache_dir: Path, device, log):
    """A full fine-tune as it was saved; an adapter over our base as this run loads it when the champion was trained
    over the same weights, else over its own."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from tunewright.registry.adapters import registered_base

    if src.whole:
        return load_full(src.local_dir, device)
    if same_base:
        base = load_base(model.base_dir, model_cfg, device, for_training=False, precision=env.precision)
    else:
        base = AutoModelForCausalLM.from_pretrained(registered_base(src, cache_dir, log),
                                                    dtype=torch.float32).to(device)
    return PeftModel.from_pretrained(base, src.local_dir).eval()


def write_cache(cache: Path, answers: list[str], loss: float) -> None:
    """Keep a model's answers and answer loss, written whole or not at all (runs may share the state folder)."""
    write_atomic(cache, json.dumps({"answers": answers, "loss": loss}))


def base_cache_path(ctx: RunContext, model: ModelArtifact, model_cfg: ModelConfig, env: EnvironmentArtifact,
                    convs: list, gen: dict, who: dict | None = None) -> Path:
    """Where the base model's answers to these test prompts are kept, named by everything they depend on: the base
    weights' digest and how they are loaded, the test conversations, the generation settings and the libraries."""
    import hashlib

    import torch
    import transformers

    key = json.dumps({"base": model.base_digest, "bits": model_cfg.load_bits(),
                      "quantization": model_cfg.quantization.model_dump(mode="json"), "device": env.device,
                      "precision": env.precision, "convs": convs, "max_new_tokens": gen["max_new_tokens"],
                      "batch_size": gen["batch_size"], "stop_after_json": gen["stop_after_json"],
                      "torch": torch.__version__, "transformers": transformers.__version__, "layout": 2}
                     | ({"who": who} if who else {}) | ({"tools": gen["tools"]} if gen.get("tools") else {}),
                     sort_keys=True, default=str)
    kind = "champion" if who else "base"
    return Path(ctx.state_dir, "eval_cache", f"{kind}-{hashlib.sha256(key.encode()).hexdigest()[:32]}.json")
