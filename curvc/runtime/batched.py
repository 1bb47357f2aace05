"""Batched externs: one torch call per group of same-shaped tensors instead of one per tensor.

A generated module's matrix call (``curvc.runtime.program.Extern``) is a per-tensor
function; where its structure has a batched form, the module also defines ``many``, the
same call on lists of tensors, which lands here. ``run`` collects the tensors an extern
serves over every bucket whose host values and flags are the same (the extern's static
settings), and each ``*_many`` function groups them by (shape, dtype, device), stacks
each group, and runs one batched torch call per group (``torch.baddbmm``,
``torch.linalg.eigh`` on a stack); a group of one tensor takes the per-tensor function.
The state stays per tensor (the checkpoint does not change).

* ``polar_many``: Newton-Schulz on a stack; only matmul rounding can differ from the
  per-tensor iteration (a batched product's blocking).
* ``factored_many``: the row and column means, V = R C / mean(R) and the spectral
  function on a stack; the accumulations and norms by foreach ops over the per-tensor
  state, the same elementwise operations in the same order as ``matrix.factored``.
* ``kronecker_many``: factors accumulated per tensor, then every factor due for a root
  grouped by size and decomposed by one ``eigh`` on the stack (``matrix``'s residual
  check per matrix; one that fails goes the per-tensor way, float64 retry included).

``opt.batch_externs = False`` runs the per-tensor function on each tensor instead.
"""
from __future__ import annotations

from collections import defaultdict

import math

import torch

from curvc.runtime import roots


def run(e, work: list) -> None:
    """Extern ``e`` over ``work`` ((group, bucket, scalars, flags) per bucket) through its
    batched form: buckets whose scalars and flags are equal make one call."""
    sig = e.args
    calls: dict = {}
    for _, bucket, scalars, flags in work:
        extra = [scalars[n] for n in sig["scalars"]] + [flags[n] for n in sig["flags"]]
        key = tuple(_key(v) for v in extra)
        calls.setdefault(key, (extra, []))[1].append((bucket, bucket.args(sig["tensors"])))
    for extra, members in calls.values():
        rows = [row for _, rs in members for row in rs]
        if not rows:
            for bucket, _ in members:
                bucket.tensors[e.output] = []
            continue
        outs = e.many(*[list(col) for col in zip(*rows)], *extra)
        start = 0
        for bucket, rs in members:
            bucket.tensors[e.output] = list(outs[start:start + len(rs)])
            start += len(rs)


def _key(v):
    """A host value as a dict key: its type too (1, 1.0 and True stay apart); a value that
    cannot be hashed (a tensor) by identity."""
    try:
        hash(v)
    except TypeError:
        return ("id", id(v))
    return (type(v), v)


def in_compute(tensors: list, like: list) -> list:
    """Each tensor in its compute dtype, promote(like's dtype, float32) (None stays None),
    as the per-tensor call casts its operands."""
    return [None if t is None else t.to(torch.promote_types(v.dtype, torch.float32))
            for t, v in zip(tensors, like)]


def groups(tensors: list, wanted=lambda t: True) -> tuple[list, list]:
    """(groups of indices with one (shape, dtype, device), each of 2+ tensors; the indices
    left over: singletons and tensors ``wanted`` refuses)."""
    by = defaultdict(list)
    alone = []
    for i, t in enumerate(tensors):
        if wanted(t):
            by[(tuple(t.shape), t.dtype, t.device)].append(i)
        else:
            alone.append(i)
    many = [ix for ix in by.values() if len(ix) > 1]
    alone += [ix[0] for ix in by.values() if len(ix) == 1]
    return many, sorted(alone)


# --- Muon's polar factor ---------------------------------------------------------------

def newton_schulz_many(x: torch.Tensor, steps: int, a: float, b: float, c: float, eps: float,
                       dtype: torch.dtype) -> torch.Tensor:
    """``matrix.newton_schulz`` on a stack (B, m, n) of matrices, each its own iteration."""
    x = x.to(dtype)
    tall = x.shape[-2] > x.shape[-1]
    if tall:
        x = x.mT
    norm = torch.linalg.vector_norm(x, dim=(-2, -1), keepdim=True)
    x = x / norm.clamp(min=eps)
    for _ in range(int(steps)):
        gram = x @ x.mT
        x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.mT if tall else x


def polar_many(states: list, statistics: list, values: list, *, steps: float, a: float,
               b: float, c: float, eps: float, precision: str) -> list:
    """``matrix.polar`` of every value; same-shaped matrices (and vectors) in one stack."""
    from curvc.runtime import matrix
    kw = dict(steps=steps, a=a, b=b, c=c, eps=eps, precision=precision)
    out = [None] * len(values)
    many, alone = groups(values, lambda v: v.dim() in (1, 2) and v.numel() > 0)
    for i in alone:
        out[i] = matrix.polar(states[i], statistics[i], values[i], **kw)
    for ix in many:
        v0 = values[ix[0]]
        shape = v0.shape if v0.dim() == 2 else (1, v0.numel())
        x = torch.stack([values[i].reshape(shape) for i in ix])
        y = newton_schulz_many(x, steps, a, b, c, eps, matrix.PRECISIONS[precision])
        y = y.to(v0.dtype)
        for i, yi in zip(ix, y.unbind(0)):
            out[i] = yi.reshape(v0.shape)
    return out


# --- Adafactor's factored statistics ----------------------------------------------------

def factored_many(states: list, statistics: list, values: list, param: list | None = None,
                  **kw) -> list:
    """``matrix.factored`` of every value (its keywords in ``kw``); tensors of one shape
    stacked (order >= 1): the means, V and its spectral function one call per group,
    the per-tensor accumulators and norms by foreach ops (the same operations as the
    per-tensor function, in its order: bitwise its result)."""
    from curvc.runtime import matrix
    out = [None] * len(values)
    many, alone = groups(values, lambda v: v.dim() >= 1 and v.numel() > 0)
    for i in alone:
        out[i] = matrix.factored(states[i], statistics[i], values[i],
                                 None if param is None else param[i], **kw)
    for ix in many:
        v0 = values[ix[0]]
        accs = matrix.factored_state([states[i] for i in ix], v0, kw["init"])
        if kw["update"]:
            stacked = torch.stack([statistics[i] for i in ix])
            matrix.accumulate_statistics(accs, matrix.factored_statistics(stacked, v0.dim()),
                                         kw["accumulate"], kw["beta"], kw["weight"])
        v = matrix.factored_diagonal(accs[0] if len(accs) == 1 else accs, kw["eps"])
        shape = (len(ix),) + (1,) * v0.dim()

        def norms(x):
            return torch.stack(torch._foreach_norm(list(x.unbind(0)))).reshape(shape)
        u = matrix.factored_applied(
            v, torch.stack([values[i] for i in ix]),
            None if param is None else torch.stack([param[i] for i in ix]),
            norms=norms, numel=v0.numel(),
            **{k: kw[k] for k in ("length", "clipped", "relative", "exponent", "eps_inside",
                                  "eps_after", "floor", "bias_correction", "clip",
                                  "scale_eps")})
        for i, ui in zip(ix, u.unbind(0)):
            out[i] = ui
    return out


# --- Kronecker factors' roots -------------------------------------------------------------

def kronecker_many(states: list, statistics: list, values: list, *, length: str,
                   eps_inside: float, eps_after: float, floor: float, **kw) -> list:
    """``matrix.kronecker`` of every value: each tensor's factors accumulated as there, then
    every root due decomposed with the others of its size, dtype and exponent by one
    ``eigh`` on their stack, then each value through its roots."""
    from curvc.runtime import matrix
    out = [None] * len(values)
    due, applied = [], []
    for i, (state, statistic, value) in enumerate(zip(states, statistics, values)):
        if value.numel() == 0:
            out[i] = value
            continue
        modes, refresh, e = matrix.kronecker_factors(state, statistic, value, **kw)
        due += [(state, key, factor, e) for key, factor in refresh]
        applied.append((i, modes))
    refresh_roots(matrix.root_function(length), due, eps_inside, eps_after, floor,
                  kw["init"])
    for i, modes in applied:
        out[i] = matrix.kronecker_applied(states[i], values[i], modes, length)
    return out


def refresh_roots(how, due: list, eps: float, after: float, floor: float,
                  start: float = 0.0) -> None:
    """Each (state, key, factor, exponent) of ``due``: ``state[key]``, the factor's root by
    ``how`` (``roots.checked_inverse_root`` or ``checked_eigenbasis``). Factors of one
    size, dtype, device and exponent are decomposed together; one whose stacked root
    fails the per-matrix checks takes ``roots.refreshed``'s way alone (float64 retry,
    the previous root kept)."""
    by = defaultdict(list)
    for j, (_, _, factor, e) in enumerate(due):
        by[(tuple(factor.shape), factor.dtype, factor.device, e)].append(j)
    for (_, _, _, e), ix in by.items():
        stacked = (_stacked_roots(how, [due[j][2] for j in ix], e, eps, after, floor, start)
                   if len(ix) > 1 else [None])
        for j, root in zip(ix, stacked):
            state, key, factor, _ = due[j]
            if root is None:
                root = roots.refreshed(how, factor, e, eps, after, floor, state.get(key),
                                       start=start)
            state[key] = root


def _stacked_roots(how, factors: list, exponent: float, eps: float, after: float,
                   floor: float, start: float = 0.0) -> list:
    """``how`` of each factor from one batched ``eigh``, in the first precision
    ``roots.refreshed`` tries; None for one that fails ``roots.checked_eigh``'s checks
    (or every one, if the batched solver raises)."""
    f0 = factors[0]
    dtype = roots.root_dtypes(f0.dtype)[0]
    n = f0.shape[0]
    a = torch.stack(factors).to(dtype)
    if eps:
        a = a + eps * torch.eye(n, dtype=dtype, device=a.device)
    a = (a + a.mT) / 2  # symmetric to the last bit, as eigh assumes
    try:
        w, q = torch.linalg.eigh(a)
    except RuntimeError:  # torch.linalg.LinAlgError: one did not converge
        return [None] * len(factors)
    gen = torch.Generator(device=a.device).manual_seed(n)  # roots.checked_eigh's probes
    v = torch.randn(n, roots.PROBES, dtype=dtype, device=a.device, generator=gen)
    residual = torch.linalg.matrix_norm(a @ v - q @ (w[..., :, None] * (q.mT @ v)))
    scale = torch.linalg.matrix_norm(a) * math.sqrt(roots.PROBES)
    limit = roots.RESIDUAL_SLACK * n * torch.finfo(dtype).eps
    ok = (torch.isfinite(w).all(-1) & torch.isfinite(q).all(-1).all(-1)
          & (residual <= limit * scale))
    s = roots.spectral(roots.at_rounding(w, eps, start), exponent, after, floor)
    if how is roots.checked_eigenbasis:
        ok &= torch.isfinite(s).all(-1)
        out = torch.cat([q, s[..., None]], dim=-1)
    else:
        out = (q * s[..., None, :]) @ q.mT
        ok &= torch.isfinite(out).all(-1).all(-1)
    out = out.to(f0.dtype)
    # each its own tensor: a view of the stack would carry the whole stack into a checkpoint
    return [r.clone() if good else None for r, good in zip(out.unbind(0), ok.tolist())]
