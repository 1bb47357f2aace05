"""`curvc explain` is executable for the eigenbasis too (``structure kronecker(basis =
eigen)``: SOAP, the EKFAC-like hybrid, Adagrad in the eigenbasis): the lines, run as
written (tests/_explained_eigen.py's reading), step as the compiled code, from the same
random gradients (tests/test_explain_executes.py's conventions).

The specs: the three shipped ones with flag variants (merged dims, a channels-last
4-D tensor, vectors with a basis, every refresh period) and a product of the axes the
eigenbasis takes: its iterates (ema, bias-corrected ema, sum, instant), lengths
(gradient_norm, none, eigen_sign), refreshes (eigh, power_qr), with the damping forms,
refresh periods, momentum and vectors varied along.
"""
from __future__ import annotations

import itertools

import pytest

from curvc import resources

from _explained import case, compare_steps  # tests/_explained.py

# Every factor's eigenvalues are distinct from its first step on, or a zero one is simple
# (its eigenvector unique up to a sign): with a repeated one the basis inside its
# eigenspace is LAPACK's choice and V, kept in the basis, depends on it (a vector longer
# than 2 with a factor, a factor wider than the rest of its tensor, in any SOAP).
SHAPES = [(3, 4), (2,), (2, 1, 3), (2, 2, 3, 2)]
STEPS = 7

VARIANTS = {
    "soap": [dict(), dict(precondition_frequency=2, weight_decay=0.1, maximize=True),
             dict(precondition_1d=True, normalize_gradient=True, correct_bias=False),
             # (2, 1, 3) and (2, 2, 3, 2) merge into one mode each, vectors without a basis
             dict(merge_dims=True, max_precondition_dim=12, precondition_frequency=2),
             # N H W C (2, 2, 3, 2) as N C H W (2, 2, 2, 3), merged into (4, 2, 3)
             dict(merge_dims=True, max_precondition_dim=4, data_format="channels_last",
                  precondition_1d=True),
             dict(max_precondition_dim=3, precondition_frequency=3)],
    "eigen_adagrad": [dict(), dict(refresh_every=2, weight_decay=0.1)],
    "ekfac_like": [dict(), dict(refresh_every=2, weight_decay=0.1, momentum=0.0)],
}

ITERATES = ("ema(0.9)", "ema(0.8) bias_corrected", "sum", "instant")
LENGTHS = ("gradient_norm", "none", "eigen_sign")
REFRESHES = ("eigh", "power_qr")
DAMPINGS = ("add(eps)", "inside(eps)", "floor(eps)", None)


def _product() -> list[tuple[str, str, dict]]:
    out = []
    for i, (it, ln, refresh) in enumerate(itertools.product(ITERATES, LENGTHS, REFRESHES)):
        damping = DAMPINGS[i % len(DAMPINGS)]
        every = " every k" if i % 3 else ""
        vectors = "false" if i % 2 else "true"
        lines = ["optimizer Eigen", "hyper lr = 1e-2, eps = 1e-3, k = 2",
                 "curvature empirical_fisher",
                 f"structure kronecker(basis = eigen, refresh = {refresh}, "
                 f"vectors = {vectors}, factor_beta = 0.8){every}",
                 f"iterate {it}", f"length {ln}"]
        lines += [f"damping {damping}"] if damping else []
        lines += ["momentum ema(0.5)"] if i % 4 == 1 else []
        label = f"{it.split('(')[0]}{'-bc' if 'bias' in it else ''}-{ln}-{refresh}"
        out.append((label, "\n".join(lines) + "\n", {}))
    return out


def _named() -> list[tuple[str, str, dict]]:
    shipped = resources.shipped_specs()
    return [(f"{name}-{i}", shipped[name].read_text(), hypers)
            for name, variants in VARIANTS.items() for i, hypers in enumerate(variants)]


CASES = _named() + _product()


def test_the_cases_cover_the_shipped_eigenbasis_specs_and_the_axes():
    shipped = {name for name, path in resources.shipped_specs().items()
               if "basis = eigen" in path.read_text()}
    assert shipped == set(VARIANTS)
    assert len(_product()) == len(ITERATES) * len(LENGTHS) * len(REFRESHES)


@pytest.mark.parametrize("label,source,hypers", CASES, ids=[c[0] for c in CASES])
def test_explain_computes_what_the_code_computes_in_the_eigenbasis(label, source, hypers):
    _, opt, params, gen, lines, run = case(label, source, hypers, SHAPES)
    steps = compare_steps(opt, params, gen, lines, run, STEPS)
    assert len(steps) == STEPS and max(err for err, _ in steps) <= 1e-9
    assert any(size > 0 for _, size in steps)  # the code moved the parameters: not 0 = 0
