"""`structure factored` with `iterate ema_or_sum(beta)`: Adafactor's factors, Shampoo's iterate.

Written out here in numpy, per tensor with gradient g (c = g * g, the empirical Fisher's
diagonal), for a tensor of order >= 2 (R the means of c over the last dim, C over the
one before):

    beta < 1:   R <- beta R + (1 - beta) mean_-1(c),  C <- beta C + (1 - beta) mean_-2(c)
    beta = 1:   R <- R + mean_-1(c),                  C <- C + mean_-2(c)      (the sum)
    V = R C / mean_-2(R)                 (order < 2: V is c accumulated the same way)
    bias_corrected: V / (1 - beta^t), none at beta = 1 (a sum has no zero start)
    d = g / (sqrt(V) + eps),  theta <- theta - lr d

Two param groups, one at beta = 1 (Distributed Shampoo's sum) and one at beta = 0.8,
non-default hyperparameters, 50 steps in float64, within 1e-6 relative; the state_dict
round trip is bitwise.
"""
import copy

import numpy as np
import pytest
import torch

import curvc
from curvc.explain import explain

SPEC = """optimizer SummedAdafactor
hyper lr = 0.05, beta2 = 0.9, eps = 1e-8
curvature empirical_fisher
structure factored
iterate   ema_or_sum(beta2) {corrected}
length    gradient_norm
damping   add(eps)
"""
STEPS = 50
GROUPS = (dict(lr=0.03, beta2=1.0, eps=1e-6), dict(lr=0.02, beta2=0.8, eps=1e-5))


def _params():
    g = torch.Generator().manual_seed(3)
    shapes = [(2, 3, 4), (5, 4)], [(6,), (3, 2)]
    return [[torch.randn(s, generator=g, dtype=torch.float64).requires_grad_() for s in group]
            for group in shapes]


def _targets(params):
    g = torch.Generator().manual_seed(4)
    return [[torch.randn(p.shape, generator=g, dtype=torch.float64) for p in group]
            for group in params]


def _loss(params, targets):
    """sum of (p - t)^2 / 2 + (p - t)^4 / 4: g = (p - t) + (p - t)^3."""
    return sum((((p - t) ** 2) / 2 + ((p - t) ** 4) / 4).sum()
               for group, tg in zip(params, targets) for p, t in zip(group, tg))


def _reference(x, t, hyper, corrected):
    """Each tensor's values after each step, by the module docstring."""
    beta, eps, lr = hyper["beta2"], hyper["eps"], hyper["lr"]
    summed = beta == 1.0
    acc, out = {}, []
    for step in range(1, STEPS + 1):
        g = (x - t) + (x - t) ** 3
        c = g * g
        news = {"v": c} if x.ndim < 2 else {"r": c.mean(axis=-1, keepdims=True),
                                            "c": c.mean(axis=-2, keepdims=True)}
        for k, new in news.items():
            old = acc.get(k, np.zeros_like(new))
            acc[k] = old + new if summed else beta * old + (1 - beta) * new
        if x.ndim < 2:
            v = acc["v"]
        else:
            v = acc["r"] * acc["c"] / acc["r"].mean(axis=-2, keepdims=True)
        if corrected and not summed:
            v = v / (1 - beta ** step)
        x = x - lr * g / (np.sqrt(v) + eps)
        out.append(x.copy())
    return out


def _load(tmp_path, corrected):
    path = tmp_path / "summed_adafactor.curv"
    path.write_text(SPEC.format(corrected=corrected))
    return curvc.load(str(path), backend="torch")


def _train(opt, params, targets, steps):
    for _ in range(steps):
        opt.zero_grad()
        _loss(params, targets).backward()
        opt.step()


@pytest.mark.parametrize("corrected", ["bias_corrected", ""])
def test_factored_ema_or_sum_follows_its_equations_in_both_groups(tmp_path, corrected):
    Opt = _load(tmp_path, corrected)
    params = _params()
    targets = _targets(params)
    expected = [[_reference(p.detach().numpy().copy(), t.numpy(), hyper, bool(corrected))
                 for p, t in zip(group, tg)]
                for group, tg, hyper in zip(params, targets, GROUPS)]
    opt = Opt([{"params": group, **hyper} for group, hyper in zip(params, GROUPS)])
    worst = 0.0
    for step in range(STEPS):
        _train(opt, params, targets, 1)
        for group, ref in zip(params, expected):
            for p, e in zip(group, ref):
                ours = p.detach().numpy()
                worst = max(worst, np.abs(ours - e[step]).max() / np.abs(e[step]).max())
        assert worst <= 1e-6, (step + 1, worst)
    # the sum grows without bound, the EMA does not: the two groups ran different rules
    state = opt.state[params[0][1]]
    assert float(state["row_var"].sum()) > 2 * float(opt.state[params[1][1]]["row_var"].sum())


def test_factored_ema_or_sum_round_trips_its_state_bitwise(tmp_path):
    Opt = _load(tmp_path, "bias_corrected")
    params = _params()
    targets = _targets(params)
    opt = Opt([{"params": group, **hyper} for group, hyper in zip(params, GROUPS)])
    _train(opt, params, targets, 4)
    saved = copy.deepcopy(opt.state_dict())
    twin = [[p.detach().clone().requires_grad_() for p in group] for group in params]
    other = Opt([{"params": group, **hyper} for group, hyper in zip(twin, GROUPS)])
    other.load_state_dict(saved)
    _train(opt, params, targets, 3)
    _train(other, twin, targets, 3)
    for a, b in zip(params, twin):
        for p, q in zip(a, b):
            assert torch.equal(p, q)


def test_explain_shows_the_sum_at_beta_1():
    text = explain(curvc.to_ir(SPEC.format(corrected="bias_corrected")))
    assert "R     = beta2 * R + (1 - beta2) * mean_j c_ij   (R = R + mean_j c_ij when " \
           "beta2 = 1)" in text, text
    assert "V     = V / (1 - beta2^t)" in text, text
    assert "no correction at beta2 = 1, a sum" in text, text
