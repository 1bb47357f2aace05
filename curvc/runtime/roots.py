"""A symmetric factor's inverse roots, the one spectral function and the pseudo-inverse.

Everything the matrix structures (``curvc.runtime.matrix``: Kronecker, SOAP's eigenbasis;
``curvc.runtime.kfac``; ``curvc.runtime.dense``) do with a factor's eigenvalues:

* ``spectral``: f(lam) = 1 / max(lam^e + after, floor), 0 for a non-positive eigenvalue
  without damping after or floor (the pseudo-inverse);
* ``rounding_level`` and ``at_rounding``: an eigenvalue within n eps of the largest is
  rounding noise of a zero one;
* the precision a root is computed in: a float64 factor's in float64; a float32
  factor's in float32 first (about twice as fast), checked against the factor, and
  recomputed in float64 if that failed (``refreshed``); K-FAC's damped inverse by
  Cholesky likewise (``inverse_root``).
"""
from __future__ import annotations

import math
import warnings

import torch


def inverse_root(matrix: torch.Tensor, exponent: float, eps: float = 0.0,
                 start: float = 0.0) -> torch.Tensor:
    """(A + eps I)^-exponent of a symmetric positive semi-definite A.

    Through the eigendecomposition, in float64. Eigenvalues that are not positive
    (directions the statistics never saw, with no damping) get 0: the pseudo-inverse
    root, rather than an infinity that would poison the parameter.

    The plain inverse (exponent 1: K-FAC, Newton-like steps) of a damped or started
    factor (``eps`` or ``start`` > 0: positive definite but for rounding) is a Cholesky
    factorization first, several times cheaper than an eigendecomposition: in float32
    for a matrix of at most float32 precision where that can be trusted
    (``_cholesky_inverse``), else in float64; where it fails, the pseudo-inverse takes
    over. A factor that can be singular (neither) goes to the eigendecomposition at
    once: Cholesky can succeed on a matrix singular at rounding level, with a pivot of
    noise and an inverse of 1e17s, where the pseudo-inverse (``at_rounding``) is 0.
    """
    if exponent == 1.0 and (eps or start):  # a factor that can be singular: eigh below
        for dtype in root_dtypes(matrix.dtype):
            inverse = _cholesky_inverse(matrix, eps, dtype)
            if inverse is not None:
                return inverse.to(matrix.dtype)
    w, q = torch.linalg.eigh(damped_symmetric(matrix, eps, torch.float64))
    return _root_of(w, q, exponent, inside=eps, start=start).to(matrix.dtype)


# A float32 inverse is kept where LAPACK's bound on its relative error, n eps kappa,
# is below this; kappa is estimated from the Cholesky pivots (max / min of diag(L)^2,
# a lower bound on the condition number). Beyond it the inverse is computed in float64.
_FLOAT32_INVERSE_ERROR = 1e-2


def _cholesky_inverse(matrix: torch.Tensor, eps: float,
                      dtype: torch.dtype) -> torch.Tensor | None:
    """(A + eps I)^-1 by Cholesky in ``dtype``, or None: not positive definite, or, in
    float32, not finite or too ill-conditioned for float32 to give its digits."""
    chol, info = torch.linalg.cholesky_ex(damped_symmetric(matrix, eps, dtype))
    if info.item():
        return None
    if dtype == torch.float64:
        return torch.cholesky_inverse(chol)
    pivots = chol.diagonal().square()
    limit = _FLOAT32_INVERSE_ERROR / (matrix.shape[0] * torch.finfo(dtype).eps)
    if not pivots.max() <= limit * pivots.min():  # `not <=`: NaN fails too
        return None
    inverse = torch.cholesky_inverse(chol)
    return inverse if bool(torch.isfinite(inverse).all()) else None


def damped_symmetric(matrix: torch.Tensor, eps: float, dtype: torch.dtype) -> torch.Tensor:
    a = matrix.to(dtype)
    # Symmetric to the last bit, as eigh assumes; eps on the diagonal afterwards gives
    # the same bits as (A + eps I + (A + eps I)^T) / 2 without an identity matrix.
    out = (a + a.T).mul_(0.5)
    if eps:
        out.diagonal().add_(eps)
    return out


def spectral(w: torch.Tensor, exponent: float, after: float = 0.0,
             floor: float = 0.0) -> torch.Tensor:
    """The one spectral function of the matrix structures, applied to eigenvalues:
    f(lam) = 1 / max(lam^exponent + after, floor), the damping ``after`` the root
    and the floor as the language defines them for a diagonal P (eps inside the
    root is added to the matrix before its eigendecomposition).

    An eigenvalue that is not positive (a direction the statistics never saw)
    counts as 0: f is then 1 / max(after, floor), or 0 without either (the
    pseudo-inverse), rather than an infinity that would poison the parameter.
    """
    tiny = torch.finfo(w.dtype).tiny
    positive = w.clamp(min=tiny)
    if not after and not floor:
        return torch.where(w > 0, positive.pow(-exponent), 0.0)
    denominator = (torch.where(w > 0, positive.pow(exponent), 0.0) + after).clamp(min=floor)
    return torch.where(denominator > 0, 1.0 / denominator.clamp(min=tiny), 0.0)


def at_rounding(w: torch.Tensor, inside: float = 0.0, start: float = 0.0) -> torch.Tensor:
    """A factor's eigenvalues, where the factor can be singular (no damping ``inside``
    and a ``start`` of 0: L_0 = 0), with each within n eps of the largest (n the
    factor's size, eps its precision's) set to exactly 0; otherwise as they are.

    A Gram matrix of fewer rows than columns (a vector's g g^T, an instant factor) is
    singular, and its null space comes out of eigh as eigenvalues of either sign at
    rounding level. Taken as they come, a noise eigenvalue of 1e-17 would give the
    inverse root of noise, 1e17 for an inverse, along a direction g has no component
    in but its own rounding: the step would be noise. Counted as exactly 0 (numpy's
    pinv rule, the dense structure's), the pseudo-inverse gives 0 there. A damped or
    started factor has no null space (every eigenvalue is at least the damping or the
    start's share), and its small eigenvalues are kept as computed."""
    if inside or start:
        return w
    return torch.where(w.abs() <= rounding_level(w), torch.zeros_like(w), w)


def rounding_level(w: torch.Tensor) -> torch.Tensor:
    """n eps max|w| of each row of eigenvalues (n their number, eps their precision's):
    an eigenvalue at or below it is rounding noise of a zero one (numpy's pinv cutoff).
    The one threshold of the matrix structures' pseudo-inverse: the factors' (above)
    and the dense matrix's (``curvc.runtime.dense``, on its damped eigenvalues)."""
    return w.abs().amax(-1, keepdim=True) * (w.shape[-1] * torch.finfo(w.dtype).eps)


def _root_of(w: torch.Tensor, q: torch.Tensor, exponent: float, after: float = 0.0,
             floor: float = 0.0, inside: float = 0.0, start: float = 0.0) -> torch.Tensor:
    """Q f(diag(w)) Q^T for the spectral function f (``spectral``) of w ``at_rounding``."""
    return (q * spectral(at_rounding(w, inside, start), exponent, after, floor)) @ q.T


class InaccurateRoot(RuntimeError):
    """An eigendecomposition whose result cannot be trusted (non-finite, or one that
    does not reproduce its matrix)."""


# A backward-stable symmetric eigensolver returns Q, w with ||A Q - Q diag(w)|| of
# order n eps ||A|| (LAPACK's bound; in practice nearer sqrt(n) eps). A residual
# above RESIDUAL_SLACK n eps ||A|| is far outside rounding: the solver failed.
RESIDUAL_SLACK = 16.0
PROBES = 4  # random vectors the residual is measured on (a full check costs a matmul)


def checked_eigh(matrix: torch.Tensor, eps: float, dtype: torch.dtype) -> tuple:
    """(w, Q) of ``matrix + eps I`` through eigh in ``dtype``, refusing
    (``InaccurateRoot``) a decomposition with non-finite values or a residual beyond
    rounding.

    The residual is measured on k random vectors V: for Gaussian V,
    ||(A - Q diag(w) Q^T) V||_F / sqrt(k) estimates ||A - Q diag(w) Q^T||_F, at
    O(n^2 k) cost instead of the O(n^3) of the full product. The generator is
    seeded, so a step is reproducible (a resumed run stays bitwise the same).
    """
    a = damped_symmetric(matrix, eps, dtype)
    w, q = torch.linalg.eigh(a)
    if not (torch.isfinite(w).all() and torch.isfinite(q).all()):
        raise InaccurateRoot("its eigendecomposition is not finite")
    n = a.shape[0]
    gen = torch.Generator(device=a.device).manual_seed(n)
    v = torch.randn(n, PROBES, dtype=dtype, device=a.device, generator=gen)
    residual = torch.linalg.matrix_norm(a @ v - q @ (w[:, None] * (q.T @ v)))
    scale = torch.linalg.matrix_norm(a) * math.sqrt(PROBES)
    limit = RESIDUAL_SLACK * n * torch.finfo(dtype).eps
    if not residual <= limit * scale:  # `not <=`: a NaN residual fails too
        raise InaccurateRoot(f"its eigendecomposition in {dtype} misses the matrix by "
                             f"{(residual / scale).item():.1e} of its norm")
    return w, q


def checked_inverse_root(matrix: torch.Tensor, exponent: float, eps: float,
                         dtype: torch.dtype, after: float = 0.0,
                         floor: float = 0.0, start: float = 0.0) -> torch.Tensor:
    """``Q f(w) Q^T`` (``spectral``) from ``checked_eigh``, refusing a non-finite one."""
    w, q = checked_eigh(matrix, eps, dtype)
    root = _root_of(w, q, exponent, after, floor, inside=eps, start=start)
    if not torch.isfinite(root).all():
        raise InaccurateRoot("it is not finite")
    return root.to(matrix.dtype)


def checked_eigenbasis(matrix: torch.Tensor, exponent: float, eps: float,
                       dtype: torch.dtype, after: float = 0.0,
                       floor: float = 0.0, start: float = 0.0) -> torch.Tensor:
    """``[Q, f(w)]`` as one d x (d + 1) matrix (so a state entry holds both): the
    eigenbasis and the spectral function of its eigenvalues."""
    w, q = checked_eigh(matrix, eps, dtype)
    scale = spectral(at_rounding(w, eps, start), exponent, after, floor)
    if not torch.isfinite(scale).all():
        raise InaccurateRoot("its eigenvalues' root is not finite")
    return torch.cat([q, scale[:, None]], dim=1).to(matrix.dtype)


def refreshed(how, factor: torch.Tensor, exponent: float, eps: float, after: float,
               floor: float, previous: torch.Tensor | None,
               start: float = 0.0) -> torch.Tensor:
    """The factor's new root (``how``: ``checked_inverse_root`` or ``checked_eigenbasis``):
    in float32 first for a factor of at most float32 precision, then in float64 if
    that failed (``InaccurateRoot``, or a solver that did not converge); if float64
    fails too (a non-finite factor), the previous one, with a warning."""
    reasons = []
    for dtype in root_dtypes(factor.dtype):
        try:
            return how(factor, exponent, eps, dtype, after, floor, start)
        except RuntimeError as e:  # torch.linalg.LinAlgError and InaccurateRoot are
            reasons.append(f"in {dtype}: {e}")
    if previous is None:
        n = factor.shape[0]
        previous = torch.eye(n, dtype=factor.dtype, device=factor.device)
        if how is checked_eigenbasis:
            previous = torch.cat([previous, torch.ones(n, 1, dtype=factor.dtype,
                                                       device=factor.device)], dim=1)
    warnings.warn(f"an inverse root of a {factor.shape[0]}x{factor.shape[0]} Kronecker factor "
                  f"could not be computed ({'; '.join(reasons)}); the previous root is kept",
                  RuntimeWarning)
    return previous


def root_dtypes(dtype: torch.dtype) -> tuple:
    """The precisions a root is tried in, cheapest first."""
    if dtype == torch.float64:
        return (torch.float64,)
    return (torch.float32, torch.float64)
