"""K-FAC with the length, iterate and damping axes, against equations written out here.

The reference takes each nn.Linear layer's inputs and output gradients with its
own hooks, builds A_t = a^T a / N (a = [x, 1]) and S_t = N ds^T ds, accumulates
them as the spec's iterate says, and steps with, for the layer's gradient G
(out x in, the bias as its last column) and the damped factors:

* length none:          d = (S + eps I)^-1 G (A + eps I)^-1            (F^-1 g)
* gradient_norm(p):     d = (S + eps I)^(-p/2) G (A + eps I)^(-p/2)    (F^(-p/2) g)
* eigen_sign:           d = Q_S [(l_S,i l_A,j)^(-1/2) sign((Q_S^T G Q_A)_ij)] Q_A^T,
                        l the eigenvalues of S + eps I and A + eps I, Q their eigenvectors;
                        an entry within rounding of 0 (where G has no component) has sign 0
* normalized:           d = F^-1 g / sqrt(g^T F^-1 g), g^T F^-1 g = sum over layers of
                        <G, (S + eps I)^-1 G (A + eps I)^-1>

``damping add(eps)`` is the README's "P + eps after the root", P = F^(e) the
preconditioner whose inverse takes the step, per factor as inside's is:
(S^e + eps I)^-1 G (A^e + eps I)^-1 (e = 1 for none, p/2 for gradient_norm).
Matrix powers come from scipy (``fractional_matrix_power``), inverses from numpy.

Iterate: ``ema(beta)`` from the identity; ``ema(beta) bias_corrected`` from zero,
divided by 1 - beta^n (n accumulations so far); ``sum(init)`` from init * I;
``ema_or_sum(beta)`` as ``ema(beta)`` for beta < 1 and, at beta = 1, the sum F <- F + F_t
from 0 with no bias correction (Distributed Shampoo's betas[1]);
``instant`` the last accumulated batch's factors. ``every k`` accumulates on steps
1, k+1, ... (``delayed``: k+1, 2k+1, ...; before the first, the plain gradient);
``structure kronecker every m`` recomputes the roots on steps 1, m+1, ...
"""
import copy

import numpy as np
import pytest
import torch
from scipy.linalg import fractional_matrix_power

import curvc
from curvc.explain import explain
from conftest import batches


def make_mlp(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(12, 8), torch.nn.Tanh(), torch.nn.Linear(8, 5))


@pytest.fixture(scope="module")
def data():
    """Dense Gaussian inputs: every batch's a a^T has full rank and distinct eigenvalues.

    (eigen_sign's Q sign(Q^T G Q) depends on the basis chosen inside a repeated
    eigenvalue; the digits' always-zero pixels would give A such a null space, which
    later batches' gradients reach.)
    """
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 12, generator=g)
    return x, (x[:, :5] + 0.5 * torch.randn(512, 5, generator=g)).argmax(dim=1)

SPEC = """# K-FAC on every axis
optimizer AxisKFAC
hyper lr = {lr}
curvature kfac
structure kronecker{roots_every}
iterate   {iterate}
length    {length}
damping   {damping}
"""


def _load(tmp_path, **spec):
    path = tmp_path / "axis_kfac.curv"
    path.write_text(SPEC.format(**spec))
    return curvc.load(path)


class Recorder:
    """Each Linear layer's last input and output gradient, by our own hooks."""

    def __init__(self, model):
        self.seen = {}
        self.layers = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
        for m in self.layers:
            m.register_forward_hook(self._forward)

    def _forward(self, module, args, out):
        x = args[0].detach()
        out.register_hook(lambda g: self.seen.__setitem__(module, (x, g.detach())))


def _power(m, e):
    return np.real(fractional_matrix_power(m, e))


def _floored(m, e, floor):
    """Q diag(1 / max(lambda^e, floor)) Q^T (a rounding-negative lambda counts as 0)."""
    w, q = np.linalg.eigh(m)
    return (q / np.maximum(np.maximum(w, 0.0) ** e, floor)) @ q.T


def _factor_step(G, S, A, *, length, power, inside, add, floor=0.0):
    """d of one layer, by the equations of the module docstring."""
    eye = lambda m: np.eye(len(m))  # noqa: E731
    S, A = S + inside * eye(S), A + inside * eye(A)
    if length == "eigen_sign":
        if add:  # P = F^(1/2) + eps I per factor: f(l) = 1 / (l^(1/2) + eps)
            # an eigenvalue below 0 by rounding is 0 (the pseudo-inverse rule)
            scale = lambda l: 1.0 / (np.sqrt(np.maximum(l, 0.0)) + add)  # noqa: E731
        else:
            scale = lambda l: l ** -0.5  # noqa: E731
        ls, qs = np.linalg.eigh(S)
        la, qa = np.linalg.eigh(A)
        c = qs.T @ G @ qa
        # G has no component along the null space of a a^T or ds ds^T: there c is
        # rounding, and its sign counts as 0 (|c_ij| <= (m + n) eps ||G||, orthonormal Q)
        zero = np.abs(c) <= sum(G.shape) * np.finfo(float).eps * np.linalg.norm(G)
        return qs @ (np.outer(scale(ls), scale(la)) * np.where(zero, 0.0, np.sign(c))) @ qa.T
    e = power / 2 if length == "gradient_norm" else 1.0
    if floor:
        return _floored(S, e, floor) @ G @ _floored(A, e, floor)
    if add:
        return (np.linalg.inv(_power(S, e) + add * eye(S)) @ G
                @ np.linalg.inv(_power(A, e) + add * eye(A)))
    return _power(S, -e) @ G @ _power(A, -e)


def _reference(model, data, steps, *, lr, length="none", power=1.0, inside=0.0, add=0.0, floor=0.0,
               iterate="ema", beta=0.95, init=0.0, bias_corrected=False, every=1,
               delayed=False, roots_every=1, decay=-0.8, last_lr=None):
    """The parameters after ``steps`` steps of theta <- theta - lr * d (``last_lr``: the
    last layer's, a second param group's)."""
    rec = Recorder(model)
    summed = iterate == "ema_or_sum" and beta == 1.0  # the sum from 0, never corrected
    bias_corrected = bias_corrected and not summed
    factors, count, ops = {}, 0, {}
    for t, (xb, yb) in enumerate(batches(data, steps, batch=64), start=1):
        model.zero_grad()
        torch.nn.functional.cross_entropy(model(xb.double()), yb).backward()
        if (t - 1) % every == 0 and not (delayed and t == 1):
            count += 1
            for m in rec.layers:
                x, ds = (v.numpy() for v in rec.seen[m])
                n = x.shape[0]
                a = np.concatenate([x, np.ones((n, 1))], axis=1)
                new = {"A": a.T @ a / n, "S": n * ds.T @ ds}
                if iterate == "power_ema":  # beta_t = 1 - t^decay, t the statistics steps
                    beta = 1 - count ** decay
                for key, f_t in new.items():
                    start = np.zeros_like(f_t) if bias_corrected or summed else np.eye(
                        len(f_t)) * (init if iterate == "sum" else 1.0)
                    old = factors.get((m, key), start)
                    ema = beta * old + (1 - beta) * f_t
                    factors[m, key] = {"instant": f_t, "sum": old + f_t, "ema": ema,
                                       "power_ema": ema,
                                       "ema_or_sum": old + f_t if summed else ema}[iterate]
        if not factors:  # no statistics yet: the plain gradient
            steps_of = {m: np.concatenate([m.weight.grad.numpy(), m.bias.grad.numpy()[:, None]],
                                          axis=1) for m in rec.layers}
        else:
            if (t - 1) % roots_every == 0 or not ops:
                correction = 1 - beta ** count if bias_corrected else 1.0
                ops = {m: (factors[m, "S"] / correction, factors[m, "A"] / correction)
                       for m in rec.layers}
            steps_of = {}
            for m in rec.layers:
                G = np.concatenate([m.weight.grad.numpy(), m.bias.grad.numpy()[:, None]], axis=1)
                S, A = ops[m]
                steps_of[m] = _factor_step(G, S, A, length=length, power=power, inside=inside,
                                           add=add, floor=floor)
            if length == "normalized":
                norm_sq = sum((np.concatenate([m.weight.grad.numpy(),
                                               m.bias.grad.numpy()[:, None]], axis=1)
                               * steps_of[m]).sum() for m in rec.layers)
                steps_of = {m: d / np.sqrt(norm_sq) for m, d in steps_of.items()}
        with torch.no_grad():
            for m, d in steps_of.items():
                rate = last_lr if last_lr is not None and m is rec.layers[-1] else lr
                m.weight -= rate * torch.from_numpy(d[:, :-1])
                m.bias -= rate * torch.from_numpy(d[:, -1])
    return [p.detach().clone() for p in model.parameters()]


def _ours(Opt, model, data, steps):
    opt = Opt(model)
    for xb, yb in batches(data, steps, batch=64):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(xb.double()), yb).backward()
        opt.step()
    return opt


# (spec clauses, the reference's settings): each with a non-default hyperparameter
CASES = {
    "gradient_norm(1)-shampoo-root": (
        dict(length="gradient_norm(power = 1)", damping="inside(0.01)", iterate="ema(0.9)"),
        dict(length="gradient_norm", power=1.0, inside=0.01, beta=0.9)),
    "gradient_norm(1.5)-add-sum": (
        dict(length="gradient_norm(power = 1.5)", damping="add(0.05)",
             iterate="sum(init = 0.5)"),
        dict(length="gradient_norm", power=1.5, add=0.05, iterate="sum", init=0.5)),
    "gradient_norm(0.5)-instant-every": (
        dict(length="gradient_norm(power = 0.5)", damping="inside(0.02)",
             iterate="instant every 2", roots_every=" every 3"),
        dict(length="gradient_norm", power=0.5, inside=0.02, iterate="instant", every=2,
             roots_every=3)),
    "eigen_sign-inside-instant": (
        dict(length="eigen_sign", damping="inside(0.02)", iterate="instant"),
        dict(length="eigen_sign", inside=0.02, iterate="instant")),
    "eigen_sign-add-bias_corrected": (
        dict(length="eigen_sign", damping="add(0.1)", iterate="ema(0.7) bias_corrected every 2",
             roots_every=" every 3"),
        dict(length="eigen_sign", add=0.1, beta=0.7, bias_corrected=True, every=2,
             roots_every=3)),
    "normalized-bias_corrected": (
        dict(length="normalized", damping="inside(0.01)", iterate="ema(0.8) bias_corrected"),
        dict(length="normalized", inside=0.01, beta=0.8, bias_corrected=True)),
    "gradient_norm(1)-floor-sum": (
        dict(length="gradient_norm(power = 1)", damping="floor(0.05)", iterate="sum(init = 0.5)"),
        dict(length="gradient_norm", power=1.0, floor=0.05, iterate="sum", init=0.5)),
    "normalized-sum-add": (
        dict(length="normalized", damping="add(0.03)", iterate="sum(init = 2)"),
        dict(length="normalized", add=0.03, iterate="sum", init=2.0)),
    "none-sum-delayed": (
        dict(length="none", damping="inside(0.03)", iterate="ema(0.9) every 2 delayed"),
        dict(inside=0.03, beta=0.9, every=2, delayed=True)),
    "gradient_norm(1)-power_ema-every": (
        dict(length="gradient_norm(power = 1)", damping="inside(0.02)",
             iterate="power_ema(-0.6) every 2"),
        dict(length="gradient_norm", power=1.0, inside=0.02, iterate="power_ema", decay=-0.6,
             every=2)),
    "none-add-instant": (
        dict(length="none", damping="add(0.05)", iterate="instant"),
        dict(add=0.05, iterate="instant")),
    "none-ema_or_sum-sum-every": (
        dict(length="none", damping="inside(0.05)",
             iterate="ema_or_sum(1.0) bias_corrected every 2"),
        dict(inside=0.05, iterate="ema_or_sum", beta=1.0, bias_corrected=True, every=2)),
    "gradient_norm(1)-ema_or_sum-ema": (
        dict(length="gradient_norm(power = 1)", damping="inside(0.02)",
             iterate="ema_or_sum(0.85)"),
        dict(length="gradient_norm", power=1.0, inside=0.02, iterate="ema_or_sum", beta=0.85)),
    "eigen_sign-ema_or_sum-bias_corrected": (
        dict(length="eigen_sign", damping="add(0.1)", iterate="ema_or_sum(0.7) bias_corrected"),
        dict(length="eigen_sign", add=0.1, iterate="ema_or_sum", beta=0.7,
             bias_corrected=True)),
}


@pytest.mark.parametrize("case", CASES)
def test_kfac_axis_matches_its_equation(case, data, tmp_path):
    spec, ref = CASES[case]
    lr = 0.05
    spec = {"roots_every": "", **spec}
    Opt = _load(tmp_path, lr=lr, **spec)
    model = make_mlp().double()
    expected = _reference(copy.deepcopy(model), data, 6, lr=lr, **ref)
    _ours(Opt, model, data, 6)
    for p, q in zip(model.parameters(), expected):
        torch.testing.assert_close(p.detach(), q, rtol=1e-7, atol=1e-10)


@pytest.mark.parametrize("beta", [1.0, 0.8])
def test_ema_or_sum_over_50_steps_and_two_groups(beta, data, tmp_path):
    """ema_or_sum(beta) bias_corrected, beta a hyperparameter: the sum at 1, the debiased
    EMA below; the last layer in a second param group with its own lr."""
    path = tmp_path / "ema_or_sum_kfac.curv"
    path.write_text("optimizer SummedKFAC\nhyper lr = 0.05, beta = 0.9\ncurvature kfac\n"
                    "structure kronecker\niterate ema_or_sum(beta) bias_corrected\n"
                    "length none\ndamping inside(0.05)\n")
    Opt = curvc.load(path)
    model = make_mlp().double()
    expected = _reference(copy.deepcopy(model), data, 50, lr=0.05, last_lr=0.03, inside=0.05,
                          iterate="ema_or_sum", beta=beta, bias_corrected=True)
    first, last = model[0], model[2]
    opt = Opt([{"params": list(first.parameters())},
               {"params": list(last.parameters()), "lr": 0.03}], beta=beta)
    opt.track(model)
    for xb, yb in batches(data, 50, batch=64):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(xb.double()), yb).backward()
        opt.step()
    for p, q in zip(model.parameters(), expected):
        torch.testing.assert_close(p.detach(), q, rtol=1e-6, atol=1e-9)
    state = opt.state[first.weight]
    assert ("kfac_count" in state) == (beta != 1.0)  # a sum counts nothing to correct


def test_gradient_norm_power_2_is_the_natural_gradient(data, tmp_path):
    """F^(-2/2) g = F^-1 g: K-FAC's own step, whichever way the root is taken."""
    runs = []
    for length in ("none", "gradient_norm(power = 2)"):
        Opt = _load(tmp_path, lr=0.05, roots_every="", iterate="ema(0.9)", length=length,
                    damping="inside(0.01)")
        model = make_mlp().double()
        _ours(Opt, model, data, 4)
        runs.append([p.detach() for p in model.parameters()])
    for p, q in zip(*runs):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-12)


def test_normalized_step_has_unit_fisher_norm(data, tmp_path):
    """One step of lr = 1 from theta: d^T F d = 1 with F the damped block-diagonal K-FAC
    (the defining property of the length, checked from the state's factors)."""
    Opt = _load(tmp_path, lr=1.0, roots_every="", iterate="instant", length="normalized",
                damping="inside(0.01)")
    model = make_mlp().double()
    before = [p.detach().clone() for p in model.parameters()]
    opt = _ours(Opt, model, data, 1)
    total = 0.0
    layers = [m for m in model if isinstance(m, torch.nn.Linear)]
    for i, m in enumerate(layers):
        w0, b0 = before[2 * i], before[2 * i + 1]
        d = torch.cat([w0 - m.weight, (b0 - m.bias)[:, None]], dim=1).detach().numpy()
        A = opt.state[m.weight]["kfac_A"].numpy() + 0.01 * np.eye(d.shape[1])
        S = opt.state[m.weight]["kfac_S"].numpy() + 0.01 * np.eye(d.shape[0])
        total += np.sum(d * (S @ d @ A))  # vec(d)^T (A kron S) vec(d)
    assert total == pytest.approx(1.0, rel=1e-9)


LENGTHS = ("none", "gradient_norm(power = 1)", "eigen_sign", "normalized")
DAMPINGS = ("none", "inside(0.01)", "add(0.01)", "floor(0.01)")
ITERATES = ("instant", "ema(0.9)", "ema(0.9) bias_corrected", "sum(init = 1)",
            "ema(0.9) every 2 delayed")


@pytest.mark.parametrize("length", LENGTHS)
@pytest.mark.parametrize("damping", DAMPINGS)
def test_every_kfac_combination_compiles_and_trains(length, damping, data, tmp_path):
    """Each length x damping, with an iterate per case (all of them over the grid):
    compiled, 5 steps with momentum on a small MLP, a finite loss (undamped factors
    of 64 rows are singular: the pseudo-inverse, whose steps need not descend)."""
    iterate = ITERATES[(LENGTHS.index(length) + DAMPINGS.index(damping)) % len(ITERATES)]
    path = tmp_path / "combo.curv"
    path.write_text(SPEC.format(lr=0.02, roots_every=" every 2", iterate=iterate, length=length,
                                damping=damping).replace("damping   none", "")
                    + "momentum  heavy_ball(0.5)\n")
    model = make_mlp()
    opt = curvc.load(path)(model)
    x, y = data[0][:64], data[1][:64]
    losses = []
    for _ in range(5):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert np.isfinite(losses).all(), (iterate, losses)
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.filterwarnings("ignore:divide by zero encountered in log2:RuntimeWarning")
def test_normalized_kfac_renders_alike_in_every_backend(data, tmp_path):
    """g^T F^-1 g is a reduction of the raw and the preconditioned gradient: the eager,
    foreach and Triton renderings of it take the same steps."""
    import os
    if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
        pytest.skip("CPU tensors need TRITON_INTERPRET=1")
    path = tmp_path / "normalized.curv"
    path.write_text(SPEC.format(lr=0.05, roots_every="", iterate="ema(0.9)",
                                length="normalized", damping="inside(0.01)")
                    + "momentum  heavy_ball(0.5)\n")
    runs = {}
    for name, backend, kw in (("eager", "torch", dict(foreach=False)),
                              ("foreach", "torch", dict(foreach=True)),
                              ("triton", "triton", {})):
        model = make_mlp()
        opt = curvc.load(path, backend=backend)(model, **kw)
        for xb, yb in batches(data, 3, batch=32):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(xb), yb).backward()
            opt.step()
        runs[name] = [p.detach() for p in model.parameters()]
    for name in ("foreach", "triton"):
        for p, q in zip(runs[name], runs["eager"]):
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_a_checkpoint_carries_the_bases_and_the_count(data, tmp_path):
    """eigen_sign's bases and bias correction's count resume bitwise from a state_dict."""
    Opt = _load(tmp_path, lr=0.05, roots_every=" every 2", length="eigen_sign",
                damping="inside(0.01)", iterate="ema(0.8) bias_corrected every 2")
    steps = list(batches(data, 8, batch=32))

    def run(model, opt, part):
        for xb, yb in part:
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(xb), yb).backward()
            opt.step()

    straight = make_mlp()
    run(straight, Opt(straight), steps)
    first = make_mlp()
    opt = Opt(first)
    run(first, opt, steps[:5])
    torch.save({"model": first.state_dict(), "opt": opt.state_dict()}, tmp_path / "ck.pt")
    ck = torch.load(tmp_path / "ck.pt")
    assert ck["opt"]["state"][0]["kfac_count"] == 3  # statistics on steps 1, 3, 5
    again = make_mlp(seed=5)
    again.load_state_dict(ck["model"])
    opt2 = Opt(again)
    opt2.load_state_dict(ck["opt"])
    run(again, opt2, steps[5:])
    for p, q in zip(again.parameters(), straight.parameters()):
        assert torch.equal(p, q)


def test_eigen_sign_takes_no_step_where_the_gradient_has_none(data, tmp_path):
    """Softmax output gradients sum to 0 over the classes, so 1 is an eigenvector of
    S + eps I (eigenvalue eps, the largest scale eps^-1/2) along which G is 0: the
    last layer's step has no component along 1 (each column of [dW db] sums to 0)."""
    Opt = _load(tmp_path, lr=1.0, roots_every="", length="eigen_sign",
                damping="inside(0.01)", iterate="instant")
    model = make_mlp().double()
    before = [p.detach().clone() for p in model.parameters()]
    _ours(Opt, model, data, 1)
    d = torch.cat([before[2] - model[2].weight, (before[3] - model[2].bias)[:, None]], dim=1)
    assert d.abs().max() > 0.1  # a step was taken
    torch.testing.assert_close(d.detach().sum(dim=0), torch.zeros(d.shape[1], dtype=d.dtype),
                               rtol=0, atol=1e-12)


def test_explain_shows_ema_or_sum_on_the_factors():
    text = explain(curvc.to_ir(SPEC.format(lr=0.05, roots_every="", length="none",
                                                 iterate="ema_or_sum(beta) bias_corrected",
                                                 damping="inside(0.05)").replace(
        "hyper lr = 0.05", "hyper lr = 0.05, beta = 0.9")))
    assert "A     = beta * A + (1 - beta) * A_t   (A = A + A_t when beta = 1, A_0 = 0)" \
        in text, text
    assert "A     = A / (1 - beta^n)" in text, text
    assert "(no correction at beta = 1, a sum)" in text, text
