"""SOAP (``structure kronecker(basis = eigen)``) against pytorch_optimizer.SOAP, and the
eigenbasis rotation's hybrids against their equations written out here.

The reference's QR refresh runs in float32 whatever the dtype (its comment says why); the
spec's stage does the same, so the float64 runs agree to rounding, not to float32's.
"""
from __future__ import annotations

import pytest
import torch

import curvc

STEPS = 50
TOL = 1e-6


def _soap():
    return pytest.importorskip("pytorch_optimizer").SOAP


def _params(shapes, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(*s, generator=gen, dtype=torch.float64))
            for s in shapes]


def _grads(shapes, steps, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(*s, generator=gen, dtype=torch.float64) for s in shapes]
            for _ in range(steps)]


def _make(cls, params, kw, g2):
    half = len(params) // 2
    return cls([{"params": params[:half]}, {"params": params[half:], **g2}], **kw)


def _step(opt, params, grads):
    for p, g in zip(params, grads):
        p.grad = g.clone()
    opt.step()


def _relative(a, b):
    return ((a - b).norm() / b.norm().clamp(min=1e-300)).item()


# (shapes, constructor kwargs, group 2 overrides): non-default hyperparameters, the basis
# refreshed every 3 steps (so reused in between), group 2 changing lr and one more
SHAPES = [(5, 4), (3,), (4, 3, 2), (6, 3), (7,), (2, 5)]
CASES = {
    # shampoo_beta None (the default): betas[1]
    "default-options": (SHAPES, dict(lr=1e-2, betas=(0.9, 0.97),
                                     weight_decay=0.05, precondition_frequency=3, eps=1e-6),
                        dict(lr=3e-3, eps=1e-4)),
    "precondition_1d-normalize": (SHAPES, dict(lr=1e-2, betas=(0.85, 0.9), shampoo_beta=0.8,
                                               weight_decay=0.02, precondition_frequency=4,
                                               precondition_1d=True, normalize_gradient=True),
                                  dict(lr=5e-3, correct_bias=False)),
    # a mode above max_precondition_dim keeps no factor (identity basis along it)
    "max_dim": (SHAPES, dict(lr=1e-2, betas=(0.9, 0.95), shampoo_beta=0.9,
                             precondition_frequency=2, max_precondition_dim=5),
                dict(lr=2e-3, weight_decay=0.0)),
    # merge_dims: (4, 3, 2) -> (4, 6) and (2, 3, 5) -> (6, 5); the reference cannot merge a
    # tensor into one mode (its reshape fails), so every tensor here keeps two
    "merge_dims": ([(4, 3, 2), (5, 4), (2, 3, 5), (6, 3)],
                   dict(lr=1e-2, betas=(0.9, 0.95), shampoo_beta=0.85, precondition_frequency=3,
                        max_precondition_dim=6, merge_dims=True),
                   dict(lr=4e-3, shampoo_beta=0.7)),
    # channels_last: a 4-D tensor's NHWC dims merged as NCHW, (2, 3, 4, 5) -> (10, 3, 4)
    "merge_dims-channels_last": ([(2, 3, 4, 5), (5, 4), (3, 2, 2, 4), (6, 3)],
                                 dict(lr=1e-2, betas=(0.9, 0.95), shampoo_beta=0.85,
                                      precondition_frequency=3, max_precondition_dim=10,
                                      merge_dims=True, data_format="channels_last"),
                                 dict(lr=4e-3, weight_decay=0.1)),
}


@pytest.mark.parametrize("case", CASES)
def test_soap_matches_pytorch_optimizer_in_float64(case):
    shapes, kw, g2 = CASES[case]
    ours_p, ref_p = _params(shapes), _params(shapes)
    ours = _make(curvc.load("soap", backend="torch"), ours_p, kw, g2)
    ref = _make(_soap(), ref_p, kw, g2)
    worst = 0.0
    for t, grads in enumerate(_grads(shapes, STEPS)):
        _step(ours, ours_p, grads)
        _step(ref, ref_p, grads)
        for a, b in zip(ours_p, ref_p):
            err = _relative(a.detach(), b.detach())
            worst = max(worst, err)
            assert err <= TOL, (t + 1, tuple(a.shape), err)
    # the parameters moved: a step of 0 everywhere would agree too
    assert all(_relative(p.detach(), q) > 1e-3 for p, q in zip(ours_p, _params(shapes)))


def test_soap_matches_pytorch_optimizer_in_float32():
    """Both compute in float32 (the reference's dtype is the parameter's): 1e-5."""
    shapes, kw, g2 = CASES["default-options"]
    ours_p = [torch.nn.Parameter(p.detach().float()) for p in _params(shapes)]
    ref_p = [torch.nn.Parameter(p.detach().float()) for p in _params(shapes)]
    ours = _make(curvc.load("soap"), ours_p, kw, g2)
    ref = _make(_soap(), ref_p, kw, g2)
    for t, grads in enumerate(_grads(shapes, STEPS)):
        grads = [g.float() for g in grads]
        _step(ours, ours_p, grads)
        _step(ref, ref_p, grads)
        for a, b in zip(ours_p, ref_p):
            assert _relative(a.detach(), b.detach()) <= 1e-5, (t + 1, tuple(a.shape))


def test_soap_state_dict_round_trip_is_bitwise():
    shapes, kw, g2 = CASES["default-options"]
    cls = curvc.load("soap", backend="torch")
    grads = _grads(shapes, 20, seed=2)
    straight = _params(shapes)
    opt = _make(cls, straight, kw, g2)
    for g in grads:
        _step(opt, straight, g)
    first = _params(shapes)
    opt = _make(cls, first, kw, g2)
    for g in grads[:10]:
        _step(opt, first, g)
    saved = opt.state_dict()
    resumed = [torch.nn.Parameter(p.detach().clone()) for p in first]
    fresh = _make(cls, resumed, kw, g2)
    fresh.load_state_dict(saved)
    for g in grads[10:]:
        _step(fresh, resumed, g)
    for a, b in zip(resumed, straight):
        assert torch.equal(a, b)


def test_soap_takes_the_reference_constructor_arguments_and_defaults():
    import inspect
    ours = inspect.signature(curvc.load("soap", backend="torch")).parameters
    ref = inspect.signature(_soap()).parameters
    for name, p in ref.items():
        if name in ("self", "kwargs"):
            continue
        assert name in ours, name
        assert ours[name].default == p.default, name


# --- the hybrids, against the equations written out here ----------------------------------
#
# Per tensor (a vector as an n x 1 matrix, whose 1 x 1 factor's basis is +-1): G' = Q_L^T G
# Q_R, V accumulated from G'^2 from the second step on, D' = rotate(M) / P(V), d = Q_L D'
# Q_R^T, then L, R <- EMA with G G^T, G^T G and, every k steps after the first, a new basis;
# the first step only gathers L, R and takes their eigenvectors. A basis is unique up to the
# signs of its columns, and every pipeline here is invariant to those, so the shapes keep
# every factor's null space at most 1-dimensional on the first step.

HYBRID_SHAPES = [(4, 3), (2,), (3, 4), (3, 3)]


def _desc_eigenvectors(a):
    return torch.linalg.eigh(a)[1].flip(1)


def _power_qr(f, q, v, axis):
    p = f @ q
    order = torch.argsort((q * p).sum(0), descending=True)
    new = torch.linalg.qr(p[:, order].to(torch.float32))[0].to(f.dtype)
    return new, v.index_select(axis, order)


class _Reference:
    """The rotation around a diagonal pipeline: ``pipeline(V, c, t) -> V`` accumulates,
    ``divide(M', V, t) -> D'``; ``refresh`` is 'eigh' or 'power_qr'."""

    def __init__(self, factor_beta, every, refresh, accumulate, divide):
        self.fb, self.every, self.refresh = factor_beta, every, refresh
        self.accumulate, self.divide, self.state = accumulate, divide, {}

    def direction(self, key, g, m, t):
        G, M = (g.reshape(-1, 1), m.reshape(-1, 1)) if g.dim() == 1 else (g, m)
        s = self.state.setdefault(key, {"L": torch.zeros(G.shape[0], G.shape[0],
                                                         dtype=G.dtype),
                                        "R": torch.zeros(G.shape[1], G.shape[1],
                                                         dtype=G.dtype)})
        if t == 1:
            d = torch.zeros_like(G)
            s["V"] = torch.zeros_like(G)
        else:
            ql, qr = s["QL"], s["QR"]
            s["V"] = self.accumulate(s["V"], (ql.T @ G @ qr) ** 2)
            d = ql @ self.divide(ql.T @ M @ qr, s["V"], t) @ qr.T
        s["L"] = self.fb * s["L"] + (1 - self.fb) * (G @ G.T)
        s["R"] = self.fb * s["R"] + (1 - self.fb) * (G.T @ G)
        if t == 1 or self.refresh == "eigh" and (t - 1) % self.every == 0:
            s["QL"], s["QR"] = _desc_eigenvectors(s["L"]), _desc_eigenvectors(s["R"])
        elif (t - 1) % self.every == 0:
            s["QL"], s["V"] = _power_qr(s["L"], s["QL"], s["V"], 0)
            s["QR"], s["V"] = _power_qr(s["R"], s["QR"], s["V"], 1)
        return d.reshape(g.shape)


def _ekfac_like(groups, grads_seq, kw, g2):
    """Decoupled decay, the bias-corrected momentum m-hat rotated, divided by
    V / (1 - stat_decay^(t-1)) + damping."""
    out = []
    for gi, params in enumerate(groups):
        h = {**kw, **(g2 if gi else {})}
        ref_g = _Reference(h["factor_decay"], h["refresh_every"], "power_qr",
                           lambda v, c, h=h: h["stat_decay"] * v + (1 - h["stat_decay"]) * c,
                           lambda mp, v, t, h=h: mp / (v / (1 - h["stat_decay"] ** (t - 1))
                                                       + h["damping"]))
        ms = [torch.zeros_like(p) for p in params]
        traj = []
        ps = [p.clone() for p in params]
        for t, grads in enumerate(grads_seq[gi], start=1):
            for i, (p, g) in enumerate(zip(ps, grads)):
                ms[i] = h["momentum"] * ms[i] + (1 - h["momentum"]) * g
                mhat = ms[i] / (1 - h["momentum"] ** t)
                d = ref_g.direction(i, g, mhat, t)
                ps[i] = p * (1 - h["lr"] * h["weight_decay"]) - h["lr"] * d
            traj.append([p.clone() for p in ps])
        out.append(traj)
    return out


def _eigen_adagrad(groups, grads_seq, kw, g2):
    """Coupled decay, the gradient rotated, divided by sqrt(V) + eps, V summed."""
    out = []
    for gi, params in enumerate(groups):
        h = {**kw, **(g2 if gi else {})}
        ref = _Reference(h["factor_beta"], h["refresh_every"], "eigh",
                         lambda v, c: v + c, lambda gp, v, t, h=h: gp / (v.sqrt() + h["eps"]))
        ps = [p.clone() for p in params]
        traj = []
        for t, grads in enumerate(grads_seq[gi], start=1):
            for i, (p, g) in enumerate(zip(ps, grads)):
                g = g + h["weight_decay"] * p
                ps[i] = p - h["lr"] * ref.direction(i, g, g, t)
            traj.append([p.clone() for p in ps])
        out.append(traj)
    return out


HYBRIDS = {
    "hybrids/ekfac_like": (_ekfac_like,
                           dict(lr=2e-2, momentum=0.8, stat_decay=0.9, factor_decay=0.85,
                                damping=1e-2, refresh_every=3, weight_decay=0.05),
                           dict(lr=1e-2, damping=3e-2)),
    "hybrids/eigen_adagrad": (_eigen_adagrad,
                              dict(lr=3e-2, eps=1e-6, factor_beta=0.9, refresh_every=4,
                                   weight_decay=0.01),
                              dict(lr=1e-2, factor_beta=0.8)),
}


@pytest.mark.parametrize("name", HYBRIDS)
def test_hybrid_matches_its_equations_in_float64(name):
    equations, kw, g2 = HYBRIDS[name]
    ours_p = _params(HYBRID_SHAPES)
    start = [p.detach().clone() for p in ours_p]
    half = len(ours_p) // 2
    ours = _make(curvc.load(name, backend="torch"), ours_p, kw, g2)
    grads = _grads(HYBRID_SHAPES, STEPS)
    traj = [[] for _ in range(STEPS)]
    for t, g in enumerate(grads):
        _step(ours, ours_p, g)
        traj[t] = [p.detach().clone() for p in ours_p]
    expected = equations([start[:half], start[half:]],
                         [[g[:half] for g in grads], [g[half:] for g in grads]], kw, g2)
    for t in range(STEPS):
        want = expected[0][t] + expected[1][t]
        for a, b in zip(traj[t], want):
            assert _relative(a, b) <= TOL, (name, t + 1, tuple(a.shape), _relative(a, b))
    assert all(_relative(p.detach(), q) > 1e-3 for p, q in zip(ours_p, start))
