"""Do CUDA graphs change what `tunewright serve` answers? Greedy answers with graphs off and on, against `generate`.

Run (a CUDA machine): python bench/serve_cuda_graphs.py MODEL_FOLDER [--requests 24] [--precision fp32]

The same chat requests (the bundled ticket generator's prompts) go at once to `tunewright serve` started with
TUNEWRIGHT_CUDA_GRAPHS=off and then =on, and one at a time through `model.generate` on the same weights; it prints
how many answers are equal. fp32 by default, so that a mismatch means a different computation, not bf16 rounding
between batch shapes. Throughput with and without graphs is `bench/serve_load.py` run with the variable set each way.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import serve_load  # noqa: E402


def served(model: str, convs: list, graphs: str, precision: str) -> list[str]:
    import openai

    port = serve_load._free_port()
    log = Path(os.environ.get("TMPDIR", "/tmp")) / f"serve-cuda-graphs-{graphs}.log"
    proc = subprocess.Popen([sys.executable, "-m", "tunewright.cli", "serve", f"bench={model}", "--max-tokens", "64",
                             "--cache-size", "0", "--precision", precision, "--host", "127.0.0.1", "--port", str(port)],
                            env=dict(os.environ, TUNEWRIGHT_CUDA_GRAPHS=graphs), stdout=log.open("w"),
                            stderr=subprocess.STDOUT, cwd=serve_load.ROOT)
    try:
        serve_load._wait_ready(f"http://127.0.0.1:{port}", proc, "/ready")

        async def ask():
            client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="bench", max_retries=0)
            out = await asyncio.gather(*(client.chat.completions.create(model="bench", messages=m, max_tokens=32,
                                                                        temperature=0) for m in convs))
            await client.close()
            return [r.choices[0].message.content for r in out]
        return asyncio.run(ask())
    finally:
        proc.terminate()
        proc.wait(60)


def generated(model: str, convs: list, precision: str) -> list[str]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    net = AutoModelForCausalLM.from_pretrained(model, dtype=dtype).cuda().eval()
    out = []
    with torch.no_grad():
        for conv in convs:
            enc = tok.apply_chat_template(conv, add_generation_prompt=True, return_tensors="pt",
                                          return_dict=True).to("cuda")
            ids = net.generate(**enc, max_new_tokens=32, do_sample=False, pad_token_id=tok.pad_token_id)
            out.append(tok.decode(ids[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip())
    return out  # chat answers are served stripped of surrounding space


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("--requests", type=int, default=24)
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    args = p.parse_args()
    convs = serve_load.conversations(args.requests, 11)
    reference = generated(args.model, convs, args.precision)
    answers = {graphs: served(args.model, convs, graphs, args.precision) for graphs in ("off", "on")}
    for graphs, got in answers.items():
        same = sum(a == b for a, b in zip(got, reference))
        print(f"graphs {graphs}: {same}/{len(reference)} answers equal generate's")
        for a, b in zip(got, reference):
            if a != b:
                print(f"  served:   {a[:100]!r}\n  generate: {b[:100]!r}")
    equal = sum(a == b for a, b in zip(answers["on"], answers["off"]))
    print(f"graphs on and off: {equal}/{len(reference)} answers equal")
    sys.exit(0 if equal == len(reference) else 1)


if __name__ == "__main__":
    main()
