"""`structure dense` with momentum, weight decay, a global-norm clip and a schedule.

The dense matrix is a model-scope source: it hands each parameter its slice of
d = (H + lam I)^-1 g (the damped Newton step over all parameters), and the rest of
the step is the elementwise plan applied to d, as to K-FAC's natural gradient. Written
out for step t (x all parameters as one vector, torch.optim.SGD's heavy-ball buffer):

    lr_t = lr / (1 + (t - 1) rate)                              schedule inverse_time(rate)
    d_t  = (H_t + lam I)^-1 g_t                                 the dense source
    l2:        e_t = d_t + wd x_{t-1},  x' = x_{t-1}            decay l2(wd), on d
    decoupled: e_t = d_t,               x' = x_{t-1} (1 - lr_t wd)
    m_1  = e_1,  m_t = beta m_{t-1} + e_t                       momentum heavy_ball(beta)
    u_t  = m_t min(1, c / ||m_t||)                              clip global_norm(c)
    x_t  = x' - lr_t u_t

on L(x) = x^T A x / 2 - b^T x + sum(x^4) / 4, so g = A x - b + x^3 and
H = A + 3 diag(x^2), both in numpy here.
"""
import numpy as np
import pytest
import torch

import curvc
from curvc.explain import explain

SPEC = """optimizer MomentumNewton
hyper lr = 0.5, lam = 0.1, beta = 0.9, wd = 0.05, c = 2, rate = 0.1
curvature hessian
structure dense
length    none
damping   inside(lam)
momentum  heavy_ball(beta)
decay     {decay}(wd)
clip      global_norm(c)
schedule  inverse_time(rate)
"""
LR, LAM, BETA, WD, C, RATE = 0.5, 0.1, 0.9, 0.05, 2.0, 0.1


def _problem(n=7, seed=0):
    rng = np.random.default_rng(seed)
    m = rng.standard_normal((n, n))
    return m @ m.T / n + np.eye(n), rng.standard_normal(n)


def _loss(x, A, b):
    return 0.5 * x @ torch.tensor(A) @ x - torch.tensor(b) @ x + (x ** 4).sum() / 4


def _params():
    """Two tensors (a matrix and a vector), so each gets its slice of d."""
    w = torch.linspace(-0.5, 0.5, 4, dtype=torch.float64).reshape(2, 2).requires_grad_()
    v = torch.tensor([0.3, -0.2, 0.1], dtype=torch.float64, requires_grad=True)
    return [w, v]


def _flat(params):
    return torch.cat([p.reshape(-1) for p in params])


@pytest.mark.parametrize("decay", ["l2", "decoupled"])
def test_dense_newton_with_momentum_decay_clip_and_schedule_follows_its_equations(
        tmp_path, decay):
    path = tmp_path / "momentum_newton.curv"
    path.write_text(SPEC.format(decay=decay))
    Opt = curvc.load(str(path), backend="torch")
    A, b = _problem()
    params = _params()
    opt = Opt(params)
    x = _flat(params).detach().numpy().copy()
    m, clipped = None, 0
    for t in range(1, 6):
        opt.zero_grad()
        assert opt.wants_curvature()
        _loss(_flat(params), A, b).backward(create_graph=True)
        opt.step()
        lr_t = LR / (1 + (t - 1) * RATE)
        g = A @ x - b + x ** 3
        H = A + 3 * np.diag(x ** 2)
        d = np.linalg.solve(H + LAM * np.eye(len(x)), g)
        e, shrunk = (d + WD * x, x) if decay == "l2" else (d, x * (1 - lr_t * WD))
        m = e if m is None else BETA * m + e
        norm = np.linalg.norm(m)
        clipped += norm > C
        x = shrunk - lr_t * m * min(1.0, C / norm)
        np.testing.assert_allclose(_flat(params).detach().numpy(), x, rtol=1e-9, atol=1e-12)
    assert 0 < clipped < 5  # the clip both acts and lets some steps through


def test_the_accumulated_matrix_is_kept_once_per_model(tmp_path):
    """The EMA of the dense matrix lives in the first parameter's state, beside the
    plan's momentum buffers in every parameter's: C_t = 0.5 C_{t-1} + 0.5 H_t, C_0 = 0."""
    path = tmp_path / "ema_newton.curv"
    path.write_text("optimizer EmaNewton\nhyper lr = 0.1\ncurvature hessian\nstructure dense\n"
                    "iterate ema(0.5)\nlength none\ndamping inside(1)\nmomentum heavy_ball(0.5)\n")
    Opt = curvc.load(str(path), backend="torch")
    A, b = _problem(seed=1)
    params = _params()
    opt = Opt(params)
    acc = np.zeros_like(A)
    for _ in range(3):
        x = _flat(params).detach().numpy().copy()
        opt.zero_grad()
        _loss(_flat(params), A, b).backward(create_graph=True)
        opt.step()
        acc = 0.5 * acc + 0.5 * (A + 3 * np.diag(x ** 2))
    np.testing.assert_allclose(opt.state[params[0]]["curvature"].numpy(), acc, rtol=1e-12)
    assert "curvature" not in opt.state[params[1]]
    assert all("momentum_buffer" in opt.state[p] for p in params)


def test_explain_shows_decay_and_momentum_on_the_dense_step():
    """explain prints the order the step runs: the matrix on g, then decay and momentum on d."""
    text = explain(curvc.to_ir(SPEC.format(decay="l2")))
    lines = [line.strip() for line in text.splitlines()]
    order = [lines.index(x) for x in ("d     = (H + lam I)^-1 g = Q diag(f) Q^T g", "d     = d + wd * theta",
                                      "b     = beta * b + d   (b = d at t = 1)", "d     = b",
                                      "theta = theta - lr_t * d")]
    assert order == sorted(order), text
    assert not any(line.startswith("g     = g + wd") for line in lines), text
