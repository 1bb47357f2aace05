"""The contract between a generated module and the runtime: its step as a program.

A generated module defines one ``Kernel`` per fused elementwise pass, one
``Extern`` per matrix call and at most one ``Source`` of curvature (``curvc.schedule``
decides them), and a function ``_step(run)`` that calls them in program order:
``run.source(s)`` hands every tensor the source's output (a Hessian diagonal, K-FAC's
per-layer natural gradient, the dense matrix's step), ``run.kernel(k)`` runs a kernel
over every bucket (its global reductions first), ``run.extern(e)`` calls a
matrix function on every tensor (``Extern.many`` on all of them at once where the
structure has a batched form and ``opt.batch_externs`` holds). ``Program`` holds
them for ``CurvOptimizer``, which knows nothing else about the optimizer it steps.

A source is computed before the program runs, while nothing has changed yet (so a
refused or skipped step loses nothing), by its entry of ``curvc.runtime.estimators``;
``run.source`` is where its result enters the step's dataflow. A program without
``run`` is a closure driver's (the secant method): its source is the whole step.

A *signature* (``Kernel.args``, ``Extern.args``) lists a generated function's
parameters by role, in order: ``tensors`` (per-tensor values), then ``scalars``
(host values), ``reduced`` (the sums of reductions, each over its scope: a 0-d
tensor, or for a tensor-scope reduction one per tensor), ``flags``; the function is
called positionally, since its parameter names are the backend's own.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Callable, NamedTuple

import torch


class Hyper(NamedTuple):
    """A constructor argument of the spec, with its default."""

    name: str
    default: object


class Validator(NamedTuple):
    """A check of a hyperparameter (or a tuple entry) against ``curvc.constraints``."""

    hyper: str
    index: int | None
    constraint: str
    where: str  # what the value is, for the message ("the learning rate")


class Buffer(NamedTuple):
    """A state tensor shaped like its parameter, allocated while the flag ``when``
    holds (always when None), filled with ``init(h)`` of the group's hyperparameters."""

    name: str
    when: str | None
    init: Callable


class Source(NamedTuple):
    """A curvature source of the step: ``(kind, scope)`` names its entry of
    ``curvc.runtime.estimators`` (scope: 'tensor', 'layer' or 'model', what one of its
    computations spans); it yields the kernels' input ``output`` (None: it is the whole
    step) on steps where the flag ``when`` holds (every step when None); ``args(h)``
    gives its arguments from the group's hyperparameters and this step's host scalars."""

    kind: str
    scope: str
    output: str | None
    when: str | None
    args: Callable


@dataclass(frozen=True)
class Kernel:
    """One fused elementwise pass over every tensor, in each of its renderings."""

    name: str
    update: Callable  # torch: one tensor (also what the fused CPU path compiles)
    args: dict  # update's signature
    reduce: dict = field(default_factory=dict)  # reduction -> (function, signature)
    scopes: dict = field(default_factory=dict)  # reduction -> global | group | tensor
    levels: tuple = ()  # the reductions in passes, each reading only earlier passes' values
    foreach: Callable | None = None  # torch foreach: lists of tensors
    triton: Callable | None = None  # (bucket, scalars, flags, reduced): every tensor at once
    # (bucket, scalars, flags, reduced, level) -> the level's partial sums (tensor scope:
    # one per tensor of the bucket)
    triton_reduce: Callable | None = None
    temporaries: tuple[str, ...] = ()  # step-local tensors it writes (compute dtype)
    counts_step: bool = True  # the last kernel of the step bumps the step counters


@dataclass(frozen=True)
class Extern:
    """A per-tensor matrix function: ``fn(state, *inputs, *scalars, *flags)`` returns
    the tensor ``output``. ``many``, where the structure has a batched form, is the same
    call on lists (one per tensor role, then the same scalars and flags), returning the
    list of outputs (``curvc.runtime.batched``)."""

    name: str
    fn: Callable
    args: dict
    output: str
    many: Callable | None = None


@dataclass(frozen=True)
class Program:
    """A generated optimizer's step: ``run(runner)`` calls its source, kernels and
    externs (``run`` None: ``source`` drives the whole step itself)."""

    run: Callable | None
    kernels: tuple[Kernel, ...]
    externs: tuple[Extern, ...] = ()
    source: Source | None = None

    @property
    def inputs(self) -> tuple[str, ...]:
        """The kernels' inputs a source provides (besides param, grad and state)."""
        return () if self.source is None or self.source.output is None else \
            (self.source.output,)

    @property
    def keeps_state_outside_kernels(self) -> bool:
        """Whether some state (matrix factors) is written outside the fused kernels: a
        step to skip is then decided on the host, before anything changes."""
        return bool(self.externs)


class Runner:
    """What a program's ``_step`` calls: runs kernels and externs over a step's work."""

    def __init__(self, opt, work: list, base: dict):
        self.opt = opt
        self.work = work  # (group, bucket, scalars, flags) per bucket
        self.base = base  # device -> the runtime's own device values (the skip value)

    def kernel(self, k: Kernel) -> None:
        opt = self.opt
        for _, bucket, _, _ in self.work:  # before the sums: their signatures name them
            for name in k.temporaries:
                bucket.tensors[name] = [_temporary(p) for p in bucket.params]
        reduced = opt._reduce(k, self.work) if k.reduce else [{} for _ in self.work]
        for (group, bucket, scalars, flags), mine in zip(self.work, reduced):
            red = {**self.base.get(bucket.device, {}), **mine}
            if opt._uses_triton(k, bucket, group):
                k.triton(bucket, scalars, flags, red)
                if k.counts_step:
                    count_steps(bucket.steps)  # host-side counters
            else:
                opt._torch_step(k, group, bucket, scalars, flags, red)

    def source(self, s: Source) -> None:
        """Every tensor's share of the source's output (None on a step that does not
        read it), computed before the step by ``CurvOptimizer``."""
        for _, bucket, _, flags in self.work:
            wanted = s.when is None or flags[s.when]
            column = [self.opt._estimates[p] if wanted else None for p in bucket.keys]
            if bucket.shards:  # FSDP2: this rank's shard of each (curvc.runtime.sharded)
                from curvc.runtime import sharded
                column = sharded.local_tensors(column)
            bucket.tensors[s.output] = column

    def extern(self, e: Extern) -> None:
        sig = e.args
        work = self.work
        if e.many is not None and self.opt.batch_externs:
            from curvc.runtime import batched
            batched.run(e, [w for w in work if not w[1].shards])
            work = [w for w in work if w[1].shards]  # DTensor shards: the loop below
        for _, bucket, scalars, flags in work:
            extra = [scalars[n] for n in sig["scalars"]] + [flags[n] for n in sig["flags"]]
            rows = bucket.args(sig["tensors"])
            if bucket.shards:  # DTensor shards: the call on the whole tensors (sharded.py)
                from curvc.runtime import sharded
                bucket.tensors[e.output] = sharded.extern_rows(bucket, e.fn, rows, extra,
                                                               self.opt)
                continue
            bucket.tensors[e.output] = [e.fn(*row, *extra) for row in rows]


_ONE = torch.tensor(1.0, device="cpu")  # the step counters' device, whatever the default
_SCALAR_BUFFERS = threading.local()


def host_scalars(values: list, dtype: torch.dtype, device: torch.device) -> tuple:
    """A foreach call's host scalars as 0-d tensors of the compute dtype, which foreach
    ops take without wrapping a number per list entry. On the CPU they are views of one
    buffer per thread, count and dtype, filled in place through numpy (0.4 us, against
    4.6 for a new tensor; a float rounds to the dtype alike either way). Only the call
    that asked reads them, before the thread's next call overwrites them."""
    if device.type != "cpu":
        return torch.tensor(values, dtype=dtype, device=device).unbind()
    cache = _SCALAR_BUFFERS.__dict__
    entry = cache.get((len(values), dtype))
    if entry is None:
        buffer = torch.empty(len(values), dtype=dtype, device="cpu")  # not the default device
        entry = cache[len(values), dtype] = (buffer.numpy(), buffer.unbind())
    entry[0][:] = values
    return entry[1]


def count_steps(steps: list) -> None:
    """Adds one to each float32 CPU step counter, in one call. A 0-d tensor with an
    explicit alpha takes ATen's tensor-scalar overload, which wraps nothing per entry:
    about 3x faster than ``1.0`` (148 counters: 55 against 160 us)."""
    torch._foreach_add_(steps, _ONE, alpha=1.0)


def _temporary(p: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(p, dtype=torch.promote_types(p.dtype, torch.float32),
                            memory_format=torch.contiguous_format)


def resolved(h: dict, dtype: torch.dtype = torch.float32) -> dict:
    """Flat hyperparameters ``h`` with every None (a spec's ``machine_eps`` entry) as
    ``torch.finfo(dtype).eps``, the parameter dtype's, as torch.optim.Adafactor resolves
    its eps[0] (host flags that only ask whether a step refreshes take float32's)."""
    if None not in h.values():
        return h
    eps = torch.finfo(dtype if dtype.is_floating_point else torch.float32).eps
    return {k: eps if v is None else v for k, v in h.items()}
