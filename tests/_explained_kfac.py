"""K-FAC's printed lines, run: per layer, its two factors and the step between them.

How tests/_explained.py reads them (``explain``'s words, taken literally):

* ``A_t = mean_r a_r a_r^T``: the mean over the batch's rows of the layer's input row
  (a 1 appended for the bias) times itself; ``S_t = T sum_r ds_r ds_r^T``: T (the rows,
  for a Linear) times the sum over rows of the loss's gradient at the layer's output;
* ``A`` and ``S`` hold one matrix per layer (``I`` beside them: each layer's identity);
* ``f(S) [grad W, grad b] f(A)`` is, per layer, the gradient as an out x (in + 1) matrix
  (the bias's gradient its last column) multiplied by the two factors' spectral functions,
  each written as ``F^-e``, ``(F + x I)^-e`` or ``(F^e + x I)^-1``: Q f(w) Q^T of the
  factor's eigendecomposition, f(w) = 0 where the damped root's base is not positive;
* ``Q_S [s_i^-e a_j^-e sign(Q_S^T [grad W, grad b] Q_A)_ij] Q_A^T``: the gradient rotated
  into both factors' eigenbases, its sign there (0 within 16 (m + n) eps ||G||_F of 0, as
  the note says) scaled by the eigenvalues' functions, rotated back;
* a factor's operators are recomputed on the steps its roots note says, kept in between.
"""
from __future__ import annotations

import re

import torch

from _explained_kronecker import Modes

_LINES = {  # the K-FAC statistics' lines (their second halves are NOTES): (target, expr)
    "A_t   = mean_r a_r a_r^T   (a_r: row r of the layer's input, a 1 appended for the bias;":
        ("A_t", "_mean_outer(a)"),
    "S_t   = T sum_r ds_r ds_r^T   (ds_r: the loss's gradient at row r of the layer's output;":
        ("S_t", "_t_sum_outer(ds)"),
}
KFAC_NOTES = (
    "        a conv's rows its im2col patches, one per example and output position)",
    "        T: the rows for a Linear, the examples for a conv)",
    "        (g = grad outside nn.Linear and nn.Conv2d layers)",  # the test's are all Linear
    # KFAC.step takes the sign with this threshold
    "        (per layer; an entry of Q_S^T G Q_A within 16 (m + n) eps ||G||_F of 0 has sign 0, "
    "G m x n)",
)


def kfac_statements(line: str, period: dict) -> list | None:
    """The K-FAC lines tests/_explained.py cannot read as assignments, as (target, expr,
    roots period) each: [] for a line that only names things, None for any other line."""
    if line in _LINES:
        period["kfac"] = True
        return [(*_LINES[line], None)]
    if line in KFAC_NOTES:
        return []
    if m := re.fullmatch(r"S     = Q_S diag\(s\) Q_S\^T,  A = Q_A diag\(a\) Q_A\^T   "
                         r"\(eigenbases(?:; roots every (\w+) steps)?\)", line):
        period["kfac_roots"] = m[1]  # the notation of the next line, and its refresh
        return []
    m = re.fullmatch(r"g     = Q_S \[(\S+) (\S+) sign\(Q_S\^T \[grad W, grad b\] Q_A\)_ij\] "
                     r"Q_A\^T", line)
    sign = m is not None
    m = m or re.fullmatch(r"g     = (\S+|\(.+?\)\^-\S+) \[grad W, grad b\] (.+?)"
                          r"(?:   \(per layer(?:; roots every (\w+) steps)?\))?", line)
    if m is None:
        return None
    every = period.get("kfac_roots") if sign else m[3]
    return [("g", f"_kfac(S, A, g, {m[1]!r}, {m[2]!r}, {sign})", every)]


def mean_outer(rows: list[torch.Tensor]) -> Modes:
    return Modes([[r.T @ r / r.shape[0]] for r in rows])


def t_sum_outer(rows: list[torch.Tensor]) -> Modes:
    return Modes([[r.shape[0] * (r.T @ r)] for r in rows])


def _spectral(text: str, env: dict, eval_):
    """f(w) for a factor written as text (its name replaced by F)."""
    if m := re.fullmatch(r"F\^-(\S+)", text):
        e, inside, after = eval_(m[1]), 0.0, 0.0
    elif m := re.fullmatch(r"\(F \+ (\S+?)(?: I)?\)\^-(\S+)", text):
        e, inside, after = eval_(m[2]), eval_(m[1]), 0.0
    elif m := re.fullmatch(r"\(F(?:\^(\S+))? \+ (\S+?) I\)\^-1|1/\(F(?:\^(\S+))? \+ (\S+?)\)",
                           text):
        e = eval_(m[1] or m[3] or "1")
        inside, after = 0.0, eval_(m[2] or m[4])
    else:
        raise AssertionError(f"a K-FAC factor this test cannot read: {text!r}")

    def f(w):
        base = w + inside
        root = torch.where(base > 0, base.clamp(min=1e-300) ** e, 0.0) + after
        return torch.where(root > 0, 1.0 / root.clamp(min=1e-300), 0.0)
    return f


class KFAC:
    """The per-layer functions of the K-FAC lines, over a model's Linear layers."""

    def __init__(self, layers: list[tuple[int, int]], sizes: list[int]):
        self.layers = layers  # (out, in) of each Linear, in parameter order (W, b each)
        self.sizes = sizes
        self.ops = None  # per layer (f(S) side, f(A) side), kept between refreshes
        self.rounding = False  # explain's note, where the factors start at 0

    def _matrices(self, flat):
        parts = torch.split(flat, self.sizes)
        return [torch.cat([parts[2 * i].view(o, n), parts[2 * i + 1].view(o, 1)], dim=1)
                for i, (o, n) in enumerate(self.layers)]

    def _flat(self, mats):
        return torch.cat([x for m in mats for x in (m[:, :-1].reshape(-1), m[:, -1])])

    def step(self, refresh: bool, eval_, sign: bool):
        def apply(s: Modes, a: Modes, g, left: str, right: str):
            if refresh or self.ops is None:
                self.ops = []
                for (fs,), (fa,) in zip(s.mats, a.mats):
                    sides = []
                    for factor, text in ((fs, left), (fa, right)):
                        f = _spectral(re.sub(r"\b[SA]\b|\b[sa]_[ij]\b", "F", text), {}, eval_)
                        w, q = torch.linalg.eigh(factor)
                        if self.rounding:  # the note: at rounding level of the largest, 0
                            level = w.abs().max() * w.numel() * torch.finfo(w.dtype).eps
                            w = torch.where(w.abs() <= level, 0.0, w)
                        sides.append((q, f(w)))
                    self.ops.append(sides)
            out = []
            for m, ((qs, fs), (qa, fa)) in zip(self._matrices(g), self.ops):
                if sign:
                    c = qs.T @ m @ qa  # the note: within 16 (m + n) eps ||G||_F of 0, sign 0
                    level = 16 * sum(m.shape) * torch.finfo(m.dtype).eps * torch.linalg.norm(m)
                    c = torch.sign(torch.where(c.abs() > level, c, 0.0))
                    out.append(qs @ (fs[:, None] * c * fa[None, :]) @ qa.T)
                else:
                    out.append((qs * fs) @ qs.T @ m @ (qa * fa) @ qa.T)
            return self._flat(out)
        return apply
