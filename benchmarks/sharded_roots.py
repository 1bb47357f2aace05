"""Root-refresh time of a Shampoo step under FSDP2: the blocks split over 2 ranks vs not.

Two gloo processes on 127.0.0.1 shard an MLP with ``fully_shard``; Shampoo refreshes
every root on every step (update_freq=1). Timed: ``opt.step()`` alone (the gradients
of one backward pass, reused), median over rounds, with

* split: each block's factors and roots on one owner rank, its result broadcast
  (the default, ``curvc.runtime.sharded``);
* every rank: ``opt.matrix_split = False``, each rank computes every block, which is
  the work one rank does alone.

Rounds of the two alternate in one run. Prints both and their ratio (rank 0's).

    python benchmarks/sharded_roots.py [--width 256] [--layers 4] [--rounds 10]
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
    from torch.distributed.fsdp import fully_shard
    os.environ["CURVC_QUIET"] = "1"
    torch.set_num_threads(1)  # one core per rank: the split is what is measured
    dist.init_process_group("gloo", rank=rank, world_size=world,
                            init_method=f"tcp://127.0.0.1:{port}")
    opts = {}
    for name in ("split", "every rank"):
        net = model(args.width, args.layers)
        for m in net:
            fully_shard(m)
        fully_shard(net)
        opt = curvc.load("shampoo")(net.parameters(), lr=1e-6, update_freq=1)
        opt.matrix_split = name == "split"
        x = torch.randn(32, args.width, generator=torch.Generator().manual_seed(rank))
        net(x).square().mean().backward()
        opts[name] = opt
    times = {k: [] for k in opts}
    for r in range(args.rounds + 2):  # two warm-up rounds
        for name, opt in opts.items():
            dist.barrier()
            t = time.perf_counter()
            opt.step()
            dist.barrier()
            if r >= 2:
                times[name].append(time.perf_counter() - t)
    if rank == 0:
        med = {k: statistics.median(v) for k, v in times.items()}
        print(f"Shampoo step (roots refreshed), {args.layers} x Linear({args.width}), "
              f"FSDP2 on {world} gloo ranks, median of {args.rounds}:")
        for k, v in med.items():
            print(f"  {k:>10}: {v * 1e3:8.1f} ms")
        print(f"  every rank / split: {med['every rank'] / med['split']:.2f}x")
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=10)
    args = ap.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(run, args=(2, port, args), nprocs=2)


if __name__ == "__main__":
    main()
