"""`curvc analyze`: the paper's one-step analysis against its closed forms, written here.

On a least-squares quadratic (H = X^T X / N exactly, g = X^T (X theta - y) / N, both
built in numpy below), each of the paper's rows takes its first step through the
compiled optimizer, and the measured Delta_d and ||d||_H^2 must equal the paper's
Section 1 formulas for that row to 1e-6.
"""
from __future__ import annotations

import json
import struct

import numpy as np
import pytest
from typer.testing import CliRunner

from curvc import analyze as A
from curvc.cli import app

PROBLEM = "quadratic:n=12,cond=1e3,seed=1"


@pytest.fixture(scope="module")
def quad():
    prob = A.problem(PROBLEM)
    x = prob.x.numpy()
    theta = prob.model.weight.detach().numpy().reshape(-1)
    n = len(x)
    g = x.T @ (x @ theta - prob.y.numpy()) / n
    h = x.T @ x / n
    return prob, g, h


def _paper(row: str, lr: float, g: np.ndarray, h: np.ndarray) -> tuple[float, float]:
    """(Delta_d, ||d||_H^2) of the paper's Section 1 for one row, from g, H and the step size."""
    lam, q = np.linalg.eigh(h)
    gh = q.T @ g
    if row == "newton":  # d = -alpha H^-1 g
        s = gh @ (gh / lam)
        return lr * (1 - lr / 2) * s, lr ** 2 * s
    if row == "normalized_ngd":  # d = -eps H^-1 g / sqrt(g^T H^-1 g)
        return lr * np.sqrt(gh @ (gh / lam)) - lr ** 2 / 2, lr ** 2
    if row == "gn_normalized_ngd":  # d = -eps H^-1/2 g
        return np.sum(lr * (1 / np.sqrt(lam) - lr / 2) * gh ** 2), lr ** 2 * g @ g
    if row == "eigenbasis_normalized_ngd":  # d^_i = -eps sign(g^_i) / sqrt(lambda_i)
        return np.sum(lr * np.abs(gh) / np.sqrt(lam) - lr ** 2 / 2), lr ** 2 * len(lam)
    if row == "sgd":  # d = -eta g
        return lr * g @ g - lr ** 2 / 2 * g @ h @ g, lr ** 2 * g @ h @ g
    if row == "normalized_gd":  # d = -eps g / ||g||
        return (lr * np.linalg.norm(g) - lr ** 2 / 2 * g @ h @ g / (g @ g),
                lr ** 2 * g @ h @ g / (g @ g))
    if row == "sign_gd":  # d = -eta sign(g)
        s = np.sign(g)
        return lr * np.abs(g).sum() - lr ** 2 / 2 * s @ h @ s, lr ** 2 * s @ h @ s
    raise AssertionError(row)


ROWS = {"newton": 0.5, "normalized_ngd": 0.01, "gn_normalized_ngd": 0.02,
        "eigenbasis_normalized_ngd": 0.01, "sgd": 0.05, "normalized_gd": 0.01, "sign_gd": 0.003}


@pytest.mark.parametrize("row", sorted(ROWS))
def test_measured_step_matches_the_papers_closed_form(row, quad):
    prob, g, h = quad
    lr = ROWS[row]
    r = A.analyze(row, prob, hypers={"lr": lr})
    delta, norm_h = _paper(row, lr, g, h)
    assert r.delta == pytest.approx(delta, rel=1e-6)
    assert r.norm_h == pytest.approx(norm_h, rel=1e-6)
    # ... and the closed form the command prints beside it is the same number
    assert r.closed["delta"] == pytest.approx(delta, rel=1e-6)
    assert r.closed["norm_h_sq"] == pytest.approx(norm_h, rel=1e-6)


def test_per_eigendirection_parts_add_up(quad):
    prob, g, h = quad
    for r in A.analyze_all(["adam", "shampoo", "kfac", "lbfgs", "adahessian"], prob):
        assert sum(r.delta_i) == pytest.approx(r.delta, rel=1e-9, abs=1e-15)
        assert sum(r.norm_h_i) == pytest.approx(r.norm_h, rel=1e-9, abs=1e-15)
        assert sum(b["delta"] for b in r.bands()) == pytest.approx(r.delta, rel=1e-9, abs=1e-15)
        assert r.closed == {}  # not a row of the paper's Section 1


def test_minibatch_noise_is_the_mean_over_the_drawn_batches(quad):
    """GD's step is linear in the gradient, d_b - d = -eta (g_b - g): N_b written out."""
    prob, g, h = quad
    eta, batch, samples = 0.05, 6, 5
    r = A.analyze("sgd", prob, batch=batch, samples=samples, hypers={"lr": eta})
    import torch
    gen = torch.Generator().manual_seed(0)  # the analysis draws its batches this way
    x, y = prob.x.numpy(), prob.y.numpy()
    theta = prob.model.weight.detach().numpy().reshape(-1)
    total, per = 0.0, np.zeros(len(g))
    lam, q = np.linalg.eigh(h)
    for _ in range(samples):
        idx = torch.randperm(len(x), generator=gen)[:batch].numpy()
        gb = x[idx].T @ (x[idx] @ theta - y[idx]) / batch
        xi = -eta * (gb - g)
        total += xi @ h @ xi
        per += (q.T @ xi) ** 2
    assert r.noise == pytest.approx(total / samples / 2, rel=1e-6)
    assert np.allclose(r.noise_i, per / samples, rtol=1e-6, atol=1e-18)


def test_mlp_on_digits_with_every_kind_of_curvature_source():
    prob = A.problem("mlp:digits,hidden=4")
    results = A.analyze_all(["sgd", "adam", "sophia", "adahessian", "kfac", "newton"], prob)
    assert [r.spec for r in results] == ["SGD", "Adam", "Sophia", "AdaHessian", "KFAC", "Newton"]
    for r in results:
        assert np.isfinite(r.delta) and sum(r.delta_i) == pytest.approx(r.delta, abs=1e-12)
    assert results[-1].delta > 0  # Newton drops the negative eigenvalues: no uphill step


def test_cli_table_json_and_plot(tmp_path):
    runner = CliRunner()
    out = tmp_path / "analysis.png"
    res = runner.invoke(app, ["analyze", "newton", "sgd", "adam", "--problem",
                              "quadratic:n=8,cond=100", "--plot", str(out)])
    assert res.exit_code == 0, res.output
    assert "paper: Newton" in res.output and "Adam" in res.output
    head = out.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    assert struct.unpack(">II", head[16:24]) == (1100, 420)  # 11 x 4.2 inches at 100 dpi
    res = runner.invoke(app, ["analyze", "sgd", "--problem", "quadratic:n=8,cond=100", "--json"])
    data = json.loads(res.output)
    assert data["specs"][0]["closed_form"]["row"] == "GD"
    assert len(data["specs"][0]["eigenvalues"]) == 8


def test_cli_refuses_an_unknown_problem_in_one_line():
    res = CliRunner().invoke(app, ["analyze", "adam", "--problem", "cubic:n=3"])
    assert res.exit_code == 1
    assert res.output.strip().count("\n") == 0 and "unknown --problem" in res.output
