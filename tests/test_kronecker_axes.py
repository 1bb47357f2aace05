"""Kronecker structure composed with every other axis, against equations written here.

For a matrix G (one tensor) with factors L (rows) and R (columns), the curvature
is P = (L kron R)^(1/2) (the product of two Gram factors counts the gradient
twice), so P^-1 m is L^-1/2 M R^-1/2 and P^-1/2 m is L^-1/4 M R^-1/4; a vector's
only factor L gives P = L. Each test writes the step out with torch.linalg in
float64 and compares with the compiled optimizer.
"""
import os

import pytest
import torch

import curvc

TOL = 1e-10


def _spec(tmp_path, body: str, name="Hybrid", backend="torch"):
    path = tmp_path / f"{name.lower()}.curv"
    path.write_text(f"optimizer {name}\n{body}")
    return curvc.load(str(path), backend=backend)


def _power(a: torch.Tensor, e: float) -> torch.Tensor:
    """a^e for a symmetric positive definite a."""
    w, q = torch.linalg.eigh(a)
    return (q * w.pow(e)) @ q.T


def _grads(steps: int, *shape, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=gen, dtype=torch.float64) for _ in range(steps)]


def _run(cls, p0, grads, **kw):
    p = p0.clone().requires_grad_(True)
    opt = cls([p], **kw)
    out = []
    for g in grads:
        p.grad = g.clone()
        opt.step()
        out.append(p.detach().clone())
    return out


def test_instant_factors_with_gradient_norm_give_the_polar_factor_of_the_gradient(tmp_path):
    """L = G G^T, R = G^T G: L^-1/4 G R^-1/4 = U V^T (Muon's orthogonalized step)."""
    Ours = _spec(tmp_path, "hyper lr = 0.1\ncurvature empirical_fisher\nstructure kronecker\n"
                           "iterate instant\nlength gradient_norm\n")
    grads = _grads(3, 5, 3)
    p0 = torch.zeros(5, 3, dtype=torch.float64)
    expected = p0.clone()
    for g, got in zip(grads, _run(Ours, p0, grads)):
        u, _, vh = torch.linalg.svd(g, full_matrices=False)
        expected = expected - 0.1 * (u @ vh)
        assert torch.allclose(got, expected, rtol=0, atol=1e-9)


def test_instant_factors_refreshed_every_k_steps_are_held_in_between(tmp_path):
    Ours = _spec(tmp_path, "hyper lr = 0.1, k = 2\ncurvature empirical_fisher\n"
                           "structure kronecker\niterate instant every k\n"
                           "length gradient_norm\ndamping inside(1e-3)\n")
    grads = _grads(4, 4, 3, seed=1)
    p = torch.zeros(4, 3, dtype=torch.float64)
    eye4, eye3 = torch.eye(4, dtype=torch.float64), torch.eye(3, dtype=torch.float64)
    for t, (g, got) in enumerate(zip(grads, _run(Ours, p, grads)), start=1):
        if (t - 1) % 2 == 0:
            left, right = g @ g.T, g.T @ g
        d = _power(left + 1e-3 * eye4, -0.25) @ g @ _power(right + 1e-3 * eye3, -0.25)
        p = p - 0.1 * d
        assert torch.allclose(got, p, rtol=0, atol=TOL)


def test_eigen_sign_is_the_sign_in_the_factors_eigenbasis_scaled_by_their_roots(tmp_path):
    """d = P^-1/2 Q sign(Q^T g): Q_L [w_L^-1/4 w_R^-1/4 * sign(Q_L^T G Q_R)] Q_R^T."""
    Ours = _spec(tmp_path, "hyper lr = 0.05, eps = 1e-2\ncurvature empirical_fisher\n"
                           "structure kronecker\niterate sum(init = eps)\nlength eigen_sign\n")
    grads = _grads(4, 4, 3, seed=2)
    p = torch.zeros(4, 3, dtype=torch.float64)
    left = 1e-2 * torch.eye(4, dtype=torch.float64)
    right = 1e-2 * torch.eye(3, dtype=torch.float64)
    for g, got in zip(grads, _run(Ours, p, grads)):
        left, right = left + g @ g.T, right + g.T @ g
        wl, ql = torch.linalg.eigh(left)
        wr, qr = torch.linalg.eigh(right)
        scale = wl.pow(-0.25)[:, None] * wr.pow(-0.25)[None, :]
        rotated = ql.T @ g @ qr
        # the first step's rotated gradient is diagonal: what rounding leaves off it is 0
        rotated = torch.where(rotated.abs() > 1e-12 * rotated.abs().max(), rotated, 0.0)
        d = ql @ (scale * torch.sign(rotated)) @ qr.T
        p = p - 0.05 * d
        assert torch.allclose(got, p, rtol=0, atol=TOL)


def _shampoo_inverse(g_hist, init):
    """P^-1 of the last gradient for a matrix: L^-1/2 G R^-1/2, sums from init I."""
    g = g_hist[-1]
    left = init * torch.eye(g.shape[0], dtype=g.dtype) + sum(x @ x.T for x in g_hist)
    right = init * torch.eye(g.shape[1], dtype=g.dtype) + sum(x.T @ x for x in g_hist)
    return _power(left, -0.5) @ g @ _power(right, -0.5)


def _vector_inverse(v_hist, init):
    """P^-1 of the last gradient for a vector: its one factor L = init I + sum v v^T."""
    v = v_hist[-1]
    left = init * torch.eye(v.shape[0], dtype=v.dtype) + sum(torch.outer(x, x) for x in v_hist)
    return torch.linalg.solve(left, v)


def test_normalized_length_divides_by_the_step_norm_over_every_tensor(tmp_path):
    """d = P^-1 g / sqrt(sum over tensors of g . P^-1 g), so ||d||_P = 1."""
    Ours = _spec(tmp_path, "hyper lr = 0.1\ncurvature empirical_fisher\nstructure kronecker\n"
                           "iterate sum(init = 0.1)\nlength normalized\n")
    mats, vecs = _grads(3, 4, 3, seed=3), _grads(3, 5, seed=4)
    a = torch.zeros(4, 3, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(5, dtype=torch.float64, requires_grad=True)
    opt = Ours([a, b])
    ea, eb = a.detach().clone(), b.detach().clone()
    for t in range(3):
        a.grad, b.grad = mats[t].clone(), vecs[t].clone()
        opt.step()
        ua, ub = _shampoo_inverse(mats[:t + 1], 0.1), _vector_inverse(vecs[:t + 1], 0.1)
        norm = torch.sqrt((mats[t] * ua).sum() + (vecs[t] * ub).sum())
        ea, eb = ea - 0.1 * ua / norm, eb - 0.1 * ub / norm
        assert torch.allclose(a.detach(), ea, rtol=0, atol=TOL)
        assert torch.allclose(b.detach(), eb, rtol=0, atol=TOL)


def test_global_norm_clip_scales_the_whole_preconditioned_step(tmp_path):
    """d = u min(1, C / ||u||) with u the preconditioned step of every tensor."""
    Ours = _spec(tmp_path, "hyper lr = 0.1, c = 0.5\ncurvature empirical_fisher\n"
                           "structure kronecker\niterate sum(init = 0.1)\nlength none\n"
                           "clip global_norm(c)\n")
    mats, vecs = _grads(3, 4, 3, seed=5), _grads(3, 5, seed=6)
    a = torch.zeros(4, 3, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(5, dtype=torch.float64, requires_grad=True)
    opt = Ours([a, b])
    ea, eb = a.detach().clone(), b.detach().clone()
    clipped = 0
    for t in range(3):
        a.grad, b.grad = mats[t].clone(), vecs[t].clone()
        opt.step()
        ua, ub = _shampoo_inverse(mats[:t + 1], 0.1), _vector_inverse(vecs[:t + 1], 0.1)
        norm = torch.sqrt((ua * ua).sum() + (ub * ub).sum())
        scale = min(1.0, 0.5 / norm.item())
        clipped += scale < 1.0
        ea, eb = ea - 0.1 * scale * ua, eb - 0.1 * scale * ub
        assert torch.allclose(a.detach(), ea, rtol=0, atol=TOL)
        assert torch.allclose(b.detach(), eb, rtol=0, atol=TOL)
    assert clipped  # the threshold was met, so the test saw the clip act


def test_bias_corrected_ema_factors_take_the_root_of_the_corrected_average(tmp_path):
    """L_t = beta L + (1 - beta) G G^T from 0; the root is of L_t / (1 - beta^t) + eps I."""
    Ours = _spec(tmp_path, "hyper lr = 0.1, beta = 0.9\ncurvature empirical_fisher\n"
                           "structure kronecker\niterate ema(beta) bias_corrected\n"
                           "length gradient_norm\ndamping inside(1e-4)\n")
    grads = _grads(4, 4, 3, seed=7)
    p = torch.zeros(4, 3, dtype=torch.float64)
    left = torch.zeros(4, 4, dtype=torch.float64)
    right = torch.zeros(3, 3, dtype=torch.float64)
    for t, (g, got) in enumerate(zip(grads, _run(Ours, p, grads)), start=1):
        left, right = 0.9 * left + 0.1 * g @ g.T, 0.9 * right + 0.1 * g.T @ g
        c = 1 - 0.9 ** t
        d = (_power(left / c + 1e-4 * torch.eye(4, dtype=torch.float64), -0.25) @ g
             @ _power(right / c + 1e-4 * torch.eye(3, dtype=torch.float64), -0.25))
        p = p - 0.1 * d
        assert torch.allclose(got, p, rtol=0, atol=TOL)


def test_a_floor_bounds_every_factor_root_from_below(tmp_path):
    """damping floor(eps): each mode's root is Q diag(1 / max(w^e, eps)) Q^T."""
    Ours = _spec(tmp_path, "hyper lr = 0.1, eps = 0.5\ncurvature empirical_fisher\n"
                           "structure kronecker\niterate sum\nlength gradient_norm\n"
                           "damping floor(eps)\n")
    grads = _grads(3, 4, 3, seed=8)
    p = torch.zeros(4, 3, dtype=torch.float64)
    left = torch.zeros(4, 4, dtype=torch.float64)
    right = torch.zeros(3, 3, dtype=torch.float64)

    def root(a):
        w, q = torch.linalg.eigh(a)
        return (q / torch.clamp(w.clamp(min=0).pow(0.25), min=0.5)) @ q.T

    for g, got in zip(grads, _run(Ours, p, grads)):
        left, right = left + g @ g.T, right + g.T @ g
        p = p - 0.1 * root(left) @ g @ root(right)
        assert torch.allclose(got, p, rtol=0, atol=TOL)


def test_a_running_maximum_of_kronecker_factors_is_refused_by_check(tmp_path):
    path = tmp_path / "m.curv"
    path.write_text("optimizer M\nhyper lr = 1e-3\ncurvature empirical_fisher\n"
                    "structure kronecker\niterate ema(0.9, keep_max = true)\n"
                    "length gradient_norm\n")
    with pytest.raises(curvc.CurvError, match="matrices have no maximum"):
        curvc.load(str(path))


# --- the elementwise head and tail around the matrix call ----------------------

def _train_shampoo(cls, fused, steps=6, dtype=torch.float64, **kw):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(),
                                torch.nn.Linear(5, 3)).to(dtype)
    opt = cls(model.parameters(), fused=fused, **kw)
    x, y = torch.randn(16, 6, dtype=dtype), torch.randint(0, 3, (16,))
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return [p.detach() for p in model.parameters()], opt


def test_shampoo_head_and_tail_take_the_fused_cpu_path_and_match_eager(tmp_path):
    """fused=True compiles the kernels around the matrix call; they equal the eager ones."""
    cls = curvc.load("shampoo", backend="torch")
    kw = dict(lr=0.05, momentum=0.9, weight_decay=1e-3, matrix_eps=0.1)  # well conditioned
    eager, opt_e = _train_shampoo(cls, fused=False, **kw)
    fused, opt_f = _train_shampoo(cls, fused=True, **kw)
    assert type(opt_f).__dict__.get("_fused_kernels")  # the compiled path ran
    for a, b in zip(eager, fused):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-12)
    steps = {float(s["step"]) for s in opt_f.state.values()}
    assert steps == {6.0}  # bumped once per step, by the last kernel only


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                    reason="CPU tensors need TRITON_INTERPRET=1 for Triton")
def test_shampoo_triton_kernels_around_the_matrix_call_match_torch():
    pytest.importorskip("triton")
    ours_t = curvc.load("shampoo", backend="triton")
    ours = curvc.load("shampoo", backend="torch")
    kw = dict(lr=0.05, momentum=0.9, weight_decay=1e-3, matrix_eps=0.1)  # well conditioned
    a, _ = _train_shampoo(ours, fused=False, steps=3, **kw)
    b, _ = _train_shampoo(ours_t, fused=None, steps=3, **kw)
    # The interpreter hands float arguments to kernels as float32 (compiled kernels take
    # float64), so the hyperparameters carry ~1e-7 error here (tests/test_triton_backend.py).
    for x, y in zip(a, b):
        assert torch.allclose(x, y, rtol=1e-6, atol=1e-9)


# --- Kronecker factors of a sampled curvature (the Fisher, Gauss-Newton-Bartlett) ---------

def _rows_reference(logits, x, samples, per_example, seed):
    """The rows G_r whose Gram matrices are the factors, for logits = x W^T, drawn as the
    runtime draws them (same seed, same calls): dCE/dW = (softmax(l) - e_y) x^T."""
    torch.manual_seed(seed)
    probs = torch.softmax(logits.detach().float(), dim=-1)
    p, n = torch.softmax(logits.detach(), dim=-1), x.shape[0]  # the gradient: in float64
    if per_example:  # one row per (example, label) over sqrt(rows)
        labels = torch.multinomial(probs, samples, replacement=True)
        rows = [torch.outer(p[i] - torch.eye(3, dtype=torch.float64)[labels[i, j]], x[i])
                for i in range(n) for j in range(samples)]
        return [r / len(rows) ** 0.5 for r in rows]
    rows = []
    for _ in range(samples):  # one row per draw: sqrt(B / samples) * the mean loss's gradient
        labels = torch.multinomial(probs, 1).squeeze(-1)
        grad = sum(torch.outer(p[i] - torch.eye(3, dtype=torch.float64)[labels[i]], x[i])
                   for i in range(n)) / n
        rows.append(grad * (n / samples) ** 0.5)
    return rows


@pytest.mark.parametrize("curvature, per_example, scale", [
    ("fisher(samples = 2)", True, 1.0),
    ("gauss_newton_bartlett(samples = 3)", False, 1.0),
    ("gauss_newton_bartlett(samples = 3, scale = 4)", False, 4.0),
])
def test_kronecker_factors_of_a_sampled_curvature_are_the_gram_of_its_rows(
        tmp_path, curvature, per_example, scale):
    """L = 0.1 I + sum_t sum_r G_r G_r^T, R likewise; d = (L + eps I)^-1/4 g (R + eps I)^-1/4."""
    Ours = _spec(tmp_path, f"hyper lr = 0.05, eps = 1e-3\ncurvature {curvature}\n"
                           "structure kronecker\niterate sum(init = 0.1)\nlength gradient_norm\n"
                           "damping inside(eps)\n")
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(6, 4, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (6,), generator=gen)
    w = torch.nn.Parameter(0.3 * torch.randn(3, 4, generator=gen, dtype=torch.float64))
    opt = Ours([w])
    expected = w.detach().clone()
    left, right = 0.1 * torch.eye(3, dtype=torch.float64), 0.1 * torch.eye(4, dtype=torch.float64)
    samples = 2 if per_example else 3
    for t in range(3):
        logits = x @ w.T
        torch.manual_seed(100 + t)
        opt.estimate_curvature(logits=logits)
        rows = _rows_reference(x @ expected.T, x, samples, per_example, 100 + t)
        torch.nn.functional.cross_entropy(logits, y).backward()
        g = w.grad.detach().clone()
        opt.step()
        w.grad = None
        left = left + scale * sum(r @ r.T for r in rows)
        right = right + scale * sum(r.T @ r for r in rows)
        eye3, eye4 = torch.eye(3, dtype=torch.float64), torch.eye(4, dtype=torch.float64)
        d = _power(left + 1e-3 * eye3, -0.25) @ g @ _power(right + 1e-3 * eye4, -0.25)
        expected = expected - 0.05 * d
        assert torch.allclose(w.detach(), expected, rtol=0, atol=1e-10)


def test_gauss_newton_bartlett_with_a_dense_structure_is_refused_with_both_structures_named(
        tmp_path):
    path = tmp_path / "g.curv"
    path.write_text("optimizer G\nhyper lr = 1e-3\ncurvature gauss_newton_bartlett\n"
                    "structure dense\nlength none\n")
    with pytest.raises(curvc.CurvError, match="structure diagonal, factored or kronecker"):
        curvc.load(str(path))
