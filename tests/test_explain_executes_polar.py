"""`curvc explain` is executable for the Newton-Schulz root too (Muon's polar factor):
the lines, run as written (tests/_explained_polar.py's reading), step as the compiled
code from the same random gradients (tests/test_explain_executes.py's conventions).

The iteration runs in float64 here (``precision = float64`` in each spec): in bfloat16,
as Muon's default, a matmul's rounding is its kernel's and no text's, so those lines
are checked for their numbers (tests/test_explain_matches_plan.py). The specs: the
shipped Muon with its flags and shape adjustments, and the cross product's accepted
Newton-Schulz points. The shapes: a wide matrix, a tall one (transposed for the
iteration) and a vector (one row).
"""
from __future__ import annotations

import pytest

from curvc import coverage, resources

from _explained import case, compare_steps  # tests/_explained.py

SHAPES = [(3, 4), (5,), (4, 2)]
STEPS = 5
FLOAT64 = ("root = newton_schulz", "root = newton_schulz, precision = float64")


def _cases() -> list[tuple[str, str, dict]]:
    muon = resources.shipped_specs()["muon"].read_text()
    muon = muon.replace("root = newton_schulz", FLOAT64[1])
    out = [(f"muon-{i}", muon, hypers) for i, hypers in enumerate([
        dict(), dict(nesterov=False, adjust_lr_fn="match_rms_adamw", maximize=True),
        dict(ns_steps=3, weight_decay=0.0, adjust_lr_fn="none", eps=0.5)])]
    for spec in coverage.cross_product():
        if "newton_schulz" in spec.source and coverage.classify(spec).key == coverage.ACCEPTED:
            out.append((spec.label, spec.source.replace(*FLOAT64), {}))
    return out


CASES = _cases()


def test_the_cases_are_muon_and_the_cross_products_points():
    assert sum(label.startswith("muon-") for label, _, _ in CASES) == 3
    assert len(CASES) == 3 + 3


@pytest.mark.parametrize("label,source,hypers", CASES, ids=[c[0] for c in CASES])
def test_explain_computes_what_the_code_computes_for_newton_schulz(label, source, hypers):
    _, opt, params, gen, lines, run = case(label, source, hypers, SHAPES)
    steps = compare_steps(opt, params, gen, lines, run, STEPS)
    assert len(steps) == STEPS and max(err for err, _ in steps) <= 1e-9
    assert any(size > 0 for _, size in steps)  # the code moved the parameters: not 0 = 0
