"""One rank of tests/test_sharded.py: FSDP2, ZeRO and checkpoints with compiled optimizers.

    python tests/_sharded_worker.py RANK WORLD PORT OUT

On a gloo group over 127.0.0.1, each rank trains the model of tests/_ddp_worker.py on
its own batches (the same streams as there) and saves, per case, the whole parameters
(and what a case needs besides) to OUT/<case>_<rank>.pt:

* fsdp_<name>: under FSDP2 (fully_shard per layer and the root), STEPS steps of
  torch.optim.Adam, compiled Adam (default, fused=False, fused=True), two param groups
  and non-default hyperparameters; Shampoo (its blocks split over the ranks, and
  computed on every rank) and K-FAC;
* zero_<spec>: under DDP with ZeroRedundancyOptimizer(optimizer_class=curvc.load(spec));
  zero_sophia(_own): Sophia's estimates, averaged (refused) or each rank's own;
* dcp_<spec>: under FSDP2, STEPS steps straight, and STEPS // 2 steps, a DCP save of the
  model and optimizer, a fresh model and optimizer loaded from it, the rest;
* ddp_ckpt: under DDP, a state_dict saved on rank 0 at half time and loaded on every rank.
"""
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (get_model_state_dict,
                                                     get_optimizer_state_dict,
                                                     set_model_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.fsdp import fully_shard
from torch.distributed.optim import ZeroRedundancyOptimizer
from torch.nn.parallel import DistributedDataParallel

import _ddp_worker as w
import curvc

STEPS = 10
ADAM = dict(lr=0.01, betas=(0.8, 0.95), eps=1e-7, weight_decay=0.01)
MATRIX = {"shampoo": dict(lr=0.01, update_freq=2),
          "kfac": dict(lr=0.01, stat_every=1, inverse_every=3)}
# Per-tensor specs that take only gradients (no estimator, no whole-model curvature):
# ZeRO gives each rank a subset of the tensors, which these step independently.
ZERO_SPECS = ["adam", "shampoo", "adamw", "adafactor", "lion", "muon", "lamb", "sgd",
              "rmsprop", "adagrad", "nadam", "radam", "adan", "sign_gd"]


def groups(net):
    """Two param groups: weights, and biases at twice the learning rate."""
    ps = list(net.named_parameters())
    return [{"params": [p for n, p in ps if n.endswith("weight")]},
            {"params": [p for n, p in ps if n.endswith("bias")], "lr": 0.02}]


def sharded_model():
    net = w.model()
    for m in net:
        if isinstance(m, torch.nn.Linear):
            fully_shard(m)
    fully_shard(net)
    return net


def make(name, net):
    if name == "torch_adam":
        return torch.optim.Adam(groups(net), **ADAM)
    if name.startswith("adam"):
        fused = {"adam": {}, "adam_unfused": {"fused": False}, "adam_fused": {"fused": True}}
        return curvc.load("adam")(groups(net), **ADAM, **fused[name])
    if name == "shampoo_replicated":  # every rank computes every block's roots
        opt = curvc.load("shampoo")(net.parameters(), **MATRIX["shampoo"])
        opt.matrix_split = False
        return opt
    return curvc.load(name)(net if name == "kfac" else net.parameters(), **MATRIX[name])


def train(net, opt, batches):
    for xb, yb in batches:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(net(xb), yb)
        loss.backward()
        opt.step()


def whole(net):
    return [p.full_tensor() if hasattr(p, "full_tensor") else p.detach().clone()
            for p in net.parameters()]


def fsdp(name, rank):
    net = sharded_model()
    opt = make(name, net)
    train(net, opt, w.data(rank)[:STEPS])
    compiled = type(opt).__dict__.get("_fused_kernels", {})  # the fused CPU kernels it built
    return {"params": whole(net), "fused": sum(k is not None for k in compiled.values()),
            "keys": [sorted(opt.state[p]) for p in net.parameters()]}


def zero(spec, rank):
    net = DistributedDataParallel(w.model())
    opt = ZeroRedundancyOptimizer(net.parameters(), optimizer_class=curvc.load(spec), lr=0.01)
    train(net, opt, w.data(rank)[:STEPS])
    return {"params": whole(net.module)}


def zero_estimator(rank, **kw):
    """Sophia under ZeRO: each rank estimates the curvature of its own partition."""
    net = DistributedDataParallel(w.model())
    opt = ZeroRedundancyOptimizer(net.parameters(), optimizer_class=curvc.load("sophia"),
                                  lr=0.01, k=2, **kw)
    try:
        for xb, yb in w.data(rank)[:4]:
            opt.zero_grad()
            logits = net(xb)
            if opt.optim.wants_curvature():
                opt.optim.estimate_curvature(logits=logits)
            torch.nn.functional.cross_entropy(logits, yb).backward()
            opt.step()
    except RuntimeError as e:
        return {"error": str(e)}
    return {"params": whole(net.module)}


def resumed_dcp(name, rank, where: Path):
    batches = w.data(rank)[:STEPS]
    net = sharded_model()
    opt = make(name, net)
    train(net, opt, batches[:STEPS // 2])
    dcp.save({"model": get_model_state_dict(net), "optim": get_optimizer_state_dict(net, opt)},
             checkpoint_id=str(where))
    net = sharded_model()
    opt = make(name, net)
    saved = {"model": get_model_state_dict(net), "optim": get_optimizer_state_dict(net, opt)}
    dcp.load(saved, checkpoint_id=str(where))
    set_model_state_dict(net, saved["model"])
    set_optimizer_state_dict(net, opt, saved["optim"])
    train(net, opt, batches[STEPS // 2:])
    return {"params": whole(net)}


def ddp_checkpoint(rank, where: Path):
    batches = w.data(rank)[:STEPS]
    net = DistributedDataParallel(w.model())
    opt = curvc.load("shampoo")(net.parameters(), **MATRIX["shampoo"])
    train(net, opt, batches[:STEPS // 2])
    if rank == 0:
        torch.save({"model": net.module.state_dict(), "optim": opt.state_dict()}, where)
    dist.barrier()
    saved = torch.load(where, weights_only=False)
    net = DistributedDataParallel(w.model())
    net.module.load_state_dict(saved["model"])
    opt = curvc.load("shampoo")(net.parameters(), **MATRIX["shampoo"])
    opt.load_state_dict(saved["optim"])
    train(net, opt, batches[STEPS // 2:])
    return {"params": whole(net.module), "state": opt.state_dict()["state"]}


def main():
    rank, world, port, out = sys.argv[1:]
    rank, world, out = int(rank), int(world), Path(out)
    dist.init_process_group("gloo", rank=rank, world_size=world,
                            init_method=f"tcp://127.0.0.1:{port}")
    try:
        for name in ("torch_adam", "adam", "adam_unfused", "adam_fused", "shampoo",
                     "shampoo_replicated", "kfac"):
            torch.save(fsdp(name, rank), out / f"fsdp_{name}_{rank}.pt")
        for spec in ZERO_SPECS:
            torch.save(zero(spec, rank), out / f"zero_{spec}_{rank}.pt")
        torch.save(zero_estimator(rank), out / f"zero_sophia_{rank}.pt")
        torch.save(zero_estimator(rank, curvature_group=False), out / f"zero_sophia_own_{rank}.pt")
        for name in ("adam", "shampoo"):
            torch.save(resumed_dcp(name, rank, out / f"dcp_{name}"), out / f"dcp_{name}_{rank}.pt")
        torch.save(ddp_checkpoint(rank, out / "ddp.ckpt"), out / f"ddp_ckpt_{rank}.pt")
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
