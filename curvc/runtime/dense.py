"""The dense structure: the whole n x n curvature over all parameters (small models).

This is the paper's theory rows as code: Newton (the Hessian, d = H^-1 g),
its normalized and sign variants, and hybrids such as full-matrix Adagrad
(the gradient's outer products summed, d = (C + eps I)^-1/2 g). The matrix
costs n^2 memory and an eigendecomposition per step, so it is meant for
models of up to a few thousand parameters: toy problems, the last layer of
a network, or checking what the diagonal and Kronecker structures
approximate.

With C = Q diag(w) Q^T (eigendecomposition of the accumulated, damped
curvature) and g the gradient over all parameters as one vector:

    none           d = Q diag(1/w) Q^T g                      (Newton)
    gradient_norm  d = Q diag(w^-power/2) Q^T g               (||d_i||_C = g_i)
    normalized     d = C^-1 g / sqrt(g^T C^-1 g)              (||d||_C = 1)
    eigen_sign     d = Q diag(w^-1/2) sign(Q^T g)             (||d_i||_C = 1)

``damping add(eps)`` adds eps to the root's eigenvalues; eigenvalues that
are not positive get 0 (the pseudo-inverse), so an indefinite Hessian
takes no step along its negative directions rather than a step uphill.

Newton's and the normalized length's d are C^-1 g up to a scale, so where C
is certified positive definite (a Cholesky factor of C - t I, t a few n eps
||C|| above the pseudo-inverse's threshold) a Cholesky solve gives d without
the eigendecomposition; any other matrix (indefinite, singular, nearly so)
takes eigh and its rule, as does every other length and a clipped one.

d is the step's preconditioned gradient: the elementwise plan then applies weight
decay, momentum, the clip and the learning rate's schedule to it (curvc.lower), as
it does to K-FAC's natural gradient.
"""
from __future__ import annotations

import torch

from curvc.runtime import matrix, roots

from curvc.runtime.curvature import batched_rows
from curvc.runtime.secant import flat_grad


def hessian(params: list[torch.Tensor], grads: list[torch.Tensor | None]) -> torch.Tensor:
    """The exact Hessian, from gradients that carry their graph: row i is the
    gradient of g_i (vmapped backward passes, a chunk of rows at a time). A
    parameter without a gradient (None) has zero rows and columns."""
    flat = [torch.zeros(p.numel(), dtype=p.dtype, device=p.device) if g is None
            else g.reshape(-1) for p, g in zip(params, grads)]
    return batched_rows(torch.cat(flat), params)


def direction(c: torch.Tensor, g: torch.Tensor, s: dict, solve: bool = True) -> torch.Tensor:
    """d for the accumulated curvature c and the gradient g (see the module docstring).
    ``solve``: take the Cholesky route where it gives the same d (``definite_solve``);
    False always takes the eigendecomposition (the benchmark's reference)."""
    a = c.to(torch.float64)
    a = (a + a.T).mul_(0.5)  # a new matrix: c itself is never written
    if s["eps_inside"]:
        a.diagonal().add_(s["eps_inside"])
    if solve and s["length"] in SOLVED_LENGTHS and not s.get("clip", 0.0):
        d = definite_solve(a, g.to(torch.float64), s["eps_after"])
        if d is not None:
            return _normalized(g, d, s).to(g.dtype)
    w, q = torch.linalg.eigh(a)
    # Eigenvalues at rounding level are zero (numpy's pinv rule): a Fisher of softmax
    # outputs is singular along the logits' shared shift, and 1/1e-17 is no step.
    positive = w > roots.rounding_level(w)
    w = w.clamp(min=torch.finfo(w.dtype).tiny)
    root = {"none": w, "normalized": w, "gradient_norm": w.pow(s["power"] / 2),
            "eigen_sign": w.sqrt()}[s["length"]]
    inv = torch.where(positive, 1.0 / (root + s["eps_after"]), torch.zeros_like(w))
    coords = q.T @ g.to(torch.float64)
    if s["length"] == "eigen_sign":
        coords = matrix.sign_above_rounding(coords)
    if s.get("clip", 0.0):
        return _length_clipped(w, q, positive, g, coords, inv, s)
    return _normalized(g, q @ (inv * coords), s).to(g.dtype)


def _normalized(g: torch.Tensor, d: torch.Tensor, s: dict) -> torch.Tensor:
    """d, or for the normalized length d / sqrt(g^T d) (no host sync: a zero norm gives
    a zero step)."""
    if s["length"] != "normalized":
        return d
    norm_sq = g.to(torch.float64).dot(d)
    return torch.where(norm_sq > 0, d / norm_sq.clamp(min=torch.finfo(d.dtype).tiny).sqrt(),
                       torch.zeros_like(d))


# The lengths whose d is C^-1 g, up to a scale: where every eigenvalue of C is positive
# by the pseudo-inverse's rule, a linear solve gives it without the eigendecomposition.
SOLVED_LENGTHS = ("none", "normalized")

# How far above the pseudo-inverse's threshold (n eps max|w|) the Cholesky certificate
# asks the smallest eigenvalue to be: eigenvalues within a few n eps ||C|| of it are
# rounding-level on either route (eigh's own eigenvalues carry that error), so those
# matrices take the eigendecomposition, whose rule decides them as it always did.
CERTIFICATE_MARGIN = 4.0


def definite_solve(a: torch.Tensor, g: torch.Tensor, eps_after: float) -> torch.Tensor | None:
    """(a + eps_after I)^-1 g by Cholesky, where a (symmetric, float64) is certified to
    have every eigenvalue above the pseudo-inverse's zero threshold: then the
    eigendecomposition's d = Q diag(1/(w + eps_after)) Q^T g is this solve. The
    certificate is that a - t I has a Cholesky factor, t = margin n eps ||a||_inf
    (||a||_inf >= max|w|), so every w > t. None where it fails (an indefinite,
    singular or nearly singular matrix, or one with a NaN): the caller takes eigh.

    The certificate's factor solves the system too, refined against a + eps_after I
    (each step shrinks the error by (t + eps_after) / (w_min - t), tiny unless w_min is
    near t); where the residual is then not at rounding level, a factor of
    a + eps_after I itself solves it. One factorization of n^3/3 flops, two at most:
    at n = 650 a fifth of eigh's time or less (benchmarks/dense_step.py)."""
    n = a.shape[0]
    eps = torch.finfo(a.dtype).eps
    bound = a.abs().sum(dim=1).max()  # ||a||_inf, an upper bound of the spectral radius
    shifted = a.clone()
    shifted.diagonal().sub_(CERTIFICATE_MARGIN * n * eps * bound)
    factor, info = torch.linalg.cholesky_ex(shifted)
    if info.item() != 0:  # one host sync, as eigh's own error check takes
        return None
    m = a
    if eps_after:
        m = a.clone()
        m.diagonal().add_(eps_after)
    rhs = g.unsqueeze(1)
    d = _refined(m, rhs, factor, torch.cholesky_solve(rhs, factor), REFINEMENTS)
    # A backward-stable solve's residual: n eps (||m|| ||d|| + ||g||), in the inf-norm.
    scale = (bound + eps_after) * d.abs().max() + rhs.abs().max()
    if (rhs - m @ d).abs().max() <= n * eps * scale:
        return d.squeeze(1)
    factor, info = torch.linalg.cholesky_ex(m)
    if info.item() != 0:
        return None
    return _refined(m, rhs, factor, torch.cholesky_solve(rhs, factor), 1).squeeze(1)


# Refinement steps (n^2 each) on the certificate's factor before its residual is judged.
REFINEMENTS = 2


def _refined(m, rhs, factor, d, steps: int) -> torch.Tensor:
    """d after ``steps`` of iterative refinement of m d = rhs with a Cholesky ``factor``
    of m or of a matrix near it: each adds the solve of the residual. One step on m's
    own factor takes the solve to eigh's accuracy or better (a diagonal C gives
    g_i / c_i exactly, as eigh does)."""
    for _ in range(steps):
        d = d + torch.cholesky_solve(rhs - m @ d, factor)
    return d


def _length_clipped(w, q, positive, g, coords, inv, s) -> torch.Tensor:
    """clip length(C): in the eigenbasis, the Newton step's coordinates n_i = g^_i / w_i
    (damped as the length's root is) capped at C times the length's d_L,i:
    sign(n_i) min(|n_i|, C |d_L,i|), the paper's clipped NGD variants."""
    raw = q.T @ g.to(torch.float64)
    newton = torch.where(positive, raw / (w + s["eps_after"]), torch.zeros_like(w))
    length = inv * coords
    if s["length"] == "normalized":  # d_L = n / sqrt(g^T n): one scale for every coordinate
        norm_sq = raw.dot(length)
        length = torch.where(norm_sq > 0, length / norm_sq.clamp(
            min=torch.finfo(w.dtype).tiny).sqrt(), torch.zeros_like(length))
    capped = newton.sign() * torch.minimum(newton.abs(), s["clip"] * length.abs())
    return (q @ capped).to(g.dtype)


def start(n: int, like: torch.Tensor, settings: dict) -> torch.Tensor:
    """The accumulated curvature before any refresh: 0, or init * I for a sum."""
    acc = torch.zeros(n, n, dtype=like.dtype, device=like.device)
    if settings["accumulate"] == "sum":
        acc += settings["init"] * torch.eye(n, dtype=acc.dtype, device=acc.device)
    return acc


def accumulate(acc: torch.Tensor | None, matrix: torch.Tensor, settings: dict) -> torch.Tensor:
    """The accumulated curvature after this refresh's ``matrix``: 'instant' (the matrix),
    'ema' (C <- beta C + weight c from 0: weight 1 - beta, power_ema's beta_t, or 1 for
    ema_or_sum's sum at beta = 1) or 'sum' (C <- C + c from init * I); ``acc`` is the
    previous one (None on the first)."""
    kind = settings["accumulate"]
    if kind == "instant":
        return matrix
    if acc is None:
        acc = start(matrix.shape[0], matrix, settings)
    if kind == "ema":
        return acc * settings["beta"] + matrix * settings["weight"]
    return acc + matrix


def gradient_direction(acc: torch.Tensor, params: list[torch.Tensor], s: dict) -> torch.Tensor:
    """d for the accumulated curvature (divided by a bias correction 1 - beta^r, which the
    stored matrix does not keep) and the parameters' gradients as one vector."""
    if s.get("bias_correction", 1.0) != 1.0:
        acc = acc / s["bias_correction"]
    return direction(acc, flat_grad(params).detach(), s)


def preconditioned(params: list[torch.Tensor], d: torch.Tensor) -> dict:
    """The step ``d`` (laid out as ``flat_grad`` lays out gradients) per parameter with a
    gradient: the input the elementwise rest of the step (momentum, decay, clip, lr)
    reads, as K-FAC's natural gradient is."""
    out, start = {}, 0
    for p in params:
        n = p.numel()
        if p.grad is not None:
            out[p] = d[start:start + n].view_as(p)
        start += n
    return out
