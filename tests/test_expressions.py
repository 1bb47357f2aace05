"""The expression language (let, state, CLAUSE = EXPR, update = EXPR): shipped specs
written with it match their references step for step, and its semantics (a state's
stored vs new value, host conditions, a named statistic for Kronecker factors) are
the ones the README states, checked against equations written out here."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

import curvc
from curvc import compiler

TORCH_REFERENCES = {
    # name: (reference class, constructor keywords, the second group's overrides)
    "adamax": (torch.optim.Adamax, dict(lr=3e-3, betas=(0.8, 0.99), eps=1e-6,
                                        weight_decay=0.01), dict(lr=1e-2, weight_decay=0.0)),
    "rmsprop": (torch.optim.RMSprop, dict(lr=3e-3, alpha=0.9, eps=1e-6, weight_decay=0.01,
                                          momentum=0.5, centered=True),
                dict(lr=1e-2, momentum=0.0, centered=False)),
    "adadelta": (torch.optim.Adadelta, dict(lr=0.5, rho=0.8, eps=1e-5, weight_decay=0.01),
                 dict(lr=0.9, rho=0.95)),
    "radam": (torch.optim.RAdam, dict(lr=3e-3, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.01,
                                      decoupled_weight_decay=True),
              dict(lr=1e-2, decoupled_weight_decay=False)),
}


def _reference(name):
    if name == "lion":
        lion_pytorch = pytest.importorskip("lion_pytorch")
        return (lion_pytorch.Lion, dict(lr=1e-3, betas=(0.8, 0.95), weight_decay=0.1),
                dict(lr=3e-3, weight_decay=0.0))
    if name == "lamb":
        from pytorch_optimizer import Lamb
        return (Lamb, dict(lr=3e-3, betas=(0.8, 0.99), weight_decay=0.01, eps=1e-5),
                dict(lr=1e-2, grad_averaging=False))
    return TORCH_REFERENCES[name]


def _params(dtype=torch.float64):
    torch.manual_seed(0)
    return [torch.nn.Parameter(torch.randn(5, 3, dtype=dtype)),
            torch.nn.Parameter(torch.randn(4, dtype=dtype)),
            torch.nn.Parameter(torch.zeros(2, dtype=dtype))]  # a zero norm (LAMB's trust = 1)


def _train(cls, kw, second, steps=50, dtype=torch.float64, params=None, opt=None, seed=1):
    ps = params if params is not None else _params(dtype)
    opt = opt or cls([{"params": [ps[0]]}, {"params": ps[1:], **second}], **kw)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for p in ps:
            p.grad = torch.randn(p.shape, generator=g, dtype=p.dtype)
        opt.step()
    return ps, opt


def _rel(a, b):
    return max(((x - y).abs().max() / y.abs().max().clamp(min=1e-30)).item()
               for x, y in zip(a, b))


@pytest.mark.parametrize("name", ["lion", "lamb", *TORCH_REFERENCES])
def test_spec_matches_its_reference_for_50_steps(name):
    ref, kw, second = _reference(name)
    expected, _ = _train(ref, kw, second)
    got, _ = _train(curvc.load(name, backend="torch"), kw, second)
    assert _rel(got, expected) <= 1e-6


@pytest.mark.parametrize("name", ["lion", "lamb", *TORCH_REFERENCES])
def test_spec_matches_its_reference_in_float32(name):
    ref, kw, second = _reference(name)
    expected, _ = _train(ref, kw, second, dtype=torch.float32)
    got, _ = _train(curvc.load(name, backend="torch"), kw, second, dtype=torch.float32)
    assert _rel(got, expected) <= 1e-5


@pytest.mark.parametrize("name", ["lion", "lamb", *TORCH_REFERENCES])
def test_state_dict_round_trip_is_bitwise(name):
    _, kw, second = _reference(name)
    cls = curvc.load(name, backend="torch")
    straight, _ = _train(cls, kw, second, steps=20)
    first, opt = _train(cls, kw, second, steps=10)
    saved = opt.state_dict()
    copy = [torch.nn.Parameter(p.detach().clone()) for p in first]
    fresh = cls([{"params": [copy[0]]}, {"params": copy[1:], **second}], **kw)
    fresh.load_state_dict(saved)
    # the same gradients as steps 11..20 of the straight run
    g = torch.Generator().manual_seed(1)
    for _ in range(10):
        for p in copy:
            torch.randn(p.shape, generator=g, dtype=p.dtype)
    for _ in range(10):
        for p in copy:
            p.grad = torch.randn(p.shape, generator=g, dtype=p.dtype)
        fresh.step()
    assert all(torch.equal(a, b) for a, b in zip(copy, straight))


def _spec(body: str, hyper: str = "lr = 0.1"):
    return compiler._load_cached(f"optimizer Probe\nhyper {hyper}\n{body}\n", "probe.curv",
                                 "torch")


def test_a_state_is_its_new_value_outside_its_definition_and_old_reads_the_stored_one():
    # m_t = 0.5 m_{t-1} + g_t; d = m_t + 10 old(m) = m_t + 10 m_{t-1}
    cls = _spec("state m = 0.5 * m + grad\nmomentum = m + 10 * old(m)\n"
                "curvature constant\nstructure scalar\nlength none")
    w = torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))
    opt = cls([w], lr=1.0)
    grads = [torch.tensor([1.0, 2.0]), torch.tensor([3.0, -1.0]), torch.tensor([0.5, 0.5])]
    m_prev, theta = torch.zeros(2, dtype=torch.float64), torch.zeros(2, dtype=torch.float64)
    for g in grads:
        w.grad = g.double()
        opt.step()
        m = 0.5 * m_prev + g.double()
        theta = theta - (m + 10 * m_prev)
        m_prev = m
        assert torch.allclose(w.detach(), theta, rtol=0, atol=1e-12)
        assert torch.allclose(opt.state[w]["m"], m, rtol=0, atol=1e-12)


def test_a_state_may_read_the_direction_and_starts_from_init():
    # u starts at 2; d = g / u_old; u = u_old + d*d
    cls = _spec("state u = u + direction^2 init 2\nmomentum = grad / old(u)\n"
                "curvature constant\nstructure scalar\nlength none")
    w = torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))
    opt = cls([w], lr=1.0)
    u, theta = 2.0, 0.0
    for g in (1.0, -3.0, 2.0):
        w.grad = torch.tensor([g], dtype=torch.float64)
        opt.step()
        d = g / u
        u, theta = u + d * d, theta - d
        assert w.item() == pytest.approx(theta, rel=1e-14)


def test_an_if_on_a_host_comparison_switches_with_the_step_count():
    # d = g on steps 1-2, 3g after: the condition is host arithmetic, decided per step
    cls = _spec("momentum = if(step > 2, 3 * grad, grad)\ncurvature constant\n"
                "structure scalar\nlength none")
    w = torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))
    opt = cls([w], lr=1.0)
    for t, expected in enumerate((-1.0, -2.0, -5.0, -8.0), 1):
        w.grad = torch.ones(1, dtype=torch.float64)
        opt.step()
        assert w.item() == expected, t


def test_of_names_the_vector_whose_gram_matrices_are_the_kronecker_factors():
    # Kronecker, instant, gradient_norm: d = (M M^T)^-1/4 M (M^T M)^-1/4 = U V^T, the polar
    # factor of the momentum M (Muon's orthogonalized step), not of the gradient
    cls = _spec("state buf = lerp(buf, grad, 1 - beta)\ncurvature empirical_fisher(of = buf)\n"
                "structure kronecker\niterate instant\nmomentum = buf\nlength gradient_norm",
                hyper="lr = 0.1, beta = 0.9")
    torch.manual_seed(3)
    w = torch.nn.Parameter(torch.zeros(4, 3, dtype=torch.float64))
    opt = cls([w], lr=0.1, beta=0.9)
    buf, theta = torch.zeros(4, 3, dtype=torch.float64), torch.zeros(4, 3, dtype=torch.float64)
    for _ in range(3):
        g = torch.randn(4, 3, dtype=torch.float64)
        w.grad = g.clone()
        opt.step()
        buf = 0.9 * buf + 0.1 * g
        u, _, vh = torch.linalg.svd(buf, full_matrices=False)
        theta = theta - 0.1 * (u @ vh)
        assert torch.allclose(w.detach(), theta, atol=1e-9, rtol=0)


def test_adabelief_style_curvature_of_a_difference():
    # c = (g - m)^2 through the iterate axis: v = 0.9 v + 0.1 c, d = m / (sqrt(v) + eps)
    cls = _spec("state m = lerp(m, grad, 0.5)\nlet belief = grad - m\n"
                "curvature empirical_fisher(of = belief)\nstructure diagonal\n"
                "iterate ema(0.9)\nmomentum = m\nlength gradient_norm\ndamping add(1e-3)")
    w = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))
    opt = cls([w], lr=1.0)
    m = v = theta = torch.zeros(3, dtype=torch.float64)
    g_gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        g = torch.randn(3, generator=g_gen, dtype=torch.float64)
        w.grad = g.clone()
        opt.step()
        m = m + 0.5 * (g - m)
        v = 0.9 * v + 0.1 * (g - m) ** 2
        theta = theta - m / (v.sqrt() + 1e-3)
        assert torch.allclose(w.detach(), theta, rtol=1e-12, atol=0)


EXP_LOG_SPEC = str(Path(__file__).parent / "specs" / "exp_log_step.curv")


@pytest.mark.parametrize("path", ["per-tensor", "foreach", "fused"])
def test_exp_and_log_elementwise_and_on_the_host_follow_torch_exp_and_log(path):
    # tests/specs/exp_log_step.curv, written out: w_t = exp(log(beta) t / tau) on the host,
    # m_t = lerp(m, g, 1 - w_t), n = log(1 + exp(m_t)) - log(2) elementwise,
    # v_t = 0.99 v + 0.01 g^2, theta -= lr n / (sqrt(v_t / (1 - 0.99^t)) + eps)
    cls = curvc.load(EXP_LOG_SPEC, backend="torch")
    lr, beta, eps, tau = 0.05, 0.8, 1e-6, 7.0
    gen = torch.Generator().manual_seed(3)
    shapes = [(5, 3), (4,), (3,)]
    ws = [torch.nn.Parameter(torch.randn(s, generator=gen, dtype=torch.float64)) for s in shapes]
    theta = [w.detach().clone() for w in ws]
    m = [torch.zeros(s, dtype=torch.float64) for s in shapes]
    v = [torch.zeros(s, dtype=torch.float64) for s in shapes]
    kw = dict(lr=lr, beta=beta, eps=eps, tau=tau)
    kw.update(foreach=path == "foreach", fused=path == "fused")
    opt = cls(ws, **kw)
    for t in range(1, 13):
        warm = torch.exp(torch.log(torch.tensor(beta, dtype=torch.float64)) * t / tau)
        for i, w in enumerate(ws):
            g = torch.randn(shapes[i], generator=gen, dtype=torch.float64)
            w.grad = g.clone()
            m[i] = m[i] + (1 - warm) * (g - m[i])
            n = torch.log(1 + torch.exp(m[i])) - torch.log(torch.tensor(2.0, dtype=torch.float64))
            v[i] = 0.99 * v[i] + 0.01 * g * g
            theta[i] = theta[i] - lr * n / (torch.sqrt(v[i] / (1 - 0.99 ** t)) + eps)
        opt.step()
        for i, w in enumerate(ws):
            err = ((w.detach() - theta[i]).abs().max() / theta[i].abs().max()).item()
            assert err <= 1e-12, f"step {t}, parameter {i}: relative error {err:.3g}"
            assert torch.allclose(opt.state[w]["m"], m[i], rtol=1e-12, atol=0)
    # the parameters moved from their start: a step that did nothing could not pass
    assert (ws[0].detach() - torch.randn(shapes[0], generator=torch.Generator().manual_seed(3),
                                         dtype=torch.float64)).abs().max() > 1e-3


def test_an_optional_hyperparameter_defaults_to_none_and_given_picks_the_branch():
    # hyper warmup = none: d = g * min(t / warmup, 1) when warmup is given, else d = g
    cls = _spec("momentum = if(given(warmup), grad * min(step / warmup, 1), grad)\n"
                "curvature constant\nstructure scalar\nlength none",
                hyper="lr = 1.0, warmup = none")
    import inspect
    assert inspect.signature(cls).parameters["warmup"].default is None
    for warmup, expected in ((None, (-1.0, -2.0, -3.0, -4.0)), (2.0, (-0.5, -1.5, -2.5, -3.5))):
        w = torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))
        opt = cls([w], warmup=warmup)
        for t, value in enumerate(expected, 1):
            w.grad = torch.ones(1, dtype=torch.float64)
            opt.step()
            assert w.item() == value, (warmup, t)
    with pytest.raises(ValueError, match="warmup"):
        cls([w], warmup=float("inf"))


def test_a_host_if_on_given_computes_only_the_branch_taken():
    # the other branch, log(lr - lr) = log(0), raises on the host if it is ever computed
    cls = _spec("let scale = if(given(warmup), warmup, log(lr - lr))\n"
                "momentum = grad * scale\ncurvature constant\nstructure scalar\nlength none",
                hyper="lr = 1.0, warmup = none")
    w = torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))
    opt = cls([w], warmup=3.0)
    for t in (1, 2):
        w.grad = torch.ones(1, dtype=torch.float64)
        opt.step()
        assert w.item() == -3.0 * t
    opt = cls([w], warmup=None)  # now the branch taken is log(0)
    w.grad = torch.ones(1, dtype=torch.float64)
    with pytest.raises(ValueError, match="math domain error"):
        opt.step()
