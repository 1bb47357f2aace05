"""The eigenbasis lines (``structure kronecker(basis = eigen)``: SOAP, EKFAC-like), run.

How tests/_explained.py reads them (``explain``'s words, taken literally):

* ``G = g as a matrix``: per tensor, its modes are its dims; with the merge note, first
  adjacent dims multiplied together while the product stays <= max_dim (a 4-D tensor's
  N H W C taken as N C H W first, where the layout note says so). A mode keeps a factor
  and a basis Q_i if it is at most max_dim long and the (merged) tensor is not a vector,
  or vectors are allowed; any other mode has Q_i = I;
* ``L`` is mode 0's factor, ``R`` the other modes' (``G G^T``, ``G^T G``: the tensor
  unfolded along the mode, times itself transposed), both starting at 0;
* ``Q_L^T X Q_R`` is X (a flat vector over all tensors) with each tensor multiplied along
  every mode i by Q_i^T; ``Q_L D' Q_R^T`` multiplies by Q_i, back;
* the names with a prime (G', M', D') are G_p, M_p, D_p; V, V_hat and the primed values
  live in the basis and, on the first step ("no basis yet"), are not computed: d = 0;
  after the factors that step, every basis is its factor's eigenvectors, columns by
  descending eigenvalue;
* a refresh (steps 1, k+1, 2k+1, ... of "every k steps"; every step without a period)
  after the first step: ``the eigenvectors of L and R`` again, or ``qr(L Q)``: per mode,
  P = F Q with its columns sorted by diag(Q^T F Q) descending, V permuted alike along
  that mode, Q the Q of P's QR in float32.
"""
from __future__ import annotations

import re

import torch

from _explained_kronecker import Modes, _along, _unfold
from _explained_text import _python

_G_LINE = "G     = g as a matrix; an order-k tensor has one basis Q_i per mode i (modes"
_IN_BASIS = ("G_p", "V", "V_hat", "M_p", "D_p")
_QR_NOTE = ("        columns sorted by diag(Q^T L Q) descending, V's coordinates permuted "
            "alike; the QR in float32")
_FIRST_NOTE = ("        (the first step: no basis yet, d = 0; L and R gathered, Q_L and Q_R "
               "their eigenvectors)")


def primed(line: str) -> str:
    """G', M', D' as G_p, M_p, D_p (names the Python translation can hold)."""
    return re.sub(r"\b([A-Z])'", r"\1_p", line)


def in_basis(target: str) -> bool:
    return target in _IN_BASIS


def eigen_note(line: str, period: dict) -> bool:
    """Reads a note line of the eigenbasis lines into ``period['eigen']``; False if it is
    not one."""
    if "eigen" not in period:
        return False
    eig = period["eigen"]
    if m := re.fullmatch(r"        longer than max_dim = (\S+?)(?:, and vectors(?: unless "
                         r"(\w+))?,)? keep Q_i = I\)", line):
        eig["max_dim"] = m[1]
        eig["vectors"] = True if ", and vectors" not in line else (m[2] or False)
        return True
    if m := re.fullmatch(r"        \(adjacent dims merged first while their product stays <= "
                         r"max_dim(?:, if (\w+))?:", line):
        eig["merge"] = m[1] or True
        return True
    if line == "        a tensor merged into one mode is a vector)":
        return True
    if m := re.fullmatch(r"        \(a 4-D tensor's dims, N H W C, merged as N C H W"
                         r"(?: when (\w+) = channels_last)?\)", line):
        eig["layout"] = m[1] or True
        return True
    if line == _QR_NOTE:
        eig["qr_note"] = True
        return True
    if line == _FIRST_NOTE:
        eig["first"] = True
        return True
    return False


def eigen_statements(line: str, period: dict, statement) -> list | None:
    """The eigenbasis lines tests/_explained.py cannot read as assignments (``statement``
    makes one from a target, an expression and whether it lives in the basis, by default
    as ``in_basis`` says); None for any other line."""
    if line == _G_LINE:
        period["eigen"] = {"merge": False, "layout": False}
        return [statement("G", "g")]
    if "eigen" not in period:
        return None
    if line == "Q_L, Q_R = the bases of the factors L and R as of the previous step":
        return []  # the bases the rotations use: the state Eigen keeps
    if line == "G'    = Q_L^T G Q_R   (the gradient rotated into the basis)":
        return [statement("G_p", "_rotate(G)")]
    if m := re.fullmatch(r"M'    = Q_L\^T (\w+) Q_R   \(the value rotated into the basis\)",
                         line):
        return [statement("M_p", f"_rotate({m[1]})")]
    if m := re.fullmatch(r"D'    = (.+?) / \((.+?)\)(   \(0 where that is 0\))?", line):
        num, den = _python(primed(m[1])), _python(primed(m[2]))
        expr = f"_div_or_zero({num}, {den})" if m[3] else f"({num}) / ({den})"
        return [statement("D_p", expr)]
    if line == "d     = Q_L D' Q_R^T   (rotated back)":
        return [statement("d", "_rotate_back(D_p)", True)]
    if m := re.fullmatch(r"Q_L, Q_R = the eigenvectors of L and R \((?:every (\w+) steps|"
                         r"every step), after the step\)", line):
        period["eigen"]["every"] = m[1]
        return [statement("_bases", "_refresh_eigh(L, R)")]
    if m := re.fullmatch(r"Q     = qr\(L Q\) for L's basis Q \(R's alike\), (?:every (\w+) "
                         r"steps|every step) after the step: one power-iteration step,", line):
        period["eigen"]["every"] = m[1]
        return [statement("V", "_refresh_qr(L, R, V)", False)]
    return None


class Eigen:
    """The modes, factors' layout and bases of every tensor, for the eigenbasis lines."""

    def __init__(self, shapes: list[tuple], settings: dict, number, words: dict):
        """``number(text)``: a setting's value (a constant or a hyperparameter's name);
        ``words``: the hyperparameters (a word's value is its text)."""
        self.shapes = shapes
        self.settings = settings
        self.number = number
        self.words = words
        self.bases: list[dict] | None = None  # per tensor: mode -> Q (None: no basis yet)

    def _flag(self, key: str) -> bool:
        value = self.settings.get(key, False)
        if isinstance(value, bool):
            return value
        if key == "layout":  # a word: the hyperparameter's value names the layout
            return self.words[value] == "channels_last"
        return bool(self.number(value))

    def layout(self, shape: tuple) -> tuple[bool, list[int], list[bool]]:
        """(N H W C taken as N C H W, the modes' sizes, which modes keep a factor)."""
        max_dim = self.number(self.settings["max_dim"])
        merge = self._flag("merge")
        nhwc = merge and self._flag("layout") and len(shape) == 4
        dims = [shape[0], shape[3], shape[1], shape[2]] if nhwc else list(shape)
        modes = dims
        if merge and len(dims) > 1:
            modes, run = [], 1
            for d in dims:
                if run * d > max_dim:
                    modes.append(run)
                    run = d
                else:
                    run *= d
            modes.append(run)
        vector_ok = len(modes) > 1 or self._flag("vectors")
        return nhwc, modes, [d <= max_dim and vector_ok for d in modes]

    def _tensors(self, flat: torch.Tensor) -> list[torch.Tensor]:
        out, start = [], 0
        for shape in self.shapes:
            n = torch.Size(shape).numel()
            x = flat[start:start + n].reshape(shape)
            nhwc, modes, _ = self.layout(shape)
            out.append((x.permute(0, 3, 1, 2) if nhwc else x).reshape(modes))
            start += n
        return out

    def _flat(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        out = []
        for x, shape in zip(tensors, self.shapes):
            nhwc, _, _ = self.layout(shape)
            if nhwc:
                n, h, w, c = shape
                x = x.reshape(n, c, h, w).permute(0, 2, 3, 1)
            out.append(x.reshape(-1))
        return torch.cat(out)

    def _factor_modes(self, shape, first: bool) -> list[int]:
        _, _, kept = self.layout(shape)
        return [i for i, k in enumerate(kept) if k and (i == 0) == first]

    def zeros(self, first: bool) -> Modes:
        mats = []
        for shape in self.shapes:
            _, modes, _ = self.layout(shape)
            mats.append([torch.zeros(modes[i], modes[i], dtype=torch.float64)
                         for i in self._factor_modes(shape, first)])
        return Modes(mats)

    def gram(self, first: bool):
        def of(flat):
            return Modes([[_unfold(x, i) @ _unfold(x, i).T
                           for i in self._factor_modes(shape, first)]
                          for x, shape in zip(self._tensors(flat), self.shapes)])
        return of

    def _factors(self, L: Modes, R: Modes) -> list[dict]:
        """Per tensor, mode -> its factor."""
        out = []
        for shape, left, right in zip(self.shapes, L.mats, R.mats):
            modes = self._factor_modes(shape, True) + self._factor_modes(shape, False)
            out.append(dict(zip(modes, left + right)))
        return out

    def rotate(self, back: bool):
        def apply(flat):
            out = []
            for x, bases in zip(self._tensors(flat), self.bases):
                for i, q in bases.items():
                    x = _along(x, q if back else q.T, i)
                out.append(x)
            return self._flat(out)
        return apply

    @staticmethod
    def _eigenvectors(f: torch.Tensor) -> torch.Tensor:
        _, q = torch.linalg.eigh(f)
        return torch.flip(q, dims=[1])

    def refresh_eigh(self, due: bool):
        def apply(L, R):
            if self.bases is None or due:
                self.bases = [{i: self._eigenvectors(f) for i, f in fs.items()}
                              for fs in self._factors(L, R)]
            return None
        return apply

    def refresh_qr(self, due: bool):
        def apply(L, R, V):
            if self.bases is None:  # the first step: the eigenvectors, V untouched
                self.refresh_eigh(True)(L, R)
                return V
            if not due:
                return V
            vs = self._tensors(V)
            for j, fs in enumerate(self._factors(L, R)):
                for i, f in fs.items():
                    q = self.bases[j][i]
                    p = f @ q
                    order = torch.argsort((q * p).sum(dim=0), descending=True)
                    vs[j] = vs[j].index_select(i, order)
                    new, _ = torch.linalg.qr(p[:, order].to(torch.float32))
                    self.bases[j][i] = new.to(torch.float64)
            return self._flat(vs)
        return apply

    def functions(self, due: bool) -> dict:
        return dict(_gram_first=self.gram(True), _gram_rest=self.gram(False),
                    _rotate=self.rotate(False), _rotate_back=self.rotate(True),
                    _refresh_eigh=self.refresh_eigh(due), _refresh_qr=self.refresh_qr(due))
