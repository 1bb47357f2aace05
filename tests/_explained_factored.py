"""The factored structure's printed lines, run (tests/_explained.py): per tensor of order
k >= 2, R the means over its last dim and C over the one before, flat over all tensors;
an order < 2 tensor keeps its c in R (Adafactor's diagonal)."""
from __future__ import annotations

import torch


def factored_sizes(shapes: list[tuple]) -> tuple[list[int], list[int]]:
    """The flat sizes of R and C over all tensors (an order < 2 tensor: R its c)."""
    rows = [torch.Size(s[:-1]).numel() if len(s) >= 2 else torch.Size(s).numel()
            for s in shapes]
    cols = [torch.Size(s[:-2]).numel() * s[-1] if len(s) >= 2 else 0 for s in shapes]
    return rows, cols


def factored(shapes: list[tuple], zero: bool) -> dict:
    """The lines' functions: ``mean_j c_ij``, ``mean_i c_ij`` and the rank-1 ``R C^T /
    max(mean_i R_i, eps)`` (``zero``: V = 0 where that mean is 0, the note)."""
    rows, cols = factored_sizes(shapes)
    sizes = [torch.Size(s).numel() for s in shapes]

    def means(dim):
        def of(x):
            out = [v.view(sh).mean(dim).reshape(-1) if len(sh) >= 2 else
                   (v if dim == -1 else v[:0]) for sh, v in zip(shapes, torch.split(x, sizes))]
            return torch.cat(out)
        return of

    def rank1(r, c, eps):
        out = []
        for sh, rt, ct in zip(shapes, torch.split(r, rows), torch.split(c, cols)):
            if len(sh) < 2:
                out.append(rt)
                continue
            rt, ct = rt.view(*sh[:-1], 1), ct.view(*sh[:-2], 1, sh[-1])
            scale = rt.mean(-2, keepdim=True).clamp(min=eps)
            v = rt * ct / scale
            out.append((torch.where(scale > 0, v, 0.0) if zero else v).reshape(-1))
        return torch.cat(out)
    return dict(_rows=means(-1), _cols=means(-2), _rank1=rank1)
