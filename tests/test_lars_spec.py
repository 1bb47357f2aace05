"""LARS as a spec (specs/lars.curv), against pytorch_optimizer.LARS.

Step for step in float64 for 50 steps, with non-default hyperparameters and two
param groups (a matrix, which takes the trust ratio, and a vector, which takes the
plain gradient), to 1e-6 relative; the state_dict round trip bitwise; and the
Triton interpreter's rendering equal to torch's on awkward shapes (0-d, vectors,
an (n, 1) matrix, order 4), where `ndim > 1` picks the trust ratio per tensor.
"""
from __future__ import annotations

import pytest
import torch

import curvc
from tests.test_triton_backend import assert_same_state, interpreter, trajectory

STEPS = 50
TOL = 1e-6

# case -> (constructor kwargs, group 2 overrides); group 1 holds the matrix
CASES = {
    "momentum": (dict(lr=0.05, weight_decay=0.01, momentum=0.8, dampening=0.1,
                      trust_coefficient=0.02), dict(lr=0.1, dampening=0.3)),
    "nesterov": (dict(lr=0.05, weight_decay=0.02, momentum=0.7, trust_coefficient=0.05,
                      nesterov=True), dict(lr=0.1, weight_decay=0.1)),
    # momentum 0: no buffer read, and dampening does not scale the step; the reference
    # reads maximize from its constructor only
    "no-momentum": (dict(lr=0.05, weight_decay=0.01, momentum=0.0, dampening=0.5,
                         trust_coefficient=0.02, maximize=True), dict(lr=0.1)),
}


def _reference():
    return pytest.importorskip("pytorch_optimizer").LARS


def _params() -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter(torch.randn(5, 3, generator=gen, dtype=torch.float64)),
            torch.nn.Parameter(torch.randn(6, 2, generator=gen, dtype=torch.float64)),
            torch.nn.Parameter(torch.randn(4, generator=gen, dtype=torch.float64))]


def _grads(steps: int, seed: int = 1) -> list[list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(5, 3, generator=gen, dtype=torch.float64),
             torch.randn(6, 2, generator=gen, dtype=torch.float64),
             torch.randn(4, generator=gen, dtype=torch.float64)] for _ in range(steps)]


def _make(cls, params, kw, g2):
    return cls([{"params": [params[0]]}, {"params": params[1:], **g2}], **kw)


def _step(opt, params, grads) -> None:
    for p, g in zip(params, grads):
        p.grad = g.clone()  # the reference changes its gradient in place
    opt.step()


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("foreach", [False, True])
def test_lars_matches_pytorch_optimizer_for_50_steps(case, foreach):
    kw, g2 = CASES[case]
    ref_params, our_params = _params(), _params()
    ref = _make(_reference(), ref_params, dict(kw, foreach=foreach), g2)
    ours = _make(curvc.load("lars", backend="torch"), our_params, dict(kw, foreach=foreach), g2)
    for t, grads in enumerate(_grads(STEPS), 1):
        _step(ref, ref_params, grads)
        _step(ours, our_params, grads)
        for i, (a, b) in enumerate(zip(ref_params, our_params)):
            err = ((a - b).abs().max() / a.abs().max()).item()
            assert err <= TOL, f"{case}: step {t}, parameter {i}: relative error {err:.3g}"
    start = _params()
    assert all(not torch.equal(p, q) for p, q in zip(ref_params, start))


def test_trust_ratio_reaches_matrices_only():
    """One step from a zero buffer, written out: a matrix moves by
    lr * (1 - dampening) * trust * (g + wd * theta), a vector by lr * (1 - dampening) * g."""
    kw = dict(lr=0.5, weight_decay=0.1, momentum=0.9, dampening=0.25, trust_coefficient=0.3)
    params, grads = _params(), _grads(1)[0]
    start = [p.detach().clone() for p in params]
    opt = curvc.load("lars", backend="torch")(params, **kw)
    _step(opt, params, grads)
    for p, theta, g in zip(params, start, grads):
        if theta.dim() > 1:
            pn = theta.norm()
            g = 0.3 * pn / (g.norm() + 0.1 * pn) * (g + 0.1 * theta)
        torch.testing.assert_close(p.detach(), theta - 0.5 * 0.75 * g, rtol=1e-12, atol=0)


@pytest.mark.parametrize("case", CASES)
def test_lars_state_dict_round_trip_is_bitwise(case):
    kw, g2 = CASES[case]
    cls = curvc.load("lars", backend="torch")
    grads = _grads(20, seed=2)
    straight = _params()
    opt = _make(cls, straight, kw, g2)
    for g in grads:
        _step(opt, straight, g)
    first = _params()
    opt = _make(cls, first, kw, g2)
    for g in grads[:10]:
        _step(opt, first, g)
    saved = opt.state_dict()
    resumed = [torch.nn.Parameter(p.detach().clone()) for p in first]
    fresh = _make(cls, resumed, kw, g2)
    fresh.load_state_dict(saved)
    for g in grads[10:]:
        _step(fresh, resumed, g)
    for a, b in zip(straight, resumed):
        assert torch.equal(a, b)


@interpreter
@pytest.mark.parametrize("case", CASES)
def test_lars_triton_matches_torch_rendering(case):
    kw, g2 = CASES[case]
    pa, oa = trajectory(curvc.load("lars", backend="triton"), hypers=kw, group2=g2)
    pb, ob = trajectory(curvc.load("lars", backend="torch"), hypers=kw, group2=g2)
    assert_same_state(oa, pa, ob, pb, rel=1e-6)
