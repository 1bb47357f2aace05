"""Matrix-structured preconditioners, shared by every generated module.

``kronecker`` is the per-tensor step of a Kronecker-factored curvature
(Shampoo): for each mode i of a tensor G of order k, the factor

    L_i <- L_i + U_i U_i^T            (sum)   or   beta L_i + (1 - beta) U_i U_i^T  (ema)

where U_i is G unfolded along mode i (a d_i x prod(other dims) matrix), and
the step is G multiplied along every mode by the factor's inverse root

    R_i = (L_i + eps_inside I)^(-e/k) + eps_after I.

The roots are the expensive part (an eigendecomposition, O(d^3)); they are
recomputed only when the plan's refresh flag holds and kept in the state in
between. They are computed in float64 and stored in the state's dtype.
"""
from __future__ import annotations

import math
import warnings

import torch


def inverse_root(matrix: torch.Tensor, exponent: float, eps: float = 0.0) -> torch.Tensor:
    """(A + eps I)^-exponent of a symmetric positive semi-definite A.

    Through the eigendecomposition in float64. Eigenvalues that are not
    positive (directions the statistics never saw, with no damping) get 0:
    the pseudo-inverse root, rather than an infinity that would poison the
    parameter.
    """
    a = matrix.to(torch.float64)
    if eps:
        a = a + eps * torch.eye(a.shape[0], dtype=a.dtype, device=a.device)
    a = (a + a.T) / 2  # symmetric to the last bit, as eigh assumes
    if exponent == 1.0:
        # The plain inverse (K-FAC, Newton-like steps): a Cholesky factorization
        # is several times cheaper than an eigendecomposition, and fails exactly
        # when the matrix is not positive definite, where the pseudo-inverse below
        # takes over.
        chol, info = torch.linalg.cholesky_ex(a)
        if not info.item():
            return torch.cholesky_inverse(chol).to(matrix.dtype)
    w, q = torch.linalg.eigh(a)
    inv = torch.where(w > 0, w.clamp(min=torch.finfo(w.dtype).tiny).pow(-exponent),
                      torch.zeros_like(w))
    return ((q * inv) @ q.T).to(matrix.dtype)


def mode_product(x: torch.Tensor, m: torch.Tensor, mode: int) -> torch.Tensor:
    """x multiplied along ``mode`` by the (symmetric) matrix m."""
    moved = x.movedim(mode, 0)
    out = (m @ _unfold(moved)).reshape(moved.shape)
    return out.movedim(0, mode)


def _unfold(moved: torch.Tensor) -> torch.Tensor:
    """A tensor as a (first dim) x (the rest) matrix; sizes spelled out, since -1 is
    ambiguous when a dimension is 0."""
    return moved.reshape(moved.shape[0], math.prod(moved.shape[1:]))


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
            u = _unfold(statistic.movedim(i, 0)).to(factor.dtype)
            if accumulate == "sum":
                factor.addmm_(u, u.T)
            else:
                factor.mul_(beta).addmm_(u, u.T, alpha=1.0 - beta)
        if refresh or root_key not in state:
            state[root_key] = _refreshed_root(factor, e, eps_inside, state.get(root_key))
        root = state[root_key]
        if eps_after:
            root = root + eps_after * torch.eye(d, dtype=root.dtype, device=root.device)
        out = mode_product(out, root.to(out.dtype), i)
    return out


def _refreshed_root(factor: torch.Tensor, exponent: float, eps: float,
                    previous: torch.Tensor | None) -> torch.Tensor:
    """The factor's new inverse root; if that fails (a non-finite factor, an
    eigensolver that does not converge), the previous root, with a warning."""
    try:
        root = inverse_root(factor, exponent, eps)
        if torch.isfinite(root).all():
            return root
        reason = "it is not finite"
    except RuntimeError as e:  # torch.linalg.LinAlgError is a RuntimeError
        reason = f"{type(e).__name__}: {e}"
    if previous is None:
        previous = torch.eye(factor.shape[0], dtype=factor.dtype, device=factor.device)
    warnings.warn(f"an inverse root of a {factor.shape[0]}x{factor.shape[0]} Kronecker factor "
                  f"could not be computed ({reason}); the previous root is kept", RuntimeWarning)
    return previous
