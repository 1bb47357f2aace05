"""Constant folding in lowering: only what is exact, so numerics do not move."""
from __future__ import annotations

import math
import re
from pathlib import Path

from curvc.fold import add, div, mul, op, sub
from curvc.plan import Const, Load, Op

X = Load("grad")
GOLDEN = Path(__file__).resolve().parent / "golden"


def test_operations_on_two_constants_are_done_at_compile_time():
    assert sub(1.0, 0.5) == Const(0.5)
    assert div(2.0, 2.0) == Const(1.0)
    assert div(1.0, 2.0) == Const(0.5)
    assert mul(0.5, 4.0) == Const(2.0)
    assert op("neg", 1.0) == Const(-1.0)


def test_identities_that_hold_for_every_float_are_removed():
    assert mul(X, 1.0) == X and mul(1.0, X) == X
    assert div(X, 1.0) == X
    assert sub(X, 0.0) == X  # -0.0 - 0.0 == -0.0
    assert add(X, -0.0) == X


def test_x_plus_zero_stays_because_minus_zero_plus_zero_is_plus_zero():
    assert math.copysign(1.0, -0.0 + 0.0) == 1.0  # IEEE 754 round-to-nearest
    assert add(X, 0.0) == Op("add", (X, Const(0.0)))


def test_a_constant_no_backend_reads_alike_stays_a_host_expression():
    # 1/3 and 1 - 0.9 are not float32 numbers: Triton would round a literal to float32,
    # while a host scalar reaches a float64 kernel in full
    assert div(1.0, 3.0) == Op("div", (Const(1.0), Const(3.0)))
    assert sub(1.0, 0.9) == Op("sub", (Const(1.0), Const(0.9)))
    assert div(1.0, 0.0) == Op("div", (Const(1.0), Const(0.0)))  # Python would raise


def test_no_generated_module_computes_with_two_literals():
    two_literals = re.compile(r"\(-?\d+\.\d+(e-?\d+)? [-+*/] -?\d+\.\d+(e-?\d+)?\)|= \(-\d+\.\d+\)")
    hits = [(p.name, line.strip()) for p in sorted(GOLDEN.glob("*.py"))
            for line in p.read_text().splitlines() if two_literals.search(line)]
    assert not hits, hits
