"""`curvc explain` is executable: its equations, run as written, step as the compiled code.

For the elementwise structures (scalar and diagonal), the factored one (Adafactor's
row and column means) and the dense one (the whole n x n curvature), the lines explain prints (every generated module's header carries the same)
are translated here mechanically into Python over torch tensors and run beside the
compiled optimizer for a few steps, from the same gradients and curvature estimates:
each step must agree with the code's to 1e-9 of its size. The specs: every accepted
point of the language's cross product with those structures, every shipped spec with
them, the test hybrids, and flag variants of each.

How the text is read (the conventions a reader of explain needs too):

* every name is one value per coordinate of all parameters (here: one flat vector);
  a state starts at 0 unless a note gives its ``X_0``, and keeps its value between steps;
* ``grad f(theta)`` is the gradient the caller left in ``.grad``, ``E`` the curvature
  source's estimate (the phrase explain prints for it: a Fisher expectation,
  Hutchinson's z * (H z), the Hessian), ``t`` the step;
* ``^`` is a power, ``|x|`` the absolute value, ``||x||``, ``sum`` and ``RMS`` reductions
  whose scope a note on the same line must state (nothing else defines it);
* each note in parentheses is either executed (``_note``: a condition, a refresh period,
  a first value, the pseudo-inverse, ...) or known to be descriptive; any other note fails
  the test, so explain cannot say something here that nothing checks;
* the dense structure's H is an n x n matrix, its products written by juxtaposition
  (``Q diag(f) Q^T g``); of a chained ``d = H^-1 g = Q diag(f) Q^T g`` (the paper's form,
  then the exact one) the last member is computed;
* a line in the expression language (a spec's own ``let``, ``state``, ``momentum = ...``)
  reads as the language defines it (``curvc.language.EXPRESSION_NAMES`` and
  ``FUNCTIONS``): ``grad`` is g as it stands, ``param`` theta before the step,
  ``direction`` d, ``old(x)`` a state before the step, ``norm`` and ``rms`` per tensor,
  ``if(c, a, b)`` computes only the branch taken.
"""
from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch

import curvc
from curvc import coverage, explain, resources, routing

from _explained import assert_same_step, case  # tests/_explained.py
from test_foreach_backend import VARIANTS as FOREACH_VARIANTS

SHAPES = [(3, 4), (5,), (2, 1, 3)]
STEPS = 6
STRUCTURES = ("scalar", "diagonal", "dense", "factored", "kronecker")  # explain executed
# Kronecker factors of the gradient only: K-FAC's (of layer inputs and output gradients)
# and the sampled rows' (Fisher, Gauss-Newton-Bartlett) need a model, and Newton-Schulz
# runs in bfloat16; their lines are checked for their numbers (test_explain_matches_plan)
KRONECKER_SOURCES = ("empirical_fisher",)
# shipped Kronecker specs whose lines are not run here, and why (numbers checked only)
NOT_EXECUTED = {
    "kfac": "K-FAC's factors are of layer inputs and output gradients (a model)",
    "muon": "Newton-Schulz: tests/test_explain_executes_polar.py runs it in float64",
    # executed in tests/test_explain_executes_eigen.py (its shapes keep the bases unique)
    "soap": "Adam in the eigenbasis", "eigen_adagrad": "Adagrad in the eigenbasis",
    "ekfac_like": "a damped step in the eigenbasis",
}
SIGNED = ("hessian", "hutchinson")  # sources whose estimate takes either sign
SPECS = Path(__file__).parent / "specs"

# --- the specs ------------------------------------------------------------------

def _cross_product() -> list[tuple[str, str, dict]]:
    out = []
    for spec in coverage.cross_product():
        if spec.forms["structure"] not in STRUCTURES:
            continue
        if spec.forms["structure"] == "kronecker" and (
                spec.forms["curvature"] not in KRONECKER_SOURCES
                or "newton_schulz" in spec.source):
            continue
        if coverage.classify(spec).key == coverage.ACCEPTED:
            out.append((spec.label, spec.source, {}))
    return out


# every shipped elementwise spec and the test hybrids, with flag variants
VARIANTS = {
    "sgd": [dict(), dict(momentum=0.9, dampening=0.1, weight_decay=0.1),
            dict(momentum=0.9, nesterov=True, maximize=True)],
    "sign_gd": [dict(momentum=0.8, weight_decay=0.1, maximize=True)],
    "normalized_gd": [dict(), dict(maximize=True)],
    "adam": [dict(), dict(amsgrad=True, weight_decay=0.1, maximize=True, eps=0.3),
             dict(decoupled_weight_decay=True, weight_decay=0.1, amsgrad=True)],
    "adamw": [dict(amsgrad=True, weight_decay=0.1)],
    "adagrad": [dict(), dict(lr_decay=0.1, weight_decay=0.1, initial_accumulator_value=0.2,
                             maximize=True, eps=0.3)],
    "adahessian": [dict(), dict(update_each=2, hessian_power=0.5, weight_decay=0.1, eps=0.3)],
    "sophia": [dict(k=2), dict(k=3, weight_decay=0.0, maximize=True)],
    "sophia_h": [dict(update_period=2), dict(update_period=3, weight_decay=0.1, eps=0.3)],
    "fisher_adam": [dict()],
    "sign_adagrad": [dict()],
    "diagonal_ngd": [dict()],
    "diagonal_normalized_ngd": [dict()],
    "diagonal_clipped_ngd": [dict()],
    "diagonal_gn_normalized_ngd": [dict()],
    "diagonal_gn_clipped_ngd": [dict()],
    "diagonal_eigenbasis_normalized_ngd": [dict()],
    "diagonal_eigenbasis_clipped_ngd": [dict()],
    # the expression specs (flags both ways, old(), a product state, optional hypers)
    "rmsprop": [dict(), dict(centered=True, momentum=0.9, weight_decay=0.1, maximize=True)],
    "adadelta": [dict(), dict(weight_decay=0.1, maximize=True)],
    "adamax": [dict(), dict(weight_decay=0.1, maximize=True)],
    # betas far from 1: under the sign, old(exp_avg) and exp_avg then differ somewhere
    "lion": [dict(), dict(weight_decay=0.1, maximize=True, betas=(0.5, 0.2))],
    "lamb": [dict(), dict(weight_decay=0.1, grad_averaging=False, maximize=True)],
    "lars": [dict(), dict(nesterov=True, weight_decay=0.1, dampening=0.1),
             dict(momentum=0.0, weight_decay=0.1)],
    "radam": [dict(), dict(weight_decay=0.1, decoupled_weight_decay=True, maximize=True)],
    # flags both ways, a product state, optional hyperparameters: the foreach test's
    **{name: FOREACH_VARIANTS[name] for name in ("nadam", "adabelief", "adan", "ademamix")},
    # Kronecker: roots every step and every 2, decay, momentum, maximize, a factor's start
    # (0: a singular factor's rounding-level eigenvalues count as 0)
    "shampoo": [dict(), dict(update_freq=2, momentum=0.9, weight_decay=0.1, maximize=True,
                             matrix_eps=0.3), dict(matrix_eps=0.0)],
    # merged dims (all three tensors become vectors), blocks of 2 (and of 3 unmerged: (3,
    # 4) in two blocks, (5,) in two), the roots' schedule from a later start (the graft
    # alone before it), an overridden root, bias correction off, L2 decay, the step's
    # momentum with and without Nesterov, the EMA of the factors. Not epsilon's default
    # 1e-12: the merged vectors' factors of rank t < n then have kappa 1e13, and the two
    # sides' rounding alone differs by 1e-9 of the step.
    "distributed_shampoo": [
        dict(epsilon=1e-6), dict(max_preconditioner_dim=2, momentum=0.5, use_nesterov=True),
        dict(max_preconditioner_dim=3, use_merge_dims=False, start_preconditioning_step=3,
             precondition_frequency=2, weight_decay=0.1, momentum=0.5),
        dict(inv_root_override=2, use_bias_correction=False, betas=(0.8, 0.9),
             use_decoupled_weight_decay=False, weight_decay=0.1, epsilon=1e-3),
        dict(betas=(0.9, 0.95), max_preconditioner_dim=4, start_preconditioning_step=2,
             grafting_beta2=0.9, grafting_epsilon=1e-3)],
    # the dense rows, and the dense matrix under every other axis (tests/specs)
    "newton": [dict()], "ngd": [dict()], "normalized_ngd": [dict()],
    "clipped_ngd": [dict(), dict(threshold=0.3)], "eigenbasis_normalized_ngd": [dict()],
    "eigenbasis_clipped_ngd": [dict(threshold=0.3)], "gn_normalized_ngd": [dict()],
    "gn_clipped_ngd": [dict(threshold=0.3)], "damped_newton": [dict(), dict(lam=1.0)],
    "dense_all_axes": [dict(), dict(maximize=True, wd=0.0, c=0.0)],
    "dense_sum_normalized": [dict(), dict(init=0.0)],
    "ema_or_sum_corrected": [dict(), dict(beta=1.0)],
    "dense_ema_or_sum_corrected": [dict(), dict(beta=1.0)],
    "clip_named_d": [dict(), dict(d=2.0)],
    # lr above 1/sqrt(t) and an eps that is not negligible: the relative step's min and
    # the floor both bite
    "adafactor": [dict(), dict(weight_decay=0.1, maximize=True, d=0.5),
                  dict(lr=1.0, eps=(0.3, 1e-3))],
    "every_keep_max_pow": [dict(), dict(power=0.5, k=3, amsgrad=True, maximize=True)],
    "sign_fisher_clip": [dict(), dict(max_norm=0.0)],
    "sum_normalized_hb": [dict(), dict(momentum=0.0, lr_decay=0.1, weight_decay=0.1)],
}


def _named() -> list[tuple[str, str, dict]]:
    shipped = resources.shipped_specs()
    out = []
    for name, variants in VARIANTS.items():
        path = SPECS / f"{name}.curv" if (SPECS / f"{name}.curv").exists() else shipped[name]
        for i, hypers in enumerate(variants):
            out.append((f"{name}-{i}", path.read_text(), hypers))
    return out


def _kronecker_damped() -> list[tuple[str, str, dict]]:
    """The Kronecker step under each damping form and a bias-corrected EMA (axes the
    cross product leaves at their defaults): every iterate, length and damping."""
    out = []
    for it, ln, dmp in itertools.product(("ema(0.9) bias_corrected", "sum", "ema(0.9)"),
                                         ("gradient_norm", "none", "eigen_sign"),
                                         ("add(eps)", "inside(eps)", "floor(eps)")):
        source = ("optimizer KroneckerDamped\nhyper lr = 1e-2, eps = 0.3\n"
                  "curvature empirical_fisher\nstructure kronecker\n"
                  f"iterate {it}\nlength {ln}\ndamping {dmp}\n")
        label = f"kronecker-{it.split('(')[0]}{'-bc' if 'bias' in it else ''}-{ln}-{dmp}"
        out.append((label, source, {}))
    return out


def _grafted() -> list[tuple[str, str, dict]]:
    """Each graft on the Kronecker step, per tensor and (block = true) per block of 2,
    from a later start: the grafted pipelines' lines and their norms' scopes."""
    out = []
    for graft, block in itertools.product(("sgd(start = 2)", "adagrad(0.1, start = 3)",
                                           "rmsprop(0.9, 0.1)", "adam(0.9, 0.1, start = 2)"),
                                          (False, True)):
        source = ("optimizer Grafted\nhyper lr = 1e-2, eps = 0.1\n"
                  "curvature empirical_fisher\n"
                  f"structure kronecker{'(max_dim = 2, block = true)' if block else ''}\n"
                  f"iterate sum\nlength gradient_norm\ndamping inside(eps)\n"
                  f"momentum ema(0.5)\ngraft {graft}\n")
        out.append((f"graft-{graft.split('(')[0]}{'-blocks' if block else ''}", source, {}))
    return out


CASES = _named() + _cross_product() + _kronecker_damped() + _grafted()


def test_every_shipped_spec_of_the_executed_structures_is_here():
    for name, path in resources.shipped_specs().items():
        opt = curvc.to_ir(path.read_text())
        if not routing.is_routed(opt) and opt.structure.kind in STRUCTURES:
            assert name in VARIANTS or name in NOT_EXECUTED, name


@pytest.mark.parametrize("label,source,hypers", CASES, ids=[c[0] for c in CASES])
def test_explain_computes_what_the_code_computes(label, source, hypers):
    opt_ir, opt, params, gen, lines, run = case(label, source, hypers, SHAPES)
    sizes = [p.numel() for p in params]
    theta = torch.cat([p.detach().reshape(-1) for p in params]).clone()
    signed = opt_ir.curvature.kind in SIGNED
    dense = opt_ir.structure.kind == "dense"
    for t in range(1, STEPS + 1):
        grad = torch.randn(theta.shape, generator=gen, dtype=torch.float64)
        grad[::5] = 0.0  # coordinates the step has not seen: the pseudo-inverse's case
        if dense:  # n x n, symmetric, of rank 12 (zero eigenvalues), indefinite if signed
            rows = torch.randn(theta.numel(), 12, generator=gen, dtype=torch.float64)
            signs = torch.randn(12, generator=gen, dtype=torch.float64).sign() if signed \
                else torch.ones(12, dtype=torch.float64)
            estimate = rows @ torch.diag(signs) @ rows.T
            estimate = (estimate + estimate.T) / 2
        else:
            estimate = torch.randn(theta.shape, generator=gen, dtype=torch.float64)
            estimate = estimate if signed else estimate.abs()
            estimate[1::6] = 0.0
        for p, g in zip(params, torch.split(grad, sizes)):
            p.grad = g.reshape(p.shape).clone()
        wants = opt.wants_curvature()
        if run.reads_estimate:  # the steps that take an estimate are the ones explain says
            assert wants == run.refreshes(t), f"step {t}: refresh {wants} in the code"
        if wants:
            opt.step(curvature=estimate if dense else [
                e.reshape(p.shape) for p, e in zip(params, torch.split(estimate, sizes))])
        else:
            opt.step()
        # each step from the code's parameters, the states each side's own: the step
        # itself is compared (to its own size), and a state explain gets wrong shows in
        # a later step
        want = run.step(t, theta, grad, estimate if wants else None) - theta
        theta = assert_same_step(t, theta, want, params, lines)


def test_a_hyperparameter_named_like_an_equation_symbol_is_printed_as_one():
    """Adafactor's clip threshold is called d, as the step is: d = d / max(1, RMS(d) / d)
    would read as the step divided by itself."""
    opt = curvc.to_ir(resources.shipped_specs()["adafactor"].read_text())
    assert "d     = d / max(1, RMS(d) / (hyperparameter d))   (RMS over each tensor)" in \
        explain.equations(opt)
