"""How long ``curvc.load(spec)`` takes in a fresh process, with a cold and a warm cache.

Cold: an empty cache folder, so the spec is parsed, checked, lowered and
emitted, then written. Warm: the same folder again, so the module is read,
its hash checked and its text run. Each run is a new interpreter; torch (and
triton, when installed) are imported before the clock starts, because every
user of a torch optimizer pays for those anyway. Median of ``--rounds``.

    python benchmarks/load_time.py [--spec adam] [--backend auto] [--rounds 5]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

CHILD = """
import json, sys, time
import torch
try:
    import triton  # noqa: F401  (the generated module imports it when installed)
except ImportError:
    pass
import curvc
start = time.perf_counter()
curvc.load(sys.argv[1], backend=sys.argv[2])
print(json.dumps(time.perf_counter() - start))
"""


def load_seconds(spec: str, backend: str, cache: str) -> float:
    env = {**os.environ, "CURVC_CACHE_DIR": cache}
    out = subprocess.run([sys.executable, "-c", CHILD, spec, backend], env=env, check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--spec", default="adam")
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    cold, warm = [], []
    for _ in range(args.rounds):
        with tempfile.TemporaryDirectory(prefix="curvc-load-time-") as tmp:
            cache = os.path.join(tmp, "cache")
            cold.append(load_seconds(args.spec, args.backend, cache))
            warm.append(load_seconds(args.spec, args.backend, cache))
    c, w = statistics.median(cold), statistics.median(warm)
    print(f"curvc.load({args.spec!r}, backend={args.backend!r}), median of {args.rounds} "
          f"fresh processes:")
    print(f"  cold cache  {c * 1e3:8.1f} ms")
    print(f"  warm cache  {w * 1e3:8.1f} ms")
    print(f"  cold / warm {c / w:8.1f}x")


if __name__ == "__main__":
    main()
