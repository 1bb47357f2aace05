"""Where the dense step's time goes, and the Cholesky route against the eigendecomposition.

The problem is examples/train_digits.py's damped_newton: specs/hybrids/damped_newton.curv
on the digits' linear classifier (650 parameters, a 650 x 650 Hessian), batch 64. Prints
the median time of each stage of one step (the gradient with its graph, the Hessian's
vmapped backward rows, the direction by eigh and by the Cholesky solve), then the whole
optimizer step with the direction by each route and at 1 and 2 torch threads, each
against its reference (eigh; 2 threads) measured in the same rounds, interleaved.

    python benchmarks/dense_step.py [--rounds 15]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import digits_loop as loop  # noqa: E402

from curvc.runtime import dense  # noqa: E402


def timed_rounds(runs: dict, rounds: int, warmup: int = 2) -> dict:
    """{name: [seconds per round]}, each round running every function once, in turn."""
    times = {k: [] for k in runs}
    for r in range(warmup + rounds):
        for name, (threads, fn) in runs.items():
            torch.set_num_threads(threads)
            t = time.perf_counter()
            fn()
            if r >= warmup:
                times[name].append(time.perf_counter() - t)
    return times


def ratio(times: dict, ours: str, ref: str) -> float:
    return statistics.median(a / b for a, b in zip(times[ours], times[ref]))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=15)
    args = ap.parse_args()
    x, y, train, _ = loop.load_digits()
    Opt = loop.optimizer_class("damped_newton")
    torch.manual_seed(0)
    model = loop.make_model("mlp", Opt)
    opt = loop.make_optimizer(Opt, model, None)
    params = list(model.parameters())
    xb, yb = x[train[:64]], y[train[:64]]
    settings = opt._source_args()
    n = sum(p.numel() for p in params)
    print(f"torch {torch.__version__}, {Opt.__name__} on digits' Linear(64, 10): n = {n}, "
          f"batch 64")

    def graph():
        loss = F.cross_entropy(model(xb), yb)
        return torch.autograd.grad(loss, params, create_graph=True)
    grads = graph()
    hess = dense.hessian(params, grads)
    g = torch.cat([gi.reshape(-1) for gi in grads]).detach()
    stages = {
        "gradient, with its graph": lambda: graph(),
        "Hessian rows (vmapped backward)": lambda: dense.hessian(params, grads),
        "direction by eigh": lambda: dense.direction(hess, g, settings, solve=False),
        "direction by Cholesky solve": lambda: dense.direction(hess, g, settings),
    }
    print(f"\n{'stage (1 thread)':34} {'ms':>8}")
    t = timed_rounds({k: (1, f) for k, f in stages.items()}, args.rounds)
    for k in stages:
        print(f"{k:34} {statistics.median(t[k]) * 1e3:8.2f}")
    print(f"{'solve / eigh':34} {ratio(t, 'direction by Cholesky solve', 'direction by eigh'):8.3f}")

    original = dense.direction

    def step(solve):
        def run():
            dense.direction = lambda c, gr, s: original(c, gr, s, solve=solve)
            try:
                loop.train_step(opt, model, xb, yb)
            finally:
                dense.direction = original
        return run
    runs = {f"{route}, {th} thread{'s' * (th > 1)}": (th, step(route == "solve"))
            for route in ("eigh", "solve") for th in (2, 1)}
    t = timed_rounds(runs, args.rounds)
    ref = "eigh, 2 threads"
    print(f"\n{'whole optimizer step':34} {'ms':>8} {'vs ' + ref:>18}")
    for k in runs:
        print(f"{k:34} {statistics.median(t[k]) * 1e3:8.2f} {ratio(t, k, ref):18.3f}")


if __name__ == "__main__":
    main()
