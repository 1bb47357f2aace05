"""The Newton-Schulz lines (``structure kronecker(root = newton_schulz)``: Muon), run.

How tests/_explained.py reads them (``explain``'s words, taken literally):

* ``d = U V^T for m = U S V^T ..., by Newton-Schulz in P (m as a matrix: a vector is
  1 x n)``: per tensor, m as a matrix (a vector one row), in precision P (the reader runs
  float64 only: bfloat16's rounding inside a matmul is no text's to say);
* ``X = m / max(||m||_F, eps) (transposed first when it has more rows than columns)``;
* ``X = a X + (b A + c A A) X,  A = X X^T (k times)``: the iteration, k times;
* ``d = X (transposed back ...)``;
* ``lr_s = lr * s(rows, cols)``, s named by the adjust hyperparameter's word among the
  note's ``word: formula`` pairs (or the one formula printed), rows x cols the tensor as
  a matrix: shape[0] x the rest, a vector 1 x n.
"""
from __future__ import annotations

import math
import re

import torch

_START = r"X     = (\w+) / max\(\|\|\1\|\|_F, (\S+)\)   \(transposed first when it has more rows " \
         r"than columns\)"
_ITERATE = r"X     = (\S+) X \+ \((\S+) A \+ (\S+) A A\) X,  A = X X\^T   \((\w+) times\)"
_ADJUST = r"lr_s  = lr \* s\(rows, cols\)   \(per tensor; decay keeps lr\), s by (\w+):"
_FORMULAS = {  # the note's formulas, as the reader computes them
    "1": lambda r, c: 1.0,
    "sqrt(max(1, rows/cols))": lambda r, c: math.sqrt(max(1.0, r / c)),
    "0.2 sqrt(max(rows, cols))": lambda r, c: 0.2 * math.sqrt(max(r, c)),
}


def polar_statements(line: str, period: dict, statement) -> list | None:
    """The Newton-Schulz lines tests/_explained.py cannot read as assignments; None for
    any other line."""
    if re.fullmatch(r"d     = U V\^T for (\w+) = U S V\^T \(= L\^-1/4 \1 R\^-1/4, L = \1 \1\^T, "
                    r"R = \1\^T \1\),", line):
        period["polar"] = {}
        return []
    if m := re.fullmatch(_START, line):
        return [statement("X", f"_polar_start({m[1]}, {m[2]})")]
    if m := re.fullmatch(_ITERATE, line):
        return [statement("X", f"_polar_iterate(X, {m[1]}, {m[2]}, {m[3]}, {m[4]})")]
    if line == "d     = X   (transposed back; its singular values near 1, not at 1)":
        return [statement("d", "_polar_back(X)")]
    if m := re.fullmatch(_ADJUST, line):
        period["adjust"] = {"by": m[1]}
        return [statement("lr_s", f"_adjusted(lr, {m[1]!r})")]
    if m := re.fullmatch(r"lr_s  = lr \* (.+)   \(per tensor; decay keeps lr\)", line):
        period["adjust"] = {"formulas": {"": _FORMULAS[m[1]]}}  # one formula, no word
        return [statement("lr_s", "_adjusted(lr, '')")]
    return None


def polar_note(line: str, period: dict) -> bool:
    """Reads one note line of the Newton-Schulz and adjust lines; False if it is not one."""
    if m := re.fullmatch(r"        by Newton-Schulz in (\w+) \((\w+) as a matrix: a vector is "
                         r"1 x n\):", line):
        assert m[1] == "float64", "the reader runs float64 only"
        return True
    if "adjust" in period and "formulas" not in period["adjust"]:
        pairs = re.findall(r"(\w+): (.+?)(?:, (?=\w+: )|$)", line.strip())
        assert pairs, line
        period["adjust"]["formulas"] = {word: _FORMULAS[f] for word, f in pairs}
        return True
    return line == ("        (rows x cols: the tensor as a matrix, shape[0] x the rest; a vector "
                    "1 x n)")


class Polar:
    """Per tensor, its matrix and whether the iteration runs on its transpose."""

    def __init__(self, shapes: list[tuple], period: dict, words: dict):
        self.shapes = shapes
        self.period = period
        self.words = words  # the hyperparameters: an adjust word's value
        self.tall: list[bool] = []

    def _matrices(self, flat: torch.Tensor) -> list[torch.Tensor]:
        out, start = [], 0
        for shape in self.shapes:
            n = math.prod(shape)
            rows = shape[0] if len(shape) == 2 else 1
            out.append(flat[start:start + n].reshape(rows, n // rows))
            start += n
        return out

    def start(self, m: torch.Tensor, eps: float) -> list[torch.Tensor]:
        mats = self._matrices(m)
        self.tall = [x.shape[0] > x.shape[1] for x in mats]
        mats = [x.T if tall else x for x, tall in zip(mats, self.tall)]
        return [x / max(torch.linalg.norm(x).item(), eps) for x in mats]

    @staticmethod
    def iterate(xs, a, b, c, steps):
        for _ in range(int(steps)):
            xs = [a * x + (b * (x @ x.T) + c * (x @ x.T) @ (x @ x.T)) @ x for x in xs]
        return xs

    def back(self, xs) -> torch.Tensor:
        return torch.cat([(x.T if tall else x).reshape(-1) for x, tall in zip(xs, self.tall)])

    @staticmethod
    def _rows_cols(shape: tuple) -> tuple[int, int]:
        """The tensor as a matrix: shape[0] x the rest, a vector 1 x n."""
        n = math.prod(shape)
        rows = shape[0] if len(shape) >= 2 else 1
        return rows, n // max(rows, 1)

    def adjusted(self, lr: float, name: str) -> torch.Tensor:
        """lr s(rows, cols) at each coordinate, s the formula the word (a hyperparameter's
        value, or the word itself) names."""
        s = self.period["adjust"]["formulas"][self.words.get(name, name)]
        return torch.cat([torch.full((math.prod(shape),), lr * s(*self._rows_cols(shape)),
                                     dtype=torch.float64) for shape in self.shapes])

    def functions(self) -> dict:
        return dict(_polar_start=self.start, _polar_iterate=self.iterate,
                    _polar_back=self.back, _adjusted=self.adjusted)
