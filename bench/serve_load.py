"""`tunewright serve` under load, beside one-at-a-time `generate` and `transformers serve`, in one run.

Run: .venv/bin/python bench/serve_load.py [--model FOLDER] [--levels 1,4,16,64] [--max-tokens 32] [--per-client 2]
     [--device auto|cpu|cuda] [--precision fp32|bf16]

The model is a whole model folder (a merged export); by default the embedded base converted from its
GGUF (stage 2's cache). Short support-ticket prompts (the bundled generator, with its system prompt),
greedy answers of at most `--max-tokens` tokens, each request a different ticket. Measured, each
server in its own process on the same weights (fp32 on a CPU, bf16 on a GPU unless --precision says),
clients through the official `openai` client:

- one at a time: requests of the 16-client level answered in turn by `model.generate` in this process
  (the baseline every ratio is against), once per round like every server, best round kept;
- tunewright serve: continuous batching, response cache off (every prompt differs anyway);
- tunewright serve --quantize 8bit: the same with int8 linear layers (1 and 4 clients; CPU only);
- with `--masked-attention` (CPU): tunewright serve with TUNEWRIGHT_CPU_ATTENTION=masked, transformers' one masked
  attention over the whole batch instead of tunewright's request by request;
- transformers serve --continuous-batching: transformers' own OpenAI server, given the same KV-cache
  settings tunewright uses (its defaults size the cache from memory: gigabytes and half a minute);
- with `--vllm [COMMAND]` (a GPU with vLLM in an environment of its own; COMMAND defaults to TUNEWRIGHT_VLLM,
  else `vllm` on the PATH): `tunewright serve --engine vllm`, and `vllm serve` itself on the same folder, so the
  cost of tunewright's layer over vLLM shows beside it.

At each level N clients send requests back to back (N x `--per-client` requests in all), every server
`--rounds` times in turn (best round per level reported); printed:
req/s, p50/p95 latency, error rate (429s counted apart, as refusals of a full queue), and the ratio
of req/s to one-at-a-time; then each goal with its verdict: at 16 clients at least 4x one-at-a-time,
throughput no lower than `transformers serve` at 4 clients and up, p95 under 2 s at 4 clients with
8-bit, and errors under 0.1% at every level. With no error in n requests, the error rate is below 3/n
at 95% confidence (the rule of three), so that goal is shown met only when 3/n is under 0.1%
(n >= 3000: `--error-check 3000` adds that many short requests at the highest level to each
tunewright server); otherwise it says how far the run can vouch. Results go to
bench/results/serve-load-<device>-<kind>.{md,json}.
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


def _machine(device: str = "cpu") -> str:
    spec = importlib.util.spec_from_file_location("vs_hf_trainer", ROOT / "bench/vs_hf_trainer.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.machine(device)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def default_model() -> Path:
    """The embedded base as a safetensors folder (converted once, as stage 2 does)."""
    import logging

    from tasks.model import resolve_base
    from tunewright.platform import settings
    from tunewright.recipe import ModelConfig

    state = settings.state_dir()
    folder, _ = resolve_base(ModelConfig(), state, logging.getLogger("bench"))
    return folder


def conversations(n: int, seed: int) -> list[list[dict]]:
    rows = _generator().generate(n, seed=seed)
    return [[m for m in r["messages"] if m["role"] != "assistant"] for r in rows]


def one_at_a_time(model: Path, convs: list[list[dict]], max_tokens: int, device: str = "cpu",
                  precision: str = "fp32") -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    net = AutoModelForCausalLM.from_pretrained(model, dtype=dtype).to(device).eval()
    latencies = []
    ids = [tok.apply_chat_template(c, add_generation_prompt=True, return_tensors="pt", return_dict=True).to(device)
           for c in convs]
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
    from tunewright.serve.external import wait_healthy

    if wait_healthy(f"{url}{path}", proc, timeout):
        return
    if proc.poll() is not None:
        raise RuntimeError(f"the server exited with {proc.returncode}")
    raise TimeoutError(f"{url}{path} not ready after {timeout} s")


def run_server(name: str, command, model_name: str, ready_path: str, levels: list[int],
               per_client: int, max_tokens: int, seed: int, log_dir: Path, error_check: int = 0,
               env_extra: dict | None = None) -> dict:
    """`command`: an argv the host and port are appended to, or a function of the port returning the argv;
    `env_extra`: variables for that server only."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    out = open(log_dir / f"{name.replace(' ', '_')}.log", "w")
    env = dict(os.environ, OMP_NUM_THREADS=str(os.cpu_count()), **(env_extra or {}))
    argv = command(port) if callable(command) else [*command, "--host", "127.0.0.1", "--port", str(port)]
    proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
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
        if error_check:  # many short answers at the highest level: enough requests to vouch for the error rate
            top = max(levels)
            r = asyncio.run(_load(url, model_name, conversations(error_check, seed + 7777), top, 8))
            results[f"error check, {top} clients, 8 tokens"] = r
            print(f"  {name:<32} error check: {r['requests']} requests at {top} clients, {r['req_per_s']:.2f} req/s, "
                  f"errors {r['errors']}, 429 {r['refused_429']}", flush=True)
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
        out.close()
    return results


def best_of(rounds: list[dict]) -> dict:
    """Per level, the round with the most req/s (each round's figure kept beside it), with the requests and errors
    of every round added up (what the error goal counts)."""
    out = {}
    for level in rounds[0]:
        results = [r[level] for r in rounds if level in r]
        best = dict(max(results, key=lambda r: r["req_per_s"]))
        best["rounds_req_per_s"] = [round(r["req_per_s"], 3) for r in results]
        for key in ("requests", "errors", "refused_429"):
            best[f"all_{key}"] = sum(r[key] for r in results)
        out[level] = best
    return out


def goals(baseline: dict, runs: dict[str, dict[int, dict]]) -> list[tuple[str, bool]]:
    """Each goal of the serving work, worded with the figures that decide it, and whether this run meets it."""
    out = []
    tw = runs.get("tunewright serve", {})
    if 16 in tw:  # (the error checks' keys are strings, not levels)
        ratio = tw[16]["req_per_s"] / baseline["req_per_s"]
        out.append((f"at 16 clients, {ratio:.2f}x the req/s of one at a time (goal: at least 4x)", ratio >= 4))
    hf = runs.get("transformers serve --continuous-batching", {})
    for level in sorted(k for k in set(tw) & set(hf) if isinstance(k, int)):
        if level >= 4:
            a, b = tw[level]["req_per_s"], hf[level]["req_per_s"]
            out.append((f"at {level} clients, {a:.2f} req/s against transformers serve's {b:.2f} (goal: no lower)",
                        a >= b))
    q8 = runs.get("tunewright serve --quantize 8bit", {})
    if 4 in q8:
        p95 = q8[4]["p95_s"]
        out.append((f"8-bit at 4 clients, p95 {p95:.2f} s (goal: under 2 s)", p95 < 2))
    for name, by_level in runs.items():
        if not name.startswith("tunewright") or "masked attention" in name:  # that one is a reference, not served
            continue
        n = sum(r["all_requests"] - r["all_refused_429"] for r in by_level.values())
        if not n:
            continue
        errors = sum(r["all_errors"] for r in by_level.values())
        refused = sum(r["all_refused_429"] for r in by_level.values())
        bound = 3 / n if n and not errors else errors / max(n, 1)
        worst = max((r["error_rate"] for r in by_level.values()), default=0.0)
        where = (f"no error in {n} requests: below {bound:.3%} at 95% confidence" if not errors
                 else f"{errors} errors in {n} requests (worst level {worst:.2%})")
        out.append((f"{name}: {where}; {refused} refused with 429 (goal: errors under 0.1% at every level)",
                    not errors and bound < 0.001))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="A whole model folder (default: the embedded base)")
    p.add_argument("--levels", default="1,4,16,64")
    p.add_argument("--per-client", type=int, default=2, help="Requests per client at each level (at least 8 in all)")
    p.add_argument("--baseline-requests", type=int, default=12)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--seed", type=int, default=3)
    p.add_argument("--error-check", type=int, default=0, help="After the levels, this many more requests (answers of "
                   "8 tokens) at the highest level to each tunewright server: 3000 lets a clean run vouch for "
                   "errors under 0.1%%")
    p.add_argument("--rounds", type=int, default=2, help="Each server this many times, in turn; the best round "
                   "per level is reported (rounds swing by 10-20%% on a busy 2-core machine)")
    p.add_argument("--skip-transformers-serve", action="store_true")
    p.add_argument("--skip-batching", action="store_true", help="leave out tunewright serve's own engine (and 8-bit)")
    p.add_argument("--masked-attention", action="store_true", help="also tunewright serve with "
                   "TUNEWRIGHT_CPU_ATTENTION=masked (transformers' attention over the whole batch; CPU only)")
    p.add_argument("--vllm", nargs="?", const="", metavar="COMMAND",
                   help="also tunewright serve --engine vllm and vllm serve itself (COMMAND: the vllm executable; "
                   "default TUNEWRIGHT_VLLM, else vllm on the PATH)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--precision", choices=["fp32", "bf16"], help="default: fp32 on a CPU, bf16 on a GPU")
    p.add_argument("--out", help="result file stem (default: bench/results/serve-load-<device>-<kind>)")
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    precision = args.precision or ("bf16" if device == "cuda" else "fp32")
    model = Path(args.model) if args.model else default_model()
    levels = [int(x) for x in args.levels.split(",")]
    log_dir = Path(tempfile.mkdtemp(prefix="serve-load-"))  # each server's output, for when one fails
    machine = _machine(device)
    print(f"model {model}\nmachine {machine}\ndevice {device}, {precision}\nserver output in {log_dir}", flush=True)

    same_as = 16 if 16 in levels else max(levels)  # the baseline answers requests of this level
    baselines = []

    def run_baseline() -> None:
        baselines.append(one_at_a_time(model, conversations(same_as * args.per_client, args.seed + same_as)[
            :args.baseline_requests], args.max_tokens, device, precision))
        b = baselines[-1]
        print(f"  one at a time (generate): {b['req_per_s']:.2f} req/s, p50 {b['p50_s']:.2f} s, "
              f"p95 {b['p95_s']:.2f} s", flush=True)
    tw = [sys.executable, "-m", "tunewright.cli", "serve", f"bench={model}", "--max-tokens", "64", "--cache-size", "0",
          "--max-queue", "256", "--precision", precision]
    servers = [] if args.skip_batching else [("tunewright serve", tw, "bench", "/ready", levels, args.error_check)]
    if device == "cpu" and any(lv <= 4 for lv in levels) and not args.skip_batching:
        servers.append(("tunewright serve --quantize 8bit", tw + ["--quantize", "8bit"], "bench", "/ready",
                        [lv for lv in levels if lv <= 4], args.error_check))
    if device == "cpu" and args.masked_attention and not args.skip_batching:
        servers.append(("tunewright serve, masked attention", tw, "bench", "/ready", levels, 0,
                        {"TUNEWRIGHT_CPU_ATTENTION": "masked"}))
    if args.vllm is not None:
        import shutil

        exe = args.vllm or os.environ.get("TUNEWRIGHT_VLLM") or shutil.which("vllm")
        if not exe:
            p.error("--vllm: no vllm command (give it, or set TUNEWRIGHT_VLLM)")
        os.environ["TUNEWRIGHT_VLLM"] = exe
        servers.append(("tunewright serve --engine vllm", tw + ["--engine", "vllm"], "bench", "/ready", levels,
                        args.error_check))
        # vLLM's own server, started with the very command line tunewright starts it with
        from tunewright.serve.external import vllm_command

        max_pos = json.loads((model / "config.json").read_text()).get("max_position_embeddings") or 4096
        servers.append(("vllm serve", vllm_command(model, "bench", precision, min(4096, int(max_pos))), "bench",
                        "/health", levels, 0))
    if not args.skip_transformers_serve:
        hf = [sys.executable, "-m", "transformers.cli.transformers", "serve", str(model), "--continuous-batching",
              "--device", device, "--dtype", "bfloat16" if precision == "bf16" else "float32", "--cb-block-size", "32",
              "--cb-num-blocks", str(16384 // 32), "--cb-max-batch-tokens", "1024"]
        servers.append(("transformers serve --continuous-batching", hf, str(model), "/health", levels, 0))
    rounds: dict[str, list[dict]] = {name: [] for name, *_ in servers}
    for i in range(args.rounds):  # in turn, the order reversed every other round, so a slow spell hits all alike
        if i % 2 == 0:
            run_baseline()
        for name, command, served_as, ready, server_levels, check, *env in (servers if i % 2 == 0
                                                                             else servers[::-1]):
            print(f"round {i + 1}/{args.rounds}: {name}", flush=True)
            rounds[name].append(run_server(name, command, served_as, ready, server_levels, args.per_client,
                                           args.max_tokens, args.seed, log_dir, check if i == 0 else 0,
                                           env[0] if env else None))
        if i % 2 == 1:
            run_baseline()
    runs = {name: best_of(results) for name, results in rounds.items()}
    baseline = best_of([{1: b} for b in baselines])[1]  # best of its rounds too, as every server

    rows = [("one at a time (generate)", 1, baseline)]
    rows += [(name, level, r) for name, by_level in runs.items() for level, r in by_level.items()]
    table = ["| server | clients | req/s | x one-at-a-time | p50 s | p95 s | errors | 429 |", "|---|---|---|---|---|---|---|---|"]
    for name, level, r in rows:
        ratio = f"{r['req_per_s'] / baseline['req_per_s']:.2f}" if isinstance(level, int) else "-"
        table.append(f"| {name} | {level} | {r['req_per_s']:.2f} | {ratio} | "
                     f"{r['p50_s']:.2f} | {r['p95_s']:.2f} | "
                     f"{r.get('all_errors', r['errors']) / max(r.get('all_requests', r['requests']), 1):.1%} | "
                     f"{r.get('all_refused_429', r['refused_429'])} |")
    verdicts = goals(baseline, runs)
    text = "\n".join(table) + "\n\n" + "\n".join(f"- **{'met' if ok else 'NOT met'}**: {what}"
                                                    for what, ok in verdicts)
    print("\n" + text)
    if device == "cuda":
        kind = "gpu"
    else:
        kind = "cpu-" + ("amd-" if "AMD" in machine else "") + (
            "amx" if "AMX" in machine else "bf16" if "BF16" in machine else "avx2")
    stem = Path(args.out) if args.out else ROOT / "bench" / "results" / f"serve-load-{kind}"
    header = (f"# tunewright serve under load\n\nMachine: {machine}. Model: {model.name} ({precision}, {device}), "
              f"answers of at most {args.max_tokens} tokens, greedy, {args.per_client} requests per client per "
              f"level, best of {args.rounds} rounds per server and level (every round's req/s in the .json).\n"
              f"Command: `.venv/bin/python bench/serve_load.py {' '.join(sys.argv[1:])}`\n\n")
    stem.with_suffix(".md").write_text(header + text + "\n")
    stem.with_suffix(".json").write_text(json.dumps({"machine": machine, "model": str(model), "args": vars(args),
                                                     "device": device, "precision": precision, "baseline": baseline,
                                                     "runs": runs, "goals": verdicts}, indent=1, default=str))
    print(f"\nwritten {stem}.md and .json")


if __name__ == "__main__":
    main()
