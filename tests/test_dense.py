"""The dense structure (the paper's theory rows, and hybrids) against equations written here.

Newton on a quadratic lands on the minimum in one step; Newton on
logistic regression follows the textbook iteration with the Hessian
X^T diag(p (1 - p)) X / n written out in numpy; the normalized, gradient-norm
and sign lengths and full-matrix Adagrad (a hybrid: summed outer products)
follow their formulas with numpy's eigendecomposition.
"""
import numpy as np
import pytest
import torch

import curvc
from conftest import digits  # noqa: F401  (a fixture)


def _spec(tmp_path, body: str, name="Dense"):
    path = tmp_path / f"{name.lower()}.curv"
    path.write_text(f"optimizer {name}\n{body}")
    return curvc.load(str(path), backend="torch")


def _quadratic(n=5, seed=0):
    rng = np.random.default_rng(seed)
    m = rng.standard_normal((n, n))
    return m @ m.T + n * np.eye(n), rng.standard_normal(n)


def _loss(theta, A, b):
    A, b = torch.tensor(A), torch.tensor(b)
    return 0.5 * theta @ A @ theta - b @ theta


def test_newton_reaches_the_minimum_of_a_quadratic_in_one_step():
    A, b = _quadratic()
    Newton = curvc.load("specs/theory/newton.curv")
    theta = torch.zeros(5, dtype=torch.float64, requires_grad=True)
    opt = Newton([theta])
    assert opt.wants_curvature()
    _loss(theta, A, b).backward(create_graph=True)
    opt.step()
    np.testing.assert_allclose(theta.detach().numpy(), np.linalg.solve(A, b), rtol=1e-10)
    assert theta.grad.grad_fn is None  # the graph was released


def test_newton_on_logistic_regression_follows_the_textbook_iteration():
    rng = np.random.default_rng(1)
    X = rng.standard_normal((40, 3))
    y = (X @ [1.0, -2.0, 0.5] + 0.3 * rng.standard_normal(40) > 0).astype(float)
    w_ref = np.zeros(3)
    for _ in range(5):
        p = 1 / (1 + np.exp(-X @ w_ref))
        grad = X.T @ (p - y) / len(y) + 0.1 * w_ref
        H = X.T @ (X * (p * (1 - p))[:, None]) / len(y) + 0.1 * np.eye(3)
        w_ref = w_ref - np.linalg.solve(H, grad)
    Newton = curvc.load("specs/theory/newton.curv")
    w = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    opt = Newton([w])
    Xt, yt = torch.tensor(X), torch.tensor(y)
    for _ in range(5):
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(Xt @ w, yt) + 0.05 * w @ w
        opt.estimate_curvature(loss=loss)  # or backward(create_graph=True)
        loss.backward()
        opt.step()
    np.testing.assert_allclose(w.detach().numpy(), w_ref, rtol=1e-9)


@pytest.mark.parametrize("spec, length", [
    ("specs/theory/normalized_ngd.curv", "normalized"),
    ("specs/theory/gn_normalized_ngd.curv", "gradient_norm"),
    ("specs/theory/eigenbasis_normalized_ngd.curv", "eigen_sign"),
])
def test_theory_rows_take_the_steps_their_lengths_define(spec, length):
    A, b = _quadratic(4, seed=2)
    theta0 = np.array([0.5, -1.0, 2.0, 0.0])
    w, Q = np.linalg.eigh(A)
    g = A @ theta0 - b
    d = {"normalized": np.linalg.solve(A, g) / np.sqrt(g @ np.linalg.solve(A, g)),
         "gradient_norm": Q @ np.diag(w ** -0.5) @ Q.T @ g,
         "eigen_sign": Q @ np.diag(w ** -0.5) @ np.sign(Q.T @ g)}[length]
    Opt = curvc.load(spec)
    theta = torch.tensor(theta0, requires_grad=True)
    opt = Opt([theta], lr=0.1)
    _loss(theta, A, b).backward(create_graph=True)
    opt.step()
    np.testing.assert_allclose(theta.detach().numpy(), theta0 - 0.1 * d, rtol=1e-10)


def test_full_matrix_adagrad_hybrid_matches_its_formula(tmp_path):
    """Summed outer products of the gradient, d = (sum g g^T + eps I)^-1/2 g (Duchi et al.)."""
    FullAdagrad = _spec(tmp_path, "hyper lr = 0.1, eps = 1e-3\ncurvature empirical_fisher\n"
                                  "structure dense\niterate sum\nlength gradient_norm\n"
                                  "damping inside(eps)\n")
    A, b = _quadratic(4, seed=3)
    theta0 = np.ones(4)
    theta = torch.tensor(theta0, requires_grad=True)
    opt = FullAdagrad([theta])
    G, ref = np.zeros((4, 4)), theta0.copy()
    for _ in range(6):
        g = A @ ref - b
        G += np.outer(g, g)
        w, Q = np.linalg.eigh(G + 1e-3 * np.eye(4))
        ref = ref - 0.1 * Q @ np.diag(w ** -0.5) @ Q.T @ g
        opt.zero_grad()
        _loss(theta, A, b).backward()  # no graph needed: g g^T
        opt.step()
    np.testing.assert_allclose(theta.detach().numpy(), ref, rtol=1e-10)


def test_an_indefinite_hessian_takes_no_step_along_negative_curvature():
    """A saddle 0.5 (x^2 - y^2): the pseudo-inverse drops the negative direction."""
    Newton = curvc.load("specs/theory/newton.curv")
    theta = torch.tensor([1.0, 1.0], dtype=torch.float64, requires_grad=True)
    opt = Newton([theta])
    (0.5 * (theta[0] ** 2 - theta[1] ** 2)).backward(create_graph=True)
    opt.step()
    np.testing.assert_allclose(theta.detach().numpy(), [0.0, 1.0], atol=1e-12)


def test_a_missing_hessian_is_refused_with_instructions_and_no_state_change():
    Newton = curvc.load("specs/theory/newton.curv")
    theta = torch.ones(3, requires_grad=True)
    opt = Newton([theta])
    (theta ** 2).sum().backward()  # no create_graph
    with pytest.raises(RuntimeError, match=r"create_graph=opt\.wants_curvature\(\)"):
        opt.step()
    assert torch.equal(theta, torch.ones(3)) and not opt.state


def test_a_given_hessian_is_used_and_must_be_square():
    Newton = curvc.load("specs/theory/newton.curv")
    theta = torch.ones(2, dtype=torch.float64, requires_grad=True)
    opt = Newton([theta])
    theta.grad = torch.tensor([2.0, 4.0], dtype=torch.float64)
    with pytest.raises(ValueError, match="2 x 2"):
        opt.step(curvature=torch.eye(3))
    opt.step(curvature=torch.diag(torch.tensor([2.0, 4.0], dtype=torch.float64)))
    np.testing.assert_allclose(theta.detach().numpy(), [0.0, 0.0])


# --- the Fisher with labels sampled from the model ---------------------------

def _softmax_regression(n=30, d=3, c=4, seed=4):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=torch.float64)
    W = (0.5 * torch.randn(c, d, generator=g, dtype=torch.float64)).requires_grad_()
    y = torch.randint(0, c, (n,), generator=g)
    return X, W, y


def _exact_fisher(X, W):
    """F[(c,d),(c',d')] = mean_i (delta_cc' p_ic - p_ic p_ic') x_id x_id' (vec(W) row-major)."""
    X, W = X.numpy(), W.detach().numpy()
    logits = X @ W.T
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    return np.mean([np.kron(np.diag(pi) - np.outer(pi, pi), np.outer(xi, xi))
                    for pi, xi in zip(p, X)], axis=0)


def test_the_sampled_fisher_is_the_mean_outer_product_of_drawn_label_gradients():
    """For softmax regression the gradient of -log p(y|x) is (p - e_y) kron x: redraw the
    same labels from the same generator and build the estimate by hand."""
    from curvc.runtime import curvature
    X, W, _ = _softmax_regression()
    F = curvature.fisher_matrix([W], X @ W.T, samples=3,
                                generator=torch.Generator().manual_seed(7)).numpy()
    probs = torch.softmax(X @ W.detach().T, dim=-1)
    labels = torch.multinomial(probs.float(), 3, replacement=True,
                               generator=torch.Generator().manual_seed(7))
    P, x = probs.numpy(), X.numpy()
    rows = np.stack([np.kron(P[i] - np.eye(4)[y], x[i])
                     for i in range(len(x)) for y in labels[i].tolist()])
    np.testing.assert_allclose(F, rows.T @ rows / len(rows), rtol=1e-10, atol=1e-14)
    diag = curvature.fisher_diagonal([W], X @ W.T, samples=3,
                                     generator=torch.Generator().manual_seed(7))[0]
    np.testing.assert_allclose(diag.reshape(-1).numpy(), np.diag(F), rtol=1e-10)


def test_the_sampled_fisher_converges_to_the_exact_fisher_not_the_empirical_one():
    """Labels drawn from the model, not the data: with 200 draws per example the estimate
    is within 10% of the exact Fisher, while the empirical Fisher is ~2x off here."""
    from curvc.runtime import curvature
    X, W, y = _softmax_regression()
    exact = _exact_fisher(X, W)
    F = curvature.fisher_matrix([W], X @ W.T, samples=200,
                                generator=torch.Generator().manual_seed(0)).numpy()
    assert np.linalg.norm(F - exact) <= 0.1 * np.linalg.norm(exact)
    P = torch.softmax(X @ W.detach().T, dim=-1).numpy()
    rows = np.stack([np.kron(p - np.eye(4)[t], x) for p, t, x in zip(P, y.tolist(), X.numpy())])
    empirical = rows.T @ rows / len(rows)
    assert np.linalg.norm(empirical - exact) > 0.5 * np.linalg.norm(exact)


def test_ngd_takes_the_pseudo_inverse_natural_gradient_step():
    """The softmax Fisher is singular (a shift of all logits changes nothing): the step is
    pinv(F) g, computed here with numpy."""
    X, W, y = _softmax_regression()
    F = _exact_fisher(X, W)
    NGD = curvc.load("specs/theory/ngd.curv")
    opt = NGD([W], lr=0.5)
    w0 = W.detach().numpy().reshape(-1).copy()
    torch.nn.functional.cross_entropy(X @ W.T, y).backward()
    g = W.grad.numpy().reshape(-1).copy()
    opt.step(curvature=torch.tensor(F))
    np.testing.assert_allclose(W.detach().numpy().reshape(-1),
                               w0 - 0.5 * np.linalg.pinv(F, rcond=1e-10) @ g, rtol=1e-8)


def test_damped_ngd_estimates_the_fisher_from_logits_and_trains(tmp_path, digits):
    """64 drawn labels estimate a 650 x 650 Fisher of rank <= 64: undamped, its smallest
    kept eigenvalues blow the step up (that is the theory row), so training adds
    Tikhonov damping (F + lambda I)^-1 g, a hybrid of NGD and the damping axis."""
    NGD = _spec(tmp_path, "hyper lr = 0.5, lam = 1e-2\ncurvature fisher\nstructure dense\n"
                          "iterate ema(0.9)\nlength none\ndamping inside(lam)\n", name="DampedNGD")
    torch.manual_seed(0)
    model = torch.nn.Linear(64, 10)
    opt = NGD(model.parameters())
    losses = []
    for k in range(8):
        xb, yb = digits[0][k * 64:(k + 1) * 64], digits[1][k * 64:(k + 1) * 64]
        opt.zero_grad()
        logits = model(xb)
        assert opt.wants_curvature()
        opt.estimate_curvature(logits=logits)
        loss = torch.nn.functional.cross_entropy(logits, yb)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_ngd_without_logits_says_how_and_changes_nothing():
    NGD = curvc.load("specs/theory/ngd.curv")
    w = torch.ones(3, 2, requires_grad=True)
    opt = NGD([w])
    (w ** 2).sum().backward()
    with pytest.raises(RuntimeError, match=r"estimate_curvature\(logits=logits\)"):
        opt.step()
    assert torch.equal(w, torch.ones(3, 2)) and not opt.state


def test_diagonal_fisher_hybrid_uses_the_estimator(tmp_path):
    """Adam's step with the true (sampled-label) Fisher diagonal in place of g*g."""
    FisherAdam = _spec(tmp_path, "hyper lr = 0.05, b = 0.99, eps = 1e-8\n"
                                 "curvature fisher(samples = 2)\nstructure diagonal\n"
                                 "iterate ema(b) bias_corrected\nlength gradient_norm\n"
                                 "damping add(eps)\n", name="FisherAdam")
    X, W, y = _softmax_regression()
    opt = FisherAdam([W])
    torch.manual_seed(0)
    logits = X @ W.T
    opt.estimate_curvature(logits=logits)
    torch.nn.functional.cross_entropy(logits, y).backward()
    g = W.grad.clone()
    torch.manual_seed(0)
    from curvc.runtime import curvature
    diag = curvature.fisher_diagonal([W], X @ W.T, samples=2)[0]
    w0 = W.detach().clone()
    opt.step()
    torch.testing.assert_close(W.detach(), w0 - 0.05 * g / (diag.sqrt() + 1e-8), rtol=1e-6,
                               atol=1e-9)


def test_a_step_without_gradients_changes_nothing_as_in_torch_optim():
    Newton = curvc.load("specs/theory/newton.curv")
    w = torch.randn(4, requires_grad=True)
    before = w.detach().clone()
    opt = Newton([w])
    opt.step()
    assert torch.equal(w.detach(), before) and not opt.state


def test_eigen_sign_of_an_outer_product_steps_only_along_the_gradient(tmp_path):
    """C = g g^T + eps I: Q^T g is |g| along g/|g| and exactly 0 along the rest, so
    d = (|g|^2 + eps)^-1/2 g/|g|; the rounding noise of those zeros takes no sign (it would
    step eps^-1/2 along directions the curvature never saw)."""
    Ours = _spec(tmp_path, "hyper lr = 0.1\ncurvature empirical_fisher\nstructure dense\n"
                           "iterate instant\nlength eigen_sign\ndamping inside(1e-4)\n")
    p = torch.zeros(6, dtype=torch.float64, requires_grad=True)
    opt = Ours([p])
    g = torch.tensor([0.3, -1.2, 0.7, 0.05, -0.4, 2.0], dtype=torch.float64)
    p.grad = g.clone()
    opt.step()
    expected = -0.1 * (g.norm() ** 2 + 1e-4) ** -0.5 * g / g.norm()
    assert torch.allclose(p.detach(), expected, rtol=1e-10, atol=1e-12)
