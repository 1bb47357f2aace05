"""The secant method (L-BFGS, one pair kept) with a normalized length or a global-norm
clip, against the BFGS update written out here: one iteration per step, on a quadratic."""
import pytest
import torch

import curvc
from curvc.explain import explain

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


# --- clip tensor_rms: Adafactor's update clip, per tensor of L-BFGS's one vector ----------

A5 = torch.tensor([[4.0, 0.5, 0.2, 0.0, 0.1], [0.5, 3.0, 0.0, 0.4, 0.0],
                   [0.2, 0.0, 2.0, 0.3, 0.2], [0.0, 0.4, 0.3, 1.5, 0.0],
                   [0.1, 0.0, 0.2, 0.0, 1.0]], dtype=torch.float64)
B5 = torch.tensor([3.0, -2.0, 1.5, 2.5, -3.0], dtype=torch.float64)
SIZES = (2, 3)  # two tensors: theta = [u (2), v (3)]


def _grad5(x):
    return A5 @ x - B5 + x ** 3  # of x^T A x / 2 - b^T x + sum(x^4) / 4


def _rms_clipped(d, c):
    """Each tensor's slice d_p / max(1, RMS(d_p) / c), and how many slices it scaled."""
    parts = [p / max(1.0, (p.square().mean().sqrt() / c).item()) for p in d.split(SIZES)]
    return torch.cat(parts), sum(not torch.equal(a, b) for a, b in zip(parts, d.split(SIZES)))


def _lbfgs_reference(x, lr, steps, history, c):
    """One L-BFGS iteration per step: d = -H g, H from the last ``history`` pairs (s, y)
    oldest first, H <- (I - rho s y^T) H (I - rho y s^T) + rho s s^T from h0 I, h0 = s.y / y.y
    of the newest; steepest descent and t = min(1, 1/|g|_1) lr at the first; d clipped per
    tensor, then x <- x + t d. Once max |g| <= 1e-7, or the clipped d no longer descends
    (g.d > -1e-9), the step takes no move, and none after (the pair it would add has
    y = 0). Returns x after each step, the slices clipped, and the steps that moved."""
    out, pairs, prev, clipped, moved = [], [], None, 0, 0
    eye = torch.eye(len(x), dtype=torch.float64)
    for k in range(steps):
        g = _grad5(x)
        if moved < k or g.abs().max() <= 1e-7:
            out.append(x.clone())
            continue
        if prev is None:
            d, t = -g, min(1.0, 1.0 / g.abs().sum().item()) * lr
        else:
            s, g_old = prev
            y = g - g_old
            if y @ s > 1e-10:
                pairs = (pairs + [(s, y)])[-history:]
            s_n, y_n = pairs[-1]
            h = eye * ((s_n @ y_n) / (y_n @ y_n))
            for s_i, y_i in pairs:
                rho = 1.0 / (y_i @ s_i)
                left, right = eye - rho * torch.outer(s_i, y_i), eye - rho * torch.outer(y_i, s_i)
                h = left @ h @ right + rho * torch.outer(s_i, s_i)
            d, t = -h @ g, lr
        shaped, n = _rms_clipped(d, c)
        if g @ shaped > -1e-9:
            out.append(x.clone())
            continue
        clipped += n
        moved += 1
        prev = (t * shaped, g)
        x = x + t * shaped
        out.append(x.clone())
    return out, clipped, moved


def test_a_tensor_rms_clipped_secant_direction_matches_the_lbfgs_equations(tmp_path):
    path = tmp_path / "rms_lbfgs.curv"
    path.write_text("optimizer RmsLBFGS\n"
                    "hyper lr = 0.8, history_size = 3, max_iter = 1, c = 0.05\n"
                    "curvature secant\nstructure low_rank\n"
                    "iterate secant(history = history_size, iterations = max_iter)\n"
                    "length none\nclip tensor_rms(c)\n")
    Ours = curvc.load(str(path), backend="torch")
    u = torch.tensor([0.1, -0.2], dtype=torch.float64, requires_grad=True)
    v = torch.tensor([0.3, 0.0, -0.1], dtype=torch.float64, requires_grad=True)
    opt = Ours([u, v])

    def closure():
        opt.zero_grad()
        x = torch.cat([u, v])
        loss = 0.5 * x @ A5 @ x - B5 @ x + (x ** 4).sum() / 4
        loss.backward()
        return loss

    start = torch.cat([u, v]).detach().clone()
    expected, clipped, moved = _lbfgs_reference(start, 0.8, 50, 3, 0.05)
    # the clip acts on some slices and lets others through, over many moving steps
    assert moved >= 20 and 10 <= clipped < 2 * moved, (moved, clipped)
    worst = 0.0
    for want in expected:
        opt.step(closure)
        got = torch.cat([u, v]).detach()
        worst = max(worst, ((got - want).abs().max() / want.abs().max()).item())
        assert worst <= 1e-6, worst
    assert (expected[-1] - start).abs().max() > 0.5


def test_explain_shows_the_rms_clip_of_the_secant_direction():
    text = explain(curvc.to_ir("optimizer RmsLBFGS\nhyper lr = 1, c = 0.4\ncurvature secant\n"
                               "structure low_rank\niterate secant(5)\nlength none\n"
                               "clip tensor_rms(c)\n"))
    lines = [line.strip() for line in text.splitlines()]
    two_loop = next(i for i, l in enumerate(lines) if l.startswith("d     = -H g"))
    want = "d     = d / max(1, RMS(d) / c)   (RMS over each tensor)"
    assert lines[two_loop + 1] == want, text
