"""K-FAC's inverse refresh under DDP: each layer's inverses on one rank vs on every rank.

Two gloo processes on 127.0.0.1 train an MLP under DistributedDataParallel with
K-FAC refreshing its statistics and inverses on every step (stat_every =
inverse_every = 1). Timed: one training step (forward, backward, ``opt.step()``),
median over rounds, with

* split: each layer's two factor operators computed by one owner rank and broadcast
  (the default, ``curvc.runtime.kfac``);
* split steps: ``opt.matrix_split = "step"``, the inverses split as above and each
  layer's step f(S) G f(A) computed by the same owner and broadcast too;
* every rank: ``opt.matrix_split = False``, each rank computes every layer's inverses
  and steps, the work one rank does alone.

Rounds of the three alternate in one run. Prints each and its ratio to every rank's
(rank 0's).

    python benchmarks/kfac_ddp_inverses.py [--width 384] [--layers 4] [--rounds 10]
"""
from __future__ import annotations

import argparse
import os
import socket
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import curvc


def model(width: int, layers: int) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)])


def run(rank: int, world: int, port: int, args) -> None:
    os.environ["CURVC_QUIET"] = "1"
    torch.set_num_threads(1)  # one core per rank: the split is what is measured
    dist.init_process_group("gloo", rank=rank, world_size=world,
                            init_method=f"tcp://127.0.0.1:{port}")
    x = torch.randn(64, args.width, generator=torch.Generator().manual_seed(rank))
    runs = {}
    how = {"split": True, "split steps": "step", "every rank": False}
    for name in how:
        net = torch.nn.parallel.DistributedDataParallel(model(args.width, args.layers))
        opt = curvc.load("kfac")(net, lr=1e-6, stat_every=1, inverse_every=1)
        opt.matrix_split = how[name]
        runs[name] = (net, opt)

    def step(net, opt):
        opt.zero_grad()
        net(x).square().mean().backward()
        opt.step()

    times = {k: [] for k in runs}
    for r in range(args.rounds + 2):  # two warm-up rounds
        for name, (net, opt) in runs.items():
            dist.barrier()
            t = time.perf_counter()
            step(net, opt)
            dist.barrier()
            if r >= 2:
                times[name].append(time.perf_counter() - t)
    if rank == 0:
        med = {k: statistics.median(v) for k, v in times.items()}
        print(f"K-FAC training step (inverses refreshed), {args.layers} x "
              f"Linear({args.width}), DDP on {world} gloo ranks, median of {args.rounds}:")
        for k, v in med.items():
            print(f"  {k:>11}: {v * 1e3:8.1f} ms")
        for k in ("split", "split steps"):
            print(f"  every rank / {k}: {med['every rank'] / med[k]:.2f}x")
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--width", type=int, default=384)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=10)
    args = ap.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(run, args=(2, port, args), nprocs=2)


if __name__ == "__main__":
    main()
