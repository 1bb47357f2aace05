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
import re

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

    def __truediv__(self, a):
        return self._map(lambda m: m / a)


def _unfold(x: torch.Tensor, mode: int) -> torch.Tensor:
    return x.movedim(mode, 0).reshape(x.shape[mode], -1)


def _along(x: torch.Tensor, m: torch.Tensor, mode: int) -> torch.Tensor:
    """x multiplied along ``mode`` by the matrix m (m @ each fibre)."""
    return torch.tensordot(m, x.movedim(mode, 0), dims=1).movedim(0, mode)


def _at_rounding(w: torch.Tensor) -> torch.Tensor:
    """Explain's note: an eigenvalue within n eps of the largest counts as 0."""
    return torch.where(w.abs() <= w.abs().max() * w.numel() * torch.finfo(w.dtype).eps, 0.0, w)


def _root(w: torch.Tensor, e: float, rounding: bool) -> torch.Tensor:
    """w^-e, 0 where w is not positive; with ``rounding``, ``_at_rounding`` first."""
    if rounding:
        w = _at_rounding(w)
    return torch.where(w > 0, w.clamp(min=1e-300) ** -e, 0.0)


_FACTOR = r"(F|\(F \+ (\S+?)(?: I)?\))"  # a factor, or it damped inside (no I: eigenvalues)


def factor_function(text: str, number):
    """(the exponent printed, f(w, e)) for one factor's printed function, its name
    replaced by F: ``X^-e``, ``(X^e + a I)^-1`` or ``max(X^e [+ a I], b)^-1`` with X
    ``F`` or ``(F + c I)``; f(w, e) is it on eigenvalues w with the exponent e of the
    tensor's order (0 where a root's base or the whole is not positive)."""
    if m := re.fullmatch(rf"{_FACTOR}\^-(\S+)", text):
        inside, e, after, floor, inverse_root = m[2], m[3], None, None, True
    else:
        m = re.fullmatch(rf"max\({_FACTOR}\^(\S+?)(?: \+ (\S+?)(?: I)?)?, (\S+)\)\^-1", text) \
            or re.fullmatch(rf"\({_FACTOR}\^(\S+?) \+ (\S+?)(?: I)?\)\^-1()", text)
        assert m, f"a Kronecker factor this test cannot read: {text!r}"
        inside, e, after, floor, inverse_root = m[2], m[3], m[4], m[5] or None, False
    inside, after = (number(x) if x else 0.0 for x in (inside, after))
    floor = number(floor) if floor else None

    def f(w: torch.Tensor, exponent: float) -> torch.Tensor:
        base = w + inside
        if inverse_root:
            return torch.where(base > 0, base.clamp(min=1e-300) ** -exponent, 0.0)
        root = torch.where(base > 0, base.clamp(min=1e-300) ** exponent, 0.0) + after
        if floor is not None:
            root = torch.maximum(root, torch.tensor(floor, dtype=root.dtype))
        return torch.where(root > 0, 1.0 / root.clamp(min=1e-300), 0.0)
    return number(e), f


def damped_kronecker(main: str) -> str | None:
    """The call for a Kronecker step whose factors' functions are not plain inverse roots
    (damping inside, after, a floor), or whose scale in the eigenbasis is damped; None
    for any other text."""
    side = r"(\S*\(\S.*?\)\^-1|\(L \+ \S+ I\)\^-\S+|\(R \+ \S+ I\)\^-\S+)"
    if m := re.fullmatch(rf"{side} (\w+) {side}", main):
        left, right = (re.sub(r"\b[LR]\b", "F", x) for x in (m[1], m[3]))
        return f"_kron_f(L, {m[2]}, R, {left!r}, {right!r})"
    if (m := re.fullmatch(r"Q_L \[(.+?) ((?:max\()?\(?w_R.*?) \* sign\(Q_L\^T (\w+) Q_R\)\] "
                          r"Q_R\^T", main)) and not re.fullmatch(r"w_L\^-\S+", m[1]):
        left, right = (re.sub(r"\bw_[LR]\b", "F", x) for x in (m[1], m[2]))
        return f"_eigen_sign_f(Q_L, w_L, Q_R, w_R, {m[3]}, {left!r}, {right!r})"
    return None


class Kronecker:
    """The functions the Kronecker lines call, over tensors of the given shapes."""

    def __init__(self, shapes: list[tuple], index: list | None = None):
        """``index``: per tensor (a block, tests/_explained_graft.py), its coordinates in
        the flat vector; None: the tensors one after the other."""
        self.shapes = shapes
        self.sizes = [math.prod(s) for s in shapes]
        self.index = index
        self.roots = None  # F^-e of every (tensor, mode), kept between refreshes
        self.rounding = False  # the note that eigenvalues at rounding level count as 0
        self.from_zero = False  # the note's condition: the factors start at 0
        # the largest condition number (over the eigenvalues kept) among the roots in use
        self.conditioning = 1.0

    def tensors(self, flat: torch.Tensor) -> list[torch.Tensor]:
        if self.index is not None:
            return [flat[i].view(s) for i, s in zip(self.index, self.shapes)]
        return [v.view(s) for s, v in zip(self.shapes, torch.split(flat, self.sizes))]

    def flat(self, parts: list[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
        """The tensors (flattened) as one vector again: ``tensors``' inverse."""
        if self.index is None:
            return torch.cat(parts)
        out = torch.empty_like(like)
        for i, x in zip(self.index, parts):
            out[i] = x
        return out

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
        def inverse_root(w, e):
            return torch.where(w > 0, w.clamp(min=1e-300) ** -e, 0.0)

        def apply(first: Modes, x: torch.Tensor, rest: Modes) -> torch.Tensor:
            if refresh or self.roots is None:
                self._roots(first, rest, exponent, (inverse_root, inverse_root))
            return self._applied(x)
        return apply

    def spectral(self, exponent, refresh: bool, number, printed: bool = True):
        """``f_L(L) X f_R(R)`` for the printed functions of the two sides (with the
        exponent of each tensor's order), recomputed where ``refresh`` holds."""
        def apply(first: Modes, x: torch.Tensor, rest: Modes, left: str, right: str):
            if refresh or self.roots is None:
                (e_l, f_l), (e_r, f_r) = factor_function(left, number), \
                    factor_function(right, number)
                # printed for order 2 (unless every factor's exponent is overridden)
                assert not printed or e_l == e_r == exponent(2), (left, right)
                self._roots(first, rest, exponent, (f_l, f_r))
            return self._applied(x)
        return apply

    def _roots(self, first: Modes, rest: Modes, exponent, functions) -> None:
        """Per tensor, every mode's f(F) = Q f(w) Q^T (``functions``: mode 0's f(w, e),
        the other modes'), with their largest condition number over the kept w."""
        self.roots, self.conditioning = [], 1.0
        for fs in self._factors(first, rest):
            e, roots = exponent(len(fs)), []
            for i, f in enumerate(fs):
                w, q = torch.linalg.eigh(f)
                fw = functions[min(i, 1)](_at_rounding(w) if self.rounding else w, e)
                kept = fw[fw != 0]  # its spread, back to the eigenvalues' scale
                if kept.numel():
                    self.conditioning = max(self.conditioning,
                                            (kept.max() / kept.min()).item() ** (1 / e))
                roots.append((q * fw) @ q.T)
            self.roots.append(roots)

    def _applied(self, x: torch.Tensor) -> torch.Tensor:
        """The roots in use along every mode of each tensor of x."""
        out = []
        for t, roots in zip(self.tensors(x), self.roots):
            for i, r in enumerate(roots):
                t = _along(t, r, i)
            out.append(t.reshape(-1))
        return self.flat(out, x)

    def eigens(self, first: Modes, rest: Modes):
        """(Q_L, w_L, Q_R, w_R): per (tensor, mode) its eigenvectors and eigenvalues."""
        out = [([], []), ([], [])]
        for which, name in enumerate((first, rest)):
            for fs in name.mats:
                pairs = [torch.linalg.eigh(f) for f in fs]
                out[which][0].append([q for _, q in pairs])
                out[which][1].append([w for w, _ in pairs])
        return (Modes(out[0][0]), Modes(out[0][1]), Modes(out[1][0]), Modes(out[1][1]))

    def eigen_sign_f(self, exponent, number):
        """``eigen_sign`` with the two sides' printed functions of the eigenvalues."""
        def apply(q_l, w_l, q_r, w_r, x, left: str, right: str):
            (e_l, f_l), (e_r, f_r) = factor_function(left, number), \
                factor_function(right, number)
            assert e_l == e_r == exponent(2), (left, right)  # printed for order 2
            return self.eigen_sign(exponent, (f_l, f_r))(q_l, w_l, q_r, w_r, x)
        return apply

    def eigen_sign(self, exponent, functions=None):
        """``Q_L [s * sign(Q_L^T X Q_R)] Q_R^T``, s the sides' functions of the eigenvalues
        (``functions``: f(w, e) for L's mode and the others'; the inverse roots if None)."""
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
                    if functions is None:
                        f = _root(w, e, self.rounding)
                    else:
                        f = functions[min(i, 1)](_at_rounding(w) if self.rounding else w, e)
                    scale = scale * f.view(shape)
                big = t.abs().max()
                t = scale * torch.sign(torch.where(t.abs() > ROUNDING * big, t, 0.0))
                for i, q in enumerate(qs):
                    t = _along(t, q, i)
                out.append(t.reshape(-1))
            return self.flat(out, x)
        return apply
