"""The dense step's Cholesky route (curvc.runtime.dense.definite_solve) against numpy.

Newton's and the normalized length's d are C^-1 g up to a scale: where C is
certified positive definite the step solves instead of decomposing, and it
must give the d numpy's solve gives; where C has an eigenvalue the
pseudo-inverse's rule counts as zero (positive but at rounding level),
a plain Cholesky solve would step 1/1e-20 along it, so the certificate must
fail and the eigendecomposition zero that direction.
"""
import numpy as np
import pytest
import torch

from curvc.runtime import dense


def _settings(length="none", eps_inside=0.0, eps_after=0.0, clip=0.0):
    return {"length": length, "eps_inside": eps_inside, "eps_after": eps_after,
            "power": 1.0, "clip": clip}


@pytest.fixture
def eigh_calls(monkeypatch):
    """How many times torch.linalg.eigh ran (it still computes)."""
    calls = []
    real = torch.linalg.eigh

    def counted(*args, **kw):
        calls.append(1)
        return real(*args, **kw)
    monkeypatch.setattr(torch.linalg, "eigh", counted)
    return calls


def _spd(n=40, seed=0):
    rng = np.random.default_rng(seed)
    m = rng.standard_normal((n, n))
    return m @ m.T / n + 0.05 * np.eye(n), rng.standard_normal(n)


@pytest.mark.parametrize("eps_inside, eps_after", [(0.0, 0.0), (1e-2, 0.0), (0.0, 0.3)])
def test_a_positive_definite_newton_step_is_solved_without_the_eigendecomposition(
        eigh_calls, eps_inside, eps_after):
    C, g = _spd()
    d = dense.direction(torch.tensor(C), torch.tensor(g),
                        _settings(eps_inside=eps_inside, eps_after=eps_after))
    expected = np.linalg.solve(C + (eps_inside + eps_after) * np.eye(len(g)), g)
    np.testing.assert_allclose(d.numpy(), expected, rtol=1e-10)
    assert not eigh_calls


@pytest.mark.parametrize("eps_after, factorizations", [(0.0, 1), (0.3, 2)])
def test_the_certificates_factor_solves_unless_the_damping_after_is_too_far_from_it(
        monkeypatch, eps_after, factorizations):
    # Refining against C + eps_after I on C - tI's factor shrinks the error by
    # (t + eps_after) / (w_min - t): ~1e-13 undamped, but 0.3 / 0.05 > 1 diverges, so
    # the residual check hands that one to a factor of C + eps_after I itself.
    calls = []
    real = torch.linalg.cholesky_ex
    monkeypatch.setattr(torch.linalg, "cholesky_ex", lambda m: calls.append(1) or real(m))
    C, g = _spd(seed=6)
    d = dense.definite_solve(torch.tensor(C), torch.tensor(g), eps_after)
    np.testing.assert_allclose(d.numpy(), np.linalg.solve(C + eps_after * np.eye(len(g)), g),
                               rtol=1e-10)
    assert len(calls) == factorizations


def test_a_positive_definite_normalized_step_is_solved_to_unit_length(eigh_calls):
    C, g = _spd(seed=1)
    d = dense.direction(torch.tensor(C), torch.tensor(g), _settings("normalized"))
    n = np.linalg.solve(C, g)
    np.testing.assert_allclose(d.numpy(), n / np.sqrt(g @ n), rtol=1e-10)
    assert not eigh_calls


def test_the_solve_and_the_eigendecomposition_give_the_same_float32_step():
    C, g = _spd(n=60, seed=2)
    c, gt = torch.tensor(C, dtype=torch.float32), torch.tensor(g, dtype=torch.float32)
    s = _settings(eps_inside=1e-3)
    solved, decomposed = dense.direction(c, gt, s), dense.direction(c, gt, s, solve=False)
    assert solved.dtype == torch.float32
    torch.testing.assert_close(solved, decomposed, rtol=1e-6, atol=1e-7)


def test_an_eigenvalue_at_rounding_level_fails_the_certificate_and_gets_no_step(eigh_calls):
    # diag(1, 1e-20) has a Cholesky factor, but numpy's pinv rule (w > n eps max|w|)
    # counts 1e-20 as zero: the step along it is 0, not 1e20 times the gradient.
    C = np.diag([1.0, 1e-20])
    g = np.array([3.0, 2.0])
    d = dense.direction(torch.tensor(C), torch.tensor(g), _settings())
    np.testing.assert_allclose(d.numpy(), np.linalg.pinv(C) @ g)
    np.testing.assert_allclose(d.numpy(), [3.0, 0.0])
    assert len(eigh_calls) == 1


def test_a_singular_or_indefinite_matrix_falls_back_to_the_pseudo_inverse(eigh_calls):
    rng = np.random.default_rng(3)
    q, _ = np.linalg.qr(rng.standard_normal((5, 5)))
    g = rng.standard_normal(5)
    for w in ([2.0, 1.0, 0.5, 0.0, 0.0], [2.0, 1.0, 0.5, -0.5, -3.0]):
        C = q @ np.diag(w) @ q.T
        d = dense.direction(torch.tensor(C), torch.tensor(g), _settings())
        inv = np.array([1 / x if x > 1e-12 else 0.0 for x in w])  # positive ones only
        np.testing.assert_allclose(d.numpy(), q @ (inv * (q.T @ g)), rtol=1e-9, atol=1e-12)
    assert len(eigh_calls) == 2


@pytest.mark.parametrize("settings", [_settings("gradient_norm"), _settings("eigen_sign"),
                                      _settings(clip=1.0)])
def test_lengths_that_need_the_spectrum_always_decompose(eigh_calls, settings):
    C, g = _spd(n=6, seed=4)
    dense.direction(torch.tensor(C), torch.tensor(g), settings)
    assert len(eigh_calls) == 1


def test_a_matrix_with_a_nan_fails_the_certificate():
    C, g = _spd(n=4, seed=5)
    C[1, 2] = C[2, 1] = np.nan
    assert dense.definite_solve(torch.tensor(C), torch.tensor(g), 0.0) is None
