"""The code-generation refusals (``curvc.rules.REFUSALS``) cover every spec check lets through.

Lowering once also refused a non-matrix curvature and a modified curvature
(``squared``, ``scale``, ``every``) on the dense path, and a modified
curvature on the Kronecker path. Check refuses the dense ones first, so those
rules could never fire and were removed; these tests keep it that way: a
change to the forms or to check that lets one through fails here, where a
refusal (or its lowering) must come back.
"""
from __future__ import annotations

import pytest

import curvc
from curvc import rules
from curvc.errors import CurvError
from curvc.language import FORMS

_MODIFIED = {c for c, form in FORMS["curvature"].items()
             if {"squared", "every"} & set(form.modifiers)
             or any(a.name == "scale" for a in form.args)}


def _checks(curvature: str, structure: str, iterate: str) -> bool:
    src = (f"optimizer X\nhyper lr = 1\ncurvature {curvature}\nstructure {structure}\n"
           f"iterate {iterate}\nlength none\n")
    try:
        curvc.to_ir(src, "x.curv", compilable=False)  # what lowering is handed
    except CurvError as e:
        assert e.key == "combo.clash", e
        return False
    return True


def test_some_curvatures_take_modifiers():
    assert {"hutchinson", "gauss_newton_bartlett"} <= _MODIFIED


@pytest.mark.parametrize("iterate", ["instant", "sum", "ema(0.9)"])
@pytest.mark.parametrize("curvature", sorted(FORMS["curvature"]))
def test_the_dense_path_sees_only_its_curvatures_unmodified(curvature, iterate):
    if _checks(curvature, "dense", iterate):
        assert curvature in rules.DENSE_CURVATURES
        assert curvature not in _MODIFIED


@pytest.mark.parametrize("modifier", ["squared", "every 3"])
def test_the_kronecker_path_refuses_a_squared_or_held_estimate(modifier):
    """Its factors take sampled gradients as rows (a scale multiplies them, tested in
    tests/test_kronecker_axes.py): a squared or held elementwise estimate is refused."""
    src = ("optimizer X\nhyper lr = 1\n"
           f"curvature gauss_newton_bartlett {modifier}\nstructure kronecker\n"
           "iterate ema(0.9)\nlength gradient_norm\n")
    opt = curvc.to_ir(src, "x.curv", compilable=False)
    assert rules.first_refusal(opt).name == "kronecker_estimate_modifiers"
