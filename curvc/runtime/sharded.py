"""Sharded parameters (FSDP2's DTensors): the step runs on each rank's local shard.

``torch.distributed.fsdp.fully_shard`` hands the optimizer DTensor parameters,
gradients and (through ``full_like``) state, each rank holding a slice of every
tensor. DTensor has no sharding rule for several foreach ops, and the fused CPU
and Triton kernels take plain memory, so a bucket of DTensors runs on their local
tensors instead (``localize``): an elementwise step is the same on any split of
the elements. What is not elementwise is made whole:

* a reduction (a norm: ``length normalized``, a global clip, a trust ratio) sums
  each rank's part, then all-reduces the sums over the mesh dimensions the tensors
  are sharded along (``whole_sums``): one all-reduce per bucket and pass;
* a matrix call (Shampoo's Kronecker factors, K-FAC's layer step) needs the whole
  gradient of its block: the shards are all-gathered, the call runs on the whole
  tensors on every rank (its factors and roots are then replicated, plain tensors
  in the state), and each rank keeps its own slice of the result (``extern_rows``,
  ``full`` and ``local_like``). By default the blocks are split over the ranks they
  are sharded across: each block's owner alone keeps its factors and roots and
  computes its result, which it broadcasts (``owners``); with ``opt.matrix_split =
  False`` every rank computes every block. K-FAC's layer steps
  are computed on every rank.

The state stays DTensor (the buffers ``full_like`` makes), so
``torch.distributed.checkpoint`` saves and loads it sharded.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import sys

import torch

# DTensor's module is read only once something has imported it: a DTensor cannot exist
# before, and importing it here would add seconds (sympy) to every `import curvc`.
_DTENSOR_MODULE = "torch.distributed.tensor"


def loaded() -> bool:
    """Whether DTensor's module has been imported (before that, no tensor is a DTensor)."""
    return _DTENSOR_MODULE in sys.modules


def is_sharded(t) -> bool:
    module = sys.modules.get(_DTENSOR_MODULE)
    return module is not None and isinstance(t, getattr(module, "DTensor", ()))


def is_shard(placement) -> bool:
    """Whether a DTensor placement splits its dimension (Shard), not replicates it."""
    from torch.distributed.tensor import Shard
    return isinstance(placement, Shard)


def layout(p: torch.Tensor):
    """What separates buckets: a DTensor's (mesh, placements), None for a plain tensor."""
    return (p.device_mesh, tuple(p.placements)) if is_sharded(p) else None


@dataclass(frozen=True)
class Sharding:
    """Where one tensor's local shard sits in the whole tensor."""

    mesh: object
    placements: tuple
    shape: torch.Size  # the whole tensor's
    stride: tuple
    local_shape: tuple
    offset: tuple
    param: object = field(default=None, compare=False, repr=False)  # the DTensor parameter

    def local(self, whole: torch.Tensor) -> torch.Tensor:
        """This rank's slice of a whole tensor (a copy: the whole one can go)."""
        index = tuple(slice(o, o + n) for o, n in zip(self.offset, self.local_shape))
        return whole[index].clone(memory_format=torch.contiguous_format)

    def whole(self, local: torch.Tensor) -> torch.Tensor:
        """The whole tensor from every rank's shard (an all-gather)."""
        from torch.distributed.tensor import DTensor
        return DTensor.from_local(local, self.mesh, self.placements, run_check=False,
                                  shape=self.shape, stride=self.stride).full_tensor()


def sharding_of(p) -> Sharding:
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
    for placement in p.placements:
        if type(placement) not in (Shard, Replicate):
            raise RuntimeError(
                f"a parameter is a DTensor placed as {tuple(p.placements)}: curvc-compiled "
                "optimizers take DTensors sharded along whole dimensions (Shard, as "
                "fully_shard makes) or replicated, not partial or strided placements")
    local_shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh,
                                                                p.placements)
    return Sharding(p.device_mesh, tuple(p.placements), p.shape, p.stride(),
                    tuple(local_shape), tuple(offset), p)


def localize(bucket) -> None:
    """Replace a bucket's DTensors (parameters, gradients, state, inputs) by their local
    tensors, recording each parameter's ``Sharding`` in ``bucket.shards``."""
    if not bucket.params or not is_sharded(bucket.params[0]):
        return
    bucket.shards = [sharding_of(p) for p in bucket.params]
    for p, g in zip(bucket.params, bucket.grads):
        if not is_sharded(g) or tuple(g.placements) != tuple(p.placements):
            raise RuntimeError(
                f"a DTensor parameter placed as {tuple(p.placements)} has a gradient placed "
                f"as {getattr(g, 'placements', 'a plain tensor')}: the optimizer steps each "
                "rank's shard and needs both split alike (as fully_shard does)")
    bucket.params = [p._local_tensor for p in bucket.params]
    bucket.grads = [g._local_tensor for g in bucket.grads]
    for name, column in bucket.tensors.items():
        if name != "state":
            bucket.tensors[name] = local_tensors(column)


def local_tensors(column: list) -> list:
    """Each DTensor of ``column`` as this rank's local shard (others as they are)."""
    return [t._local_tensor if is_sharded(t) else t for t in column]


def whole_sums(bucket, part: dict) -> dict:
    """A bucket's partial sums (name -> a tensor or a list of them) summed over the ranks
    holding the other shards: one all-reduce per mesh dimension the tensors are sharded
    along (a replicated dimension holds copies, which are not added)."""
    shards = getattr(bucket, "shards", None)
    if not shards or not part:
        return part
    sharding = shards[0]
    dims = [i for i, pl in enumerate(sharding.placements) if is_shard(pl)]
    if not dims:
        return part
    names = sorted(part)
    pieces = [v if isinstance(v, torch.Tensor) else torch.stack([x.reshape(()) for x in v])
              for v in (part[n] for n in names)]
    flat = torch.cat([x.reshape(-1).double() for x in pieces])
    for dim in dims:
        torch.distributed.all_reduce(flat, group=sharding.mesh.get_group(dim))
    out, at = {}, 0
    for n, x in zip(names, pieces):
        v = flat[at:at + x.numel()].view(x.shape).to(x.dtype)
        at += x.numel()
        out[n] = v if isinstance(part[n], torch.Tensor) else list(v.unbind(0))
    return out


def extern_rows(bucket, fn, rows, extra, opt=None) -> list:
    """A matrix call on every row of a sharded bucket, on the whole tensors (gathered),
    each rank keeping its slice of the result.

    With ``opt.matrix_split``, each row is computed by one rank of the shard group, its
    *owner* (``owners`` over all of ``opt``'s parameters, so a block keeps its owner
    whichever others have gradients), which alone keeps the row's factors and roots in
    its state, and broadcasts the result (Distributed Shampoo's split of the work: each
    rank refreshes the roots of its own blocks); otherwise every rank computes every
    row."""
    group = _split_group(bucket.shards[0]) if opt is not None and opt.matrix_split else None
    wholes = [[sh.whole(t.contiguous()) if isinstance(t, torch.Tensor) else t for t in row]
              for sh, row in zip(bucket.shards, rows)]
    if group is None:
        return [sh.local(fn(*row, *extra)) for sh, row in zip(bucket.shards, wholes)]
    from curvc.runtime.distributed import from_owners
    ranks, me = torch.distributed.get_world_size(group), torch.distributed.get_rank(group)
    of = _owner_map(opt, ranks)
    owner = {j: of[id(sh.param)] for j, sh in enumerate(bucket.shards)}
    mine = {j: (fn(*row, *extra).contiguous(),) for j, row in enumerate(wholes)
            if owner[j] == me}
    layouts = _result_layouts(opt, fn, wholes, extra, owner, mine, group)
    got = from_owners(mine, list(owner), owner, group,
                      lambda j: [(*layouts[j], bucket.device)], copy=False)
    return [sh.local(got[j][0]) for j, sh in enumerate(bucket.shards)]


def _result_layouts(opt, fn, wholes: list, extra: tuple, owner: dict, mine: dict,
                    group) -> dict:
    """{row: (shape, dtype)} of ``fn``'s result on each row, known on every rank.

    A result's layout is a function of its tensors' layouts (an extern's scalars and
    flags, a step's hyperparameters and refresh decisions, change its values only), so
    each owner broadcasts its rows' layouts once per input signature and every later
    step with that signature reuses them: a step's only collectives are then the
    results' flat buffers."""
    def sig(x):
        return (tuple(x.shape), x.dtype) if isinstance(x, torch.Tensor) else type(x)
    key = (fn, id(group), tuple(owner.values()),
           tuple(tuple(sig(x) for x in row) for row in wholes), tuple(sig(x) for x in extra))
    cache = opt.__dict__.setdefault("_sharded_layouts", {})
    me = torch.distributed.get_rank(group)
    layouts = cache.get(key)
    if layouts is None:
        layouts = {}
        for r in sorted(set(owner.values())):
            rows = [j for j in owner if owner[j] == r]
            meta = [[(mine[j][0].shape, mine[j][0].dtype) for j in rows] if r == me else None]
            torch.distributed.broadcast_object_list(meta, group=group, group_src=r)
            layouts.update(zip(rows, meta[0]))
        cache[key] = layouts
    for j, (x,) in mine.items():  # the invariant the cache rests on: the buffer's sizes
        if (x.shape, x.dtype) != tuple(layouts[j]):
            raise RuntimeError(f"curvc: a matrix call's result changed layout for the same "
                               f"inputs ({tuple(layouts[j])} -> {(x.shape, x.dtype)})")
    return layouts


def owners(shapes: list, ranks: int) -> list[int]:
    """Each block's owning rank: the largest blocks first, each to the rank with the
    least work so far, the work of a block its roots' (the sum of d^3 over its
    dimensions, an eigendecomposition's cost). The same on every rank (shapes only)."""
    load = [0] * ranks
    owner = [0] * len(shapes)
    cost = [sum(d ** 3 for d in shape) for shape in shapes]
    for j in sorted(range(len(shapes)), key=lambda j: (-cost[j], j)):
        r = min(range(ranks), key=lambda r: (load[r], r))
        owner[j] = r
        load[r] += cost[j]
    return owner


def _owner_map(opt, ranks: int) -> dict:
    """id(parameter) -> its owner, over every DTensor parameter of the optimizer in
    order (cached until the parameters change)."""
    params = [p for g in opt.param_groups for p in g["params"] if is_sharded(p)]
    key = (ranks, tuple(id(p) for p in params))
    cached = opt.__dict__.get("_sharded_owners")
    if cached is None or cached[0] != key:
        owner = owners([p.shape for p in params], ranks)
        cached = opt.__dict__["_sharded_owners"] = (key, {id(p): r for p, r in
                                                          zip(params, owner)})
    return cached[1]


def _split_group(sharding: Sharding):
    """The group to split a bucket's matrix work over: the ranks its tensors are
    sharded across (one sharded mesh dimension), or None to compute everywhere."""
    dims = [i for i, pl in enumerate(sharding.placements) if is_shard(pl)]
    if len(dims) != 1:
        return None
    group = sharding.mesh.get_group(dims[0])
    return group if torch.distributed.get_world_size(group) > 1 else None


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a DTensor (an all-gather); a plain tensor as it is."""
    return t.full_tensor() if is_sharded(t) else t


def local_like(value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """This rank's slice of ``value`` (a whole tensor) where ``like`` is a DTensor, as
    ``like`` is split; ``value`` itself otherwise."""
    return sharding_of(like).local(value) if is_sharded(like) else value
