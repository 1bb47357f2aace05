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
recomputed in float64 if that eigendecomposition failed (see ``_refreshed``); K-FAC's
damped inverse likewise (``inverse_root``).
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
        for dtype in _root_dtypes(matrix.dtype):
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
# above _RESIDUAL_SLACK n eps ||A|| is far outside rounding: the solver failed.
_RESIDUAL_SLACK = 16.0
_PROBES = 4  # random vectors the residual is measured on (a full check costs a matmul)


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
    v = torch.randn(n, _PROBES, dtype=dtype, device=a.device, generator=gen)
    residual = torch.linalg.matrix_norm(a @ v - q @ (w[:, None] * (q.T @ v)))
    scale = torch.linalg.matrix_norm(a) * math.sqrt(_PROBES)
    limit = _RESIDUAL_SLACK * n * torch.finfo(dtype).eps
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


def _gram(statistic: torch.Tensor, mode: int, dtype: torch.dtype, stacked: bool = False):
    """(U, U^T) for the unfolding U of ``statistic`` along ``mode``, as views where
    the memory allows (the last mode: U = X^T for X the tensor as a rest x d matrix);
    ``stacked``: dimension 0 counts statistics, unfolded into the rest."""
    if mode == statistic.dim() - 1 and mode > int(stacked):
        x = _unfold_last(statistic).to(dtype)
        return x.T, x
    u = _unfold(statistic.movedim(mode, 0)).to(dtype)
    return u, u.T


def kronecker(state: dict, statistic: torch.Tensor, value: torch.Tensor, *, factors: str,
              roots: str, accumulate: str, update: bool, refresh: bool, length: str,
              beta: float, init: float, exponent: float, eps_inside: float, eps_after: float,
              floor: float, bias_correction: float, max_dim: float,
              per_mode: bool, weight: float | None = None,
              factor_root: float = 0.0) -> torch.Tensor:
    """One tensor's Kronecker-preconditioned value (see the module docstring and
    ``curvc.plan.KroneckerStage``); ``weight``: the EMA's weight of this step's Gram
    matrix when it is not 1 - beta (1 at beta = 1 for ``iterate ema_or_sum``).

    ``state`` is the parameter's optimizer state: factor i lives under
    ``f"{factors}_{i}"`` and its root (or, for ``length='eigen_sign'``, its
    eigenbasis and spectral function) under ``f"{roots}_{i}"``, created on first use
    (the factor as ``init * I``). Modes longer than ``max_dim`` keep no factor (the
    identity), as an embedding's vocabulary would cost a vocabulary-squared matrix.
    ``factor_root`` p > 0: every factor's root is ``2 * exponent / p`` (L^(-power/p) for a
    gradient-norm length), whatever the order (Distributed Shampoo's inv_root_override).
    """
    if value.numel() == 0:
        return value  # a zero-size tensor (Linear(4, 0)): nothing to precondition
    modes, due, e = kronecker_factors(
        state, statistic, value, factors=factors, roots=roots, accumulate=accumulate,
        update=update, refresh=refresh, beta=beta, init=init, exponent=exponent,
        bias_correction=bias_correction, max_dim=max_dim, per_mode=per_mode, weight=weight,
        factor_root=factor_root)
    how = root_function(length)
    for root_key, corrected in due:
        state[root_key] = _refreshed(how, corrected, e, eps_inside, eps_after, floor,
                                     state.get(root_key), start=init)
    return kronecker_applied(state, value, modes, length)


def kronecker_factors(state: dict, statistic: torch.Tensor, value: torch.Tensor, *,
                      factors: str, roots: str, accumulate: str, update: bool, refresh: bool,
                      beta: float, init: float, exponent: float, bias_correction: float,
                      max_dim: float, per_mode: bool, weight: float | None = None,
                      factor_root: float = 0.0) -> tuple[list, list, float]:
    """``kronecker``'s first part: every mode's factor accumulated. Returns (the modes with
    a factor, as (mode, root key); the roots due, as (root key, bias-corrected factor);
    the roots' exponent)."""
    order = value.dim()
    e = exponent / order if per_mode and order else exponent
    if per_mode and factor_root:
        e = 2.0 * exponent / factor_root
    modes, due = [], []
    for i, d in enumerate(value.shape):
        if d > max_dim:
            continue
        key, root_key = f"{factors}_{i}", f"{roots}_{i}"
        factor = state.get(key)
        if factor is None:
            factor = state[key] = torch.eye(d, dtype=value.dtype, device=value.device).mul_(init)
        if update:
            # a stack of statistics (rows of a sampled curvature): the Gram of their sum
            stacked = statistic.dim() == order + 1
            u, ut = _gram(statistic, i + stacked, factor.dtype, stacked)
            if accumulate == "sum":
                factor.addmm_(u, ut)
            elif accumulate == "ema":
                factor.mul_(beta).addmm_(u, ut, alpha=1.0 - beta if weight is None else weight)
            else:  # instant: this step's statistic only
                torch.mm(u, ut, out=factor)
        if refresh or root_key not in state:
            due.append((root_key, factor / bias_correction if bias_correction != 1.0
                        else factor))
        modes.append((i, root_key))
    return modes, due, e


def root_function(length: str):
    """What a factor's root is for a length: its eigenbasis and spectral function
    (``eigen_sign``), or the matrix function itself."""
    return checked_eigenbasis if length == "eigen_sign" else checked_inverse_root


def kronecker_applied(state: dict, value: torch.Tensor, modes: list, length: str):
    """``kronecker``'s last part: the value through the roots of ``modes`` ((mode, root
    key) pairs, the roots in ``state``)."""
    modes = [(i, state[key].to(value.dtype)) for i, key in modes]
    if length == "eigen_sign":
        return _eigen_sign(value, modes)
    out = value
    for i, root in modes:
        out = mode_product(out, root, i)
    return out


_SIGN_SLACK = 16.0


def sign_above_rounding(x: torch.Tensor) -> torch.Tensor:
    """sign(x), with 0 for an entry at rounding level of the largest: a coordinate in an
    eigenbasis that is zero in exact arithmetic (at the first step Q^T G Q is the diagonal
    of G's singular values; Q^T g has one entry for C = g g^T) comes out as noise, and
    its sign would be a full-size step along a direction the curvature never saw."""
    noise = _SIGN_SLACK * math.sqrt(x.numel()) * torch.finfo(x.dtype).eps
    return torch.sign(torch.where(x.abs() > noise * x.abs().max(), x, 0.0))


def _eigen_sign(value: torch.Tensor, modes: list) -> torch.Tensor:
    """Q diag(f(lam)) sign(Q^T v) for Q the Kronecker product of the modes' eigenbases
    and f(lam) the product of the modes' spectral functions (the root of a Kronecker
    product is the product of the roots)."""
    def times(x, m, i):  # x multiplied along mode i by m (mode_product wants m symmetric)
        return mode_product(x, m.T if i == x.dim() - 1 and i > 0 else m, i)

    rotated = value
    for i, basis in modes:
        rotated = times(rotated, basis[:, :-1].T, i)
    out = sign_above_rounding(rotated)
    for i, basis in modes:
        shape = [1] * value.dim()
        shape[i] = -1
        out = out * basis[:, -1].reshape(shape)
    for i, basis in modes:
        out = times(out, basis[:, :-1], i)
    return out


def _refreshed(how, factor: torch.Tensor, exponent: float, eps: float, after: float,
               floor: float, previous: torch.Tensor | None,
               start: float = 0.0) -> torch.Tensor:
    """The factor's new root (``how``: ``checked_inverse_root`` or ``checked_eigenbasis``):
    in float32 first for a factor of at most float32 precision, then in float64 if
    that failed (``InaccurateRoot``, or a solver that did not converge); if float64
    fails too (a non-finite factor), the previous one, with a warning."""
    reasons = []
    for dtype in _root_dtypes(factor.dtype):
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


def _root_dtypes(dtype: torch.dtype) -> tuple:
    """The precisions a root is tried in, cheapest first."""
    if dtype == torch.float64:
        return (torch.float64,)
    return (torch.float32, torch.float64)


def factored(state: dict, statistic: torch.Tensor | None, value: torch.Tensor,
             param: torch.Tensor | None = None, *, accumulate: str, update: bool, length: str,
             clipped: bool, relative: bool, beta: float, weight: float, init: float,
             exponent: float, eps_inside: float, eps_after: float, floor: float, eps: float,
             bias_correction: float, clip: float, scale_eps: float) -> torch.Tensor:
    """One tensor's step under the factored structure (``curvc.plan.FactoredStage``).

    The state keys are torch.optim.Adafactor's: ``row_var`` (the statistic's means over
    the last dim, shape (..., m, 1)) and ``col_var`` (over the one before, (..., 1, n)) for
    a tensor of order >= 2, ``variance`` (the statistic itself) below that. The RMS norms
    (the clip, the relative step's RMS(param)) stay on the device: no host sync.
    """
    if value.numel() == 0:
        return value  # a zero-size tensor: nothing to precondition
    accs = factored_state([state], value, init)
    if update:
        accumulate_statistics(accs, factored_statistics(statistic, value.dim()), accumulate,
                              beta, weight)
    v = factored_diagonal(accs[0] if len(accs) == 1 else accs, eps)
    return factored_applied(v, value, param, length=length, clipped=clipped,
                            relative=relative, exponent=exponent, eps_inside=eps_inside,
                            eps_after=eps_after, floor=floor, bias_correction=bias_correction,
                            clip=clip, scale_eps=scale_eps, norms=torch.linalg.vector_norm)


def factored_state(states: list, value: torch.Tensor, init: float) -> list:
    """The accumulators of tensors shaped like ``value``, one list per key (``row_var`` and
    ``col_var`` for order >= 2, ``variance`` below), each created at ``init`` on first use."""
    shape = tuple(value.shape)
    keys = ((("row_var", shape[:-1] + (1,)), ("col_var", shape[:-2] + (1, shape[-1])))
            if value.dim() >= 2 else (("variance", shape),))
    out = []
    for key, sh in keys:
        for state in states:
            if key not in state:
                state[key] = torch.full(sh, float(init), dtype=value.dtype, device=value.device)
        out.append([state[key] for state in states])
    return out


def factored_statistics(statistic: torch.Tensor, order: int) -> list:
    """The statistic's means over the last dim and the one before (a tensor of ``order``
    >= 2; a leading dimension may count tensors), or the statistic itself (one entry per
    accumulator key)."""
    if order >= 2:
        return [statistic.mean(dim=-1, keepdim=True), statistic.mean(dim=-2, keepdim=True)]
    return [statistic]


def accumulate_statistics(accs: list, news: list, accumulate: str, beta: float,
                          weight: float) -> None:
    """Each key's accumulators (a list of tensors) take the new statistics (``news``: one
    tensor per key, its leading dimension one entry per accumulator when there are many)."""
    for acc, new in zip(accs, news):
        new = [new] if len(acc) == 1 and new.dim() == acc[0].dim() else list(new.unbind(0))
        if accumulate == "ema":  # beta acc + weight new: an EMA, or a sum at 1 and 1
            torch._foreach_mul_(acc, beta)
            torch._foreach_add_(acc, new, alpha=weight)
        elif accumulate == "sum":
            torch._foreach_add_(acc, new)
        else:  # instant: this step's statistics only
            torch._foreach_copy_(acc, new)


def factored_diagonal(accs, eps: float) -> torch.Tensor:
    """V from the accumulators: R C / max(mean(R), eps) for a (row, column) pair of lists
    (the rank-1 fit whose row and column means are R and C; a zero mean, a statistic that
    was always 0, gives V = 0, the pseudo-inverse), the accumulator itself for one list;
    stacked when the lists hold several tensors."""
    if not isinstance(accs[0], list):
        return accs[0] if len(accs) == 1 else torch.stack(accs)
    rows, cols = accs
    row = rows[0] if len(rows) == 1 else torch.stack(rows)
    col = cols[0] if len(cols) == 1 else torch.stack(cols)
    scale = row.mean(dim=-2, keepdim=True).clamp(min=eps)
    tiny = torch.finfo(row.dtype).tiny
    return torch.where(scale > 0, (row @ col) / scale.clamp(min=tiny), 0.0)


def factored_applied(v: torch.Tensor, value: torch.Tensor, param, *, length: str,
                     clipped: bool, relative: bool, exponent: float, eps_inside: float,
                     eps_after: float, floor: float, bias_correction: float, clip: float,
                     scale_eps: float, norms, numel: int | None = None) -> torch.Tensor:
    """The step from V: f(V) times the value (or its sign), then the per-tensor RMS clip and
    relative scale; ``norms(x)`` is each tensor's 2-norm of x, shaped to broadcast against
    it (``numel`` elements per tensor: all of the value's by default)."""
    if bias_correction != 1.0:
        v = v / bias_correction
    f = spectral(v + eps_inside if eps_inside else v, exponent, eps_after, floor)
    u = f * (torch.sign(value) if length == "eigen_sign" else value)
    root_n = math.sqrt(value.numel() if numel is None else numel)
    if clipped:  # d / max(1, RMS(d) / clip)
        u = u / (norms(u) / (root_n * clip)).clamp(min=1.0)
    if relative:  # the relative step's per-tensor part: max(scale_eps, RMS(param))
        u = u * (norms(param) / root_n).clamp(min=scale_eps)
    return u


# --- the polar factor by a Newton-Schulz iteration (Muon) ------------------------------
#
# For a matrix G = U S V^T, the eigendecomposition path above computes
# L^-1/4 G R^-1/4 = U V^T (L = G G^T, R = G^T G). An odd polynomial iteration
# reaches nearly the same factor with matrix products only: X_0 = G / ||G||_F (so every
# singular value is at most 1), then X <- a X + (b A + c A^2) X with A = X X^T, which
# maps each singular value s to a s + b s^3 + c s^5. Muon's coefficients (Jordan et al.)
# push small singular values up fast (slope a at 0) and leave every one within roughly
# [0.7, 1.2] after a few steps, not at 1: the step is U S' V^T, S' near I.

PRECISIONS = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float64": torch.float64}


def newton_schulz(g: torch.Tensor, steps: int, a: float, b: float, c: float, eps: float,
                  dtype: torch.dtype) -> torch.Tensor:
    """The iteration above on a matrix ``g``, in ``dtype`` (returned in ``dtype``).

    The Gram matrix is taken on the shorter side (a wide matrix: X X^T; a tall one is
    transposed first and back after), which is cheaper and gives the same polynomial
    in the singular values. Each update is one fused multiply-add of torch's kernels
    (``addmm``: b A + c A A, then a X + B X), the rounding torch.optim.Muon's bf16
    iteration has.
    """
    x = g.to(dtype)
    tall = g.shape[0] > g.shape[1]
    if tall:
        x = x.T
    x = x / x.norm().clamp(min=eps)
    for _ in range(int(steps)):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if tall else x


def polar(state: dict, statistic: torch.Tensor | None, value: torch.Tensor, *, steps: float,
          a: float, b: float, c: float, eps: float, precision: str) -> torch.Tensor:
    """One tensor's polar factor by ``newton_schulz`` (``curvc.plan.PolarStage``), in
    the value's dtype. It keeps no state: the check pass admits it only where the
    factors would be this step's Gram matrices of the value itself, so ``statistic``
    (the same tensor) is not read.

    A vector is a 1 x n matrix (its polar factor is v / ||v||, what the eigendecomposition
    path gives it); a 0-d tensor has no mode and is returned as it is (as that path does).
    """
    if value.dim() == 0 or value.numel() == 0:
        return value
    if value.dim() > 2:
        raise ValueError(f"the Newton-Schulz root orthogonalizes matrices, and a tensor of "
                         f"shape {tuple(value.shape)} is not one (its Kronecker step would be "
                         "a root per mode, not a polar factor): give it to another optimizer, "
                         "or use structure kronecker(root = eigh)")
    g = value if value.dim() == 2 else value.reshape(1, -1)
    out = newton_schulz(g, steps, a, b, c, eps, PRECISIONS[precision])
    return out.reshape(value.shape).to(value.dtype)


# The eigenbasis stage (SOAP) lives in its own module; generated code calls matrix.<fn>.
from curvc.runtime.eigenbasis import eigenbasis  # noqa: E402,F401
# Distributed Shampoo's blocking and grafting (curvc.runtime.blocks), beside the others
from curvc.runtime.blocks import blocked_kronecker  # noqa: E402
# The batched forms of the functions above (curvc.runtime.batched), for generated modules
from curvc.runtime.batched import (factored_many, in_compute, kronecker_many,  # noqa: E402,F401
                                   polar_many)
