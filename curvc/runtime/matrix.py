"""Matrix-structured preconditioners, shared by every generated module.

``kronecker`` is the per-tensor step of a Kronecker-factored curvature
(Shampoo): for each mode i of a tensor G of order k, the factor

    L_i <- L_i + U_i U_i^T            (sum)   or   beta L_i + (1 - beta) U_i U_i^T  (ema)

where U_i is G unfolded along mode i (a d_i x prod(other dims) matrix), and
the step is G multiplied along every mode by the factor's inverse root

    R_i = (L_i + eps_inside I)^(-e/k) + eps_after I.

The roots are the expensive part (an eigendecomposition, O(d^3)); they are
recomputed only when the plan's refresh flag holds and kept in the state in
between, in the state's dtype, by ``curvc.runtime.roots`` (which precision, the
spectral function, the pseudo-inverse).
"""
from __future__ import annotations

import math

import torch

from curvc.runtime.roots import checked_eigenbasis, checked_inverse_root, refreshed, spectral


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
        state[root_key] = refreshed(how, corrected, e, eps_inside, eps_after, floor,
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


SIGN_SLACK = 16.0


def sign_above_rounding(x: torch.Tensor) -> torch.Tensor:
    """sign(x), with 0 for an entry at rounding level of the largest: a coordinate in an
    eigenbasis that is zero in exact arithmetic (at the first step Q^T G Q is the diagonal
    of G's singular values; Q^T g has one entry for C = g g^T) comes out as noise, and
    its sign would be a full-size step along a direction the curvature never saw."""
    noise = SIGN_SLACK * math.sqrt(x.numel()) * torch.finfo(x.dtype).eps
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
