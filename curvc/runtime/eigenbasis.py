"""A diagonal pipeline run in the eigenbasis of a tensor's Kronecker factors (SOAP, EKFAC).

For a tensor G of order k (after ``merged``), mode i of size d_i <= max_dim keeps a
d_i x d_i factor L_i, the EMA of the Gram matrices of G unfolded along mode i, and an
orthogonal basis Q_i of it (a mode without a factor has Q_i = I). One step:

    G' = G x_1 Q_1^T ... x_k Q_k^T                   (the statistic in the basis)
    V  <- accumulate(V, G'^2)                         (ema, sum or instant, kept in the basis)
    D' = (M x_1 Q_1^T ... x_k Q_k^T) / root(V)        (the value: the momentum, rotated)
    D  = D' x_1 Q_1 ... x_k Q_k                       (rotated back)

then L_i <- beta_f L_i + (1 - beta_f) G_(i) G_(i)^T, and, when the refresh flag holds,
a new basis. So the step reads the basis of the factors up to the previous step (SOAP's
order). The first call has no basis: it accumulates the factors, takes Q_i from an
eigendecomposition (columns by descending eigenvalue) and returns 0.

A refresh is ``eigh`` (a new eigendecomposition) or ``power_qr``: one power-iteration
step from the old basis, P = L_i Q_i with its columns sorted by the estimated eigenvalues
diag(Q_i^T L_i Q_i), descending, and Q_i the Q of P = QR. The QR runs in float32 whatever
the dtype (pytorch_optimizer's SOAP does, for bfloat16 support), and V's coordinates along
mode i are permuted with the columns, so each entry stays with its eigenvector.
"""
from __future__ import annotations

import torch

# added to the diagonal before eigh, as SOAP does: a zero row stays solvable. L + c I has
# L's eigenvectors exactly, so explain's "the eigenvectors of L" holds as printed.
_NUDGE = 1e-30


def merged_shape(shape, max_dim: float) -> list[int]:
    """Adjacent dims multiplied together while the product stays <= max_dim (a run of small
    dims becomes one mode). A tensor whose dims all merge is one mode of numel."""
    out, product = [], 1
    for d in shape:
        product *= d
        if product > max_dim:
            out.append(product // d)
            product = d
    out.append(product)
    return out


class _Modes:
    """A tensor's modes as the factors see them: its own dims, or (``merge``) the merged
    ones, a 4-D tensor of ``layout`` 1 (NHWC) taken as NCHW before merging."""

    def __init__(self, value: torch.Tensor, max_dim: float, merge: float, layout: float):
        self.original = tuple(value.shape)
        self.nhwc = bool(merge) and bool(layout) and value.dim() == 4
        self.laid = self.original
        if self.nhwc:
            n, h, w, c = self.original
            self.laid = (n, c, h, w)
        self.shape = list(self.original)
        if merge and value.dim() > 1:
            self.shape = merged_shape(self.laid, max_dim)

    def into(self, x: torch.Tensor) -> torch.Tensor:
        return (x.permute(0, 3, 1, 2) if self.nhwc else x).reshape(self.shape)

    def back(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(self.laid).permute(0, 2, 3, 1) if self.nhwc \
            else x.reshape(self.original)


def _has_factor(shape, d: int, max_dim: float, vectors: bool) -> bool:
    return d <= max_dim and (len(shape) > 1 or vectors)


def _rotate(x: torch.Tensor, bases: list, back: bool) -> torch.Tensor:
    """x multiplied along every mode i by Q_i^T (back: by Q_i); a mode with no basis is
    left alone. Each contraction takes mode 0 and appends the new one last, so after k of
    them the modes are in their order again."""
    for q in bases:
        if q is None:
            x = x.permute(*range(1, x.dim()), 0)
        else:
            x = torch.tensordot(x, q, dims=([0], [1 if back else 0]))
    return x


def _eigenvectors(factor: torch.Tensor) -> torch.Tensor:
    eye = torch.eye(factor.shape[0], dtype=factor.dtype, device=factor.device)
    _, q = torch.linalg.eigh(factor + _NUDGE * eye)
    return torch.flip(q, dims=[1])  # descending eigenvalues


def eigenbasis(state: dict, statistic: torch.Tensor, value: torch.Tensor, *, accumulate: str,
               refresh: bool, method: str, length: str, factor_beta: float, weight: float,
               init: float, exponent: float, eps_inside: float, eps_after: float,
               floor: float, bias_correction: float, max_dim: float, merge: float,
               vectors: float, layout: float) -> torch.Tensor:
    """One tensor's step (see the module docstring and ``curvc.plan_eigen.EigenbasisStage``).

    State keys: ``GG_i`` the factors, ``Q_i`` their bases, ``exp_avg_sq`` V (the shape of
    the tensor); pytorch_optimizer's SOAP names, so checkpoints read alike.
    """
    if value.numel() == 0:
        return value
    modes_of = _Modes(value, max_dim, merge, layout)
    shape = modes_of.shape
    g = modes_of.into(statistic)
    modes = [i for i, d in enumerate(shape) if _has_factor(shape, d, max_dim, bool(vectors))]
    first = "exp_avg_sq" not in state
    if first:
        state["exp_avg_sq"] = torch.full_like(value, float(init),
                                              memory_format=torch.contiguous_format)
        out = torch.zeros_like(value)
    else:
        bases = [state.get(f"Q_{i}") for i in range(len(shape))]
        v = state["exp_avg_sq"]
        c = modes_of.back(_rotate(g, bases, back=False)).square()
        if accumulate == "ema":
            v.lerp_(c, weight)
        elif accumulate == "sum":
            v.add_(c)
        else:  # instant: this step's only
            v.copy_(c)
        out = modes_of.back(_rotate(_scaled(_rotate(modes_of.into(value), bases, back=False),
                                            modes_of.into(v), length, exponent, eps_inside,
                                            eps_after, floor, bias_correction),
                                    bases, back=True))
    for i in modes:
        key = f"GG_{i}"
        if key not in state:
            state[key] = torch.zeros(shape[i], shape[i], dtype=value.dtype, device=value.device)
        others = [j for j in range(len(shape)) if j != i]
        state[key].lerp_(torch.tensordot(g, g, dims=(others, others)), 1.0 - factor_beta)
    if first:
        for i in modes:
            state[f"Q_{i}"] = _eigenvectors(state[f"GG_{i}"])
    elif refresh:
        _refresh(state, modes, modes_of, method)
    return out


def _scaled(m: torch.Tensor, v: torch.Tensor, length: str, exponent: float, eps_inside: float,
            eps_after: float, floor: float, bias_correction: float) -> torch.Tensor:
    """The diagonal pipeline's direction in the basis: m (or sign(m)) / P, P = root(V) with
    curvc's damping forms, elementwise (curvc.lower's lower_preconditioner: the same
    order of operations). Without damping a zero P gives 0 (the pseudo-inverse)."""
    if bias_correction != 1.0:
        v = v / bias_correction
    if eps_inside:
        v = v + eps_inside
    p = v.sqrt() if exponent == 0.5 else (v if exponent == 1.0 else v.pow(exponent))
    if eps_after:
        p = p + eps_after
    if floor:
        p = p.clamp(min=floor)
    u = torch.sign(m) if length == "eigen_sign" else m
    if not (eps_inside or eps_after or floor):
        return torch.where(p > 0, u / torch.where(p > 0, p, 1.0), 0.0)
    return u / p


def _refresh(state: dict, modes: list, modes_of: "_Modes", method: str) -> None:
    vm = modes_of.into(state["exp_avg_sq"])
    for i in modes:
        factor, q = state[f"GG_{i}"], state[f"Q_{i}"]
        if method == "eigh":
            state[f"Q_{i}"] = _eigenvectors(factor)
            continue
        product = factor @ q
        estimate = (q * product).sum(dim=0)  # diag(Q^T L Q), the eigenvalues' estimates
        order = torch.argsort(estimate, descending=True)
        vm = vm.index_select(i, order)
        new, _ = torch.linalg.qr(product.index_select(1, order).to(torch.float32))
        state[f"Q_{i}"] = new.to(factor.dtype)
    state["exp_avg_sq"] = modes_of.back(vm).contiguous()
