"""`tunewright serve` under load, beside one-at-a-time `generate` and `transformers serve`, in one run.

Run: .venv/bin/python bench/serve_load.py [--model FOLDER] [--levels 1,4,16,64] [--max-tokens 32]

The model is a whole model folder (a merged export); by default the embedded base converted from its
GGUF (stage 2's cache). Short support-ticket prompts (the bundled generator, with its system prompt),
greedy answers of at most `--max-tokens` tokens, each request a different ticket. Measured, each
server in its own process on the same weights, fp32, clients through the official `openai` client:

- one at a time: the same requests answered in turn by `model.generate` in this process (the
  baseline every ratio is against);
- tunewright serve: continuous batching, response cache off (every prompt differs anyway);
- tunewright serve --quantize 8bit: the same with int8 linear layers (1 and 4 clients);
- transformers serve --continuous-batching: transformers' own OpenAI server, given the same KV-cache
  settings tunewright uses (its defaults size the cache from memory: gigabytes and half a minute).

At each level N clients send requests back to back (N x `--per-client` requests in all); printed:
req/s, p50/p95 latency, error rate (429s counted apart, as refusals of a full queue), and the ratio
of req/s to one-at-a-time. Results go to bench/results/serve-load-cpu-<kind>.{md,json}.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _generator():
    spec = importlib.util.spec_from_file_location("ticket_generator", ROOT / "data/support_tickets/generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _machine() -> str:
    spec = importlib.util.spec_from_file_location("vs_hf_trainer", ROOT / "bench/vs_hf_trainer.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.machine("cpu")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def default_model() -> Path:
    """The embedded base as a safetensors folder (converted once, as stage 2 does)."""
    import logging

    from tasks.model import resolve_base
    from tunewright import settings
    from tunewright.recipe import ModelConfig

    state = settings.state_dir()
    folder, _ = resolve_base(ModelConfig(), state, logging.getLogger("bench"))
    return folder


def conversations(n: int, seed: int) -> list[list[dict]]:
    rows = _generator().generate(n, seed=seed)
    return [[m for m in r["messages"] if m["role"] != "assistant"] for r in rows]


def one_at_a_time(model: Path, convs: list[list[dict]], max_tokens: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    net = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    latencies = []
    ids = [tok.apply_chat_template(c, add_generation_prompt=True, return_tensors="pt", return_dict=True) for c in convs]
    with torch.no_grad():
        net.generate(**ids[0], max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)  # warm-up
        start = time.perf_counter()
        for enc in ids:
            t = time.perf_counter()
            net.generate(**enc, max_new_tokens=max_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
            latencies.append(time.perf_counter() - t)
        wall = time.perf_counter() - start
    return _summary(latencies, [], len(convs), wall)


def _summary(latencies: list[float], errors: list[str], n: int, wall: float, refused: int = 0) -> dict:
    ordered = sorted(latencies) or [float("nan")]
    return {"requests": n, "ok": len(latencies), "refused_429": refused, "errors": len(errors),
            "error_rate": len(errors) / max(n, 1), "req_per_s": len(latencies) / wall, "wall_s": wall,
            "p50_s": statistics.median(ordered), "p95_s": ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))],
            "first_error": errors[0] if errors else None}


async def _load(url: str, model: str, convs: list[list[dict]], clients: int, max_tokens: int) -> dict:
    import openai

    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="bench", max_retries=0, timeout=600)
    work = list(convs)
    latencies, errors, refused = [], [], 0

    async def worker():
        nonlocal refused
        while work:
            conv = work.pop()
            t = time.perf_counter()
            try:
                await client.chat.completions.create(model=model, messages=conv, max_tokens=max_tokens, temperature=0)
                latencies.append(time.perf_counter() - t)
            except openai.RateLimitError:
                refused += 1
            except Exception as exc:  # counted, and the first one shown
                errors.append(f"{type(exc).__name__}: {exc}"[:300])

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(clients)))
    wall = time.perf_counter() - start
    await client.close()
    return _summary(latencies, errors, len(convs), wall, refused)


def _wait_ready(url: str, proc: subprocess.Popen, path: str, timeout: float = 600) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}")
        try:
            if httpx.get(f"{url}{path}", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url}{path} not ready after {timeout} s")


def run_server(name: str, command: list[str], model_name: str, ready_path: str, levels: list[int],
               per_client: int, max_tokens: int, seed: int, log_dir: Path) -> dict:
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    out = open(log_dir / f"{name.replace(' ', '_')}.log", "w")
    env = dict(os.environ, OMP_NUM_THREADS=str(os.cpu_count()))
    proc = subprocess.Popen([*command, "--host", "127.0.0.1", "--port", str(port)], stdout=out, stderr=subprocess.STDOUT,
                            env=env, cwd=ROOT)
    results = {}
    try:
        _wait_ready(url, proc, ready_path)
        asyncio.run(_load(url, model_name, conversations(2, seed + 999), 1, 4))  # warm-up
        for level in levels:
            convs = conversations(level * per_client, seed + level)
            results[level] = asyncio.run(_load(url, model_name, convs, level, max_tokens))
            r = results[level]
            print(f"  {name:<32} {level:>3} clients: {r['req_per_s']:.2f} req/s, p50 {r['p50_s']:.2f} s, "
                  f"p95 {r['p95_s']:.2f} s, errors {r['errors']}, 429 {r['refused_429']}", flush=True)
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
        out.close()
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="A whole model folder (default: the embedded base)")
    p.add_argument("--levels", default="1,4,16,64")
    p.add_argument("--per-client", type=int, default=2, help="Requests per client at each level (at least 8 in all)")
    p.add_argument("--baseline-requests", type=int, default=12)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--seed", type=int, default=3)
    p.add_argument("--skip-transformers-serve", action="store_true")
    p.add_argument("--out", help="result file stem (default: bench/results/serve-load-cpu-<cpu kind>)")
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    model = Path(args.model) if args.model else default_model()
    levels = [int(x) for x in args.levels.split(",")]
    log_dir = Path(tempfile.mkdtemp(prefix="serve-load-"))  # each server's output, for when one fails
    machine = _machine()
    print(f"model {model}\nmachine {machine}\nserver output in {log_dir}", flush=True)

    baseline = one_at_a_time(model, conversations(args.baseline_requests, args.seed), args.max_tokens)
    print(f"  one at a time (generate): {baseline['req_per_s']:.2f} req/s, p50 {baseline['p50_s']:.2f} s, "
          f"p95 {baseline['p95_s']:.2f} s", flush=True)
    tw = [sys.executable, "-m", "tunewright.cli", "serve", f"bench={model}", "--max-tokens", "64", "--cache-size", "0",
          "--max-queue", "256"]
    runs = {"tunewright serve": run_server("tunewright serve", tw, "bench", "/ready", levels, args.per_client,
                                           args.max_tokens, args.seed, log_dir),
            "tunewright serve --quantize 8bit": run_server(
                "tunewright serve 8bit", tw + ["--quantize", "8bit"], "bench", "/ready", [lv for lv in levels if lv <= 4],
                args.per_client, args.max_tokens, args.seed, log_dir)}
    if not args.skip_transformers_serve:
        hf = [str(Path(sys.executable).parent / "transformers"), "serve", str(model), "--continuous-batching",
              "--device", "cpu", "--dtype", "float32", "--cb-block-size", "32",
              "--cb-num-blocks", str(16384 // 32), "--cb-max-batch-tokens", "1024"]
        runs["transformers serve --continuous-batching"] = run_server(
            "transformers serve", hf, str(model), "/health", levels, args.per_client, args.max_tokens, args.seed,
            log_dir)

    rows = [("one at a time (generate)", 1, baseline)]
    rows += [(name, level, r) for name, by_level in runs.items() for level, r in by_level.items()]
    table = ["| server | clients | req/s | x one-at-a-time | p50 s | p95 s | errors | 429 |", "|---|---|---|---|---|---|---|---|"]
    for name, level, r in rows:
        table.append(f"| {name} | {level} | {r['req_per_s']:.2f} | {r['req_per_s'] / baseline['req_per_s']:.2f} | "
                     f"{r['p50_s']:.2f} | {r['p95_s']:.2f} | {r['error_rate']:.1%} | {r['refused_429']} |")
    text = "\n".join(table)
    print("\n" + text)
    kind = ("amd-" if "AMD" in machine else "") + ("amx" if "AMX" in machine else "bf16" if "BF16" in machine else "avx2")
    stem = Path(args.out) if args.out else ROOT / "bench" / "results" / f"serve-load-cpu-{kind}"
    header = (f"# tunewright serve under load\n\nMachine: {machine}. Model: {model.name} (fp32), answers of at most "
              f"{args.max_tokens} tokens, greedy, {args.per_client} requests per client per level.\n"
              f"Command: `.venv/bin/python bench/serve_load.py {' '.join(sys.argv[1:])}`\n\n")
    stem.with_suffix(".md").write_text(header + text + "\n")
    stem.with_suffix(".json").write_text(json.dumps({"machine": machine, "model": str(model), "args": vars(args),
                                                     "baseline": baseline, "runs": runs}, indent=1, default=str))
    print(f"\nwritten {stem}.md and .json")


if __name__ == "__main__":
    main()
