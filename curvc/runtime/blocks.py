"""Distributed Shampoo's blocking and grafting around the Kronecker step (Shi et al. 2023).

``blocked_kronecker`` is one tensor's step of ``curvc.lower_graft.BlockedKroneckerStage``:

1. ``merge``: the tensor viewed with its size-1 dims dropped and adjacent dims merged,
   from the last, while their product stays <= max_dim (``merged_shape``);
2. ``block``: each dim longer than max_dim cut into pieces of max_dim (the last one
   shorter), every block of the grid its own tensor for ``curvc.runtime.matrix.kronecker``,
   with its own factors in the parameter's state (``<factors>_block<b>_<mode>``);
3. ``graft``: each block of the step rescaled to the norm of the same block of the
   grafted pipeline's step, d_b * ||g_b|| / (||d_b|| + 1e-16).
"""
from __future__ import annotations

import itertools
import math

import torch

NORM_GUARD = 1e-16  # curvc.lower_graft.NORM_GUARD


def merged_shape(shape: tuple[int, ...], max_dim: float) -> tuple[int, ...]:
    """``shape`` with size-1 dims dropped and neighbours merged from the last dim while
    the product stays <= max_dim; () and all-ones give (1,), a zero-size tensor (0,)."""
    if 0 in shape:
        return (0,)
    dims = [d for d in reversed(shape) if d != 1] or [1]
    out = [dims[0]]
    for d in dims[1:]:
        if out[-1] * d <= max_dim:
            out[-1] *= d
        else:
            out.append(d)
    return tuple(reversed(out))


def block_slices(shape: tuple[int, ...], size: float) -> list[tuple[slice, ...]]:
    """The grid of blocks of at most ``size`` per dim, in row-major order (the first dim
    slowest, as torch.split along each dim in turn gives them)."""
    step = [d if size >= d else int(size) for d in shape]
    ranges = [[slice(i, min(i + s, d)) for i in range(0, d, s)] if d else [slice(0, 0)]
              for d, s in zip(shape, step)]
    return list(itertools.product(*ranges))


def blocked_kronecker(state: dict, statistic: torch.Tensor | None, value: torch.Tensor,
                      graft: torch.Tensor | None = None, *, block: bool, merge: bool,
                      factors: str, roots: str, max_dim: float, **kronecker) -> torch.Tensor:
    """One tensor's blocked, grafted Kronecker step (the module docstring); ``kronecker``
    holds the keywords of ``curvc.runtime.matrix.kronecker``."""
    from curvc.runtime.matrix import kronecker as step

    if value.numel() == 0:
        return value
    if not (block or merge):  # the tensor is the one block: the plain step's state keys
        out = step(state, statistic, value, factors=factors, roots=roots, max_dim=max_dim,
                   **kronecker)
        return out if graft is None else _grafted(out, graft)
    shape = merged_shape(tuple(value.shape), max_dim) if merge else tuple(value.shape)
    v = value.reshape(shape)
    st = None if statistic is None else statistic.reshape(shape)
    gr = None if graft is None else graft.reshape(shape)
    out = torch.empty_like(v)
    for b, where in enumerate(block_slices(shape, max_dim if block else math.inf)):
        d = step(state, None if st is None else st[where].contiguous(), v[where].contiguous(),
                 factors=f"{factors}_block{b}", roots=f"{roots}_block{b}", max_dim=max_dim,
                 **kronecker)
        out[where] = d if gr is None else _grafted(d, gr[where])
    return out.reshape(value.shape)


def _grafted(d: torch.Tensor, graft: torch.Tensor) -> torch.Tensor:
    """d rescaled to graft's norm: d * ||graft|| / (||d|| + 1e-16)."""
    return d * (torch.linalg.vector_norm(graft) / (torch.linalg.vector_norm(d) + NORM_GUARD))
