"""Distributed Shampoo's lines (merged dims, blocks, grafting, the roots' schedule), run.

How tests/_explained.py reads them (``explain``'s words, taken literally):

* ``G = g without its size-1 dims, neighbours merged from the last while their product
  <= D``: per tensor, its dims but the size-1 ones, the last ones multiplied together
  (right to left) as long as the product stays <= D;
* ``G = each block of G, every dim cut into pieces of at most D``: the grid of blocks,
  each block a tensor of its own for the Kronecker lines (its factors, its roots); m,
  d_g and d are cut alike, and ``||x||`` with the note ``norms over each block`` is each
  block's norm;
* ``roots recomputed on step S and the multiples of k after it``: on step S, and on the
  steps after it that are multiples of k;
* ``every factor ^-p/r instead, whatever the order, when r > 0``: each factor's exponent.
"""
from __future__ import annotations

import itertools
import math
import re

import torch

_NOTES = (
    "        each block has its own factors (below), and m, d_g, d are cut alike",
    "        G unfolded along mode i (a block's modes are all <= max_dim)",
)


def graft_statements(line: str, period: dict, statement) -> list | None:
    """The blocking lines tests/_explained.py cannot read as assignments; None for any
    other line."""
    if line == "G     = g without its size-1 dims, neighbours merged from the last":
        period.setdefault("blocks", {})["merge"] = True
        return [statement("G", "g")]
    if m := re.fullmatch(r"G     = each block of (g|G), every dim cut into pieces of at most "
                         r"(\S+)(?: \(if (\w+)\))?:", line):
        period.setdefault("blocks", {}).update(block=m[2], block_if=m[3])
        return [statement("G", "g")] if m[1] == "g" else []
    if line == ("G     = G as a matrix; an order-k tensor has one factor per mode i, "
                "from G_(i),"):
        period["kronecker"] = True
        return []
    return None


def graft_note(line: str, period: dict) -> bool:
    """Reads one note line of the blocking lines; False if it is not one."""
    if line in _NOTES:
        return True
    if m := re.fullmatch(r"        while their product <= (\S+)(?: \(if (\w+)\))?", line):
        period["blocks"].update(merge_max=m[1], merge_if=m[2])
        return True
    if m := re.fullmatch(r"        \(roots recomputed on step (\w+)", line):
        period["roots_from"] = [m[1]]
        return True
    if m := re.fullmatch(r"         and the multiples of (\w+) after it\)", line):
        period["roots_from"].append(m[1])
        return True
    if m := re.fullmatch(r"        \(every factor \^-(\S+)/(\w+) instead, whatever the order, "
                         r"when \2 > 0\)", line):
        period["root_override"] = (m[1], m[2])
        return True
    return False


def merged(shape: tuple, max_dim: float) -> tuple:
    dims = [d for d in shape if d != 1] or [1]
    out = [dims[-1]]
    for d in reversed(dims[:-1]):
        if out[0] * d <= max_dim:
            out[0] *= d
        else:
            out.insert(0, d)
    return tuple(out)


def blocks(shapes: list[tuple], merge: float | None, block: float | None):
    """(the block of each coordinate: an index per block into the flat vector, the
    blocks' shapes), tensors merged (``merge``: their D) and cut (``block``: its D)."""
    index, out, start = [], [], 0
    for shape in shapes:
        n = math.prod(shape)
        x = torch.arange(start, start + n).reshape(merged(shape, merge) if merge else shape)
        start += n
        if block:
            size = int(block)
            grid = [[slice(i, i + size) for i in range(0, d, size)] for d in x.shape]
            pieces = [x[cut] for cut in itertools.product(*grid)]
        else:
            pieces = [x]
        index += [p.reshape(-1) for p in pieces]
        out += [tuple(p.shape) for p in pieces]
    return index, out


def block_norm(index: list[torch.Tensor]):
    """||x|| per block, at each of the block's coordinates."""
    def norm(x: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(x)
        for i in index:
            out[i] = x[i].pow(2).sum().sqrt()
        return out
    return norm
