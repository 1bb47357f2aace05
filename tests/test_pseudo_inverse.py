"""An undamped curvature that is zero somewhere: the step there is 0 (the pseudo-inverse),
for the diagonal structure as for the matrix ones (``curvc.runtime.roots.spectral``),
never 0/0."""
import pytest
import torch

import curvc


def _spec(tmp_path, body):
    path = tmp_path / "pinv.curv"
    path.write_text("optimizer Pinv\nhyper lr = 0.1\n" + body)
    return curvc.load(str(path), backend="torch")


@pytest.mark.parametrize("fused", [False, True])
def test_an_instant_diagonal_of_g_squared_takes_no_step_where_g_is_zero(tmp_path, fused):
    """d_i = g_i / g_i^2 = 1 / g_i where g_i != 0, and 0 where g_i = 0."""
    Pinv = _spec(tmp_path, "curvature empirical_fisher\nstructure diagonal\nlength none\n")
    p = torch.zeros(6, dtype=torch.float64, requires_grad=True)
    opt = Pinv([p], fused=fused)
    g = torch.tensor([2.0, 0.0, -4.0, 0.0, 0.5, -1.0], dtype=torch.float64)
    p.grad = g.clone()
    opt.step()
    expected = torch.where(g != 0, -0.1 / torch.where(g != 0, g, 1.0), 0.0)
    assert torch.equal(p.detach(), expected)


def test_a_normalized_step_of_a_partly_zero_diagonal_is_finite_and_unit_in_its_norm(tmp_path):
    """d = P^+ g / sqrt(g^T P^+ g) with P = g*g: each nonzero coordinate 1/g_i, over sqrt(n)."""
    Pinv = _spec(tmp_path, "curvature empirical_fisher\nstructure diagonal\nlength normalized\n")
    p = torch.zeros(4, dtype=torch.float64, requires_grad=True)
    opt = Pinv([p])
    g = torch.tensor([1.0, 0.0, -2.0, 4.0], dtype=torch.float64)
    p.grad = g.clone()
    opt.step()
    seen = g != 0
    expected = torch.where(seen, -0.1 / torch.where(seen, g, 1.0) / seen.sum().double().sqrt(), 0.0)
    assert torch.allclose(p.detach(), expected, rtol=1e-12, atol=0)


def test_a_damped_diagonal_still_divides(tmp_path):
    """With damping, P > 0 by construction: the plain division, as torch.optim's."""
    Pinv = _spec(tmp_path, "curvature empirical_fisher\nstructure diagonal\nlength none\n"
                           "damping add(0.5)\n")
    p = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    opt = Pinv([p])
    p.grad = torch.tensor([0.0, 2.0], dtype=torch.float64)
    opt.step()
    assert torch.equal(p.detach(), torch.tensor([0.0, -0.1 * 2.0 / 4.5], dtype=torch.float64))


def test_an_instant_kronecker_step_of_a_rank_deficient_factor_is_its_pseudo_inverse(tmp_path):
    """L = g g^T of a vector is rank 1, R = G^T G of a 3 x 5 matrix rank 3: eigh gives
    their null spaces eigenvalues of rounding noise, whose inverse roots would be noise
    the size of 1e17. Counted as 0, d = L^+ g = g / ||g||^2 and L^-1/2 G R^-1/2 =
    U S^-1 V^T (G = U S V^T), over many draws."""
    Pinv = _spec(tmp_path, "curvature empirical_fisher\nstructure kronecker\niterate instant\n"
                           "length none\n")
    worst = 0.0
    for seed in range(50):
        gen = torch.Generator().manual_seed(seed)
        v = torch.zeros(7, dtype=torch.float64, requires_grad=True)
        m = torch.zeros(3, 5, dtype=torch.float64, requires_grad=True)
        v.grad = torch.randn(7, generator=gen, dtype=torch.float64)
        m.grad = torch.randn(3, 5, generator=gen, dtype=torch.float64)
        Pinv([v, m], lr=1.0).step()
        u, s, vh = torch.linalg.svd(m.grad, full_matrices=False)
        for got, want in ((v, -v.grad / v.grad.dot(v.grad)), (m, -(u / s) @ vh)):
            worst = max(worst, ((got.detach() - want).norm() / want.norm()).item())
    assert worst < 1e-12
