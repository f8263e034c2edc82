"""Three LoRA adapters served together by one `tunewright serve` against three servers, one per adapter, in one run.

Run: .venv/bin/python bench/serve_fleet.py [--levels 3,12] [--per-client 2] [--max-tokens 32] [--hidden 512]
     [--layers 6] [--rank 16]

The model: a small Llama built from a config (`--hidden`, `--layers`; the embedded model's tokenizer) and three
LoRA adapters over every linear layer with random weights (rank `--rank`). Measured, each setup in processes of
its own on the same weights, fp32 on the CPU, clients through the official `openai` client, each client's
requests spread over the three adapter names in turn (support-ticket prompts of the bundled generator, greedy
answers of at most `--max-tokens` tokens):

- one server: `tunewright serve a=... b=... c=...`: the base once, requests of the three adapters batched
  together (`tunewright.serve.shared_base`);
- three servers: `tunewright serve a=...` and so on, each adapter merged into a base of its own, each request
  sent to its adapter's server.

Every server process runs `--threads` torch threads (default 1: on a small machine other work shares, a second
OpenMP thread mostly waits for a core, and every step of the engine waits with it), so the three servers have
up to three cores' worth of threads against the one server's one.

At each level N clients send requests back to back (N x `--per-client` requests in all), each setup `--rounds`
times in turn, the order reversed every other round (so a slow spell of the machine hits both alike), the best
round per level kept; printed: req/s, tokens a second, p50/p95 latency, errors, and the memory of each setup: the
parameter bytes the servers hold (counted from the tensors) and their resident memory (RSS) after the load, the
largest of the rounds. Results go to bench/results/serve-fleet-cpu-<kind>.{md,json}.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
NAMES = ("billing", "shipping", "returns")


def _module(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / f"bench/{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build(out: Path, hidden: int, layers: int, rank: int) -> tuple[Path, dict[str, Path], dict]:
    """The base folder, the three adapter folders, and the parameter bytes of the base and of each adapter."""
    import torch
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from tunewright.tokenizer import embedded_gguf

    gguf = embedded_gguf()
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, num_hidden_layers=layers,
                         num_attention_heads=max(1, hidden // 64), num_key_value_heads=max(1, hidden // 192),
                         intermediate_size=hidden * 3, max_position_embeddings=2048, tie_word_embeddings=True,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    base = out / "base"
    net = LlamaForCausalLM(config)
    net.save_pretrained(base)
    tok.save_pretrained(base)
    sizes = {"base": sum(p.numel() * p.element_size() for p in net.parameters())}
    adapters = {}
    for i, name in enumerate(NAMES):
        torch.manual_seed(100 + i)
        lora = get_peft_model(LlamaForCausalLM.from_pretrained(base), LoraConfig(
            r=rank, lora_alpha=2 * rank, target_modules="all-linear", task_type="CAUSAL_LM"))
        with torch.no_grad():
            for key, p in lora.named_parameters():
                if "lora_B" in key:
                    p.copy_(torch.randn_like(p) * 0.02)
        lora.save_pretrained(out / name)
        adapters[name] = out / name
        sizes[name] = sum(t.numel() * t.element_size()
                          for t in load_file(out / name / "adapter_model.safetensors").values())
    return base, adapters, sizes


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


async def _load(routes: dict[str, str], convs: list[list[dict]], clients: int, max_tokens: int) -> dict:
    """`clients` clients sending `convs` back to back, request i to adapter NAMES[i % 3] at its server."""
    import openai

    servers = {url: openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="bench", max_retries=0, timeout=600)
               for url in set(routes.values())}
    work = list(enumerate(convs))
    latencies, errors, tokens = [], [], 0

    async def worker():
        nonlocal tokens
        while work:
            i, conv = work.pop()
            name = NAMES[i % len(NAMES)]
            t = time.perf_counter()
            try:
                reply = await servers[routes[name]].chat.completions.create(model=name, messages=conv,
                                                                            max_tokens=max_tokens, temperature=0)
                latencies.append(time.perf_counter() - t)
                tokens += reply.usage.completion_tokens
            except Exception as exc:  # counted, and the first one shown
                errors.append(f"{type(exc).__name__}: {exc}"[:300])

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(clients)))
    wall = time.perf_counter() - start
    for client in servers.values():
        await client.close()
    summary = _module("serve_load")._summary(latencies, errors, len(convs), wall)
    summary["tokens_per_s"] = tokens / wall
    return summary


def run_setup(label: str, servers: list[tuple[list[str], list[str]]], threads: int, levels: list[int],
              per_client: int, max_tokens: int, seed: int, log_dir: Path) -> dict:
    """Start each server (its model specs, the names it answers), load them together, stop them."""
    load = _module("serve_load")
    procs, routes = [], {}
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    try:
        for i, (specs, names) in enumerate(servers):
            port = load._free_port()
            url = f"http://127.0.0.1:{port}"
            out = open(log_dir / f"{label.replace(' ', '_')}-{i}.log", "w")
            procs.append(subprocess.Popen([sys.executable, "-m", "tunewright.cli", "serve", *specs, "--max-tokens", "64",
                                           "--cache-size", "0", "--host", "127.0.0.1", "--port", str(port)],
                                          stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT))
            routes.update({name: url for name in names})
        for proc, url in zip(procs, dict.fromkeys(routes.values())):
            load._wait_ready(url, proc, "/ready")
        asyncio.run(_load(routes, load.conversations(3, seed + 999), 3, 4))  # warm-up, every adapter once
        results = {}
        for level in levels:
            r = results[level] = asyncio.run(_load(routes, load.conversations(level * per_client, seed + level), level,
                                                   max_tokens))
            print(f"  {label:<14} {level:>3} clients: {r['req_per_s']:.2f} req/s, {r['tokens_per_s']:.1f} tok/s, "
                  f"p50 {r['p50_s']:.2f} s, p95 {r['p95_s']:.2f} s, errors {r['errors']}", flush=True)
        results["rss_bytes"] = sum(_rss(p.pid) for p in procs)
        return results
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()


def best(rounds: list[dict], levels: list[int]) -> dict:
    """Per level the round with the most req/s (every round's req/s beside it); the largest RSS of the rounds."""
    out = {level: {**max((r[level] for r in rounds), key=lambda r: r["req_per_s"]),
                   "rounds_req_per_s": [round(r[level]["req_per_s"], 3) for r in rounds]} for level in levels}
    out["rss_bytes"] = max(r["rss_bytes"] for r in rounds)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--levels", default="3,12")
    p.add_argument("--per-client", type=int, default=2)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--seed", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch threads of each server process")
    p.add_argument("--rounds", type=int, default=2, help="each setup this many times, in turn; the best round kept")
    p.add_argument("--out", help="result file stem (default: bench/results/serve-fleet-cpu-<kind>)")
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    levels = [int(x) for x in args.levels.split(",")]
    work = Path(tempfile.mkdtemp(prefix="serve-fleet-"))
    machine = _module("vs_hf_trainer").machine("cpu")
    base, adapters, sizes = build(work, args.hidden, args.layers, args.rank)
    print(f"machine {machine}\nbase {args.hidden} hidden x {args.layers} layers, {sizes['base'] / 1e6:.1f} MB; "
          f"adapters rank {args.rank}, {sizes[NAMES[0]] / 1e6:.2f} MB each\nfiles and server output in {work}",
          flush=True)
    specs = [f"{name}={adapters[name]}" for name in NAMES]
    setups = {"one server": [([*specs, "--base", str(base)], list(NAMES))],
              "three servers": [([spec, "--base", str(base)], [name]) for spec, name in zip(specs, NAMES)]}
    rounds: dict[str, list[dict]] = {label: [] for label in setups}
    for i in range(args.rounds):
        for label in (list(setups) if i % 2 == 0 else list(setups)[::-1]):
            print(f"round {i + 1}/{args.rounds}: {label}", flush=True)
            rounds[label].append(run_setup(label, setups[label], args.threads, levels, args.per_client,
                                           args.max_tokens, args.seed, work))
    together, apart = (best(rounds[label], levels) for label in setups)
    params = {"one server": sizes["base"] + sum(sizes[n] for n in NAMES), "three servers": 3 * sizes["base"]}
    table = ["| setup | clients | req/s | tok/s | p50 s | p95 s | errors |", "|---|---|---|---|---|---|---|"]
    for label, runs in (("one server", together), ("three servers", apart)):
        for level in levels:
            r = runs[level]
            table.append(f"| {label} | {level} | {r['req_per_s']:.2f} | {r['tokens_per_s']:.1f} | {r['p50_s']:.2f} | "
                         f"{r['p95_s']:.2f} | {r['errors']} |")
    memory = ["| setup | parameter bytes | RSS after the load |", "|---|---|---|"]
    for label, runs in (("one server", together), ("three servers", apart)):
        memory.append(f"| {label} | {params[label] / 1e6:.1f} MB | {runs['rss_bytes'] / 1e6:.0f} MB |")
    top = max(levels)
    ratio = together[top]["req_per_s"] / apart[top]["req_per_s"]
    text = ("\n".join(table) + "\n\n" + "\n".join(memory) +
            f"\n\nAt {top} clients one server answers {ratio:.2f}x the requests a second of three; it holds "
            f"{params['one server'] / params['three servers']:.0%} of their parameter bytes (the base once, "
            f"{sum(sizes[n] for n in NAMES) / 1e6:.1f} MB of adapters) and "
            f"{together['rss_bytes'] / apart['rss_bytes']:.0%} of their resident memory.")
    print("\n" + text)
    kind = "amd-" * ("AMD" in machine) + ("amx" if "AMX" in machine else "bf16" if "BF16" in machine else "avx2")
    stem = Path(args.out) if args.out else ROOT / "bench" / "results" / f"serve-fleet-cpu-{kind}"
    header = (f"# Three adapters on one server against three servers\n\nMachine: {machine}. Base: a Llama of "
              f"{args.hidden} hidden x {args.layers} layers ({sizes['base'] / 1e6:.1f} MB fp32, the embedded "
              f"tokenizer), three random LoRA adapters of rank {args.rank} on every linear layer; greedy answers of "
              f"at most {args.max_tokens} tokens, {args.per_client} requests per client per level, spread over the "
              f"three names. {args.threads} torch thread(s) per server process; best of {args.rounds} rounds per "
              f"setup and level (every round's req/s in the .json).\n"
              f"Command: `.venv/bin/python bench/serve_fleet.py {' '.join(sys.argv[1:])}`\n\n")
    stem.with_suffix(".md").write_text(header + text + "\n")
    stem.with_suffix(".json").write_text(json.dumps({"machine": machine, "args": vars(args), "sizes": sizes,
                                                     "parameter_bytes": params, "one_server": together,
                                                     "three_servers": apart}, indent=1, default=str))
    print(f"\nwritten {stem}.md and .json")


if __name__ == "__main__":
    main()
