"""The elementwise step of a bucket: Triton kernels, the fused CPU kernel, or foreach ops.

A mixin of ``CurvOptimizer`` (curvc/runtime/optimizer.py). For each kernel of the
program (curvc/runtime/program.py), a bucket's tensors go to the kernel's
generated Triton launcher on CUDA (or with backend 'triton'), else to the
compiled CPU kernel (``fused_cpu``) when the bucket is large or ``fused=True`` and
its tensors are plain dense CPU memory, else to the generated foreach function over
pieces of at most _PIECE elements; reductions (over every tensor, a param group's, or
each tensor's own) are summed on the device first.
"""
from __future__ import annotations

import functools
import operator
import os
import sys
import time
import warnings
from typing import TYPE_CHECKING

import torch

from curvc.runtime import amp, sharded
from curvc.runtime.program import count_steps

if TYPE_CHECKING:
    from curvc.runtime.optimizer import Bucket
    from curvc.runtime.program import Kernel


class ElementwiseSteps:
    """Runs a program's generated elementwise kernels over a bucket."""

    def _uses_triton(self, k: Kernel, bucket: Bucket, group: dict) -> bool:
        """Backend 'triton' runs Triton everywhere (CPU tensors need TRITON_INTERPRET=1);
        'auto' runs it on CUDA tensors and the torch rendering elsewhere."""
        if k.triton is None or group.get("fused") is False:
            return False
        return self.BACKEND == "triton" or bucket.device.type == "cuda"

    def _fused(self, group: dict, size: int) -> bool:
        """fused=True: one compiled pass per tensor; None: so when the bucket is large
        (``size`` elements)."""
        fused = group.get("fused")
        return bool(fused) if fused is not None else size >= _LARGE

    def _torch_step(self, k: Kernel, group: dict, bucket: Bucket, scalars: dict, flags: dict,
                    reduced: dict) -> None:
        spec = k.args
        size = sum(map(torch.Tensor.numel, bucket.params))
        columns = bucket.columns(spec["tensors"])
        if self._fused(group, size) and _plain_dense_cpu(columns) and self._fused_step(
                k, list(zip(*columns)), bucket.steps, scalars, flags, reduced):
            return  # the compiled pass bumped the step counters
        if k.counts_step:
            count_steps(bucket.steps)
        # A tensor-scope reduction is one value per tensor (row): each call takes its rows'.
        per_tensor = _per_tensor(spec, reduced)
        plain = _plain_columns(columns)
        if k.foreach is not None and plain and not per_tensor and size <= _BATCH and \
                0 not in map(torch.Tensor.dim, bucket.params):
            # one call with every tensor whole: what the loop below does for a bucket
            # this small, without its per-tensor bookkeeping (a small model's step)
            k.foreach(*columns, *_arguments(spec, scalars, reduced, flags))
            return
        rows = list(zip(*columns))

        def args_of(owners):
            if not per_tensor:
                return _arguments(spec, scalars, reduced, flags)
            if isinstance(owners, int):
                return _arguments(spec, scalars, _row_reduced(reduced, owners), flags)
            return _arguments(spec, scalars, {**reduced, **{n: [reduced[n][j] for j in owners]
                                                            for n in per_tensor}}, flags)
        update = k.update
        if k.foreach is None or not plain:
            # Subclasses (DTensor) take per-tensor ops: their foreach coverage varies.
            for j, tensors in enumerate(rows):
                update(*tensors, *args_of(j))
            return
        # Eager: foreach ops over pieces (_PIECE). The step is elementwise, so any
        # split of the tensors is valid; pieces bound the temporaries a call
        # allocates for a very large tensor. Tensors that
        # fit in one piece go whole (foreach ops take any shape and strides; a
        # view or a slice per tensor would cost more than a small tensor's update),
        # except 0-d ones, kept 1-D as everywhere else (type promotion differs).
        foreach = k.foreach
        pieces, owners, size = [], [], 0
        for j, row in enumerate(rows):
            n = row[0].numel()
            if n <= _PIECE and row[0].dim():
                split = [row]
            elif all(t is None or t.is_contiguous() for t in row):
                flat = [None if t is None else t.view(-1) for t in row]
                split = [[None if t is None else t[start:start + _PIECE] for t in flat]
                         for start in range(0, max(n, 1), _PIECE)]
            else:
                update(*row, *args_of(j))
                continue
            for piece in split:
                pieces.append(piece)
                owners.append(j)
                size += min(_PIECE, n)
                if size >= _BATCH:
                    foreach(*(list(c) for c in zip(*pieces)), *args_of(owners))
                    pieces, owners, size = [], [], 0
        if pieces:
            foreach(*(list(c) for c in zip(*pieces)), *args_of(owners))

    def _fused_step(self, k: Kernel, rows, steps: list, scalars: dict, flags: dict,
                    reduced: dict) -> bool:
        """The bucket's pass through the compiled kernel; False if it cannot be compiled."""
        from curvc.runtime.fused_cpu import FusedUpdate
        spec = k.args
        names = spec["scalars"] + [f"reduced_{n}" for n in spec["reduced"]]
        present = tuple(t is not None for t in rows[0])
        dtypes = tuple(t.dtype for t in rows[0] if t is not None)
        sdtype = torch.promote_types(rows[0][0].dtype, torch.float32)
        fl = tuple((n, flags[n]) for n in spec["flags"])
        cache = type(self).__dict__.get("_fused_kernels")
        if cache is None:
            cache = type(self)._fused_kernels = {}
        key = (k.name, present, dtypes, fl)
        if key not in cache:
            name = type(self).__name__
            _status(f"curvc: compiling {name}'s fused CPU step for {len(rows)} tensors, once "
                    "(a few seconds; fused=False skips it)")
            start = time.perf_counter()
            try:
                cache[key] = FusedUpdate(k.update, spec["tensors"], present,
                                         names, dict(fl), dtypes, sdtype, k.counts_step)
                _status(f"curvc: {name}'s fused CPU step compiled in "
                        f"{time.perf_counter() - start:.1f} s")
            except Exception as e:  # no C++ compiler, an inductor bug, ...: stay correct
                warnings.warn(f"{name}: the fused CPU step could not be compiled "
                              f"({type(e).__name__}: {e}); using the eager torch path")
                _status(f"curvc: {name} falls back to the eager torch path (see the warning)")
                cache[key] = None
        kernel = cache[key]
        if kernel is None:
            return False
        unread = [] if flags.get(amp.NONFINITE_FLAG) else [amp.NONFINITE_VALUE]
        per_tensor = _per_tensor(spec, reduced)

        def with_reduced(values: dict):
            # device values: keep them on the device, no .item()
            head = [torch.tensor([scalars[n] for n in spec["scalars"]], dtype=sdtype)]
            return torch.cat(head + [values[n].reshape(1).to(sdtype) if n not in unread
                                     else torch.zeros(1, dtype=sdtype) for n in spec["reduced"]])
        if per_tensor:
            s = None  # one per tensor, below
        elif [n for n in spec["reduced"] if n not in unread]:
            s = with_reduced(reduced)
        else:  # the skip value is unread with its flag off
            s = kernel.set_scalars([scalars[n] for n in spec["scalars"]]
                                   + [0.0] * len(spec["reduced"]))
        # One call per tensor, small ones too: a call costs microseconds, less than
        # gathering small tensors into one buffer and scattering them back.
        if not all(c.dtype == torch.float32 and c.dim() == 0 and c.is_cpu for c in steps):
            return False  # a counter loaded in another form: the eager path bumps it
        for j, (row, count) in enumerate(zip(rows, steps)):
            kernel([t if t.dim() == 1 else t.view(-1) for t in row if t is not None],
                   s if s is not None else with_reduced(_row_reduced(reduced, j)), count)
        return True

    def _reduce(self, k: Kernel, work) -> list[dict]:
        """Each work item's reduction values, on its bucket's device (no host sync): a
        global or group reduction is one 0-d sum over every tensor of the optimizer or of
        the item's param group, a tensor-scope one a sum per tensor of the bucket (a list
        on the torch path, a 1-D tensor on Triton's). The passes of ``k.levels`` run in
        order, each reading the values of those before it."""
        _refuse_flat_shards(work)
        values: list[dict] = [{} for _ in work]
        for level, names in enumerate(k.levels or (tuple(k.reduce),)):
            parts = []
            for (group, bucket, scalars, flags), known in zip(work, values):
                if self._uses_triton(k, bucket, group):
                    parts.append(sharded.whole_sums(
                        bucket, k.triton_reduce(bucket, scalars, flags, known, level)))
                    continue
                part = {}
                for name in names:
                    fn, spec = k.reduce[name]
                    per_tensor = _per_tensor(spec, known)
                    sums = [fn(*t, *_arguments(spec, scalars, _row_reduced(known, j)
                                               if per_tensor else known, flags)).double()
                            for j, t in enumerate(bucket.args(spec["tensors"]))]
                    part[name] = sums if k.scopes.get(name) == "tensor" else sum(sums)
                parts.append(sharded.whole_sums(bucket, part))  # a shard's sums: the whole's
            for name in names:
                scope = k.scopes.get(name, "global")
                if scope == "tensor":
                    for mine, part in zip(values, parts):
                        mine[name] = part[name]
                    continue
                key = (lambda group: id(group)) if scope == "group" else (lambda group: None)
                totals: dict = {}
                for (group, *_), part in zip(work, parts):
                    value, at = part[name].double(), key(group)
                    totals[at] = value if at not in totals else \
                        totals[at] + value.to(totals[at].device)
                for (group, bucket, *_), mine in zip(work, values):
                    mine[name] = totals[key(group)].to(bucket.device, non_blocking=True)
        return values


def _per_tensor(spec: dict, reduced: dict) -> list[str]:
    """The reductions a generated function reads that hold one value per tensor."""
    return [n for n in spec["reduced"] if isinstance(reduced.get(n), list)]


def _row_reduced(reduced: dict, j: int) -> dict:
    """The reduction values of the bucket's tensor j: its own entry of a per-tensor one."""
    return {n: v[j] if isinstance(v, list) else v for n, v in reduced.items()}


def _refuse_flat_shards(work) -> None:
    """A norm over FSDP's flat shards would be this rank's part of it, silently.

    ``FullyShardedDataParallel`` (FSDP1) hands the optimizer plain tensors holding each
    rank's slice of a flattened parameter, so neither a tensor's norm nor a global one
    can be read from them; FSDP2 (``fully_shard``) hands DTensors, whose sums the torch
    path reduces over the mesh (the whole tensor's), and DDP whole replicas."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return
    for _, bucket, _, _ in work:
        if any(getattr(p, "_fsdp_flattened", False) for p in bucket.params):
            raise RuntimeError(
                "this optimizer takes a norm (length normalized, clip global_norm) and its "
                "parameters are FullyShardedDataParallel's flat shards, which hold a part of "
                "each tensor on each rank: the norm would be this rank's part only. Shard "
                "with FSDP2 (torch.distributed.fsdp.fully_shard: DTensor parameters, whose "
                "norms are the whole tensor's) or use DDP")


def _status(line: str) -> None:
    """A one-time status line on stderr (the fused compile takes seconds, once), unless
    CURVC_QUIET is set."""
    if not os.environ.get("CURVC_QUIET"):
        print(line, file=sys.stderr, flush=True)


def _arguments(spec: dict, scalars: dict, reduced: dict, flags: dict) -> list:
    """A generated function's arguments after its tensors, in its signature's order
    (positional: the rendered parameter names are the backend's, not the plan's)."""
    return ([scalars[n] for n in spec["scalars"]] + [reduced[n] for n in spec["reduced"]]
            + [flags[n] for n in spec["flags"]])


_LARGE = 1 << 18  # elements in a bucket from which the fused (compiled) CPU path pays off
# Eager path: elements per foreach list entry, and per foreach call. Since the foreach
# rendering writes state in place and fuses chains, few temporaries remain, and a
# call's fixed cost per list entry outweighs cache misses: splitting a 0.3M-parameter
# MLP into 32K pieces made its step 1.5x torch's foreach Adam, 1M pieces 1.1x.
_PIECE = 1 << 20
_BATCH = 1 << 20


def _plain_dense_cpu(columns) -> bool:
    """Whether a bucket may take the compiled CPU kernel, whose raw call checks nothing:
    plain tensors (no subclass such as DTensor) in contiguous strided CPU memory (not
    meta: no memory at all), each column (a role) all present with one dtype, or all
    absent. Checked column by column in C (``map``): microseconds a tensor add up."""
    for column in columns:
        if column[0] is None:
            if not all(map(_is_none, column)):
                return False
            continue
        if not _PLAIN.issuperset(map(type, column)) or len(set(map(_DTYPE, column))) != 1 \
                or not all(map(_IS_CPU, column)) or set(map(_LAYOUT, column)) != _STRIDED \
                or not all(map(torch.Tensor.is_contiguous, column)):
            return False
    return True


_DTYPE, _IS_CPU, _LAYOUT = (operator.attrgetter(a) for a in ("dtype", "is_cpu", "layout"))
_STRIDED = {torch.strided}
_is_none = functools.partial(operator.is_, None)


_PLAIN = frozenset((torch.Tensor, torch.nn.Parameter))


_PLAIN_OR_ABSENT = frozenset((*_PLAIN, type(None)))


def _plain_columns(columns) -> bool:
    """Whether every tensor of a bucket's columns (lists per role) is a plain tensor or
    absent, checked in C (``map``): subclasses (DTensor) take per-tensor ops."""
    return all(_PLAIN_OR_ABSENT.issuperset(map(type, c)) for c in columns)
