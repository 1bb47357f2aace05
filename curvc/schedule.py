"""Scheduling: a plan's DAG split into a program of fused kernels and extern calls.

A plan is one expression DAG per stored value. Most of it is elementwise and
fuses into one pass over memory; a matrix computation (``Precondition``: a
Kronecker factor's accumulation, root and mode products) does not. As torch
Inductor does with its ``ExternKernel`` nodes, the scheduler cuts the DAG at
each such node:

* a **head** kernel computes, in one fused pass, every store that does not
  depend on the extern, and the extern's tensor operands, written to step-local
  temporaries (``matrix_statistic``, ``matrix_value``);
* the **extern** runs per tensor through torch's kernels (cuBLAS/LAPACK),
  reading the temporaries and the tensor's state, writing ``matrix_step``;
* a **tail** kernel computes the stores that depend on it (the parameter),
  with its global reductions (a step norm over every tensor) summed after
  every tensor's extern has run.

A tail expression that needs a value the head overwrote (a buffer's old
content) reads it from a temporary the head wrote before the store. Each
kernel is itself a ``Plan`` (the same host code, its own stores, buffers and
inputs), so every elementwise backend renders it unchanged: foreach, the fused
CPU path, Triton. A plan without an extern is a one-kernel program.

A curvature the kernels read as an input (a Hessian diagonal, K-FAC's per-layer
natural gradient, the dense matrix's step) comes from a **source** node at the head
of the program, with its scope (tensor, layer, model) and the arguments it is
computed with; a closure driver's program (L-BFGS) is its source alone.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from curvc.plan import Buffer, Expr, FactoredStage, KroneckerStage, Load, Op, Plan, \
    Precondition, Reduced, Select, Store, walk


@dataclass(frozen=True)
class Kernel:
    """A fused elementwise pass over every tensor; ``plan`` is what backends render.

    ``temporaries`` are tensors the pass writes that live for one step only
    (the runtime allocates them, in the compute dtype); ``last`` marks the
    kernel after which the step is done (it bumps the step counters)."""

    name: str  # '' for a one-kernel program; else 'head', 'tail', ...
    plan: Plan
    temporaries: tuple[str, ...] = ()
    last: bool = True


@dataclass(frozen=True)
class Extern:
    """A per-tensor call into a runtime matrix function, between two kernels.

    It reads the tensors ``inputs`` and the tensor's optimizer state, and
    returns the tensor ``output``; ``params`` are host expressions in the order
    of ``stage.params``."""

    name: str
    stage: KroneckerStage | FactoredStage
    inputs: tuple[str, ...]
    output: str
    params: tuple[Expr, ...]


@dataclass(frozen=True)
class Source:
    """The curvature the kernels read as their input ``output`` (None: the source is
    the whole step), from the runtime's source ``(kind, scope)`` on steps where the flag
    ``when`` holds (every step when None). Its arguments are ``args``, host expressions
    or words by keyword, or, for a whole-model stage, the settings function of
    ``settings`` ('dense' or 'secant': the stage's fields, rendered by emit)."""

    kind: str
    scope: str  # 'tensor' | 'layer' | 'model'
    output: str | None
    when: str | None = None
    args: tuple[tuple[str, object], ...] = ()
    settings: str | None = None


@dataclass(frozen=True)
class Program:
    steps: tuple  # Source | Kernel | Extern, in execution order

    @property
    def source(self) -> Source | None:
        return next((s for s in self.steps if isinstance(s, Source)), None)

    @property
    def kernels(self) -> tuple[Kernel, ...]:
        return tuple(s for s in self.steps if isinstance(s, Kernel))

    @property
    def externs(self) -> tuple[Extern, ...]:
        return tuple(s for s in self.steps if isinstance(s, Extern))


STATISTIC, VALUE, OUTPUT = "matrix_statistic", "matrix_value", "matrix_step"


def _contains(e: Expr, node: Expr) -> bool:
    return any(n == node for n in walk(e))


def _tensor_names(exprs) -> set[str]:
    return {n.name for e in exprs for n in walk(e) if isinstance(n, Load)}


def _sums_read(exprs) -> set[str]:
    return {n.name for e in exprs for n in walk(e) if isinstance(n, Reduced)}


def _kernel_plan(plan: Plan, stores, reductions, extra_inputs=(), temporaries=()) -> Plan:
    """A sub-plan with only the buffers and inputs its expressions touch."""
    exprs = [st.value for st in stores] + [r.value for r in reductions]
    used = _tensor_names(exprs) | {st.target for st in stores}
    buffers = tuple(b for b in plan.buffers if b.name in used)
    buffers += tuple(Buffer(t) for t in temporaries)
    inputs = tuple(i for i in (*plan.inputs, *extra_inputs) if i in used)
    return replace(plan, buffers=buffers, inputs=inputs, stores=tuple(stores),
                   reductions=tuple(reductions), matrix=())


def source_of(plan: Plan) -> Source | None:
    """The plan's curvature source as the program's first node (None: the gradient alone)."""
    if plan.secant is not None:
        return Source("secant", "model", None, settings="secant")
    if plan.dense is not None:  # the matrix's step d, read every step (refreshed less often)
        output, = plan.inputs
        return Source(plan.dense.curvature, "model", output, settings="dense")
    est = plan.estimator
    if est is not None:
        return Source(est.kind, est.scope, est.input, est.when, est.args)
    return None


def split(plan: Plan) -> Program:
    """The plan as a program (see the module docstring)."""
    source = source_of(plan)
    if plan.secant is not None:  # a closure driver: no kernels
        return Program((source,))
    head = (source,) if source is not None else ()
    return Program(head + _kernels(plan))


def _kernels(plan: Plan) -> tuple:
    """The plan's kernels and its extern, in order."""
    externs = {n for st in plan.stores for n in walk(st.value) if isinstance(n, Precondition)}
    if not externs:
        return (Kernel("", plan),)
    if len(externs) > 1:
        raise AssertionError("a plan with more than one matrix stage")  # lowering makes one
    node = externs.pop()
    stage = plan.stage(node.stage)
    n_params = len(stage.params)  # then the stage's own tensor operands (a graft's step)
    statistic, value = node.args[:2]
    params, extra = node.args[2:2 + n_params], node.args[2 + n_params:]
    head_stores = [st for st in plan.stores if not _contains(st.value, node)]
    tail_stores = [st for st in plan.stores if _contains(st.value, node)]
    head_reductions = [r for r in plan.reductions if not _contains(r.value, node)]
    tail_reductions = [r for r in plan.reductions if _contains(r.value, node)]
    # What the head overwrites: a tail reading it must read the old value from a temporary.
    overwritten = {st.target for st in head_stores}
    # The head's reductions (a clipped gradient's norm) are summed before the head runs: a
    # tail value reading one is computed by the head, into a temporary, too.
    head_sums = {r.name for r in head_reductions}
    temps: dict[Expr, str] = {}
    operands = []  # the extern's tensor inputs: a tensor the head leaves alone goes as it is
    for e, name in ((statistic, STATISTIC), (value, VALUE),
                    *((x, f"matrix_{n}") for x, n in zip(extra, getattr(stage, "operands", ())))):
        if isinstance(e, Load) and e.name not in overwritten:
            operands.append(e.name)
        else:
            operands.append(temps.setdefault(e, name))

    def tail_value(e: Expr) -> Expr:
        if e == node:
            return Load(OUTPUT)
        if not _contains(e, node):
            if _tensor_names([e]) & overwritten or _sums_read([e]) & head_sums:
                if e not in temps:
                    temps[e] = f"matrix_old{len(temps)}"  # read after the head stores
                return Load(temps[e])
            return e
        if isinstance(e, Select):
            return Select(e.flag, tail_value(e.then), tail_value(e.other))
        assert isinstance(e, Op), e
        return replace(e, args=tuple(tail_value(a) for a in e.args))

    tail_stores = [replace(st, value=tail_value(st.value)) for st in tail_stores]
    tail_reductions = [replace(r, value=tail_value(r.value)) for r in tail_reductions]
    temp_stores = [Store(name, e) for e, name in temps.items()]
    head = _kernel_plan(plan, temp_stores + head_stores, head_reductions,
                        temporaries=tuple(temps.values()))
    tail = _kernel_plan(plan, tail_stores, tail_reductions,
                        extra_inputs=(*temps.values(), OUTPUT))
    inputs = tuple(operands[:2]) if operands[0] != operands[1] else (operands[0],)
    inputs += tuple(operands[2:])
    if stage.reads_param:  # the parameter before the step (the head does not write it)
        assert "param" not in overwritten, "the head stores the parameter"
        inputs += ("param",)
    extern = Extern(node.stage, stage, inputs, OUTPUT, tuple(params))
    return (Kernel("head", head, tuple(temps.values()), last=False), extern,
            Kernel("tail", tail))
