"""Stage 1 throughput: synthetic chat datasets with near-duplicates and PII planted at known rates.

Run: python bench/data_stage1.py [--rows 100000 1000000] [--near-rate 0.05] [--pii-rate 0.02]

Each size runs in a fresh process through `tasks.data.prepare` (the code stage 1 of a run uses),
with exact and near-duplicate removal, PII redaction and the gate on. Prints rows/s, peak RSS (the
stage's process, and the largest of its worker processes), the machine's 1-minute load average
before and after (other work on the machine slows the figure), and planted vs found
near-duplicates (recall) and PII (redactions); writes bench/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SYSTEM = "You are a support assistant for an online shop. Answer briefly and politely."
WORDS = ("order parcel refund invoice account password delivery courier warehouse screen battery charger cable "
         "keyboard headphones speaker kettle blender backpack jacket shoes tent lamp camera printer router monitor "
         "late broken missing damaged wrong cracked slow noisy faulty dead stuck lost charged twice cancelled "
         "yesterday today monday tuesday week month morning evening again still never always please urgently "
         "help check replace return track update confirm explain resend repair exchange").split()


def _sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def _perturb(text: str, rng: random.Random) -> str:
    """A near-duplicate: one or two words changed, as a user resending a ticket would."""
    words = text.split()
    for _ in range(rng.choice((1, 2))):
        words[rng.randrange(len(words))] = rng.choice(WORDS)
    return " ".join(words)


def make(path: Path, rows: int, near_rate: float, pii_rate: float, seed: int = 0) -> dict:
    rng = random.Random(seed)
    planted_near, planted_pii, originals = 0, 0, []
    with path.open("w", encoding="utf-8") as fh:
        for i in range(rows):
            if originals and rng.random() < near_rate:
                user, answer = originals[rng.randrange(len(originals))]
                user = _perturb(user, rng)
                planted_near += 1
            else:
                user = f"Ticket {i}: " + _sentence(rng, rng.randint(30, 45))
                answer = "We are sorry. " + _sentence(rng, rng.randint(12, 20))
                if len(originals) < 50_000:
                    originals.append((user, answer))
                if rng.random() < pii_rate:
                    user += f" Reach me at user{i}@example.com or +1 415 555 {i % 10000:04d}."
                    planted_pii += 2
            fh.write(json.dumps({"id": f"r{i}", "messages": [
                {"role": "system", "content": SYSTEM}, {"role": "user", "content": user},
                {"role": "assistant", "content": answer}]}) + "\n")
    return {"planted_near_duplicates": planted_near, "planted_pii": planted_pii}


def child(path: str, state: str) -> None:
    from tunewright.recipe import DataConfig
    from tasks.data import prepare

    cfg = DataConfig.model_validate({"path": path, "gate": {"min_rows": 10, "max_rejected_fraction": 0.05}})
    t0 = time.perf_counter()
    s = prepare(cfg, Path(state), use_cache=False)
    wall = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    workers_peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(json.dumps({"seconds": wall, "peak_rss_mb": peak, "workers_peak_rss_mb": workers_peak,
                      "rows_in": s["rows_in"], "rows_kept": s["rows_kept"],
                      "duplicates_removed": s["duplicates_removed"], "near_found": s["near_duplicates_removed"],
                      "redactions": s["redactions"], "quarantined": s["rows_quarantined"],
                      "stage_seconds": s["seconds"]}))


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                flags = open("/proc/cpuinfo").read()
                kind = "AMX bf16" if "amx_bf16" in flags else ("AVX512-BF16" if "avx512_bf16" in flags else "AVX2, no bf16")
                return f"{line.split(':', 1)[1].strip()} ({kind}, {os.cpu_count()} cores)"
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--near-rate", type=float, default=0.05)
    ap.add_argument("--pii-rate", type=float, default=0.02)
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(*args.child)
        return
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.rows:
            path = Path(tmp, f"chat-{n}.jsonl")
            planted = make(path, n, args.near_rate, args.pii_rate)
            load_before = os.getloadavg()[0]
            out = subprocess.run([sys.executable, __file__, "--child", str(path), str(Path(tmp, f"state-{n}"))],
                                 capture_output=True, text=True, cwd=ROOT)
            if out.returncode != 0:
                sys.exit(out.stderr[-3000:])
            r = json.loads(out.stdout.strip().splitlines()[-1])
            r.update(planted, rows=n, rows_per_s=n / r["seconds"], load_before=load_before,
                     load_after=os.getloadavg()[0],
                     near_recall=min(1.0, r["near_found"] / max(planted["planted_near_duplicates"], 1)),
                     pii_found=sum(r["redactions"].values()))
            results.append(r)
            path.unlink()
    base = results[0]
    lines = [f"# Stage 1 throughput ({cpu_name()})", "",
             "| rows | seconds | rows/s | time vs first size per row | peak RSS (MB) | workers' peak RSS (MB) | "
             "load avg before/after | planted near-dups | near-dups found | recall | exact dups | planted PII | "
             "PII redacted |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        per_row = (r["seconds"] / r["rows"]) / (base["seconds"] / base["rows"])
        lines.append(f"| {r['rows']:,} | {r['seconds']:.1f} | {r['rows_per_s']:,.0f} | {per_row:.2f}x | "
                     f"{r['peak_rss_mb']:,.0f} | {r['workers_peak_rss_mb']:,.0f} | "
                     f"{r['load_before']:.1f} / {r['load_after']:.1f} | {r['planted_near_duplicates']:,} | "
                     f"{r['near_found']:,} | "
                     f"{r['near_recall']:.3f} | {r['duplicates_removed']:,} | {r['planted_pii']:,} | {r['pii_found']:,} |")
    table = "\n".join(lines)
    print(table)
    res = ROOT / "bench" / "results"
    res.mkdir(parents=True, exist_ok=True)
    tag = "avx2" if "no bf16" in cpu_name() else "bf16"
    (res / f"data-stage1-cpu-{tag}.md").write_text(table + "\n")
    (res / f"data-stage1-cpu-{tag}.json").write_text(json.dumps({"cpu": cpu_name(), "results": results}, indent=1))


if __name__ == "__main__":
    main()
