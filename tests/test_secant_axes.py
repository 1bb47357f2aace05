"""The secant method (L-BFGS, one pair kept) with a normalized length or a global-norm
clip, against the BFGS update written out here: one iteration per step, on a quadratic."""
import pytest
import torch

import curvc

A = torch.tensor([[3.0, 0.5, 0.0], [0.5, 2.0, 0.3], [0.0, 0.3, 1.0]], dtype=torch.float64)
B = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)


def _grad(theta):
    return A @ theta - B  # of f = theta^T A theta / 2 - b^T theta


def _shaped(d, g, normalized, clip):
    if normalized:
        d = d / torch.sqrt(-g @ d)
    if clip and d.norm() > clip:
        d = d * (clip / d.norm())
    return d


def _reference(theta, lr, steps, normalized=False, clip=0.0):
    """theta_{k+1} = theta_k + t d, d = -H g shaped; H from the one BFGS pair of the last step
    (H = (I - rho s y^T) h0 (I - rho y s^T) + rho s s^T, h0 = s.y / y.y), steepest descent
    and t = min(1, 1/|g|_1) lr at the first step."""
    out, prev = [], None
    for k in range(steps):
        g = _grad(theta)
        if prev is None:
            d, t = _shaped(-g, g, normalized, clip), min(1.0, 1.0 / g.abs().sum().item()) * lr
        else:
            s, y = prev
            rho, eye = 1.0 / (y @ s), torch.eye(3, dtype=torch.float64)
            h = (eye - rho * torch.outer(s, y)) * ((s @ y) / (y @ y)) @ (
                eye - rho * torch.outer(y, s)) + rho * torch.outer(s, s)
            d, t = _shaped(-h @ g, g, normalized, clip), lr
        new = theta + t * d
        prev = (new - theta, _grad(new) - g)
        theta = new
        out.append(theta.clone())
    return out


@pytest.mark.parametrize("length, clip", [("normalized", ""), ("none", "clip global_norm(0.3)")])
def test_a_shaped_secant_direction_matches_the_bfgs_equations(tmp_path, length, clip):
    path = tmp_path / "s.curv"
    path.write_text("optimizer Shaped\nhyper lr = 0.5, history_size = 1, max_iter = 1\n"
                    "curvature secant\nstructure low_rank\n"
                    "iterate secant(history = history_size, iterations = max_iter)\n"
                    f"length {length}\n{clip}\n")
    Ours = curvc.load(str(path), backend="torch")
    theta = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    opt = Ours([theta])

    def closure():
        opt.zero_grad()
        loss = 0.5 * theta @ A @ theta - B @ theta
        loss.backward()
        return loss

    expected = _reference(torch.zeros(3, dtype=torch.float64), 0.5, 4,
                          normalized=length == "normalized", clip=0.3 if clip else 0.0)
    for want in expected:
        opt.step(closure)
        assert torch.allclose(theta.detach(), want, rtol=0, atol=1e-12)
