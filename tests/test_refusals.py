"""The code-generation refusals (``curvc.rules.REFUSALS``) cover every spec check lets through.

Lowering once also refused a non-matrix curvature and a modified curvature
(``squared``, ``scale``, ``every``) on the dense path, and a modified
curvature on the Kronecker path. Check refuses all of those first, so the
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


@pytest.mark.parametrize("iterate", ["instant", "sum", "ema(0.9)"])
@pytest.mark.parametrize("curvature", sorted(FORMS["curvature"]))
def test_the_kronecker_path_sees_no_modified_curvature(curvature, iterate):
    if _checks(curvature, "kronecker", iterate):
        assert curvature not in _MODIFIED

