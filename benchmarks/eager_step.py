"""The eager (unfused) step and the small-model default, against torch.optim.Adam.

Prints, measured in one process with the methods' rounds interleaved:

* a 784-256-256-10 MLP (269K parameters in 6 tensors, weight decay 0.01):
  curvc Adam with ``fused=False`` over ``torch.optim.Adam(foreach=True)``;
* the digits example's MLP (64-64-10, 4.8K parameters): curvc's and torch's
  default Adam, each over ``torch.optim.Adam(fused=True)``;
* MLPs 64-w-w-10 from 1.5K to 1.1M parameters: curvc's default Adam over torch's
  (the eager path below 2^18 elements, the fused one from there).

    python benchmarks/eager_step.py [--threads 1] [--rounds 20]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import curvc


def params(shapes, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for s in shapes:
        p = torch.nn.Parameter(torch.randn(s, generator=g) * 0.02)
        p.grad = torch.randn(s, generator=g) * 1e-3
        out.append(p)
    return out


def race(makers: dict, shapes, rounds: int, steps: int) -> dict:
    """Median seconds per step of each optimizer, rounds interleaved."""
    opts = {k: make(params(shapes)) for k, make in makers.items()}
    for o in opts.values():
        for _ in range(5):
            o.step()
    times = {k: [] for k in opts}
    for _ in range(rounds):
        for k, o in opts.items():
            t = time.perf_counter()
            for _ in range(steps):
                o.step()
            times[k].append((time.perf_counter() - t) / steps)
    return {k: statistics.median(v) for k, v in times.items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--widths", type=int, nargs="*", default=[16, 128, 256, 512, 1024],
                    help="hidden widths of the default-against-default rows")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    Adam = curvc.load("adam", backend="torch")
    mlp = [(256, 784), (256,), (256, 256), (256,), (10, 256), (10,)]
    t = race({"torch foreach": lambda ps: torch.optim.Adam(ps, lr=1e-3, foreach=True,
                                                           weight_decay=0.01),
              "curvc fused=False": lambda ps: Adam(ps, lr=1e-3, fused=False,
                                                   weight_decay=0.01)}, mlp, args.rounds, 20)
    print(f"MLP 784-256-256-10, {args.threads} thread(s): curvc fused=False "
          f"{t['curvc fused=False'] * 1e6:.0f} us, torch foreach {t['torch foreach'] * 1e6:.0f} us"
          f" -> {t['curvc fused=False'] / t['torch foreach']:.2f}x torch foreach Adam")
    digits = [(64, 64), (64,), (10, 64), (10,)]
    t = race({"torch fused": lambda ps: torch.optim.Adam(ps, lr=1e-3, fused=True),
              "torch default": lambda ps: torch.optim.Adam(ps, lr=1e-3),
              "curvc default": lambda ps: Adam(ps, lr=1e-3)}, digits, args.rounds, 50)
    print(f"digits MLP (4.8K): curvc default {t['curvc default'] / t['torch fused']:.2f}x, "
          f"torch default {t['torch default'] / t['torch fused']:.2f}x torch fused Adam")
    # the defaults over sizes: the eager path below _LARGE elements, the fused one above
    for width in args.widths:
        mlp = [(width, 64), (width,), (width, width), (width,), (10, width), (10,)]
        n = sum(torch.Size(s).numel() for s in mlp)
        t = race({"torch default": lambda ps: torch.optim.Adam(ps, lr=1e-3),
                  "curvc default": lambda ps: Adam(ps, lr=1e-3)}, mlp, args.rounds, 20)
        print(f"MLP 64-{width}-{width}-10 ({n} parameters): curvc default "
              f"{t['curvc default'] / t['torch default']:.2f}x torch default Adam "
              f"({t['torch default'] * 1e6:.0f} us)")


if __name__ == "__main__":
    main()
