"""The paper's clipped NGD variants and its diagonal NGD rows, against their formulas.

Zheng's "unified view" relaxes each normalized NGD to a clip at C = eps / lr: with
g~ = H^-1 g, g^ = Q^T g and H = Q diag(lambda) Q^T,

    Clipped NGD             d   = min(1, C / ||g~||_H) g~
    Gradient-norm clipped   d^_i = min(1, C sqrt(lambda_i)) g^_i / lambda_i
    Eigenbasis clipped      d^_i = min(1, C sqrt(lambda_i) / |g^_i|) g^_i / lambda_i

(the paper prints ||g~||_H^2 in the first ratio; its rule alpha <= eps t with Normalized
NGD's alpha = eps / ||g~||_H gives the norm, see specs/theory/clipped_ngd.curv), and
with a diagonal H = diag(lambda) the NGD rows are d = g / lambda, the normalized
(g / lambda) / sqrt(sum g^2 / lambda), the gradient-norm g / sqrt(lambda), the
eigenbasis sign(g) / sqrt(lambda), and the three clips with Q = I. Each is written
out here in numpy (eigh for the dense ones) and compared with the shipped spec over
several steps: a quadratic with its exact Hessian for the dense rows, given Fisher
diagonals on two param groups for the diagonal ones. Thresholds are picked so that
some components are clipped and some are not, and the test asserts that they are.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import curvc
from tests.test_triton_backend import assert_same_state, interpreter, make_params

STEPS = 5


def _quadratic(n=6, seed=0):
    rng = np.random.default_rng(seed)
    m = rng.standard_normal((n, n))
    return m @ m.T + 0.5 * np.eye(n), rng.standard_normal(n)


def _dense_step(kind: str, A, g, C):
    """The paper's d for one step, and which components the clip held back."""
    lam, Q = np.linalg.eigh(A)
    gh = Q.T @ g
    if kind == "clipped_ngd":
        gt = np.linalg.solve(A, g)
        norm = np.sqrt(g @ gt)
        return min(1.0, C / norm) * gt, np.array([C / norm < 1.0])
    if kind == "gn_clipped_ngd":
        scale = np.minimum(1.0, C * np.sqrt(lam))
    else:  # eigenbasis_clipped_ngd
        scale = np.minimum(1.0, C * np.sqrt(lam) / np.abs(gh))
    return Q @ (scale * gh / lam), scale < 1.0


# threshold C for each row: inside the range its ratio takes on this problem
DENSE = {"clipped_ngd": (0.4, 5.0), "gn_clipped_ngd": (0.8,), "eigenbasis_clipped_ngd": (1.5,)}


@pytest.mark.parametrize("kind, C", [(k, c) for k, cs in DENSE.items() for c in cs])
def test_dense_clipped_ngd_follows_the_papers_formula(kind, C):
    A, b = _quadratic()
    lr = 0.3
    theta0 = np.array([1.5, -1.0, 2.0, 0.0, 0.5, -2.0])
    Opt = curvc.load(f"theory/{kind}", backend="torch")
    theta = torch.tensor(theta0, requires_grad=True)
    opt = Opt([theta], lr=lr, threshold=C)
    ref, clipped = theta0.copy(), []
    for _ in range(STEPS):
        d, held = _dense_step(kind, A, A @ ref - b, C)
        ref = ref - lr * d
        clipped.append(held)
        opt.zero_grad()
        Ah, bh = torch.tensor(A), torch.tensor(b)
        (0.5 * theta @ Ah @ theta - bh @ theta).backward(create_graph=True)
        opt.step()
        np.testing.assert_allclose(theta.detach().numpy(), ref, rtol=1e-9, atol=1e-12)
    clipped = np.concatenate(clipped)
    # the threshold bites somewhere (per step for the first row, per component otherwise)
    if kind == "clipped_ngd" and C > 1.0:
        assert not clipped.all()
    else:
        assert clipped.any()
    if kind != "clipped_ngd":
        assert not clipped.all()


# --- diagonal rows --------------------------------------------------------------

def _diag_step(kind: str, gs, lams, C):
    """d per tensor for one step; the normalized rows sum over every tensor."""
    total = sum(float((g * g / lam).sum()) for g, lam in zip(gs, lams))
    out, held = [], []
    for g, lam in zip(gs, lams):
        newton = g / lam
        if kind == "ngd":
            d = newton
        elif kind == "normalized_ngd":
            d = newton / np.sqrt(total)
        elif kind == "gn_normalized_ngd":
            d = g / np.sqrt(lam)
        elif kind == "eigenbasis_normalized_ngd":
            d = np.sign(g) / np.sqrt(lam)
        else:
            scale = {"clipped_ngd": np.full_like(g, min(1.0, C / np.sqrt(total))),
                     "gn_clipped_ngd": np.minimum(1.0, C * np.sqrt(lam)),
                     "eigenbasis_clipped_ngd": np.minimum(1.0, C * np.sqrt(lam) / np.abs(g)),
                     }[kind]
            d = scale * newton
            held.append((scale < 1.0).ravel())
        out.append(d)
    return out, held


DIAGONAL = {"ngd": None, "normalized_ngd": None, "gn_normalized_ngd": None,
            "eigenbasis_normalized_ngd": None, "clipped_ngd": 4.0, "gn_clipped_ngd": 1.0,
            "eigenbasis_clipped_ngd": 0.8}


def _draws(steps, seed=0):
    rng = np.random.default_rng(seed)
    return [([rng.standard_normal((3, 4)), rng.standard_normal(5)],
             [rng.uniform(0.2, 3.0, (3, 4)), rng.uniform(0.2, 3.0, 5)]) for _ in range(steps)]


@pytest.mark.parametrize("kind", DIAGONAL)
def test_diagonal_ngd_rows_follow_the_papers_formula(kind):
    C = DIAGONAL[kind]
    rng = np.random.default_rng(1)
    start = [rng.standard_normal((3, 4)), rng.standard_normal(5)]
    params = [torch.nn.Parameter(torch.tensor(p)) for p in start]
    lrs = (0.1, 0.05)
    extra = {} if C is None else {"threshold": C}
    Opt = curvc.load(f"theory/diagonal_{kind}", backend="torch")
    opt = Opt([{"params": [params[0]], "lr": lrs[0]}, {"params": [params[1]], "lr": lrs[1]}],
              **extra)
    ref, held = [p.copy() for p in start], []
    for gs, lams in _draws(STEPS):
        ds, h = _diag_step(kind, gs, lams, C)
        held += h
        ref = [r - lr * d for r, lr, d in zip(ref, lrs, ds)]
        for p, g in zip(params, gs):
            p.grad = torch.tensor(g)
        opt.step(curvature=[torch.tensor(lam) for lam in lams])
        for p, r in zip(params, ref):
            np.testing.assert_allclose(p.detach().numpy(), r, rtol=1e-10, atol=1e-13)
    if C is not None:  # the clip holds some components back and lets others through
        held = np.concatenate(held)
        assert held.any() and not held.all()


def test_a_zero_curvature_takes_no_step_under_the_clip():
    """The pseudo-inverse, as the unclipped rows take it: lambda = 0 gives d = 0, not NaN."""
    Opt = curvc.load("theory/diagonal_gn_clipped_ngd", backend="torch")
    p = torch.nn.Parameter(torch.tensor([1.0, 2.0], dtype=torch.float64))
    opt = Opt([p], lr=0.1, threshold=0.5)
    p.grad = torch.tensor([1.0, -1.0], dtype=torch.float64)
    opt.step(curvature=[torch.tensor([0.0, 4.0], dtype=torch.float64)])
    # lambda = 4: min(1, 0.5 * 2) * (-1 / 4) = -0.25
    assert torch.equal(p.detach(), torch.tensor([1.0, 2.0 + 0.1 * 0.25], dtype=torch.float64))


@interpreter
@pytest.mark.parametrize("kind", [k for k, c in DIAGONAL.items() if c is not None])
def test_diagonal_clips_triton_match_torch_rendering(kind):
    runs = []
    for backend in ("triton", "torch"):
        first, second = make_params("cpu", torch.float32)
        opt = curvc.load(f"theory/diagonal_{kind}", backend=backend)(
            [{"params": first}, {"params": second, "lr": 0.02}], lr=0.01,
            threshold=DIAGONAL[kind])
        params = first + second
        for step in range(10):
            gen = torch.Generator().manual_seed(100 + step)
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen)
            opt.step(curvature=[torch.rand(p.shape, generator=gen) + 0.1 for p in params])
        runs.append((opt, params))
    (oa, pa), (ob, pb) = runs
    assert_same_state(oa, pa, ob, pb, rel=1e-6)
