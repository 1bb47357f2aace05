"""Curvature as a distributed quantity: estimates averaged over the ranks that hold a replica.

Under data parallelism (DDP), every rank holds the same parameters and sees
its own data; torch averages the gradients, but a curvature estimate made from
the local batch (Hutchinson's z * Hz, Gauss-Newton-Bartlett's and the Fisher's
sampled-label gradients, K-FAC's activation and output-gradient factors, the
dense matrix) would make the ranks' states, and then their parameters, drift
apart. So the optimizer averages each estimate over the process group before
it enters the state: one all-reduce per refresh, bucketed by (device, dtype),
not one per tensor; K-FAC's factors only on its statistics steps.

The group is the optimizer's ``curvature_group`` keyword: ``None`` (the default)
means the default group whenever ``torch.distributed`` is initialised with
more than one rank; ``False`` turns the averaging off (e.g. for sharded
parameters, where each rank's estimate belongs to its own shard); or a
``ProcessGroup``. Estimates handed over by ``set_curvature`` or
``step(curvature=...)`` are used as given.
"""
from __future__ import annotations

import math
import weakref

import torch


def group_of(choice):
    """The process group to average over for a ``curvature_group`` choice, or None."""
    if choice is False:
        return None
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        return None
    group = dist.group.WORLD if choice is None else choice
    return group if dist.get_world_size(group) > 1 else None


def average(tensors: list[torch.Tensor], group) -> list[torch.Tensor]:
    """The mean of each tensor over the group's ranks (new tensors; the inputs are
    untouched), with one all-reduce per (device, dtype). Every rank must pass
    tensors of the same shapes in the same order."""
    if group is None:
        return list(tensors)
    dist = torch.distributed
    ranks = dist.get_world_size(group)
    signature = (id(group), len(tensors), sum(t.numel() for t in tensors))
    if signature not in _VERIFIED:  # once per layout: the check syncs with the host
        _check_same_tensors(tensors, group, ranks)
        _VERIFIED.add(signature)
    if not tensors:
        return []
    out: list = [None] * len(tensors)
    buckets: dict = {}
    for i, t in enumerate(tensors):
        buckets.setdefault((t.device, t.dtype), []).append(i)
    for (device, dtype), idx in sorted(buckets.items(), key=lambda kv: (str(kv[0][0]),
                                                                      str(kv[0][1]))):
        flat = torch.cat([tensors[i].reshape(-1) for i in idx])
        dist.all_reduce(flat, group=group)
        flat.div_(ranks)
        at = 0
        for i in idx:
            n = tensors[i].numel()
            out[i] = flat[at:at + n].view(tensors[i].shape)
            at += n
    return out


# (group, tensors, elements) layouts every rank was seen to share: a refresh with the same
# local layout skips the check (under DDP and ZeRO a rank's layout is fixed, so every rank
# checks at its first refresh and at the same later ones)
_VERIFIED: set = set()


def _check_same_tensors(tensors: list, group, ranks: int) -> None:
    """Refuse, on every rank, to average estimates of different tensors (one small
    all-gather): ZeroRedundancyOptimizer gives each rank other parameters, whose sums
    would be mixed up, or a rank with none would wait forever."""
    dist = torch.distributed
    cuda = dist.get_backend(group) == "nccl"
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    mine = torch.tensor([len(tensors), sum(t.numel() for t in tensors)], dtype=torch.int64,
                        device=device)
    every = [torch.empty_like(mine) for _ in range(ranks)]
    dist.all_gather(every, mine, group=group)
    if any(not torch.equal(e, every[0]) for e in every):
        raise RuntimeError(
            "curvature estimates cannot be averaged over the ranks: they hold different "
            "parameters (as under ZeroRedundancyOptimizer, each rank its own partition; "
            f"tensors and elements per rank: {[e.tolist() for e in every]}). Pass "
            "curvature_group=False to keep each rank's estimate of its own parameters")


# -- matrix work split over the ranks: each result computed by its owner, then shared ----

def from_owners(mine: dict, wanted: list, of: dict, group, like, copy: bool = True) -> dict:
    """{key: tensors} for every key of ``wanted``, each computed by its owner (``of[key]``,
    a rank of ``group``; this rank's results in ``mine``) and broadcast: one flat buffer
    per owner and dtype, not one collective per tensor. ``like(key)`` is the (shape,
    dtype, device) of each of its tensors, known on every rank.

    The owner takes its tensors back from the buffer too: the same contiguous layout on
    every rank, so the products that read them round alike (a strided and a contiguous
    operand take different matmul kernels on AVX-512 CPUs). ``copy``: each tensor its
    own storage (for state that outlives the step); otherwise views of the buffer."""
    dist = torch.distributed
    me, out = dist.get_rank(group), {}
    for r in range(dist.get_world_size(group)):
        by_dtype: dict = {}
        for key in wanted:
            if of[key] == r:
                by_dtype.setdefault(like(key)[0][1], []).append(key)
        for dtype in sorted(by_dtype, key=str):
            keys = by_dtype[dtype]
            shapes = [x for key in keys for x in like(key)]
            if r == me:
                flat = torch.cat([x.reshape(-1) for key in keys for x in mine[key]])
            else:
                flat = torch.empty(sum(math.prod(s) for s, _, _ in shapes), dtype=dtype,
                                   device=shapes[0][2])
            dist.broadcast(flat, group=group, group_src=r)
            pieces = iter(flat.split([math.prod(s) for s, _, _ in shapes]))
            for key in keys:
                got = [next(pieces).view(s) for s, _, _ in like(key)]
                out[key] = tuple(x.clone() for x in got) if copy else tuple(got)
    return out


# -- the non-finite skip decision, made the same on every rank ---------------------------

def decision_groups(opt) -> list:
    """The groups a step's skip decision (curvc.runtime.amp) is max-reduced over, so that
    one rank's NaN skips the step on every rank: ``opt.nonfinite_group`` (as
    ``curvature_group`` reads: ``None``, the default group whenever torch.distributed
    runs with 2+ ranks; ``False``, none; or a ``ProcessGroup``) and, unless that is the
    default group (which holds them), the mesh groups DTensor parameters are sharded
    over: a tensor's shards always decide together. Cached while the parameters stay
    (off the optimizer: a copy or pickle of it must not carry a ProcessGroup)."""
    choice = getattr(opt, "nonfinite_group", None)
    params = [p for g in opt.param_groups for p in g["params"]]
    key = (id(choice), tuple(id(p) for p in params))
    cached = _DECISION_GROUPS.get(opt)
    if cached is not None and cached[0] == key:
        return cached[1]
    from curvc.runtime import sharded
    groups: list = []
    chosen = group_of(choice)
    if chosen is not None:
        groups.append(chosen)
    if chosen is None or chosen is not torch.distributed.group.WORLD:
        for p in params:
            if not sharded.is_sharded(p):
                continue
            for dim, placement in enumerate(p.placements):
                group = p.device_mesh.get_group(dim)
                if sharded.is_shard(placement) and all(group is not g for g in groups) \
                        and torch.distributed.get_world_size(group) > 1:
                    groups.append(group)
    _DECISION_GROUPS[opt] = (key, groups)
    return groups


_DECISION_GROUPS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def agree(flag: torch.Tensor, groups: list) -> torch.Tensor:
    """``flag`` (a 0-d float32 tensor) max-reduced over ``groups`` in order (a new tensor
    where it had to move to the group's device; ``flag`` itself otherwise)."""
    dist = torch.distributed
    for group in groups:
        on = flag
        if dist.get_backend(group) == "nccl" and not flag.is_cuda:
            on = flag.to(torch.device("cuda", torch.cuda.current_device()))
        dist.all_reduce(on, op=dist.ReduceOp.MAX, group=group)
        flag = on if on is flag else on.to(flag.device)
    return flag
