"""The equations of grafting, blocking and ``iterate ema_or_sum`` for ``curvc.explain``
(what ``curvc.lower_graft`` and ``curvc.runtime.blocks`` compute)."""
from __future__ import annotations

from curvc import ir
from curvc.explain_exprs import arg_text as _v
from curvc.lower_graft import NORM_GUARD


def _on(a) -> bool:
    return a is not None and a != ir.Const(False)


def _when(a) -> str:
    """'' for true, ' (if NAME)' for a flag."""
    return "" if isinstance(a, ir.Const) else f" (if {_v(a)})"


def ema_or_sum(name: str, new: str, beta, every: str) -> list[str]:
    b = _v(beta)
    return [f"{name}     = {b} * {name} + (1 - {b}) * {new}{every}   "
            f"({name} = {name} + {new} when {b} = 1)"]


def blocking(opt: ir.Optimizer, of: str) -> list[str]:
    """How the Kronecker structure cuts a tensor before its factors."""
    st = opt.structure
    out = []
    n = _v(st.max_dim)
    if _on(st.merge_dims):
        out += [f"G     = {of} without its size-1 dims, neighbours merged from the last",
                f"        while their product <= {n}{_when(st.merge_dims)}"]
    if _on(st.block):
        whole = "G" if out else of  # the merged view, or the tensor itself
        out += [f"G     = each block of {whole}, every dim cut into pieces of at most {n}"
                f"{_when(st.block)}:",
                "        each block has its own factors (below), and m, d_g, d are cut alike"]
    return out


def direction(opt: ir.Optimizer, m: str) -> list[str]:
    """d_g, the grafted pipeline's step on the momentum m."""
    gr = opt.graft
    if gr.kind == "sgd":
        return [f"d_g   = {m}   (graft sgd)"]
    eps = _v(gr.eps)
    if gr.kind == "adagrad":
        return ["V     = V + g * g   (graft adagrad)", f"d_g   = {m} / (sqrt(V) + {eps})"]
    b = _v(gr.beta)
    lines = [f"V     = {b} * V + (1 - {b}) * g * g   (graft {gr.kind})"]
    v = f"V / (1 - {b}^t)" if gr.kind == "adam" else "V"
    return lines + [f"d_g   = {m} / (sqrt({v}) + {eps})"]


def rescale(opt: ir.Optimizer, per: str) -> list[str]:
    """d at d_g's norm, and the grafted step alone before the start."""
    gr = opt.graft
    out = [f"d     = d * ||d_g|| / (||d|| + {NORM_GUARD:g})   (norms {per})"]
    if gr.start is not None and gr.start != ir.Const(1.0):
        out.append(f"d     = d_g   (steps t < {_v(gr.start)}: the grafted step alone)")
    return out


def roots_schedule(opt: ir.Optimizer) -> str:
    """When the Kronecker roots are recomputed, as ``curvc.lower_graft.roots_flag`` says."""
    gr, every = opt.graft, opt.structure.every
    if gr.kind == "none":
        return f"   (roots recomputed every {_v(every)} steps)" if every is not None else ""
    start = gr.start if gr.start is not None else ir.Const(1.0)
    if start == ir.Const(1.0) and every in (None, ir.Const(1.0)):
        return ""
    k = _v(every) if every is not None else "1"
    return f"   (roots recomputed on step {_v(start)} and the multiples of {k} after it)"
