"""The top of a Hessian's spectrum without the Hessian: Lanczos on Hessian-vector products.

A model of a few thousand parameters or more has a Hessian too large to form and
eigendecompose (its square in float64), but H v costs one forward and two backward
passes. Lanczos builds an orthonormal basis of the Krylov space span{v, Hv, H^2 v, ...}
in which H is tridiagonal; the eigenvalues of that small matrix (the Ritz values)
converge first at the ends of the spectrum, so the largest eigenpairs, the sharp
directions the paper's analysis is most about, come out after a few times k products.
The basis is reorthogonalized in full against every earlier vector each iteration
(twice, "twice is enough"), which costs O(n m) per step but keeps the Ritz values free
of the spurious copies plain Lanczos produces in floating point.
"""
from __future__ import annotations

from typing import Callable

import torch

MatVec = Callable[[torch.Tensor], torch.Tensor]


def lanczos(matvec: MatVec, n: int, k: int, iterations: int | None = None, seed: int = 0,
            dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` algebraically largest eigenpairs of the symmetric operator ``matvec`` on
    R^n: (eigenvalues ascending, shape (k,); eigenvectors as columns, shape (n, k)).
    ``iterations`` (the Krylov dimension) defaults to min(n, max(3k, k + 40)); with
    ``iterations = n`` the result is exact up to rounding, as a full eigendecomposition."""
    if not 1 <= k <= n:
        raise ValueError(f"top-k eigenpairs: k must be in 1..{n}, got {k}")
    m = min(n, iterations if iterations is not None else max(3 * k, k + 40))
    gen = torch.Generator().manual_seed(seed)
    v = torch.randn(n, generator=gen, dtype=dtype)
    basis = torch.zeros(m, n, dtype=dtype)
    alpha = torch.zeros(m, dtype=dtype)
    beta = torch.zeros(m, dtype=dtype)
    basis[0] = v / v.norm()
    size = m
    for j in range(m):
        w = matvec(basis[j]).to(dtype)
        alpha[j] = basis[j] @ w
        for _ in range(2):  # full reorthogonalization against the whole basis so far
            w = w - basis[:j + 1].T @ (basis[:j + 1] @ w)
        if j + 1 == m:
            break
        beta[j] = w.norm()
        if beta[j] <= 1e-12 * alpha[:j + 1].abs().max().clamp_min(1e-300):
            size = j + 1  # an invariant subspace: its Ritz pairs are exact
            break
        basis[j + 1] = w / beta[j]
    t = torch.diag(alpha[:size]) + torch.diag(beta[:size - 1], 1) + torch.diag(beta[:size - 1], -1)
    ritz, y = torch.linalg.eigh(t)
    top = min(k, size)
    return ritz[-top:], basis[:size].T @ y[:, -top:]


def hessian_vector_product(f: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> MatVec:
    """v -> H v for the Hessian H of the scalar ``f`` at ``x`` (forward over reverse)."""
    grad = torch.func.grad(f)

    def hv(v: torch.Tensor) -> torch.Tensor:
        return torch.func.jvp(grad, (x,), (v,))[1]
    return hv
