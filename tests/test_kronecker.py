"""Kronecker-structured curvature (Shampoo and hybrids) against references nobody here wrote.

* ``pytorch_optimizer.Shampoo`` (the Shampoo of Gupta et al., 2018, as that
  package implements it), in float64 so both sides are exact to rounding;
* in float32, ours is as close to the float64 reference as the float32
  reference itself is (the roots of near-singular factors amplify
  rounding, so two float32 implementations legitimately drift apart);
* the paper's equations written out below with numpy and scipy's
  ``fractional_matrix_power``, for what pytorch_optimizer does not cover
  (roots every k steps, EMA factors, damping, length none, max_dim).
"""
import copy

import numpy as np
import pytest
import torch

import curvc
from conftest import batches, make_mlp, max_relative_error, train, two_groups

scipy_linalg = pytest.importorskip("scipy.linalg")
STEPS = 60


def _po_shampoo():
    return pytest.importorskip("pytorch_optimizer").Shampoo


def _spec(tmp_path, body: str, name="Hybrid"):
    path = tmp_path / f"{name.lower()}.curv"
    path.write_text(f"optimizer {name}\n{body}")
    return curvc.load(str(path), backend="torch")


# --- against pytorch_optimizer.Shampoo -------------------------------------

@pytest.mark.parametrize("g1, g2", [
    (dict(lr=0.05), dict(lr=0.02, weight_decay=1e-2)),
    (dict(lr=0.02, matrix_eps=1e-4), dict(lr=0.01)),
])
def test_shampoo_matches_pytorch_optimizer_in_float64(digits, g1, g2):
    Ref, Ours = _po_shampoo(), curvc.load("shampoo")
    ref_model = make_mlp().double()
    our_model = copy.deepcopy(ref_model)
    data = (digits[0].double(), digits[1])
    ref_losses = train(ref_model, Ref(two_groups(ref_model, g1, g2)), data, STEPS)
    our_losses = train(our_model, Ours(two_groups(our_model, g1, g2)), data, STEPS)
    assert max_relative_error(ref_model, our_model) <= 1e-9
    assert our_losses == pytest.approx(ref_losses, rel=1e-9)
    assert our_losses[-1] < our_losses[0]  # it trains, not only matches


def test_shampoo_in_float32_is_as_close_to_the_exact_reference_as_the_reference_is(digits):
    Ref, Ours = _po_shampoo(), curvc.load("shampoo")
    g1, g2 = dict(lr=0.05), dict(lr=0.02)
    exact = make_mlp().double()
    ref32, ours32 = make_mlp(), make_mlp()
    train(exact, Ref(two_groups(exact, g1, g2)), (digits[0].double(), digits[1]), STEPS)
    train(ref32, Ref(two_groups(ref32, g1, g2)), digits, STEPS)
    train(ours32, Ours(two_groups(ours32, g1, g2)), digits, STEPS)
    ref_drift = max_relative_error(exact.float(), ref32)
    our_drift = max_relative_error(exact.float(), ours32)
    assert our_drift <= 2 * ref_drift + 1e-6, (our_drift, ref_drift)


def test_shampoo_matches_pytorch_optimizer_on_tensors_of_every_order():
    """0-d (no factor), 1-d (one factor, root -1/2), 2-d and 4-d (root -1/8 per mode)."""
    Ref, Ours = _po_shampoo(), curvc.load("shampoo")
    torch.manual_seed(1)
    shapes = [(), (5,), (4, 6), (3, 2, 2, 3)]
    targets = [torch.randn(s, dtype=torch.float64) for s in shapes]
    start = [torch.randn(s, dtype=torch.float64) for s in shapes]
    ref = [t.clone().requires_grad_() for t in start]
    ours = [t.clone().requires_grad_() for t in start]
    opts = [Ref(ref, lr=0.1, weight_decay=0.01), Ours(ours, lr=0.1, weight_decay=0.01)]
    for _ in range(20):
        for params, opt in zip((ref, ours), opts):
            opt.zero_grad()
            sum(((p - t) ** 4).sum() for p, t in zip(params, targets)).backward()
            opt.step()
    for r, o in zip(ref, ours):
        torch.testing.assert_close(o, r, rtol=1e-9, atol=1e-12)


# --- against the equations, written out ------------------------------------

def _reference_step(state, theta, g, *, lr, every, step, root, eps_inside=0.0, eps_after=0.0,
                    beta=None, init=0.0, max_dim=None, per_mode=True):
    """One Kronecker-preconditioned step in numpy: L_i accumulates G_(i) G_(i)^T,
    R_i = ((L_i + eps_inside I)^(root/k) + eps_after I)^-1, refreshed on steps 1, 1+every, ...,
    d = G x_1 R_1 x_2 ... x_k R_k."""
    k = g.ndim
    d = g.copy()
    for i, n in enumerate(g.shape):
        if max_dim is not None and n > max_dim:
            continue
        unfolded = np.moveaxis(g, i, 0).reshape(n, -1)
        L = state.setdefault(("L", i), init * np.eye(n))
        gram = unfolded @ unfolded.T
        state[("L", i)] = L + gram if beta is None else beta * L + (1 - beta) * gram
        if (step - 1) % every == 0:
            e = root / k if per_mode else root
            state[("R", i)] = np.linalg.inv(np.real(scipy_linalg.fractional_matrix_power(
                state[("L", i)] + eps_inside * np.eye(n), e)) + eps_after * np.eye(n))
        moved = np.moveaxis(d, i, 0)
        d = np.moveaxis(np.tensordot(state[("R", i)], moved, axes=1), 0, i)
    return theta - lr * d


def _run_both(opt_cls, kw, ref_kw, shapes, steps=12, seed=0):
    rng = np.random.default_rng(seed)
    targets = [rng.standard_normal(s) for s in shapes]
    thetas = [rng.standard_normal(s) for s in shapes]
    params = [torch.tensor(t, requires_grad=True) for t in thetas]
    opt = opt_cls(params, **kw)
    states = [{} for _ in shapes]
    for step in range(1, steps + 1):
        grads = [t - c for t, c in zip(thetas, targets)]
        thetas = [_reference_step(s, t, g, step=step, **ref_kw)
                  for s, t, g in zip(states, thetas, grads)]
        opt.zero_grad()
        sum(0.5 * ((p - torch.tensor(c)) ** 2).sum() for p, c in zip(params, targets)).backward()
        opt.step()
    return [(p.detach().numpy(), t) for p, t in zip(params, thetas)]


def _all_close(pairs) -> bool:
    """Ours against the reference equations, parameter by parameter."""
    return all(np.allclose(ours, ref, rtol=1e-8, atol=1e-10) for ours, ref in pairs)


def test_shampoo_roots_refreshed_every_k_steps_match_the_equations():
    Ours = curvc.load("shampoo")
    assert _all_close(_run_both(Ours, dict(lr=0.05, update_freq=3, matrix_eps=1e-3),
                                dict(lr=0.05, every=3, root=0.5, init=1e-3), [(4, 6), (5,)]))


def test_ema_factors_with_damping_inside_and_length_none_match_the_equations(tmp_path):
    """A hybrid no library ships: natural-gradient-style (L kron R + eps)^-1 from EMA factors."""
    Ours = _spec(tmp_path, "hyper lr = 0.05, beta = 0.9, eps = 0.1, k = 2\n"
                           "curvature empirical_fisher\nstructure kronecker every k\n"
                           "iterate ema(beta)\nlength none\ndamping inside(eps)\n")
    assert _all_close(_run_both(Ours, {}, dict(lr=0.05, every=2, root=1.0, eps_inside=0.1,
                                               beta=0.9), [(3, 5), (2, 2, 3)]))


def test_damping_after_the_root_and_max_dim_match_the_equations(tmp_path):
    """``damping add`` adds eps I to each factor's root before it is inverted (P + eps after
    the root, as for every structure); modes longer than max_dim keep no factor."""
    Ours = _spec(tmp_path, "hyper lr = 0.02, eps = 0.5\n"
                           "curvature empirical_fisher\nstructure kronecker(max_dim = 5)\n"
                           "iterate sum(init = 0.01)\nlength gradient_norm\ndamping add(eps)\n")
    assert _all_close(_run_both(Ours, {}, dict(lr=0.02, every=1, root=0.5, eps_after=0.5,
                                               init=0.01, max_dim=5), [(4, 7), (9,), (3,)]))


def test_momentum_is_heavy_ball_on_the_gradient_before_preconditioning(tmp_path):
    """b = beta b + g (b = g at step 1); d = L^-1/4 b R^-1/4, with statistics from g."""
    Ours = curvc.load("shampoo")
    torch.manual_seed(0)
    p = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    opt = Ours([p], lr=0.1, momentum=0.9, matrix_eps=1e-2)
    theta, L, R, b = p.detach().numpy().copy(), 1e-2 * np.eye(3), 1e-2 * np.eye(4), None
    for _ in range(5):
        opt.zero_grad()
        (p ** 2).sum().backward()
        g = 2 * theta
        b = g.copy() if b is None else 0.9 * b + g
        L, R = L + g @ g.T, R + g.T @ g
        pw = lambda m: np.real(scipy_linalg.fractional_matrix_power(m, -0.25))  # noqa: E731
        theta = theta - 0.1 * pw(L) @ b @ pw(R)
        opt.step()
    np.testing.assert_allclose(p.detach().numpy(), theta, rtol=1e-9)


# --- the optimizer contract ---------------------------------------------------

def test_checkpoint_resume_is_bitwise_the_uninterrupted_run(digits, tmp_path):
    Ours = curvc.load("shampoo")
    g1, g2 = dict(lr=0.05), dict(lr=0.02, update_freq=2)
    straight, resumed = make_mlp(), make_mlp()
    opt = Ours(two_groups(straight, g1, g2))
    train(straight, opt, digits, 20)
    half = Ours(two_groups(resumed, g1, g2))
    data = list(batches(digits, 20))
    for xb, yb in data[:10]:
        half.zero_grad()
        torch.nn.functional.cross_entropy(resumed(xb), yb).backward()
        half.step()
    torch.save({"model": resumed.state_dict(), "opt": half.state_dict()}, tmp_path / "ck.pt")
    ck = torch.load(tmp_path / "ck.pt")
    again = make_mlp(seed=5)
    again.load_state_dict(ck["model"])
    opt2 = Ours(two_groups(again, g1, g2))
    opt2.load_state_dict(ck["opt"])
    assert set(opt2.state[again[0].weight]) >= {"pre_cond_0", "pre_cond_1", "inv_pre_cond_0",
                                                 "inv_pre_cond_1", "step"}
    for xb, yb in data[10:]:
        opt2.zero_grad()
        torch.nn.functional.cross_entropy(again(xb), yb).backward()
        opt2.step()
    for a, b in zip(straight.parameters(), again.parameters()):
        assert torch.equal(a, b)


def test_bf16_parameters_keep_float32_factors():
    Ours = curvc.load("shampoo")
    p = torch.randn(4, 3, dtype=torch.bfloat16, requires_grad=True)
    opt = Ours([p], lr=0.01)
    p.grad = torch.randn_like(p)
    opt.step()
    assert p.dtype == torch.bfloat16
    assert opt.state[p]["pre_cond_0"].dtype == torch.float32
    assert torch.isfinite(p).all()


def test_a_zero_gradient_without_damping_leaves_the_parameter_finite(tmp_path):
    """Singular factors take the pseudo-inverse root, not an infinity."""
    Ours = _spec(tmp_path, "hyper lr = 0.1\ncurvature empirical_fisher\nstructure kronecker\n"
                           "iterate sum\nlength gradient_norm\n")
    p = torch.ones(3, 2, requires_grad=True)
    opt = Ours([p])
    p.grad = torch.zeros_like(p)
    opt.step()
    assert torch.equal(p, torch.ones(3, 2))
    p.grad = torch.tensor([[1.0, 0.0], [0.0, 0.0], [0.0, 0.0]])
    opt.step()
    assert torch.isfinite(p).all() and p[0, 0] < 1.0


def test_a_failed_root_keeps_the_previous_one_with_a_warning():
    from curvc.runtime import matrix
    state: dict = {}
    g = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    kw = dict(factors="L", roots="R", accumulate="sum", update=True, refresh=True,
              length="root", beta=0.0, init=1e-3, exponent=0.5, eps_inside=0.0, eps_after=0.0,
              floor=0.0, bias_correction=1.0, max_dim=100.0, per_mode=True)
    matrix.kronecker(state, g, g, **kw)
    before = state["R_0"].clone()
    bad = torch.tensor([[float("nan"), 0.0], [0.0, 1.0]])
    with pytest.warns(RuntimeWarning, match="previous root is kept"):
        matrix.kronecker(state, bad, g, **kw)
    assert torch.equal(state["R_0"], before)


# --- the precision of the roots ------------------------------------------------

def _spy_eigh(monkeypatch, fail_float32=None):
    """Records the dtype of every torch.linalg.eigh call; ``fail_float32`` (a function
    of the true (w, q)) replaces what a float32 call returns."""
    calls, real = [], torch.linalg.eigh

    def eigh(a, *args, **kw):
        calls.append(a.dtype)
        w, q = real(a, *args, **kw)
        return fail_float32(w, q) if fail_float32 and a.dtype == torch.float32 else (w, q)
    monkeypatch.setattr(torch.linalg, "eigh", eigh)
    return calls


def _factor_with_spectrum(eigenvalues, seed=0) -> np.ndarray:
    q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((len(eigenvalues),) * 2))
    return (q * eigenvalues) @ q.T


def _exact_root(a: np.ndarray, exponent: float) -> np.ndarray:
    return np.real(scipy_linalg.fractional_matrix_power(a, -exponent))


def test_a_float32_factor_takes_a_float32_root_as_accurate_as_float32_allows(monkeypatch):
    """A backward-stable eigh in float32 errs by dA of order n eps ||A||; the root's
    derivative is bounded by e lambda_min^(-e-1), so ||dR||_F / ||R||_2 <= e kappa n eps."""
    from curvc.runtime import roots
    n, kappa, e = 64, 1e3, 0.25
    exact = _factor_with_spectrum(np.logspace(0, -3, n))  # condition number kappa
    factor = torch.tensor(exact, dtype=torch.float32)
    calls = _spy_eigh(monkeypatch)
    root = roots.refreshed(roots.checked_inverse_root, factor, e, 0.0, 0.0, 0.0, None)
    assert calls == [torch.float32] and root.dtype == torch.float32
    ref = _exact_root(factor.double().numpy(), e)  # the float32 matrix, exactly
    error = np.linalg.norm(root.double().numpy() - ref) / np.linalg.norm(ref, 2)
    bound = e * kappa * n * np.finfo(np.float32).eps
    assert error <= bound, (error, bound)
    assert error > 10 * np.finfo(np.float64).eps  # it is the float32 result, not float64's


def test_a_float64_factor_keeps_its_root_in_float64(monkeypatch):
    from curvc.runtime import roots
    factor = torch.tensor(_factor_with_spectrum(np.logspace(0, -3, 16)))
    calls = _spy_eigh(monkeypatch)
    root = roots.refreshed(roots.checked_inverse_root, factor, 0.25, 0.0, 0.0, 0.0, None)
    assert calls == [torch.float64]
    np.testing.assert_allclose(root.numpy(), _exact_root(factor.numpy(), 0.25), rtol=1e-10)


def test_a_factor_that_overflows_float32_gets_its_root_from_float64(monkeypatch, recwarn):
    """Sum-accumulated statistics can near float32's largest value, where symmetrizing
    in float32 overflows; float64 holds them, and their root is a normal float32."""
    from curvc.runtime import roots
    exact = _factor_with_spectrum(np.linspace(2.0e38, 3.0e38, 8))
    factor = torch.tensor(exact, dtype=torch.float32)
    assert torch.isfinite(factor).all()
    calls = _spy_eigh(monkeypatch)
    root = roots.refreshed(roots.checked_inverse_root, factor, 0.25, 0.0, 0.0, 0.0, None)
    assert calls == [torch.float32, torch.float64]
    np.testing.assert_allclose(root.double().numpy(), _exact_root(factor.double().numpy(), 0.25),
                               rtol=1e-6)
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]


@pytest.mark.parametrize("corrupt", [
    lambda w, q: (w, torch.eye(len(w))),              # a wrong eigenbasis
    lambda w, q: (torch.full_like(w, float("nan")), q),  # non-finite eigenvalues
], ids=["inaccurate", "nonfinite"])
def test_a_failed_float32_eigendecomposition_is_retried_in_float64(monkeypatch, recwarn,
                                                                    corrupt):
    from curvc.runtime import roots
    factor = torch.tensor(_factor_with_spectrum(np.logspace(0, -2, 12)), dtype=torch.float32)
    calls = _spy_eigh(monkeypatch, fail_float32=corrupt)
    root = roots.refreshed(roots.checked_inverse_root, factor, 0.5, 1e-3, 0.0, 0.0, None)
    assert calls == [torch.float32, torch.float64]
    ref = _exact_root(factor.double().numpy() + 1e-3 * np.eye(12), 0.5)
    np.testing.assert_allclose(root.double().numpy(), ref, rtol=1e-5, atol=1e-6)
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]


def test_generated_module_shows_the_matrix_stage(tmp_path):
    out = curvc.compile_file("specs/shampoo.curv", tmp_path, backend="triton")
    text = out.read_text()
    assert "matrix.kronecker(state, " in text
    assert "refresh=f_refresh_roots" in text
    assert "d     = (L)^-1/4" in text or "^-1/4" in text


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_shampoo_on_cuda_equals_shampoo_on_cpu_in_float64():
    Ours = curvc.load("shampoo")
    torch.manual_seed(0)
    shapes = [(), (7,), (16, 9), (3, 4, 2, 5)]
    start = [torch.randn(s, dtype=torch.float64) for s in shapes]
    runs = {}
    for device in ("cpu", "cuda"):
        params = [t.clone().to(device).requires_grad_() for t in start]
        opt = Ours(params, lr=0.05, update_freq=2, weight_decay=1e-3)
        for k in range(6):
            opt.zero_grad()
            sum((p ** 2 * (k + 1)).sum() for p in params).backward()
            opt.step()
        runs[device] = [p.detach().cpu() for p in params]
    for a, b in zip(runs["cuda"], runs["cpu"]):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("eps", [0.0, 1e-12, 0.37])
def test_the_damped_factor_is_the_symmetrized_sum_with_eps_identity_to_the_last_bit(dtype, eps):
    from curvc.runtime.roots import damped_symmetric
    g = torch.Generator().manual_seed(3)
    a = torch.randn(17, 5, generator=g)
    factor = a @ a.T + 1e-3 * torch.randn(17, 17, generator=g)  # not quite symmetric
    damped = factor.to(dtype) + eps * torch.eye(17, dtype=dtype)
    expected = (damped + damped.T) / 2
    got = damped_symmetric(factor, eps, dtype)
    assert torch.equal(got, expected)
    assert torch.equal(got, got.T)
