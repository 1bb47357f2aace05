"""Passes: named rewrites of a lowered plan, run in order (``PASSES``).

Each takes a ``Plan`` and returns a new one: dividing by a host value
becomes multiplying by its reciprocal, scalar-only arithmetic is hoisted to
the host, every store is guarded by the runtime's skip flag, and ``verify``
checks that every name an expression reads is defined. Lowering
(``curvc.lower``) builds the plan they start from.
"""
from __future__ import annotations

from dataclasses import replace

from curvc.fold import div, mul
from curvc.plan import (NONFINITE_FLAG, NONFINITE_VALUE, Expr, Load, Op, Plan,
                        Precondition, Reduced, Scalar, Select, walk)


def _is_host(e: Expr) -> bool:
    return all(not isinstance(n, (Load, Reduced, Select)) for n in walk(e))


def divide_by_reciprocal(plan: Plan) -> Plan:
    """x / s -> x * (1/s) when s is a host value: one division per step, not per element.

    Elementwise division is several times slower than multiplication, and an
    optimizer step is close to memory-bound, so each one per element shows.
    The result may differ from the division in the last bit.
    """
    def visit(e: Expr) -> Expr:
        if isinstance(e, Op):
            args = tuple(visit(a) for a in e.args)
            if e.op == "div" and _is_host(args[1]) and not _is_host(args[0]):
                return mul(args[0], div(1.0, args[1]))
            return replace(e, args=args)
        if isinstance(e, Select):
            return Select(e.flag, visit(e.then), visit(e.other))
        return e

    stores = tuple(replace(st, value=visit(st.value)) for st in plan.stores)
    reductions = tuple(replace(r, value=visit(r.value)) for r in plan.reductions)
    return replace(plan, stores=stores, reductions=reductions)


def hoist_host(plan: Plan) -> Plan:
    """Move scalar-only subexpressions (1 - beta, lr * wd, ...) to the host.

    They are then computed once per group and step in Python and passed to
    kernels as arguments, instead of once per element.
    """
    host = list(plan.host)
    named: dict[Expr, Scalar] = {e: Scalar(n) for n, e in host}
    # host scalars share one namespace with the (flattened) hyperparameters
    taken = set(plan.host_inputs) | {n for n, _ in host}

    def fresh() -> str:
        i = len(host)
        while f"s{i}" in taken:
            i += 1
        taken.add(f"s{i}")
        return f"s{i}"

    def visit(e: Expr) -> Expr:
        if isinstance(e, Op):
            if _is_host(e):
                if e not in named:
                    name = fresh()
                    host.append((name, e))
                    named[e] = Scalar(name)
                return named[e]
            return replace(e, args=tuple(visit(a) for a in e.args))
        if isinstance(e, Select):
            return Select(e.flag, visit(e.then), visit(e.other))
        return e

    stores = tuple(replace(st, value=visit(st.value)) for st in plan.stores)
    reductions = tuple(replace(r, value=visit(r.value)) for r in plan.reductions)
    return replace(plan, host=tuple(host), stores=stores, reductions=reductions)


def keep_on_nonfinite(plan: Plan) -> Plan:
    """Every store becomes ``old if flagged else new`` when the runtime asks for it.

    A step with a non-finite gradient (``nonfinite="skip"``) or one a GradScaler
    found infs in must leave the parameters and every buffer as they were,
    without a host sync: the runtime passes a 0-d device value (nonzero: skip)
    and turns the host flag on; with the flag off (``nonfinite="propagate"``, no
    scaler) the Select is a static branch and the step is unchanged.
    """
    flag = Reduced(NONFINITE_VALUE)
    stores = tuple(replace(st, value=Select(NONFINITE_FLAG, Op("keep_if", (
        flag, Load(st.target), st.value)), st.value)) for st in plan.stores)
    return replace(plan, stores=stores)


def verify(plan: Plan) -> Plan:
    """Every name an expression reads is defined; fails loudly on a lowering bug."""
    scalars = set(plan.host_inputs)
    for name, e in plan.host:
        for n in walk(e):
            assert not isinstance(n, (Load, Reduced, Select)), (name, n)
            assert not isinstance(n, Scalar) or n.name in scalars, (name, n)
        scalars.add(name)
    flags = {n for n, _ in plan.flags} | {"maximize", NONFINITE_FLAG}  # the runtime's flags
    tensors = {"param", "grad", *plan.inputs, *(b.name for b in plan.buffers)}
    reduced = {r.name for r in plan.reductions} | {NONFINITE_VALUE}
    for e in [st.value for st in plan.stores] + [r.value for r in plan.reductions]:
        for n in walk(e):
            if isinstance(n, Scalar):
                assert n.name in scalars, n
            elif isinstance(n, Load):
                assert n.name in tensors, n
            elif isinstance(n, Reduced):
                assert n.name in reduced, n
            elif isinstance(n, Select):
                assert n.flag in flags, n
    for st in plan.stores:
        assert st.target == "param" or st.target in tensors, st
    stages = {m.name: m for m in plan.matrix}
    for e in [st.value for st in plan.stores] + [r.value for r in plan.reductions]:
        for n in walk(e):
            if isinstance(n, Precondition):
                stage = stages.get(n.stage)
                assert stage is not None and len(n.args) == 2 + len(stage.params) + len(
                    getattr(stage, "operands", ())), n
    for m in plan.matrix:
        assert {m.refresh, m.accumulate_when} - {None} <= flags, m
    return plan


PASSES = (("divide_by_reciprocal", divide_by_reciprocal), ("hoist_host", hoist_host),
          ("keep_on_nonfinite", keep_on_nonfinite), ("verify", verify))
