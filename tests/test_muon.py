"""Muon: ``structure kronecker(root = newton_schulz)`` against torch.optim.Muon.

The references are torch's own: ``torch.optim._muon._zeropower_via_newtonschulz``
(its bf16 iteration), ``torch.linalg.svd`` for the polar factor U V^T, and
``torch.optim.Muon`` itself for the whole step. The float64 iteration is also written
out here, in numpy, from its equations (X <- a X + (b A + c A^2) X, A = X X^T).
"""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch.optim._muon import _zeropower_via_newtonschulz as torch_newton_schulz

import curvc
from curvc.runtime import matrix

COEFFICIENTS = (3.4445, -4.775, 2.0315)
SHAPES = [(32, 64), (64, 32), (17, 17), (1, 50), (100, 3), (48, 80)]


def _random(shape, dtype, seed):
    return torch.randn(*shape, dtype=dtype, generator=torch.Generator().manual_seed(seed))


# --- the iteration, at the runtime level --------------------------------------------

@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_bfloat16_iteration_is_torchs_bit_for_bit(shape, dtype):
    for seed in range(3):
        g = _random(shape, dtype, seed) * 10 ** (seed - 1)  # scale is normalized away
        expected = torch_newton_schulz(g, COEFFICIENTS, 5, 1e-7)
        out = matrix.polar({}, g, g, steps=5, a=COEFFICIENTS[0], b=COEFFICIENTS[1],
                           c=COEFFICIENTS[2], eps=1e-7, precision="bfloat16")
        assert out.dtype == dtype  # returned in the value's dtype, exactly (bf16 widens)
        assert torch.equal(out, expected.to(dtype))


@pytest.mark.parametrize("steps, coefficients", [(3, (3.0, -3.2, 1.2)), (8, COEFFICIENTS)])
def test_other_steps_and_coefficients_are_torchs_too(steps, coefficients):
    g = _random((24, 40), torch.float32, 5)
    expected = torch_newton_schulz(g, coefficients, steps, 1e-7)
    out = matrix.newton_schulz(g, steps, *coefficients, 1e-7, torch.bfloat16)
    assert torch.equal(out, expected)


def _numpy_iteration(g: np.ndarray, steps: int, a: float, b: float, c: float, eps: float):
    """The iteration's equations in float64, on the shorter side's Gram matrix."""
    tall = g.shape[0] > g.shape[1]
    x = g.T if tall else g
    x = x / max(np.linalg.norm(x), eps)
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.T if tall else x


@pytest.mark.parametrize("shape", SHAPES)
def test_float64_iteration_is_its_equations(shape):
    g = _random(shape, torch.float64, 1)
    out = matrix.polar({}, g, g, steps=5, a=COEFFICIENTS[0], b=COEFFICIENTS[1],
                       c=COEFFICIENTS[2], eps=1e-7, precision="float64")
    expected = _numpy_iteration(g.numpy(), 5, *COEFFICIENTS, 1e-7)
    np.testing.assert_allclose(out.numpy(), expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("precision", ["float32", "float64", "bfloat16"])
@pytest.mark.parametrize("shape", [(32, 64), (64, 32), (48, 80), (1, 50)])
def test_the_step_is_the_polar_factor_up_to_the_iterations_accuracy(precision, shape):
    """U S' V^T with S' near I: Muon's coefficients leave the singular values within
    about [0.68, 1.14] (they do not converge to 1), on the singular vectors of G.
    Rectangular Gaussian matrices: no singular value is near 0 relative to ||G||_F."""
    g = _random(shape, torch.float64, 2)
    out = matrix.polar({}, g, g, steps=5, a=COEFFICIENTS[0], b=COEFFICIENTS[1],
                       c=COEFFICIENTS[2], eps=1e-7, precision=precision).double()
    u, s, vh = torch.linalg.svd(g, full_matrices=False)
    s_out = torch.linalg.svdvals(out)
    assert s_out.min() > 0.65 and s_out.max() < 1.2, s_out
    # in G's singular basis the step is diagonal: U^T out V = S' (off-diagonal ~ rounding)
    inner = u.T @ out @ vh.T
    off = inner - torch.diag(torch.diagonal(inner))
    tol = {"bfloat16": 5e-2, "float32": 1e-5, "float64": 1e-12}[precision]
    assert off.abs().max() < tol
    assert torch.diagonal(inner).min() > 0.65
    # its own polar factor is G's
    uo, _, vho = torch.linalg.svd(out, full_matrices=False)
    assert (uo @ vho - u @ vh).abs().max() < {"bfloat16": 0.1, "float32": 1e-4,
                                              "float64": 1e-10}[precision]


def test_a_vector_is_a_row_and_a_scalar_is_left_alone():
    v = _random((50,), torch.float32, 3)
    out = matrix.polar({}, v, v, steps=5, a=COEFFICIENTS[0], b=COEFFICIENTS[1],
                       c=COEFFICIENTS[2], eps=1e-7, precision="bfloat16")
    assert out.shape == v.shape
    assert torch.equal(out, torch_newton_schulz(v[None], COEFFICIENTS, 5, 1e-7)[0].float())
    s = torch.tensor(3.0)
    assert matrix.polar({}, s, s, steps=5, a=1, b=0, c=0, eps=1e-7, precision="bfloat16") is s


def test_a_tensor_of_order_three_is_refused_with_its_shape():
    t = torch.ones(2, 3, 4)
    with pytest.raises(ValueError, match=r"shape \(2, 3, 4\) is not one"):
        matrix.polar({}, t, t, steps=5, a=1, b=0, c=0, eps=1e-7, precision="bfloat16")


# --- the whole step: specs/muon.curv against torch.optim.Muon -----------------------

SHAPES_2D = [(8, 16), (12, 4), (16, 32), (20, 5)]


def _params(dtype):
    gen = torch.Generator().manual_seed(1)
    return [torch.randn(*s, dtype=dtype, generator=gen).requires_grad_() for s in SHAPES_2D]


def _loss(ps, x):
    h = torch.tanh(x @ ps[2].T)            # 16 -> 32 wide
    h = torch.tanh(h @ ps[0].T)            # 8 x 16
    return (h.sum(1) ** 2).mean() + (ps[1] ** 2).sum() + (ps[3] ** 3).sum()


def _groups(ps):
    return [{"params": ps[:2]}, {"params": ps[2:], "lr": 0.05, "weight_decay": 0.01}]


def _run(opt_a, pa, opt_b, pb, x, steps=50):
    worst = 0.0
    for _ in range(steps):
        for ps, opt in ((pa, opt_a), (pb, opt_b)):
            opt.zero_grad()
            _loss(ps, x).backward()
            opt.step()
        worst = max(worst, max(((a - b).abs().max() / a.abs().max()).item()
                               for a, b in zip(pa, pb)))
    return worst


@pytest.mark.parametrize("adjust", [None, "original", "match_rms_adamw"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_muon_without_momentum_is_torchs_step_for_step(dtype, adjust):
    Muon = curvc.load("muon")
    x = torch.randn(64, 32, dtype=dtype, generator=torch.Generator().manual_seed(0))
    pa, pb = _params(dtype), _params(dtype)
    ref = torch.optim.Muon(_groups(pa), lr=0.02, weight_decay=0.2, momentum=0, nesterov=False,
                           ns_steps=6, eps=1e-6, adjust_lr_fn=adjust)
    ours = Muon(_groups(pb), lr=0.02, weight_decay=0.2, momentum=0, nesterov=False, ns_steps=6,
                eps=1e-6, adjust_lr_fn=adjust, fused=False)
    worst = _run(ref, pa, ours, pb, x)
    # measured: 0 (bit for bit) on the eager path; the bf16 iteration magnifies any
    # rounding difference upstream, so the bound is the brief's
    assert worst <= (1e-6 if dtype == torch.float64 else 1e-5), worst


@pytest.mark.parametrize("nesterov", [True, False])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_muon_with_momentum_is_torchs_step_for_step(dtype, nesterov):
    # the buffer lerp(b, g, 1 - momentum) and its (Nesterov) readout are the spec's state
    # and let; the polar factor is of the readout (`of = readout`)
    Muon = curvc.load("muon")
    x = torch.randn(64, 32, dtype=dtype, generator=torch.Generator().manual_seed(0))
    pa, pb = _params(dtype), _params(dtype)
    groups = lambda ps: [{"params": ps[:2]},  # noqa: E731
                         {"params": ps[2:], "lr": 0.05, "momentum": 0.8, "nesterov": False}]
    ref = torch.optim.Muon(groups(pa), lr=0.02, weight_decay=0.2, momentum=0.9,
                           nesterov=nesterov, adjust_lr_fn="match_rms_adamw")
    ours = Muon(groups(pb), lr=0.02, weight_decay=0.2, momentum=0.9, nesterov=nesterov,
                adjust_lr_fn="match_rms_adamw", fused=False)
    worst = _run(ref, pa, ours, pb, x)
    assert worst <= (1e-6 if dtype == torch.float64 else 1e-5), worst


def test_muon_has_torchs_constructor_arguments():
    import inspect
    Muon = curvc.load("muon")
    ours = inspect.signature(Muon).parameters
    theirs = inspect.signature(torch.optim.Muon).parameters
    for name in ("lr", "weight_decay", "momentum", "nesterov", "ns_coefficients", "eps",
                 "ns_steps"):
        assert ours[name].default == theirs[name].default, name
    # torch's None means "original"; the spec names its default
    assert theirs["adjust_lr_fn"].default is None and ours["adjust_lr_fn"].default == "original"


def test_adjust_lr_fn_takes_its_words_or_none():
    Muon = curvc.load("muon")
    p = [torch.zeros(3, 4, requires_grad=True)]
    with pytest.raises(ValueError, match="adjust_lr_fn.*'sqrt'"):
        Muon(p, adjust_lr_fn="sqrt")
    with pytest.raises(ValueError, match="adjust_lr_fn"):
        Muon([{"params": p, "adjust_lr_fn": "rms"}])
    Muon(p, adjust_lr_fn=None)


def test_state_dict_round_trip_is_bitwise():
    Muon = curvc.load("muon")
    x = torch.randn(64, 32, generator=torch.Generator().manual_seed(0))
    pa, pb = _params(torch.float32), _params(torch.float32)
    a = Muon(_groups(pa), lr=0.02, adjust_lr_fn="match_rms_adamw")
    b = Muon(_groups(pb), lr=0.02, adjust_lr_fn="match_rms_adamw")
    _run(a, pa, b, pb, x, steps=3)
    saved = copy.deepcopy(b.state_dict())
    pc = [p.detach().clone().requires_grad_() for p in pb]
    c = Muon(_groups(pc), lr=0.02)
    c.load_state_dict(saved)
    assert c.param_groups[0]["adjust_lr_fn"] == "match_rms_adamw"
    _run(a, pa, c, pc, x, steps=5)
    assert all(torch.equal(p, q) for p, q in zip(pa, pc))
