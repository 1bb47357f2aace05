"""SOAP (``structure kronecker(basis = eigen)``) against pytorch_optimizer.SOAP, and the
eigenbasis rotation's hybrids against their equations written out here.

The reference's QR refresh runs in float32 whatever the dtype (its comment says why); the
spec's stage does the same, so the float64 runs agree to rounding, not to float32's.
"""
from __future__ import annotations

import pytest
import torch

import curvc

STEPS = 50
TOL = 1e-6


def _soap():
    return pytest.importorskip("pytorch_optimizer").SOAP


def _params(shapes, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(*s, generator=gen, dtype=torch.float64))
            for s in shapes]


def _grads(shapes, steps, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(*s, generator=gen, dtype=torch.float64) for s in shapes]
            for _ in range(steps)]


def _make(cls, params, kw, g2):
    half = len(params) // 2
    return cls([{"params": params[:half]}, {"params": params[half:], **g2}], **kw)


def _step(opt, params, grads):
    for p, g in zip(params, grads):
        p.grad = g.clone()
    opt.step()


def _relative(a, b):
    return ((a - b).norm() / b.norm().clamp(min=1e-300)).item()


# (shapes, constructor kwargs, group 2 overrides): non-default hyperparameters, the basis
# refreshed every 3 steps (so reused in between), group 2 changing lr and one more
SHAPES = [(5, 4), (3,), (4, 3, 2), (6, 3), (7,), (2, 5)]
CASES = {
    "default-options": (SHAPES, dict(lr=1e-2, betas=(0.9, 0.97), shampoo_beta=0.9,
                                     weight_decay=0.05, precondition_frequency=3, eps=1e-6),
                        dict(lr=3e-3, eps=1e-4)),
    "precondition_1d-normalize": (SHAPES, dict(lr=1e-2, betas=(0.85, 0.9), shampoo_beta=0.8,
                                               weight_decay=0.02, precondition_frequency=4,
                                               precondition_1d=True, normalize_gradient=True),
                                  dict(lr=5e-3, correct_bias=False)),
    # a mode above max_precondition_dim keeps no factor (identity basis along it)
    "max_dim": (SHAPES, dict(lr=1e-2, betas=(0.9, 0.95), shampoo_beta=0.9,
                             precondition_frequency=2, max_precondition_dim=5),
                dict(lr=2e-3, weight_decay=0.0)),
    # merge_dims: (4, 3, 2) -> (4, 6) and (2, 3, 5) -> (6, 5); the reference cannot merge a
    # tensor into one mode (its reshape fails), so every tensor here keeps two
    "merge_dims": ([(4, 3, 2), (5, 4), (2, 3, 5), (6, 3)],
                   dict(lr=1e-2, betas=(0.9, 0.95), shampoo_beta=0.85, precondition_frequency=3,
                        max_precondition_dim=6, merge_dims=True),
                   dict(lr=4e-3, shampoo_beta=0.7)),
}


@pytest.mark.parametrize("case", CASES)
def test_soap_matches_pytorch_optimizer_in_float64(case):
    shapes, kw, g2 = CASES[case]
    ours_p, ref_p = _params(shapes), _params(shapes)
    ours = _make(curvc.load("soap", backend="torch"), ours_p, kw, g2)
    ref = _make(_soap(), ref_p, kw, g2)
    worst = 0.0
    for t, grads in enumerate(_grads(shapes, STEPS)):
        _step(ours, ours_p, grads)
        _step(ref, ref_p, grads)
        for a, b in zip(ours_p, ref_p):
            err = _relative(a.detach(), b.detach())
            worst = max(worst, err)
            assert err <= TOL, (t + 1, tuple(a.shape), err)
    # the parameters moved: a step of 0 everywhere would agree too
    assert all(_relative(p.detach(), q) > 1e-3 for p, q in zip(ours_p, _params(shapes)))


def test_soap_state_dict_round_trip_is_bitwise():
    shapes, kw, g2 = CASES["default-options"]
    cls = curvc.load("soap", backend="torch")
    grads = _grads(shapes, 20, seed=2)
    straight = _params(shapes)
    opt = _make(cls, straight, kw, g2)
    for g in grads:
        _step(opt, straight, g)
    first = _params(shapes)
    opt = _make(cls, first, kw, g2)
    for g in grads[:10]:
        _step(opt, first, g)
    saved = opt.state_dict()
    resumed = [torch.nn.Parameter(p.detach().clone()) for p in first]
    fresh = _make(cls, resumed, kw, g2)
    fresh.load_state_dict(saved)
    for g in grads[10:]:
        _step(fresh, resumed, g)
    for a, b in zip(resumed, straight):
        assert torch.equal(a, b)


def test_soap_takes_the_reference_constructor_arguments_and_defaults():
    import inspect
    ours = inspect.signature(curvc.load("soap", backend="torch")).parameters
    ref = inspect.signature(_soap()).parameters
    for name, p in ref.items():
        if name in ("self", "kwargs", "data_format", "shampoo_beta"):
            continue
        assert name in ours, name
        assert ours[name].default == p.default, name
