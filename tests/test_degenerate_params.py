"""Zero-size tensors and gradients without a graph, against the equations written out here.

* A zero-size tensor (the weight of ``Linear(4, 0)``) has nothing to precondition:
  Shampoo and K-FAC step it as the empty tensor it is, and every other tensor as
  the equations say.
* A parameter entering the loss linearly has a constant gradient (no graph even
  under ``create_graph=True``), so its Hessian row is 0: Hutchinson's estimate of
  it is 0 and the dense Hessian has a zero row, where they used to refuse the step.
"""
import numpy as np
import pytest
import torch

import curvc

scipy_linalg = pytest.importorskip("scipy.linalg")


def _power(m, e):
    return np.real(scipy_linalg.fractional_matrix_power(m, e))


def test_shampoo_steps_zero_size_tensors_as_empty_and_the_rest_by_the_equations():
    """d = L^-1/4 G R^-1/4 with L = eps I + sum G G^T, R = eps I + sum G^T G."""
    Shampoo = curvc.load("shampoo")
    rng = np.random.default_rng(0)
    theta, target = rng.standard_normal((4, 3)), rng.standard_normal((4, 3))
    p = torch.tensor(theta, requires_grad=True)
    empties = [torch.zeros(s, dtype=torch.float64, requires_grad=True)
               for s in [(4, 0), (0, 4), (2, 0, 3), (0,)]]
    opt = Shampoo([empties[0], p, *empties[1:]], lr=0.05, momentum=0.5, matrix_eps=1e-3)
    L, R, buf = 1e-3 * np.eye(4), 1e-3 * np.eye(3), None
    for _ in range(4):
        g = theta - target
        L, R = L + g @ g.T, R + g.T @ g
        buf = g if buf is None else 0.5 * buf + g
        theta = theta - 0.05 * _power(L, -0.25) @ buf @ _power(R, -0.25)
        opt.zero_grad()
        (0.5 * ((p - torch.tensor(target)) ** 2).sum() + sum(e.sum() for e in empties)).backward()
        opt.step()
    np.testing.assert_allclose(p.detach().numpy(), theta, rtol=1e-8, atol=1e-10)
    assert [tuple(e.shape) for e in empties] == [(4, 0), (0, 4), (2, 0, 3), (0,)]


# torch warns that initializing a zero-width layer does nothing: the layer is the point here
@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors is a no-op")
def test_kfac_on_a_zero_width_layer_steps_the_next_bias_by_the_equations():
    """Linear(4, 0) then Linear(0, 3): the second layer's output is its bias b on every
    row, so a = [1], A = 1, S = n ds^T ds with ds = (b - t_r) / n for the loss
    mean_r 0.5 |b - t_r|^2, and b <- b - lr (S + lam I)^-1 g_b (A + lam)^-1."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 0), torch.nn.Linear(0, 3)).double()
    lr, lam, n = 0.1, 0.05, 6
    opt = curvc.load("kfac")(model, lr=lr, momentum=0.0, stat_decay=0.0, damping=lam,
                             stat_every=1, inverse_every=1)
    b = model[1].bias.detach().numpy().copy()
    for _ in range(3):
        x, t = torch.randn(n, 4, dtype=torch.float64), torch.randn(n, 3, dtype=torch.float64)
        ds = (b - t.numpy()) / n
        S = n * ds.T @ ds
        g_b = ds.sum(axis=0)
        b = b - lr * np.linalg.solve(S + lam * np.eye(3), g_b) / (1.0 + lam)
        opt.zero_grad()
        (0.5 * ((model(x) - t) ** 2).sum(dim=1).mean()).backward()
        opt.step()
    np.testing.assert_allclose(model[1].bias.detach().numpy(), b, rtol=1e-10, atol=1e-12)
    assert tuple(model[0].weight.shape) == (0, 4)
    assert opt.state[model[0].weight]["kfac_S"].shape == (0, 0)


def _linear_in_q(a, b, c, p, q):
    """0.5 sum a p^2 + b.p + c.q: diag H = a for p, 0 for q (which enters linearly)."""
    return 0.5 * (a * p * p).sum() + (b * p).sum() + (c * q).sum()


@pytest.mark.parametrize("route", ["create_graph", "estimate_curvature"])
def test_adahessian_estimates_zero_for_a_parameter_entering_the_loss_linearly(route):
    """On a separable quadratic Hutchinson's z * (H z) is exactly diag H for any
    Rademacher z. Step 1 of AdaHessian: m_hat = g, v_hat = c^2, and
    x <- x - lr * g / (|c| + eps)."""
    AdaHessian = curvc.load("adahessian", backend="torch")
    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(5, generator=g) + 0.5, torch.randn(5, generator=g)
    c = torch.randn(3, generator=g)
    p0, q0 = torch.randn(5, generator=g), torch.randn(3, generator=g)
    p, q = torch.nn.Parameter(p0.clone()), torch.nn.Parameter(q0.clone())
    lr, eps = 1e-3, 1e-4
    opt = AdaHessian([p, q], lr=lr, eps=eps)
    loss = _linear_in_q(a, b, c, p, q)
    if route == "create_graph":
        loss.backward(create_graph=True)
    else:
        opt.estimate_curvature(loss=loss)
        loss.backward()
    opt.step()
    assert torch.equal(opt.state[q]["curvature"], torch.zeros(3))
    torch.testing.assert_close(opt.state[p]["curvature"], a)
    torch.testing.assert_close(q.detach(), q0 - lr * c / (0.0 + eps))
    torch.testing.assert_close(p.detach(), p0 - lr * (a * p0 + b) / (a + eps))


def test_damped_newton_takes_a_zero_hessian_row_for_a_parameter_entering_linearly():
    """H = diag(a, 0): d = (H + lam I)^-1 g, so p moves by (a p + b) / (a + lam) and
    q by c / lam."""
    Newton = curvc.load("damped_newton", backend="torch")
    g = torch.Generator().manual_seed(1)
    kw = dict(generator=g, dtype=torch.float64)
    a, b, c = torch.rand(4, **kw) + 0.5, torch.randn(4, **kw), torch.randn(2, **kw)
    p0, q0 = torch.randn(4, **kw), torch.randn(2, **kw)
    p, q = torch.nn.Parameter(p0.clone()), torch.nn.Parameter(q0.clone())
    lam = 0.1
    opt = Newton([p, q], lr=1.0, lam=lam)
    _linear_in_q(a, b, c, p, q).backward(create_graph=True)
    opt.step()
    torch.testing.assert_close(p.detach(), p0 - (a * p0 + b) / (a + lam))
    torch.testing.assert_close(q.detach(), q0 - c / lam)
