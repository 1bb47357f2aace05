"""`curvc analyze` beyond Section 1: the paper's N_b for its linear rows, and the top of the
spectrum by Lanczos for models whose Hessian is too large to form.

The references are written here in numpy from the definitions: per-example gradients
of the least-squares quadratic x_i (x_i^T theta - y_i), their covariance, the minibatch
covariance for draws without replacement, and N_b = tr(H A Sigma_b A^T) / 2 (Section 2);
eigenpairs from numpy's eigh.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from curvc import analyze as A, spectrum
from curvc.cli import app

PROBLEM = "quadratic:n=10,cond=1e3,seed=2"
BATCH = 8


@pytest.fixture(scope="module")
def quad():
    prob = A.problem(PROBLEM)
    x, y = prob.x.numpy(), prob.y.numpy()
    theta = prob.model.weight.detach().numpy().reshape(-1)
    n = len(x)
    rows = x * (x @ theta - y)[:, None]  # each example's gradient of (x^T theta - y)^2 / 2
    centred = rows - rows.mean(0)
    sigma_b = centred.T @ centred / n * (n - BATCH) / ((n - 1) * BATCH)
    return prob, rows.mean(0), x.T @ x / n, sigma_b


def _noise(a: np.ndarray, h: np.ndarray, sigma_b: np.ndarray) -> float:
    return 0.5 * np.trace(h @ a @ sigma_b @ a.T)


@pytest.mark.parametrize("spec,lr", [("sgd", 0.05), ("newton", 0.5), ("gn_normalized_ngd", 0.02)])
def test_papers_minibatch_noise_for_its_linear_rows(spec, lr, quad):
    prob, _, h, sigma_b = quad
    lam, q = np.linalg.eigh(h)
    a = {"sgd": lr * np.eye(len(h)), "newton": lr * np.linalg.inv(h),
         "gn_normalized_ngd": lr * q @ np.diag(lam ** -0.5) @ q.T}[spec]
    r = A.analyze(spec, prob, batch=BATCH, samples=2, hypers={"lr": lr})
    assert r.closed_noise["noise"] == pytest.approx(_noise(a, h, sigma_b), rel=1e-6)
    per = np.diag(q.T @ a @ sigma_b @ a.T @ q)
    assert np.allclose(r.closed_noise["noise_i"], per, rtol=1e-6, atol=1e-20)
    # the paper's Sigma_b ~ (k/B) H, k/B fitted to the trace
    kb = np.trace(sigma_b) / np.trace(h)
    assert r.closed_noise["noise_kh"] == pytest.approx(_noise(a, h, kb * h), rel=1e-6)


def test_newton_noise_under_the_papers_approximation_is_alpha_squared_n_over_two(quad):
    """Written out: A = alpha H^-1, Sigma_b = (k/B) H gives N_b = (k/B) alpha^2 n / 2."""
    prob, _, h, sigma_b = quad
    alpha = 0.5
    r = A.analyze("newton", prob, batch=BATCH, samples=1, hypers={"lr": alpha})
    kb = np.trace(sigma_b) / np.trace(h)
    assert r.closed_noise["noise_kh"] == pytest.approx(0.5 * kb * alpha ** 2 * len(h), rel=1e-9)


def test_gd_measured_noise_converges_to_the_papers_N_b(quad):
    """GD's step is linear in g with A = eta I held fixed, so the sampled N_b is an unbiased
    estimate of the closed form: within five standard errors of the draws."""
    prob, g, h, sigma_b = quad
    eta, samples = 0.05, 400
    r = A.analyze("sgd", prob, batch=BATCH, samples=samples, hypers={"lr": eta})
    gen = torch.Generator().manual_seed(0)  # the analysis draws its batches this way
    x, y = prob.x.numpy(), prob.y.numpy()
    theta = prob.model.weight.detach().numpy().reshape(-1)
    draws = []
    for _ in range(samples):
        idx = torch.randperm(len(x), generator=gen)[:BATCH].numpy()
        xi = -eta * (x[idx].T @ (x[idx] @ theta - y[idx]) / BATCH - g)
        draws.append(0.5 * xi @ h @ xi)
    draws = np.array(draws)
    assert r.noise == pytest.approx(draws.mean(), rel=1e-6)
    exact = _noise(eta * np.eye(len(h)), h, sigma_b)
    assert abs(draws.mean() - exact) < 5 * draws.std() / np.sqrt(samples)


def test_a_spec_off_the_papers_rows_has_no_closed_noise(quad):
    r = A.analyze("adam", quad[0], batch=BATCH, samples=1)
    assert r.closed_noise == {} and r.noise is not None


def test_lanczos_finds_the_top_eigenpairs():
    rng = np.random.default_rng(0)
    n, k = 80, 6
    q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    lam = np.concatenate([-np.logspace(-3, -1, 10), np.logspace(-4, 0, n - 10)])
    h = q @ np.diag(lam) @ q.T
    t = torch.tensor(h)
    vals, vecs = spectrum.lanczos(lambda v: t @ v, n, k)
    ref = np.sort(lam)[-k:]
    assert np.allclose(vals.numpy(), ref, rtol=1e-8)
    residual = t @ vecs - vecs * vals
    assert residual.norm(dim=0).max() < 1e-5
    assert np.allclose(vecs.T @ vecs, np.eye(k), atol=1e-10)


def test_lanczos_refuses_a_k_outside_the_dimension():
    with pytest.raises(ValueError, match="1..5"):
        spectrum.lanczos(lambda v: v, 5, 6)


def test_top_k_analysis_agrees_with_the_exact_one_on_those_directions():
    prob = A.problem("quadratic:n=30,cond=1e2,seed=3")
    exact = A.analyze_all(["adam", "sgd"], prob)
    top = A.analyze_all(["adam", "sgd"], prob, top=5)
    for e, t in zip(exact, top):
        assert not t.complete and len(t.lam) == 5
        assert t.delta == pytest.approx(e.delta, rel=1e-10)  # totals by H v: exact
        assert t.norm_h == pytest.approx(e.norm_h, rel=1e-10)
        assert np.allclose(t.lam, e.lam[-5:], rtol=1e-8)
        # Delta_d^i is the same for v and -v, so the sign Lanczos picks does not matter
        assert np.allclose(t.delta_i, e.delta_i[-5:], rtol=1e-6, atol=1e-14)
        rest = t.bands()[-1]
        assert rest["band"] == "the rest"
        assert rest["delta"] == pytest.approx(sum(e.delta_i[:-5]), rel=1e-6, abs=1e-14)


def test_models_above_the_limit_use_lanczos_by_default(monkeypatch):
    monkeypatch.setattr(A, "EXACT_LIMIT", 20)
    monkeypatch.setattr(A, "DEFAULT_TOP", 4)
    (r,) = A.analyze_all(["sgd"], A.problem("quadratic:n=25,cond=10"))
    assert not r.complete and len(r.lam) == 4 and r.closed == {}


def test_cli_top_and_batch_print_the_papers_noise():
    res = CliRunner().invoke(app, ["analyze", "sgd", "newton", "--problem",
                                   "quadratic:n=8,cond=100", "--batch", "6", "--samples", "3"])
    assert res.exit_code == 0, res.output
    assert "paper, Sigma_b ~ (k/B) H" in res.output and "paper: GD" in res.output
    res = CliRunner().invoke(app, ["analyze", "sgd", "--problem", "quadratic:n=8,cond=100",
                                   "--top", "3"])
    assert res.exit_code == 0, res.output
    assert "top 3 eigenpairs of H by Lanczos" in res.output and "the rest" in res.output
