"""The factored structure (Adafactor) against references nobody here wrote.

* ``torch.optim.Adafactor`` (torch 2.13), step for step: ``specs/adafactor.curv`` with
  non-default hyperparameters, two param groups (one maximizing, one with eps[0] left
  None), parameters of order 0, 1, 2 and 3, in float64 (1e-6 relative; it is exact to
  rounding) and float32 (1e-5);
* a hybrid (Adam-like moments on the factored diagonal: bias-corrected EMA refreshed
  every 2 steps, momentum, damping add) against its equations written out below with
  numpy;
* checkpoints: our state_dict round trip is bitwise, and a torch.optim.Adafactor
  checkpoint (same state keys and shapes) resumes in ours;
* the constructor is torch's (keywords, defaults, ValueErrors), and ``curvc explain``
  shows the rule.
"""
import copy
import inspect

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

import curvc
from conftest import batches
from curvc.cli import app

STEPS = 50


class Net(torch.nn.Module):
    """Parameters of order 2 and 1 (a Linear layer), 3 (a stack of matrices) and 0."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.lin = torch.nn.Linear(64, 16)
        self.stack = torch.nn.Parameter(torch.randn(2, 8, 5) * 0.3)
        self.scale = torch.nn.Parameter(torch.tensor(1.5))

    def forward(self, x):
        h = torch.tanh(self.lin(x)).reshape(-1, 2, 8)
        return torch.einsum("bij,ijk->bik", h, self.stack).reshape(-1, 10) * self.scale


def groups(net, first: dict, second: dict) -> list[dict]:
    return [{"params": [net.lin.weight, net.lin.bias], **first},
            {"params": [net.stack, net.scale], **second}]


# non-default everywhere; the second group maximizes and leaves eps[0] to the dtype
HYPERS = dict(lr=0.05, beta2_decay=-0.6, eps=(1e-4, 2e-3), d=1.5, weight_decay=0.05)
SECOND = dict(lr=0.02, eps=(None, 5e-3), weight_decay=0.0, maximize=True, beta2_decay=-0.9)


def run(net, opt, data, steps=STEPS, seed=0):
    for xb, yb in batches(data, steps, seed=seed):
        opt.zero_grad()
        F.cross_entropy(net(xb), yb).backward()
        opt.step()


def max_relative(a, b) -> float:
    """max over parameters of max |a - b| / max |a|."""
    return max(((pa - pb).abs().max() / pa.abs().max()).item()
               for pa, pb in zip(a.parameters(), b.parameters()))


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-6), (torch.float32, 1e-5)])
def test_adafactor_matches_torch_step_for_step(digits, dtype, tol):
    Ours = curvc.load("adafactor")
    ref, ours = Net().to(dtype), Net().to(dtype)
    data = (digits[0].to(dtype), digits[1])
    ref_opt = torch.optim.Adafactor(groups(ref, {}, SECOND), **HYPERS)
    our_opt = Ours(groups(ours, {}, SECOND), **HYPERS)
    worst = 0.0
    for step, (xb, yb) in enumerate(batches(data, STEPS)):
        for net, opt in ((ref, ref_opt), (ours, our_opt)):
            opt.zero_grad()
            F.cross_entropy(net(xb), yb).backward()
            opt.step()
        worst = max(worst, max_relative(ref, ours))
        assert worst <= tol, (step, worst)
    for p, q in zip(ref.parameters(), ours.parameters()):
        ref_state, our_state = ref_opt.state[p], our_opt.state[q]
        assert set(our_state) == set(ref_state)  # row_var/col_var or variance, and step
        for key, value in ref_state.items():
            assert our_state[key].shape == value.shape, key
            torch.testing.assert_close(our_state[key].to(value.dtype), value,
                                       rtol=tol, atol=0.0)


def test_defaults_match_torch_and_vectors_keep_the_diagonal(digits):
    """Default hyperparameters (eps[0] None: float64's machine epsilon), one group."""
    Ours = curvc.load("adafactor")
    ref, ours = Net().double(), Net().double()
    data = (digits[0].double(), digits[1])
    ref_opt, our_opt = torch.optim.Adafactor(ref.parameters()), Ours(ours.parameters())
    run(ref, ref_opt, data)
    run(ours, our_opt, data)
    assert max_relative(ref, ours) <= 1e-6
    assert our_opt.state[ours.lin.bias].keys() == {"step", "variance"}
    assert our_opt.state[ours.scale]["variance"].shape == ()


def test_the_constructor_is_torchs():
    Ours = curvc.load("adafactor")
    ours = inspect.signature(Ours.__init__).parameters
    theirs = inspect.signature(torch.optim.Adafactor.__init__).parameters
    for name in ("lr", "beta2_decay", "eps", "d", "weight_decay", "maximize", "foreach"):
        assert ours[name].default == theirs[name].default, name
    assert list(ours)[:7] == list(theirs)[:7]  # the positional order too
    p = [torch.nn.Parameter(torch.zeros(2, 2))]
    for bad in (dict(lr=-1.0), dict(beta2_decay=0.5), dict(eps=(-1.0, 1e-3)),
                dict(eps=(None, -1e-3)), dict(weight_decay=-0.1)):
        with pytest.raises(ValueError):
            torch.optim.Adafactor(p, **bad)
        with pytest.raises(ValueError):
            Ours(p, **bad)
    with pytest.raises(ValueError, match="d"):  # None is only the dtype's epsilon's default
        Ours(p, d=None)
    Ours(p, eps=(None, 1e-3))
    Ours(p, eps=(1e-30, 1e-3))


def test_state_dict_round_trip_is_bitwise(digits):
    Ours = curvc.load("adafactor")
    data = (digits[0].double(), digits[1])
    a = Net().double()
    opt_a = Ours(groups(a, {}, SECOND), **HYPERS)
    run(a, opt_a, data, steps=10)
    b = copy.deepcopy(a)
    opt_b = Ours(groups(b, {}, SECOND), **HYPERS)
    opt_b.load_state_dict(copy.deepcopy(opt_a.state_dict()))
    sa, sb = opt_a.state_dict(), opt_b.state_dict()
    assert sa["param_groups"] == sb["param_groups"]
    for i, state in sa["state"].items():
        assert state.keys() == sb["state"][i].keys()
        for key, value in state.items():
            assert torch.equal(value, sb["state"][i][key]), (i, key)
    run(a, opt_a, data, steps=10, seed=1)
    run(b, opt_b, data, steps=10, seed=1)
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


def test_a_torch_checkpoint_resumes_in_ours(digits):
    Ours = curvc.load("adafactor")
    data = (digits[0].double(), digits[1])
    ref = Net().double()
    ref_opt = torch.optim.Adafactor(groups(ref, {}, SECOND), **HYPERS)
    run(ref, ref_opt, data, steps=10)
    ours = copy.deepcopy(ref)
    our_opt = Ours(groups(ours, {}, SECOND), **HYPERS)
    our_opt.load_state_dict(copy.deepcopy(ref_opt.state_dict()))
    run(ref, ref_opt, data, steps=20, seed=1)
    run(ours, our_opt, data, steps=20, seed=1)
    assert max_relative(ref, ours) <= 1e-6


# --- a hybrid: Adam's moments on the factored diagonal, against numpy --------------

HYBRID = """optimizer FactoredAdam
hyper lr = 0.01, beta = 0.9, beta1 = 0.8, floor = 1e-6, eps = 1e-8
curvature empirical_fisher
structure factored(eps = floor)
iterate   ema(beta) bias_corrected every 2
momentum  ema(beta1) bias_corrected
length    gradient_norm
damping   add(eps)
"""


def _hybrid_reference(params, grads_per_step, lr=0.01, beta=0.9, beta1=0.8, floor=1e-6,
                      eps=1e-8):
    """The equations, written out: R, C the EMAs (every 2 steps, from step 1) of g*g's
    means over the last dim and the one before, V = R C / max(mean(R), floor) divided by
    1 - beta^r (r the refreshes so far); vectors keep the EMA of g*g itself."""
    theta = [p.copy() for p in params]
    state = [dict(m=np.zeros_like(p), r=None, c=None, v=None) for p in params]
    refreshes = 0
    for t, grads in enumerate(grads_per_step, start=1):
        refresh = (t - 1) % 2 == 0
        refreshes += refresh
        for x, g, s in zip(theta, grads, state):
            if refresh:
                c = g * g
                if g.ndim >= 2:
                    rows, cols = c.mean(axis=-1, keepdims=True), c.mean(axis=-2, keepdims=True)
                    for key, new in (("r", rows), ("c", cols)):
                        old = 0.0 if s[key] is None else s[key]
                        s[key] = beta * old + (1 - beta) * new
                else:
                    s["v"] = beta * (0.0 if s["v"] is None else s["v"]) + (1 - beta) * c
            if g.ndim >= 2:
                v = s["r"] @ s["c"] / np.maximum(s["r"].mean(axis=-2, keepdims=True), floor)
            else:
                v = s["v"]
            v = v / (1 - beta ** refreshes)
            s["m"] = beta1 * s["m"] + (1 - beta1) * g
            m = s["m"] / (1 - beta1 ** t)
            x -= lr * m / (np.sqrt(v) + eps)
    return theta


def test_factored_hybrid_matches_its_equations(tmp_path):
    path = tmp_path / "factored_adam.curv"
    path.write_text(HYBRID)
    Hybrid = curvc.load(str(path), backend="torch")
    rng = np.random.default_rng(0)
    shapes = [(6, 4), (5,), (3, 4, 2), ()]
    start = [rng.standard_normal(s) for s in shapes]
    grads = [[rng.standard_normal(s) * (1 + t % 3) for s in shapes] for t in range(STEPS)]
    params = [torch.nn.Parameter(torch.tensor(x)) for x in start]
    opt = Hybrid(params)
    for step in grads:
        for p, g in zip(params, step):
            p.grad = torch.tensor(g)
        opt.step()
    expected = _hybrid_reference(start, grads)
    for p, e in zip(params, expected):
        np.testing.assert_allclose(p.detach().numpy(), e, rtol=1e-9, atol=1e-12)


def test_explain_shows_the_factored_rule():
    result = CliRunner().invoke(app, ["explain", "adafactor"])
    assert result.exit_code == 0, result.output
    text = result.stdout
    for line in ("Structure Approximation    diagonal, R C^T / mean(R)",
                 "beta_t = 1 - t^beta2_decay",
                 "V     = R C^T / max(mean_i R_i, eps[0])",
                 "P     = max(sqrt(V), eps[0])",
                 "d     = d / max(1, RMS(d) / (hyperparameter d))   (RMS over each tensor)",
                 "lr_t  = min(lr, 1/sqrt(t)) * max(eps[1], RMS(theta))",
                 "theta = theta * (1 - lr * weight_decay)",
                 "order < 2 keeps the diagonal", "machine_eps"):
        assert line in text, (line, text)


def test_a_checkpoint_for_another_model_is_refused_with_nothing_loaded():
    Ours = curvc.load("adafactor")
    small = [torch.nn.Parameter(torch.randn(3, 4)), torch.nn.Parameter(torch.randn(4))]
    other = [torch.nn.Parameter(torch.randn(3, 5)), torch.nn.Parameter(torch.randn(4))]
    opt = Ours(small)
    for p in small:
        p.grad = torch.ones_like(p)
    opt.step()
    fresh = Ours(other)
    with pytest.raises(ValueError, match=r"'col_var' has shape \(1, 4\), expected \(1, 5\)"):
        fresh.load_state_dict(opt.state_dict())
    assert not fresh.state


def test_power_ema_on_the_plain_diagonal_matches_its_equations(tmp_path):
    """iterate power_ema is an axis of its own: with structure diagonal, every 3 steps
    (t in beta_t counts refreshes), C <- beta_t C + (1 - beta_t) g*g, beta_t = 1 - r^decay."""
    path = tmp_path / "power_adam.curv"
    path.write_text("optimizer PowerAdam\nhyper lr = 0.01, decay = -0.7, eps = 1e-8\n"
                    "curvature empirical_fisher\nstructure diagonal\n"
                    "iterate   power_ema(decay) every 3\nlength    gradient_norm\n"
                    "damping   add(eps)\n")
    Ours = curvc.load(str(path), backend="torch")
    rng = np.random.default_rng(1)
    start = rng.standard_normal((4, 3))
    p = torch.nn.Parameter(torch.tensor(start))
    opt = Ours([p], lr=0.02, decay=-0.5)
    x, c, r = start.copy(), np.zeros_like(start), 0
    for t in range(1, STEPS + 1):
        g = rng.standard_normal((4, 3))
        p.grad = torch.tensor(g)
        opt.step()
        if (t - 1) % 3 == 0:
            r += 1
            w = r ** -0.5
            c = (1 - w) * c + w * g * g
        x -= 0.02 * g / (np.sqrt(c) + 1e-8)
    np.testing.assert_allclose(p.detach().numpy(), x, rtol=1e-9, atol=1e-12)


def test_the_fused_cpu_kernels_around_the_extern_match_torch():
    """fused=True compiles the head and tail kernels (inductor); the extern between them
    runs eagerly. Still torch's Adafactor, in float32."""
    Ours = curvc.load("adafactor", backend="torch")
    gen = torch.Generator().manual_seed(0)
    shapes = [(), (7,), (33, 5), (2, 3, 4, 5)]
    start = [torch.randn(s, generator=gen) for s in shapes]
    ours = [torch.nn.Parameter(x.clone()) for x in start]
    ref = [torch.nn.Parameter(x.clone()) for x in start]
    our_opt = Ours(ours, fused=True, lr=0.05, weight_decay=0.1, d=1.2)
    ref_opt = torch.optim.Adafactor(ref, lr=0.05, weight_decay=0.1, d=1.2)
    for _ in range(6):
        for p, q in zip(ours, ref):
            g = torch.randn(p.shape, generator=gen)
            p.grad, q.grad = g.clone(), g.clone()
        our_opt.step()
        ref_opt.step()
    for p, q in zip(ours, ref):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7)
