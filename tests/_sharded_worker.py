"""One rank of tests/test_sharded.py: FSDP2, ZeRO and checkpoints with compiled optimizers.

    python tests/_sharded_worker.py RANK WORLD PORT OUT

On a gloo group over 127.0.0.1, each rank trains the model of tests/_ddp_worker.py on
its own batches (the same streams as there) and saves, per case, the whole parameters
(and what a case needs besides) to OUT/<case>_<rank>.pt:

* fsdp_<name>: under FSDP2 (fully_shard per layer and the root), STEPS steps of
  torch.optim.Adam, compiled Adam (default, fused=False, fused=True), two param groups
  and non-default hyperparameters; Shampoo and Distributed Shampoo (blocks, Adam
  grafting), their roots split over the ranks and computed on every rank; K-FAC; with
  the optimizer's object and tensor broadcasts counted per step;
* zero_<spec>: under DDP with ZeroRedundancyOptimizer(optimizer_class=curvc.load(spec))
  (K-FAC, the estimators and the refused whole-model specs: tests/_zero_worker.py);
* dcp_<spec>: under FSDP2, STEPS steps straight, and STEPS // 2 steps, a DCP save of the
  model and optimizer, a fresh model and optimizer loaded from it, the rest;
* ddp_ckpt: under DDP, a state_dict saved on rank 0 at half time and loaded on every rank;
* nan_<setup>_<spec>_<how> (setup fsdp, zero or ddp): rank 0 alone poisons a gradient on
  step POISONED (its local shard under FSDP2, a tensor of its partition under ZeRO, its
  replica's after DDP's all-reduce), with nonfinite="skip" (NaN), a GradScaler (inf) or
  nonfinite="raise" (NaN); dropped_<setup>_<spec>: the same setup on the batches without
  the poisoned one (what a skipped step must leave).
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
import _gloo
import curvc

STEPS = 10
ADAM = dict(lr=0.01, betas=(0.8, 0.95), eps=1e-7, weight_decay=0.01)
MATRIX = {"shampoo": dict(lr=0.01, update_freq=2),
          "kfac": dict(lr=0.01, stat_every=1, inverse_every=3),
          # blocks of 8 (a 16 x 64 weight is 16 blocks, each rank's 8 x 64 shard 8 of them)
          # and Adam grafting from step 3, its roots every 2 steps: non-default values
          "distributed_shampoo": dict(lr=0.01, betas=(0.85, 0.99), epsilon=1e-8,
                                      weight_decay=0.01, max_preconditioner_dim=8,
                                      precondition_frequency=2, start_preconditioning_step=3,
                                      grafting_beta2=0.99, grafting_epsilon=1e-8)}
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
    if name.endswith("_replicated"):  # every rank computes every block's roots
        spec = name.removesuffix("_replicated")
        opt = curvc.load(spec)(net.parameters(), **MATRIX[spec])
        opt.matrix_split = False
        return opt
    if name == "kfac_step_split":  # each layer's step on its owner too, broadcast
        opt = curvc.load("kfac")(net, **MATRIX["kfac"])
        opt.matrix_split = "step"
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
    collectives = []  # per step: (object broadcasts, tensor broadcasts) of the optimizer
    with counted(("broadcast_object_list", "broadcast")) as count:
        opt.register_step_pre_hook(lambda *_: count.clear())
        opt.register_step_post_hook(lambda *_: collectives.append(
            (count["broadcast_object_list"], count["broadcast"])))
        train(net, opt, w.data(rank)[:STEPS])
    compiled = type(opt).__dict__.get("_fused_kernels", {})  # the fused CPU kernels it built
    return {"params": whole(net), "fused": sum(k is not None for k in compiled.values()),
            "keys": [sorted(opt.state[p]) for p in net.parameters()],
            "collectives": collectives}


class counted:
    """Counts the calls of the named torch.distributed functions while in the block."""

    def __init__(self, names):
        self.names, self.saved = names, {}

    def __enter__(self):
        from collections import Counter
        self.count = Counter()
        for n in self.names:
            self.saved[n] = fn = getattr(dist, n)
            setattr(dist, n, self._counting(n, fn))
        return self.count

    def _counting(self, name, fn):
        def call(*args, **kw):
            self.count[name] += 1
            return fn(*args, **kw)
        return call

    def __exit__(self, *exc):
        for n, fn in self.saved.items():
            setattr(dist, n, fn)


def zero(spec, rank):
    net = DistributedDataParallel(w.model())
    opt = ZeroRedundancyOptimizer(net.parameters(), optimizer_class=curvc.load(spec), lr=0.01)
    train(net, opt, w.data(rank)[:STEPS])
    return {"params": whole(net.module)}


POISONED, NAN_STEPS = 3, 6  # rank 0 alone poisons a gradient on step 3 (0-based) of 6
NONFINITE = [("fsdp", "adam", "skip"), ("fsdp", "lamb", "skip"), ("fsdp", "shampoo", "skip"),
             ("fsdp", "adam", "scaler"), ("fsdp", "shampoo", "scaler"), ("fsdp", "adam", "raise"),
             ("zero", "adam", "skip"), ("zero", "shampoo", "skip"), ("zero", "muon_adamw", "skip"),
             ("ddp", "adam", "skip")]


def setup(where, spec, **kw):
    """(model, optimizer, the optimizer whose state holds the counters, module)."""
    kw = {**dict(lr=0.01), **MATRIX.get(spec, {}), **kw}
    if where == "fsdp":
        net = sharded_model()
        opt = curvc.load(spec)(net.parameters(), **kw)
        return net, opt, opt, net
    net = DistributedDataParallel(w.model())
    if where == "ddp":
        opt = curvc.load(spec)(net.parameters(), **kw)
        return net, opt, opt, net.module
    opt = ZeroRedundancyOptimizer(net.parameters(), optimizer_class=curvc.load(spec), **kw)
    return net, opt, opt.optim, net.module


def poisoned(where, spec, how, rank):
    """NAN_STEPS steps, rank 0 poisoning a gradient on step POISONED; whether each step left
    the whole parameters bitwise as they were, the errors raised, the skip counters."""
    net, opt, inner, module = setup(where, spec, nonfinite="raise" if how == "raise" else "skip")
    scaler = torch.amp.GradScaler("cpu", init_scale=16.0) if how == "scaler" else None
    unchanged, errors = [], []
    for i, (xb, yb) in enumerate(w.data(rank)[:NAN_STEPS]):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(net(xb), yb)
        (loss if scaler is None else scaler.scale(loss)).backward()
        if i == POISONED and rank == 0:
            p = (inner.param_groups[0]["params"] if where == "zero" else
                 list(module.parameters()))[0]  # under ZeRO: one of rank 0's partition
            g = p.grad._local_tensor if hasattr(p.grad, "_local_tensor") else p.grad
            g.view(-1)[0] = float("inf") if scaler is not None else float("nan")
        before = whole(module)
        try:
            if scaler is None:
                opt.step()
            else:
                scaler.step(opt)
                scaler.update()
        except ValueError as e:
            errors.append((i, str(e)))
        unchanged.append(all(torch.equal(a, b) for a, b in zip(before, whole(module))))
    counters = [float(inner.state[p]["skipped_steps"]) for g in inner.param_groups
                for p in g["params"]] if how != "raise" else []
    return {"params": whole(module), "unchanged": unchanged, "errors": errors,
            "skipped": counters}


def dropped(where, spec, rank):
    """The same setup on the batches without the poisoned one."""
    net, opt, _, module = setup(where, spec)
    batches = w.data(rank)[:NAN_STEPS]
    train(net, opt, batches[:POISONED] + batches[POISONED + 1:])
    return {"params": whole(module)}


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
                     "shampoo_replicated", "kfac", "kfac_step_split", "distributed_shampoo",
                     "distributed_shampoo_replicated"):
            torch.save(fsdp(name, rank), out / f"fsdp_{name}_{rank}.pt")
        for spec in ZERO_SPECS:
            torch.save(zero(spec, rank), out / f"zero_{spec}_{rank}.pt")
        for name in ("adam", "shampoo"):
            torch.save(resumed_dcp(name, rank, out / f"dcp_{name}"), out / f"dcp_{name}_{rank}.pt")
        torch.save(ddp_checkpoint(rank, out / "ddp.ckpt"), out / f"ddp_ckpt_{rank}.pt")
        for where, spec, how in NONFINITE:
            torch.save(poisoned(where, spec, how, rank),
                       out / f"nan_{where}_{spec}_{how}_{rank}.pt")
        for where, spec in sorted({(where, spec) for where, spec, _ in NONFINITE}):
            torch.save(dropped(where, spec, rank), out / f"dropped_{where}_{spec}_{rank}.pt")
    except BaseException:
        dist.destroy_process_group()
        raise
    _gloo.leave()


if __name__ == "__main__":
    main()
