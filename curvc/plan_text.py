"""A plan as text (``curvc compile --stage lower``, the golden plan dumps).

The plan's expressions form a DAG: a value read by two stores (a momentum buffer
and the parameter, say) is one node. Printed as nested dataclasses it would be
written out once per reader, so a plan with a few shared values grows into
thousands of lines and a one-node change shows as a wall of diff. Here every
operator node read more than once is printed once, as a numbered line
``%k = ...`` before the plan, and ``%k`` wherever it is read, as an SSA listing
does; leaves (constants, loads, scalars, sums) are short and stay inline.
"""
from __future__ import annotations

import dataclasses
import pprint
from collections import Counter

from curvc.plan import Op, Select

WIDTH = 100


class _Ref:
    """A shared node, printed by its number."""

    def __init__(self, index: int):
        self.index = index

    def __repr__(self) -> str:
        return f"%{self.index}"


def _children(node) -> tuple:
    if isinstance(node, Op):
        return node.args
    if isinstance(node, Select):
        return (node.then, node.other)
    return ()


def _roots(value):
    """The expression nodes a plan value holds directly (through tuples and dataclasses)."""
    if isinstance(value, (Op, Select)):
        yield value
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from _roots(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _roots(v)
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        for f in dataclasses.fields(value):
            yield from _roots(getattr(value, f.name))


def _shared(plan) -> list:
    """Operator nodes read more than once, children before parents."""
    reads: Counter = Counter()
    order: list = []
    seen: set = set()

    def visit(node):  # iterative: deep sums would exceed the recursion limit
        stack = [(node, False)]
        while stack:
            n, done = stack.pop()
            if done:
                order.append(n)
                continue
            if n in seen:
                continue
            seen.add(n)
            stack.append((n, True))
            for c in reversed(_children(n)):
                reads[c] += 1
                if isinstance(c, (Op, Select)):
                    stack.append((c, False))

    for root in _roots(plan):
        reads[root] += 1
        visit(root)
    return [n for n in order if reads[n] > 1]


def _substitute(value, names: dict, memo: dict):
    """``value`` with every shared node replaced by its reference."""
    if isinstance(value, (Op, Select)):
        if value in names:
            return names[value]
        if value not in memo:
            if isinstance(value, Op):
                args = tuple(_substitute(a, names, memo) for a in value.args)
                memo[value] = dataclasses.replace(value, args=args)
            else:
                memo[value] = dataclasses.replace(
                    value, then=_substitute(value.then, names, memo),
                    other=_substitute(value.other, names, memo))
        return memo[value]
    if isinstance(value, tuple):
        return tuple(_substitute(v, names, memo) for v in value)
    if isinstance(value, list):
        return [_substitute(v, names, memo) for v in value]
    if isinstance(value, dict):
        return {k: _substitute(v, names, memo) for k, v in value.items()}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        changes = {f.name: _substitute(getattr(value, f.name), names, memo)
                   for f in dataclasses.fields(value) if f.init}
        return dataclasses.replace(value, **changes)
    return value


def format_plan(plan) -> str:
    """The plan, its shared values first (``%k = ...``), then the plan reading them."""
    shared = _shared(plan)
    names: dict = {}
    memo: dict = {}
    lines = []
    for k, node in enumerate(shared):
        body = _substitute(node, {n: r for n, r in names.items()}, memo)
        text = pprint.pformat(body, width=WIDTH - len(f"%{k} = "))
        pad = " " * len(f"%{k} = ")
        lines.append(f"%{k} = " + text.replace("\n", "\n" + pad))
        names[node] = _Ref(k)
    lines.append(pprint.pformat(_substitute(plan, names, memo), width=WIDTH))
    return "\n".join(lines)
