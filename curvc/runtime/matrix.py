"""Matrix-structured preconditioners, shared by every generated module.

``kronecker`` is the per-tensor step of a Kronecker-factored curvature
(Shampoo): for each mode i of a tensor G of order k, the factor

    L_i <- L_i + U_i U_i^T            (sum)   or   beta L_i + (1 - beta) U_i U_i^T  (ema)

where U_i is G unfolded along mode i (a d_i x prod(other dims) matrix), and
the step is G multiplied along every mode by the factor's inverse root

    R_i = (L_i + eps_inside I)^(-e/k) + eps_after I.

The roots are the expensive part (an eigendecomposition, O(d^3)); they are
recomputed only when the plan's refresh flag holds and kept in the state in
between, in the state's dtype. A float64 factor's root is computed in float64;
a float32 factor's in float32 first (about twice as fast), checked, and
recomputed in float64 if that eigendecomposition failed (see ``_refreshed_root``).
"""
from __future__ import annotations

import math
import warnings

import torch


def inverse_root(matrix: torch.Tensor, exponent: float, eps: float = 0.0, *,
                 dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """(A + eps I)^-exponent of a symmetric positive semi-definite A, computed in ``dtype``.

    Through the eigendecomposition. Eigenvalues that are not positive (directions
    the statistics never saw, with no damping) get 0: the pseudo-inverse root,
    rather than an infinity that would poison the parameter.
    """
    a = _damped_symmetric(matrix, eps, dtype)
    if exponent == 1.0:
        # The plain inverse (K-FAC, Newton-like steps): a Cholesky factorization
        # is several times cheaper than an eigendecomposition, and fails exactly
        # when the matrix is not positive definite, where the pseudo-inverse below
        # takes over.
        chol, info = torch.linalg.cholesky_ex(a)
        if not info.item():
            return torch.cholesky_inverse(chol).to(matrix.dtype)
    w, q = torch.linalg.eigh(a)
    return _root_of(w, q, exponent).to(matrix.dtype)


def _damped_symmetric(matrix: torch.Tensor, eps: float, dtype: torch.dtype) -> torch.Tensor:
    a = matrix.to(dtype)
    if eps:
        a = a + eps * torch.eye(a.shape[0], dtype=a.dtype, device=a.device)
    return (a + a.T) / 2  # symmetric to the last bit, as eigh assumes


def _root_of(w: torch.Tensor, q: torch.Tensor, exponent: float) -> torch.Tensor:
    """Q diag(w^-exponent) Q^T, with 0 for the eigenvalues that are not positive."""
    inv = torch.where(w > 0, w.clamp(min=torch.finfo(w.dtype).tiny).pow(-exponent),
                      torch.zeros_like(w))
    return (q * inv) @ q.T


class InaccurateRoot(RuntimeError):
    """An eigendecomposition whose result cannot be trusted (non-finite, or one that
    does not reproduce its matrix)."""


# A backward-stable symmetric eigensolver returns Q, w with ||A Q - Q diag(w)|| of
# order n eps ||A|| (LAPACK's bound; in practice nearer sqrt(n) eps). A residual
# above _RESIDUAL_SLACK n eps ||A|| is far outside rounding: the solver failed.
_RESIDUAL_SLACK = 16.0
_PROBES = 4  # random vectors the residual is measured on (a full check costs a matmul)


def checked_inverse_root(matrix: torch.Tensor, exponent: float, eps: float,
                         dtype: torch.dtype) -> torch.Tensor:
    """``inverse_root`` through eigh in ``dtype``, refusing (``InaccurateRoot``) a
    decomposition with non-finite values or a residual beyond rounding.

    The residual is measured on k random vectors V: for Gaussian V,
    ||(A - Q diag(w) Q^T) V||_F / sqrt(k) estimates ||A - Q diag(w) Q^T||_F, at
    O(n^2 k) cost instead of the O(n^3) of the full product. The generator is
    seeded, so a step is reproducible (a resumed run stays bitwise the same).
    """
    a = _damped_symmetric(matrix, eps, dtype)
    w, q = torch.linalg.eigh(a)
    if not (torch.isfinite(w).all() and torch.isfinite(q).all()):
        raise InaccurateRoot("its eigendecomposition is not finite")
    n = a.shape[0]
    gen = torch.Generator(device=a.device).manual_seed(n)
    v = torch.randn(n, _PROBES, dtype=dtype, device=a.device, generator=gen)
    residual = torch.linalg.matrix_norm(a @ v - q @ (w[:, None] * (q.T @ v)))
    scale = torch.linalg.matrix_norm(a) * math.sqrt(_PROBES)
    limit = _RESIDUAL_SLACK * n * torch.finfo(dtype).eps
    if not residual <= limit * scale:  # `not <=`: a NaN residual fails too
        raise InaccurateRoot(f"its eigendecomposition in {dtype} misses the matrix by "
                             f"{(residual / scale).item():.1e} of its norm")
    root = _root_of(w, q, exponent)
    if not torch.isfinite(root).all():
        raise InaccurateRoot("it is not finite")
    return root.to(matrix.dtype)


def mode_product(x: torch.Tensor, m: torch.Tensor, mode: int) -> torch.Tensor:
    """x multiplied along ``mode`` by the (symmetric) matrix m.

    The first and the last mode are a matrix product on a view of x (for a
    matrix, m @ x and x @ m); a middle mode moves its dimension to the front.
    """
    if mode == x.dim() - 1 and mode > 0:
        return (_unfold_last(x) @ m).reshape(x.shape)
    moved = x.movedim(mode, 0)
    out = (m @ _unfold(moved)).reshape(moved.shape)
    return out.movedim(0, mode)


def _unfold(moved: torch.Tensor) -> torch.Tensor:
    """A tensor as a (first dim) x (the rest) matrix; sizes spelled out, since -1 is
    ambiguous when a dimension is 0."""
    return moved.reshape(moved.shape[0], math.prod(moved.shape[1:]))


def _unfold_last(x: torch.Tensor) -> torch.Tensor:
    """A tensor as a (the rest) x (last dim) matrix."""
    return x.reshape(math.prod(x.shape[:-1]), x.shape[-1])


def _gram(statistic: torch.Tensor, mode: int, dtype: torch.dtype) -> tuple:
    """(U, U^T) for the unfolding U of ``statistic`` along ``mode``, as views where
    the memory allows (the last mode: U = X^T for X the tensor as a rest x d matrix)."""
    if mode == statistic.dim() - 1 and mode > 0:
        x = _unfold_last(statistic).to(dtype)
        return x.T, x
    u = _unfold(statistic.movedim(mode, 0)).to(dtype)
    return u, u.T


def kronecker(state: dict, statistic: torch.Tensor, value: torch.Tensor, *, factors: str,
              roots: str, accumulate: str, update: bool, refresh: bool, beta: float,
              init: float, exponent: float, eps_inside: float, eps_after: float,
              max_dim: float, per_mode: bool) -> torch.Tensor:
    """One tensor's Kronecker-preconditioned value (see the module docstring).

    ``state`` is the parameter's optimizer state: factor i lives under
    ``f"{factors}_{i}"`` and its root under ``f"{roots}_{i}"``, created on
    first use (the factor as ``init * I``). Modes longer than ``max_dim``
    keep no factor (the identity), as an embedding's vocabulary would cost
    a vocabulary-squared matrix.
    """
    if value.numel() == 0:
        return value  # a zero-size tensor (Linear(4, 0)): nothing to precondition
    order = value.dim()
    e = exponent / order if per_mode and order else exponent
    out = value
    for i, d in enumerate(value.shape):
        if d > max_dim:
            continue
        key, root_key = f"{factors}_{i}", f"{roots}_{i}"
        factor = state.get(key)
        if factor is None:
            factor = state[key] = torch.eye(d, dtype=value.dtype, device=value.device).mul_(init)
        if update:
            u, ut = _gram(statistic, i, factor.dtype)
            if accumulate == "sum":
                factor.addmm_(u, ut)
            else:
                factor.mul_(beta).addmm_(u, ut, alpha=1.0 - beta)
        if refresh or root_key not in state:
            state[root_key] = _refreshed_root(factor, e, eps_inside, state.get(root_key))
        root = state[root_key].to(out.dtype)
        moved = mode_product(out, root, i)
        # (R + eps_after I) x = R x + eps_after x: no identity matrix built per step
        out = moved.add_(out, alpha=eps_after) if eps_after else moved
    return out


def _refreshed_root(factor: torch.Tensor, exponent: float, eps: float,
                    previous: torch.Tensor | None) -> torch.Tensor:
    """The factor's new inverse root: in float32 first for a factor of at most
    float32 precision, then in float64 if that failed (``InaccurateRoot``, or a
    solver that did not converge); if float64 fails too (a non-finite factor), the
    previous root, with a warning."""
    reasons = []
    for dtype in _root_dtypes(factor.dtype):
        try:
            return checked_inverse_root(factor, exponent, eps, dtype)
        except RuntimeError as e:  # torch.linalg.LinAlgError and InaccurateRoot are
            reasons.append(f"in {dtype}: {e}")
    if previous is None:
        previous = torch.eye(factor.shape[0], dtype=factor.dtype, device=factor.device)
    warnings.warn(f"an inverse root of a {factor.shape[0]}x{factor.shape[0]} Kronecker factor "
                  f"could not be computed ({'; '.join(reasons)}); the previous root is kept",
                  RuntimeWarning)
    return previous


def _root_dtypes(dtype: torch.dtype) -> tuple:
    """The precisions a root is tried in, cheapest first."""
    if dtype == torch.float64:
        return (torch.float64,)
    return (torch.float32, torch.float64)
