"""Building expressions with the exact folds: what lowering and the passes write with.

``add``, ``sub``, ``mul``, ``div`` and ``op`` build plan expressions and fold only what
is exact in every backend (see each helper), so plans and generated code stay readable
without changing a bit of the arithmetic.
"""
from __future__ import annotations

import math
import struct

from curvc.plan import Const, Expr, Op

def _c(v) -> Expr:
    return v if not isinstance(v, (int, float)) else Const(float(v))


def _exact_in_float32(v: float) -> bool:
    """Whether every backend reads ``v`` as the same number: Triton takes a float
    literal as float32, so a folded constant must be exact there (or it stays a
    host expression, computed in double and passed as an argument)."""
    return math.isfinite(v) and struct.unpack("f", struct.pack("f", v))[0] == v


def _fold(name, a, b=None):
    """Arithmetic on constants, done now when the host would compute the same double
    and it is exact in float32 (see ``_exact_in_float32``); None when it is not."""
    if not (isinstance(a, Const) and (b is None or isinstance(b, Const))):
        return None
    x, y = a.value, None if b is None else b.value
    if name == "div" and y == 0:  # the host would raise; leave it to the runtime
        return None
    v = {"add": lambda: x + y, "sub": lambda: x - y, "mul": lambda: x * y,
         "div": lambda: x / y, "neg": lambda: -x}[name]()
    return Const(v) if _exact_in_float32(v) else None


def _is_zero(e: Expr, negative: bool) -> bool:
    """``e`` is the constant 0.0 (``negative``: -0.0); 0.0 == -0.0 in Python, so the
    sign is read apart."""
    return isinstance(e, Const) and e.value == 0 and (math.copysign(1.0, e.value) < 0) == negative


def add(a, b):
    a, b = _c(a), _c(b)
    if (f := _fold("add", a, b)) is not None:
        return f
    # x + (-0.0) is x for every x; x + 0.0 is not (-0.0 + 0.0 is 0.0), so it stays
    if _is_zero(b, negative=True):
        return a
    if _is_zero(a, negative=True):
        return b
    return Op("add", (a, b))


def sub(a, b):
    a, b = _c(a), _c(b)
    if (f := _fold("sub", a, b)) is not None:
        return f
    if _is_zero(b, negative=False):  # x - 0.0 is x, -0.0 included
        return a
    return Op("sub", (a, b))


def mul(a, b):
    a, b = _c(a), _c(b)
    if (f := _fold("mul", a, b)) is not None:
        return f
    if a == Const(1.0):  # x * 1.0 is x, exactly
        return b
    if b == Const(1.0):
        return a
    return Op("mul", (a, b))


def div(a, b):
    a, b = _c(a), _c(b)
    if (f := _fold("div", a, b)) is not None:
        return f
    return a if b == Const(1.0) else Op("div", (a, b))


def op(name, *args):
    args = tuple(_c(a) for a in args)
    if name == "neg" and (f := _fold("neg", *args)) is not None:
        return f
    return Op(name, args)
