"""The elementwise step of a bucket: Triton kernels, the fused CPU kernel, or foreach ops.

A mixin of ``CurvOptimizer`` (curvc/runtime/optimizer.py). For each kernel of the
program (curvc/runtime/program.py), a bucket's tensors go to the kernel's
generated Triton launcher on CUDA (or with backend 'triton'), else to the
compiled CPU kernel (``fused_cpu``) when the bucket is large or ``fused=True`` and
its tensors are plain dense CPU memory, else to the generated foreach function over
pieces of at most _PIECE elements; global reductions are summed on the device first.
"""
from __future__ import annotations

import os
import sys
import time
import warnings
from typing import TYPE_CHECKING

import torch

from curvc.runtime import amp

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

    def _fused(self, group: dict, bucket: Bucket) -> bool:
        """fused=True: one compiled pass per tensor; None: so when the bucket is large."""
        fused = group.get("fused")
        return bool(fused) or (fused is None and _large(bucket))

    def _torch_step(self, k: Kernel, group: dict, bucket: Bucket, scalars: dict, flags: dict,
                    reduced: dict) -> None:
        spec = k.args
        rows = bucket.args(spec["tensors"])
        if self._fused(group, bucket) and _plain_dense_cpu(rows):
            if self._fused_step(k, rows, bucket.steps, scalars, flags, reduced):
                return  # the compiled pass bumped the step counters
        if k.counts_step:
            torch._foreach_add_(bucket.steps, 1.0)
        args = _arguments(spec, scalars, reduced, flags)
        update = k.update
        if k.foreach is None or not _all_plain(rows):
            # Subclasses (DTensor) take per-tensor ops: their foreach coverage varies.
            for tensors in rows:
                update(*tensors, *args)
            return
        # Eager: foreach ops over pieces (_PIECE). The step is elementwise, so any
        # split of the tensors is valid; pieces bound the temporaries a call
        # allocates for a very large tensor. Tensors that
        # fit in one piece go whole (foreach ops take any shape and strides; a
        # view or a slice per tensor would cost more than a small tensor's update),
        # except 0-d ones, kept 1-D as everywhere else (type promotion differs).
        foreach = k.foreach
        pieces, size = [], 0
        for row in rows:
            n = row[0].numel()
            if n <= _PIECE and row[0].dim():
                split = [row]
            elif all(t is None or t.is_contiguous() for t in row):
                flat = [None if t is None else t.view(-1) for t in row]
                split = [[None if t is None else t[start:start + _PIECE] for t in flat]
                         for start in range(0, max(n, 1), _PIECE)]
            else:
                update(*row, *args)
                continue
            for piece in split:
                pieces.append(piece)
                size += min(_PIECE, n)
                if size >= _BATCH:
                    foreach(*(list(c) for c in zip(*pieces)), *args)
                    pieces, size = [], 0
        if pieces:
            foreach(*(list(c) for c in zip(*pieces)), *args)

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
        if [n for n in spec["reduced"] if n not in unread]:
            # device values: keep them on the device, no .item()
            values = [torch.tensor([scalars[n] for n in spec["scalars"]], dtype=sdtype)]
            values += [reduced[n].reshape(1).to(sdtype) for n in spec["reduced"]]
            s = torch.cat(values)
        else:  # the skip value is unread with its flag off
            s = kernel.set_scalars([scalars[n] for n in spec["scalars"]]
                                   + [0.0] * len(spec["reduced"]))
        # One call per tensor, small ones too: a call costs microseconds, less than
        # gathering small tensors into one buffer and scattering them back.
        if not all(c.dtype == torch.float32 and c.dim() == 0 and c.is_cpu for c in steps):
            return False  # a counter loaded in another form: the eager path bumps it
        for row, count in zip(rows, steps):
            kernel([t if t.dim() == 1 else t.view(-1) for t in row if t is not None], s, count)
        return True

    def _reduce(self, k: Kernel, work) -> dict:
        """A kernel's global sums over every parameter of every group, one per device,
        on device."""
        totals: dict[str, torch.Tensor] = {}
        for group, bucket, scalars, flags in work:
            if self._uses_triton(k, bucket, group):
                partial = k.triton_reduce(bucket, scalars, flags)
            else:
                partial = {}
                for name, (fn, spec) in k.reduce.items():
                    args = _arguments(spec, scalars, {}, flags)
                    partial[name] = sum(fn(*t, *args).double() for t in bucket.args(spec["tensors"]))
            for name, value in partial.items():
                value = value.double()
                totals[name] = value if name not in totals else totals[name] + value.to(totals[name].device)
        devices = {b.device for _, b, _, _ in work}
        return {d: {n: v.to(d, non_blocking=True) for n, v in totals.items()} for d in devices}


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


def _plain_dense_cpu(rows) -> bool:
    """Whether a bucket may take the compiled CPU kernel, whose raw call checks nothing:
    plain tensors (no subclass such as DTensor) in contiguous strided CPU memory (not
    meta: no memory at all), every row with the first row's dtypes and buffers."""
    layout = [None if t is None else t.dtype for t in rows[0]]
    for row in rows:
        for t, dtype in zip(row, layout):
            if t is None or dtype is None:
                if t is not dtype:
                    return False
                continue
            if type(t) not in _PLAIN or t.dtype != dtype or t.device.type != "cpu" or \
                    t.layout != torch.strided or not t.is_contiguous():
                return False
    return True


_PLAIN = (torch.Tensor, torch.nn.Parameter)


def _all_plain(rows) -> bool:
    return all(t is None or type(t) in _PLAIN for row in rows for t in row)


def _large(bucket: Bucket) -> bool:
    return sum(p.numel() for p in bucket.params) >= _LARGE
