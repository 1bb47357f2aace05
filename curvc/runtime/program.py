"""The contract between a generated module and the runtime: its step as a program.

A generated module defines one ``Kernel`` per fused elementwise pass and one
``Extern`` per matrix call (``curvc.schedule`` decides them), and a function
``_step(run)`` that calls them in program order: ``run.kernel(k)`` runs a kernel
over every bucket (its global reductions first), ``run.extern(e)`` calls a
matrix function on every tensor. ``Program`` holds them for ``CurvOptimizer``,
which knows nothing else about the optimizer it steps.

A *signature* (``Kernel.args``, ``Extern.args``) lists a generated function's
parameters by role, in order: ``tensors`` (per-tensor values), then ``scalars``
(host values), ``reduced`` (global sums), ``flags``; the function is called
positionally, since its parameter names are the backend's own.
"""
from __future__ import annotations

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


class Estimator(NamedTuple):
    """The curvature source the plan reads (``curvc.runtime.estimators``): it fills the
    input ``input`` on steps where the flag ``when`` holds, with ``args(h)``."""

    kind: str
    input: str
    when: str | None
    args: Callable


@dataclass(frozen=True)
class Kernel:
    """One fused elementwise pass over every tensor, in each of its renderings."""

    name: str
    update: Callable  # torch: one tensor (also what the fused CPU path compiles)
    args: dict  # update's signature
    reduce: dict = field(default_factory=dict)  # reduction -> (function, signature)
    foreach: Callable | None = None  # torch foreach: lists of tensors
    triton: Callable | None = None  # (bucket, scalars, flags, reduced): every tensor at once
    triton_reduce: Callable | None = None  # (bucket, scalars, flags) -> partial sums
    temporaries: tuple[str, ...] = ()  # step-local tensors it writes (compute dtype)
    counts_step: bool = True  # the last kernel of the step bumps the step counters


@dataclass(frozen=True)
class Extern:
    """A per-tensor matrix function: ``fn(state, *inputs, *scalars, *flags)`` returns
    the tensor ``output``."""

    name: str
    fn: Callable
    args: dict
    output: str


@dataclass(frozen=True)
class Program:
    """A generated optimizer's step: ``run(runner)`` calls its kernels and externs."""

    run: Callable
    kernels: tuple[Kernel, ...]
    externs: tuple[Extern, ...] = ()

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
        reduced = opt._reduce(k, self.work) if k.reduce else {}
        for group, bucket, scalars, flags in self.work:
            for name in k.temporaries:
                bucket.tensors[name] = [_temporary(p) for p in bucket.params]
            red = {**self.base.get(bucket.device, {}), **reduced.get(bucket.device, {})}
            if opt._uses_triton(k, bucket, group):
                k.triton(bucket, scalars, flags, red)
                if k.counts_step:
                    torch._foreach_add_(bucket.steps, 1.0)  # host-side counters, one call
            else:
                opt._torch_step(k, group, bucket, scalars, flags, red)

    def extern(self, e: Extern) -> None:
        sig = e.args
        for _, bucket, scalars, flags in self.work:
            extra = [scalars[n] for n in sig["scalars"]] + [flags[n] for n in sig["flags"]]
            bucket.tensors[e.output] = [e.fn(*row, *extra) for row in bucket.args(sig["tensors"])]


def _temporary(p: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(p, dtype=torch.promote_types(p.dtype, torch.float32),
                            memory_format=torch.contiguous_format)
