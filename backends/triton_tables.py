"""Run-time support of the Triton rendering: the pointer tables a launch reads.

Imported by generated modules (``from curvc.backends.triton_tables import Tables``);
it needs torch, never triton at import time, so the torch path works without Triton.
"""
from __future__ import annotations

import copy
import math
from collections import OrderedDict

BLOCK = 1024  # elements per program on GPU: 4 warps x 8 elements per thread
INTERPRETER_BLOCK = 256  # on the CPU interpreter: fewer lanes, and tests still cross blocks
NUM_WARPS = 4
CACHE_SIZE = 16  # table sets kept per generated optimizer


def _interpreted(kernel) -> bool:
    kernel = getattr(kernel, "__wrapped__", kernel)  # a wrapper (a launch counter) names its kernel
    return type(kernel).__name__ == "InterpretedFunction"


def _dense(t) -> bool:
    """Whether ``t``'s elements fill its storage span without gaps or overlap."""
    if t.is_contiguous():
        return True
    expected = 1
    for stride, size in sorted((st, sz) for st, sz in zip(t.stride(), t.shape) if sz != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def _layout(t) -> tuple:
    return tuple(st for st, sz in zip(t.stride(), t.shape) if sz != 1)


class Launch:
    """One kernel launch's worth of tables: tensors sharing dtypes (usually the whole bucket)."""

    def __init__(self, ptrs, numels, block_tensor, block_start, blocks, dtypes, compute, block,
                 write_back, device):
        self.ptrs = ptrs  # role -> int64 device table of data pointers
        self.numels, self.block_tensor, self.block_start = numels, block_tensor, block_start
        self.blocks = blocks
        self.dtypes = dtypes  # role -> tl dtype
        self.compute = compute
        self.block = block
        self.num_warps = NUM_WARPS
        self.device = device
        self._write_back = write_back  # (original, staged) for non-dense tensors
        self._keep = ()  # tensors the launch reads that nothing else holds

    def partials(self, rows: int):
        import torch
        return torch.empty(rows * self.blocks, dtype=torch.float64, device=self.device)

    def finish(self) -> None:
        for original, staged in self._write_back:
            original.copy_(staged)


class Tables:
    """Data-pointer tables for multi-tensor launches, cached on the tensors' ``data_ptr()``s.

    ``launches(bucket, kernel)`` returns the launches that cover a bucket:
    one, unless tensors of one role differ in dtype (then one per dtype mix).
    Tensors whose layout is not dense, or differs between param, grad and
    state, are updated through contiguous copies written back by ``finish``.
    """

    def __init__(self, roles: list[str], stored: list[str]):
        self.roles = list(roles)
        self.stored = set(stored)
        self._cache: OrderedDict = OrderedDict()

    def zeros(self, bucket, rows: int):
        import torch
        return torch.zeros(rows, dtype=torch.float64, device=bucket.device)

    def _columns(self, bucket) -> list[list]:
        cols = []
        for role in self.roles:
            col = bucket.params if role == "param" else bucket.grads if role == "grad" else \
                bucket.tensors.get(role)
            cols.append(list(col) if col is not None else [None] * len(bucket.params))
        return cols

    def launches(self, bucket, kernel) -> list[Launch]:
        import torch
        interpreted = _interpreted(kernel)
        if bucket.device.type == "cpu" and not interpreted:
            raise RuntimeError("Triton kernels on CPU tensors need the interpreter: set "
                               "TRITON_INTERPRET=1 before triton is imported, or use backend "
                               "'torch' or 'auto'")
        block = INTERPRETER_BLOCK if interpreted else BLOCK
        cols = self._columns(bucket)
        rows = list(zip(*cols))  # per tensor: (param, grad, ...)
        groups: dict[tuple, list[int]] = {}
        write_back: list = []
        staged_rows = []
        places = []  # each staged row's place in the bucket (tensor-scope sums are kept so)
        for j, row in enumerate(rows):
            p = row[0]
            if p.numel() == 0:
                continue
            places.append(j)
            present = [t for t in row if t is not None]
            if not all(_dense(t) and _layout(t) == _layout(p) for t in present):
                row = tuple(None if t is None else t.contiguous() for t in row)
                write_back += [(o, s) for role, o, s in zip(self.roles, rows[j], row)
                               if role in self.stored and o is not None and s is not o]
            staged_rows.append(row)
            key = tuple(None if t is None else t.dtype for t in row)
            groups.setdefault(key, []).append(len(staged_rows) - 1)
        if len(groups) > 1:
            groups = self._merge(groups)
        out = [copy.copy(self._launch([staged_rows[j] for j in members],
                                      tuple(places[j] for j in members), key, bucket.device,
                                      block, torch)) for key, members in groups.items()]
        for launch in out:
            # Staged copies must outlive the launch: freed earlier, their memory
            # could be reused (by the next table, say) before the kernel reads it.
            launch._keep = staged_rows
        if out:
            out[-1]._write_back = write_back  # after the last launch has written everything
        return out

    @staticmethod
    def _merge(groups: dict) -> dict:
        """Treat an absent tensor (None) as matching any dtype of its role."""
        merged: dict[tuple, list[int]] = {}
        for key, members in sorted(groups.items(), key=lambda kv: sum(k is None for k in kv[0])):
            for mkey in merged:
                if all(a is None or b is None or a == b for a, b in zip(key, mkey)):
                    new = tuple(b if b is not None else a for a, b in zip(key, mkey))
                    merged[new] = merged.pop(mkey) + members
                    break
            else:
                merged[key] = list(members)
        return merged

    def _launch(self, rows, places, dtypes, device, block, torch) -> Launch:
        numels = tuple(r[0].numel() for r in rows)
        ptrs = tuple(tuple(0 if t is None else t.data_ptr() for t in r) for r in rows)
        key = (device, block, dtypes, numels, ptrs, places)
        hit = self._cache.get(key)
        if hit is not None:
            self._cache.move_to_end(key)
            return hit
        launch = self._build(rows, places, numels, dtypes, device, block, torch)
        self._cache[key] = launch
        if len(self._cache) > CACHE_SIZE:
            self._cache.popitem(last=False)
        return launch

    def _build(self, rows, places, numels, dtypes, device, block, torch) -> Launch:
        import triton.language as tl
        tl_types = {torch.float32: tl.float32, torch.float16: tl.float16,
                    torch.bfloat16: tl.bfloat16, torch.float64: tl.float64}
        n = len(rows)
        counts = torch.tensor([math.ceil(m / block) for m in numels], dtype=torch.int64)
        blocks = int(counts.sum())
        block_tensor = torch.repeat_interleave(torch.arange(n), counts)
        first = torch.cumsum(counts, 0) - counts
        block_start = (torch.arange(blocks) - first[block_tensor]) * block
        # One host buffer, one copy to the device; every segment padded to 16
        # bytes so each table slice is as aligned as a fresh tensor (Triton
        # specializes pointer arguments on 16-byte alignment).
        segments = [torch.tensor([0 if t is None else t.data_ptr() for t in col], dtype=torch.int64)
                    for col in zip(*rows)]
        segments += [torch.tensor(numels, dtype=torch.int64), block_tensor, block_start,
                     counts, torch.tensor(places, dtype=torch.int64)]
        padded = [torch.cat([s, s.new_zeros(len(s) % 2)]) for s in segments]
        flat = torch.cat(padded)
        if device.type == "cuda":
            flat = flat.pin_memory().to(device, non_blocking=True)
        views, at = [], 0
        for s, p in zip(segments, padded):
            views.append(flat[at:at + len(s)])
            at += len(p)
        role_dtypes = {}
        for role, dt in zip(self.roles, dtypes):
            if dt is not None and dt not in tl_types:
                raise TypeError(f"Triton backend: unsupported dtype {dt} for {role!r}")
            role_dtypes[role] = tl_types.get(dt, tl.float32)  # absent everywhere: never read
        compute = tl.float64 if dtypes[0] == torch.float64 else tl.float32
        ptrs = dict(zip(self.roles, views[:len(self.roles)]))
        numel_t, block_tensor_t, block_start_t, counts_t, places_t = views[len(self.roles):]
        launch = Launch(ptrs, numel_t, block_tensor_t, block_start_t, blocks, role_dtypes,
                        compute, block, [], device)
        launch.counts, launch.positions = counts_t, places_t  # per tensor: blocks, bucket place
        return launch
