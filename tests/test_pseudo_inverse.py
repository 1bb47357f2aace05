"""An undamped curvature that is zero somewhere: the step there is 0 (the pseudo-inverse),
for the diagonal structure as for the matrix ones (``curvc.runtime.matrix.spectral``),
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
