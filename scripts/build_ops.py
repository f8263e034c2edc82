"""Build DeepSpeed's CPU ops at install time, not in the first run that needs them.

DeepSpeed compiles its C++ ops the first time a process loads them (ZeRO over gloo loads its
shared-memory collectives; an offloaded optimiser loads CPU Adam) and keeps the result in
torch's extension cache (TORCH_EXTENSIONS_DIR, else ~/.cache/torch_extensions). On a 2-core
machine the two builds take about 80 s, which the first distributed run (or test) would
otherwise spend. A build that fails here is reported and left to that first use.
"""

from __future__ import annotations

import os
import sys
import time

OPS = ("ShareMemCommBuilder", "CPUAdamBuilder")


def main() -> int:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # the ops tunewright's CPU training processes load
    try:
        from deepspeed.accelerator import get_accelerator
    except ImportError:
        print("deepspeed is not installed: no ops to build")
        return 0
    accelerator = get_accelerator()
    for name in OPS:
        start = time.time()
        try:
            accelerator.create_op_builder(name).load(verbose=False)
        except Exception as exc:  # noqa: BLE001 - a missing compiler leaves the build to first use, as before
            print(f"warning: DeepSpeed op {name} did not build ({type(exc).__name__}: {exc}); "
                  "it will build on first use", file=sys.stderr)
            continue
        print(f"DeepSpeed op {name} ready ({time.time() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
