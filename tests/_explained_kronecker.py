"""The Kronecker structure's printed lines, run: per tensor, one factor per mode.

How tests/_explained.py reads them (``explain``'s own words, taken literally):

* ``G = g as a matrix; an order-k tensor has one factor per mode i, from G_(i)``: G is
  g (flat over all parameters, like every other name); each tensor of order k has k
  factors, the Gram matrix of its unfolding along mode i, G_(i) G_(i)^T;
* ``L`` is every tensor's mode-0 factor, ``R`` its other modes' (for a matrix, G G^T
  and G^T G: its rows and its columns), so ``G G^T`` is the mode-0 Gram matrix and
  ``G^T G`` the others'; a vector has L alone;
* ``L^-p X R^-p`` multiplies X along each mode i by F_i^-e, e the order-k exponent its
  note gives (``^-1/(2k)`` or ``^-1/k`` per mode, which is p for a matrix); F^-e is
  Q diag(f(w)) Q^T with f(w) = w^-e, 0 where w is not positive (the pseudo-inverse);
* ``Q_L, w_L, Q_R, w_R`` are the factors' eigenvectors and eigenvalues, and
  ``Q_L [w_L^-p w_R^-p * sign(Q_L^T X Q_R)] Q_R^T`` rotates X into every mode's
  eigenbasis, takes the sign there (0 at rounding level of the tensor's largest
  entry), scales by the product of the modes' w^-e and rotates back;
* the note below those lines, an eigenvalue within n eps of its factor's largest is 0
  for a factor that starts at 0, applies to every root where L_0 and R_0 are 0 (n the
  factor's size, eps float64's here).
"""
from __future__ import annotations

import math

import torch

ROUNDING = 1e-10  # generous: what is at rounding level in float64 is far below it


# the sampled rows' lines, and what their rows are (Explained.sampled, the caller's)
SAMPLED = {
    "G_r   = per example and label y ~ p(y|x) (samples per example), the gradient": "fisher",
    "G_r   = per draw of labels y ~ p(y|x) for the batch, sqrt(B / samples) times the": "gnb",
}
SAMPLED_NOTES = (
    "        of -log p(y|x), over sqrt(rows): sum_r G_r G_r^T is the mean (the Fisher)",
    "        gradient of the mean loss on them (Gauss-Newton-Bartlett)",
)


class Identity:
    """``I`` beside a factor: the identity of each factor's own size, times ``scale``."""

    def __init__(self, scale=1.0):
        self.scale = scale

    def __mul__(self, a):
        return Identity(self.scale * a)

    __rmul__ = __mul__


class Modes:
    """One matrix per (tensor, mode) of the modes a name holds (L: mode 0, R: the rest)."""

    def __init__(self, mats: list[list[torch.Tensor]]):
        self.mats = mats

    def _map(self, f):
        return Modes([[f(m) for m in ms] for ms in self.mats])

    def __mul__(self, a):
        return self._map(lambda m: m * a)

    __rmul__ = __mul__

    def __add__(self, other):
        if isinstance(other, (int, float)):  # a start of 0 (L_0 = 0)
            return self._map(lambda m: m + other)
        if isinstance(other, Identity):
            return self._map(lambda m: m + other.scale * torch.eye(m.shape[0], dtype=m.dtype))
        return Modes([[a + b for a, b in zip(x, y)] for x, y in zip(self.mats, other.mats)])

    __radd__ = __add__


def _unfold(x: torch.Tensor, mode: int) -> torch.Tensor:
    return x.movedim(mode, 0).reshape(x.shape[mode], -1)


def _along(x: torch.Tensor, m: torch.Tensor, mode: int) -> torch.Tensor:
    """x multiplied along ``mode`` by the matrix m (m @ each fibre)."""
    return torch.tensordot(m, x.movedim(mode, 0), dims=1).movedim(0, mode)


def _root(w: torch.Tensor, e: float, rounding: bool) -> torch.Tensor:
    """w^-e, 0 where w is not positive; with ``rounding`` (explain's note), an eigenvalue
    within n eps of the largest counts as 0 first."""
    if rounding:
        w = torch.where(w.abs() <= w.abs().max() * w.numel() * torch.finfo(w.dtype).eps, 0.0, w)
    return torch.where(w > 0, w.clamp(min=1e-300) ** -e, 0.0)


class Kronecker:
    """The functions the Kronecker lines call, over tensors of the given shapes."""

    def __init__(self, shapes: list[tuple]):
        self.shapes = shapes
        self.sizes = [math.prod(s) for s in shapes]
        self.roots = None  # F^-e of every (tensor, mode), kept between refreshes
        self.rounding = False  # the note that eigenvalues at rounding level count as 0
        self.from_zero = False  # the note's condition: the factors start at 0
        # the largest condition number (over the eigenvalues kept) among the roots in use
        self.conditioning = 1.0

    def tensors(self, flat: torch.Tensor) -> list[torch.Tensor]:
        return [v.view(s) for s, v in zip(self.shapes, torch.split(flat, self.sizes))]

    def zeros(self, first: bool) -> Modes:
        return Modes([[torch.zeros(s[i], s[i], dtype=torch.float64) for i in self._modes(s, first)]
                      for s in self.shapes])

    @staticmethod
    def _modes(shape, first: bool) -> range:
        return range(0, min(1, len(shape))) if first else range(1, len(shape))

    def gram(self, first: bool):
        def of(flat):
            return Modes([[_unfold(x, i) @ _unfold(x, i).T for i in self._modes(x.shape, first)]
                          for x in self.tensors(flat)])
        return of

    def gram_rows(self, first: bool):
        """``sum_r G_r G_r^T`` (mode 0) or ``sum_r G_r^T G_r`` (the others): per tensor, the
        sum over its stack of rows (R, *shape) of each row's modes' Gram matrices."""
        def of(rows: list[torch.Tensor]):
            # mode i of every row at once: the stack unfolded along its dim i + 1
            return Modes([[_unfold(r, i + 1) @ _unfold(r, i + 1).T
                           for i in self._modes(r.shape[1:], first)] for r in rows])
        return of

    def _factors(self, first: Modes, rest: Modes) -> list[list[torch.Tensor]]:
        return [a + b for a, b in zip(first.mats, rest.mats)]

    def preconditioned(self, exponent, refresh: bool):
        """``L^-p X R^-p``, the roots recomputed where ``refresh`` holds."""
        def apply(first: Modes, x: torch.Tensor, rest: Modes) -> torch.Tensor:
            if refresh or self.roots is None:
                self.roots, self.conditioning = [], 1.0
                for fs in self._factors(first, rest):
                    e = exponent(len(fs))
                    roots = []
                    for f in fs:
                        w, q = torch.linalg.eigh(f)
                        root = _root(w, e, self.rounding)
                        kept = w[root != 0]
                        if kept.numel():
                            self.conditioning = max(self.conditioning,
                                                    (kept.max() / kept.min()).item())
                        roots.append((q * root) @ q.T)
                    self.roots.append(roots)
            out = []
            for t, roots in zip(self.tensors(x), self.roots):
                for i, r in enumerate(roots):
                    t = _along(t, r, i)
                out.append(t.reshape(-1))
            return torch.cat(out)
        return apply

    def eigens(self, first: Modes, rest: Modes):
        """(Q_L, w_L, Q_R, w_R): per (tensor, mode) its eigenvectors and eigenvalues."""
        out = [([], []), ([], [])]
        for which, name in enumerate((first, rest)):
            for fs in name.mats:
                pairs = [torch.linalg.eigh(f) for f in fs]
                out[which][0].append([q for _, q in pairs])
                out[which][1].append([w for w, _ in pairs])
        return (Modes(out[0][0]), Modes(out[0][1]), Modes(out[1][0]), Modes(out[1][1]))

    def eigen_sign(self, exponent):
        def apply(q_l, w_l, q_r, w_r, x):
            out = []
            for t, qs, ws in zip(self.tensors(x), self._factors(q_l, q_r),
                                 self._factors(w_l, w_r)):
                e = exponent(len(qs))
                for i, q in enumerate(qs):
                    t = _along(t, q.T, i)
                scale = torch.ones((), dtype=torch.float64)
                for i, w in enumerate(ws):
                    shape = [1] * len(ws)
                    shape[i] = w.numel()
                    scale = scale * _root(w, e, self.rounding).view(shape)
                big = t.abs().max()
                t = scale * torch.sign(torch.where(t.abs() > ROUNDING * big, t, 0.0))
                for i, q in enumerate(qs):
                    t = _along(t, q, i)
                out.append(t.reshape(-1))
            return torch.cat(out)
        return apply
