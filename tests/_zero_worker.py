"""One rank of tests/test_zero.py: compiled optimizers under ZeroRedundancyOptimizer.

    python tests/_zero_worker.py RANK WORLD PORT OUT

On a gloo group over 127.0.0.1, each rank trains under DDP on its own batches (the
streams of tests/_ddp_worker.py) and saves, per case, to OUT/<case>_<rank>.pt:

* kfac_<setting>: K-FAC as ZeRO's local optimizer (``zero.optim.track(model)``), STEPS
  steps, the whole parameters and the state keys this rank's local optimizer keeps;
* kfac_resumed: the same (setting ``every``), ``consolidate_state_dict`` to rank 0 at
  half time, saved there and loaded on every rank into a fresh model and ZeRO;
* scaled_<spec>: K-FAC (setting ``every``) or Adam under ZeRO with a GradScaler (a power
  of two, so the scaled run is the unscaled one up to rounding), parameters;
* untracked: the error of a K-FAC local optimizer stepped without ``track``;
* ownerless: the error of K-FAC under ZeRO with a rank that owns no tensor;
* estimated_<spec>: a per-tensor estimator (AdaHessian, Sophia-H, Sophia) under ZeRO, its
  draws seeded per step (``seed``); ddp_sophia: Sophia under DDP alone, the same draws;
  own_sophia: Sophia under ZeRO with curvature_group=False;
* refused_<spec>: the error of constructing ZeRO with L-BFGS or a dense spec;
* ddp_<spec>: that spec under DDP alone on the tiny model (``tiny``): L-BFGS (a closure
  whose loss is averaged over the ranks) and damped Newton (the Hessian from
  ``estimate_curvature(loss=...)``), parameters and state.
"""
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.optim import ZeroRedundancyOptimizer
from torch.nn.parallel import DistributedDataParallel

import _ddp_worker as w
import _gloo
import curvc

STEPS = 12
KFAC = {"every": dict(lr=0.01, stat_every=1, inverse_every=3),
        "sparse": dict(lr=0.02, momentum=0.8, stat_every=2, inverse_every=4, damping=1e-2,
                       weight_decay=1e-3)}
WHOLE = {"lbfgs": dict(lr=0.5, max_iter=4, history_size=5),
         "damped_newton": dict(lr=0.5, lam=0.1)}
TINY_STEPS = 5
# Per-tensor estimators: Hutchinson's (exactly linear in the Hessian for given probes) and
# Sophia's Gauss-Newton-Bartlett (sampled labels); their refresh every few steps
ESTIMATED = {"adahessian": dict(lr=0.02, update_each=2),
             "sophia_h": dict(lr=0.02, update_period=3),
             "sophia": dict(lr=0.01, k=2)}
ESTIMATED_STEPS = 8


def seed(step: int) -> None:
    """The estimator's draws of each step, the same on every rank and in one process."""
    torch.manual_seed(1000 + step)


def tiny():
    """A 51-parameter model of 8 pixels (the digits' middle row): small enough for the
    dense Hessian."""
    torch.manual_seed(1)
    return torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.Tanh(),
                               torch.nn.Linear(4, 3)).double()


def tiny_data(rank: int):
    return [(x[:, 24:32], y % 3) for x, y in w.data(rank)[:TINY_STEPS]]


def zero_kfac(module, setting):
    net = DistributedDataParallel(module)
    opt = ZeroRedundancyOptimizer(module.parameters(), optimizer_class=curvc.load("kfac"),
                                  **KFAC[setting])
    opt.optim.track(module)
    return net, opt


def train(net, opt, batches):
    for xb, yb in batches:
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(xb), yb).backward()
        opt.step()


def kfac(setting, rank):
    module = w.model()
    net, opt = zero_kfac(module, setting)
    train(net, opt, w.data(rank)[:STEPS])
    return {"params": [p.detach().clone() for p in module.parameters()],
            "keys": [sorted(opt.optim.state[p]) if p in opt.optim.state else None
                     for p in module.parameters()]}


def kfac_resumed(rank, where: Path):
    batches = w.data(rank)[:STEPS]
    module = w.model()
    net, opt = zero_kfac(module, "every")
    train(net, opt, batches[:STEPS // 2])
    opt.consolidate_state_dict(to=0)
    if rank == 0:
        torch.save({"model": module.state_dict(), "optim": opt.state_dict()}, where)
    dist.barrier()
    saved = torch.load(where, weights_only=False)
    keys = [sorted(s) for _, s in sorted(saved["optim"]["state"].items())]  # before ZeRO's
    module = w.model()  # load_state_dict blanks the state of the other ranks' tensors
    module.load_state_dict(saved["model"])
    net, opt = zero_kfac(module, "every")
    opt.load_state_dict(saved["optim"])
    train(net, opt, batches[STEPS // 2:])
    return {"params": [p.detach().clone() for p in module.parameters()],
            "saved_keys": keys}


SCALED = {"kfac": KFAC["every"], "adam": dict(lr=0.01, betas=(0.8, 0.9), weight_decay=1e-3)}


def scaled(spec, rank):
    module = w.model()
    net = DistributedDataParallel(module)
    opt = ZeroRedundancyOptimizer(module.parameters(), optimizer_class=curvc.load(spec),
                                  **SCALED[spec])
    if spec == "kfac":
        opt.optim.track(module)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12, growth_interval=10 ** 6)
    for xb, yb in w.data(rank)[:STEPS]:
        opt.zero_grad()
        scaler.scale(torch.nn.functional.cross_entropy(net(xb), yb)).backward()
        scaler.step(opt)
        scaler.update()
    return {"params": [p.detach().clone() for p in module.parameters()],
            "scale": scaler.get_scale()}


def untracked(rank):
    module = w.model()
    net = DistributedDataParallel(module)
    opt = ZeroRedundancyOptimizer(module.parameters(), optimizer_class=curvc.load("kfac"),
                                  **KFAC["every"])
    try:
        train(net, opt, w.data(rank)[:1])
    except RuntimeError as e:
        return {"error": str(e)}
    return {"error": None}


def ownerless(rank):
    """K-FAC under ZeRO over more ranks than tensors: refused on every rank."""
    module = torch.nn.Linear(3, 2, bias=False).double()
    try:
        ZeroRedundancyOptimizer(module.parameters(), optimizer_class=curvc.load("kfac"), lr=0.1)
    except ValueError as e:
        return {"error": str(e)}
    return {"error": None}


def refused(spec):
    module = tiny()
    try:
        ZeroRedundancyOptimizer(module.parameters(), optimizer_class=curvc.load(spec),
                                **WHOLE[spec])
    except curvc.CurvError as e:
        return {"error": str(e)}
    return {"error": None}


def ddp(spec, rank):
    module = tiny()
    net = DistributedDataParallel(module)
    opt = curvc.load(spec)(module.parameters(), **WHOLE[spec])
    for xb, yb in tiny_data(rank):
        if spec == "lbfgs":
            def closure():
                opt.zero_grad()
                loss = torch.nn.functional.cross_entropy(net(xb), yb)
                loss.backward()
                mean = loss.detach().clone()  # its stopping tests read the loss: the ranks'
                dist.all_reduce(mean)  # mean, so that every rank iterates alike
                return mean / dist.get_world_size()
            opt.step(closure)
        else:
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(net(xb), yb)
            if opt.wants_curvature():
                opt.estimate_curvature(loss=loss)
            loss.backward()
            opt.step()
    return {"params": [p.detach().clone() for p in module.parameters()],
            "state": opt.state_dict()["state"]}


def estimated(spec, rank, where="zero", **kw):
    """``spec`` under ZeRO (``where``: or DDP alone), its curvature from
    ``estimate_curvature`` (the logits for Sophia, the loss otherwise) on refresh steps."""
    module = w.model()
    net = DistributedDataParallel(module)
    cls = curvc.load(spec)
    if where == "zero":
        opt = ZeroRedundancyOptimizer(module.parameters(), optimizer_class=cls,
                                      **ESTIMATED[spec], **kw)
        local = opt.optim
    else:
        opt = local = cls(module.parameters(), **ESTIMATED[spec], **kw)
    for i, (xb, yb) in enumerate(w.data(rank)[:ESTIMATED_STEPS]):
        opt.zero_grad()
        logits = net(xb)
        loss = torch.nn.functional.cross_entropy(logits, yb)
        if local.wants_curvature():
            seed(i)
            local.estimate_curvature(**({"logits": logits} if spec == "sophia" else
                                        {"loss": loss}))
        loss.backward()
        opt.step()
    return {"params": [p.detach().clone() for p in module.parameters()]}


def main():
    rank, world, port, out = sys.argv[1:]
    rank, world, out = int(rank), int(world), Path(out)
    dist.init_process_group("gloo", rank=rank, world_size=world,
                            init_method=f"tcp://127.0.0.1:{port}")
    try:
        for setting in KFAC:
            torch.save(kfac(setting, rank), out / f"kfac_{setting}_{rank}.pt")
        torch.save(kfac_resumed(rank, out / "kfac.ckpt"), out / f"kfac_resumed_{rank}.pt")
        for spec in SCALED:
            torch.save(scaled(spec, rank), out / f"scaled_{spec}_{rank}.pt")
        torch.save(untracked(rank), out / f"untracked_{rank}.pt")
        torch.save(ownerless(rank), out / f"ownerless_{rank}.pt")
        for spec in ESTIMATED:
            torch.save(estimated(spec, rank), out / f"estimated_{spec}_{rank}.pt")
        torch.save(estimated("sophia", rank, "ddp"), out / f"ddp_sophia_{rank}.pt")
        torch.save(estimated("sophia", rank, curvature_group=False),
                   out / f"own_sophia_{rank}.pt")
        for spec in WHOLE:
            torch.save(refused(spec), out / f"refused_{spec}_{rank}.pt")
            torch.save(ddp(spec, rank), out / f"ddp_{spec}_{rank}.pt")
    except BaseException:
        dist.destroy_process_group()
        raise
    _gloo.leave()


if __name__ == "__main__":
    main()
