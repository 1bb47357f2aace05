"""The combination rule of ``structure kronecker(basis = eigen)`` (curvc.rules runs it)."""
from __future__ import annotations

from curvc import ir, language
from curvc.rules import _clash


def _default(name: str) -> ir.Const:
    return ir.Const(language.default("structure", "kronecker", name))


def rule_eigenbasis_runs_a_diagonal_pipeline(opt: ir.Optimizer) -> None:
    """basis = eigen runs the spec's diagonal pipeline (the square of the rotated gradient,
    accumulated every step, divided into the rotated value) inside the factors' basis; the
    eigenbasis arguments mean nothing without it."""
    st = opt.structure
    if st.kind != "kronecker":
        return
    me = "structure kronecker(basis = eigen)"
    if st.basis is None or st.basis == _default("basis"):
        given = [n for n in language.EIGENBASIS_ARGS[1:] if getattr(st, n) is not None
                 and getattr(st, n) != _default(n)]
        if given:
            raise _clash(st, f"structure kronecker({given[0]} = {getattr(st, given[0])})", st,
                         "no `basis = eigen`", f"{given[0]} is an argument of the eigenbasis "
                         "rotation, which only basis = eigen runs")
        return
    if st.block not in (None, ir.Const(False)):
        raise _clash(st, "structure kronecker(block = ...)", st, me,
                     "the eigenbasis stage keeps one basis per mode of each (merged) tensor; "
                     "blocks of a mode are Distributed Shampoo's root = eigh step")
    inside = "in the eigenbasis the spec's diagonal pipeline runs on the rotated gradient, "
    if st.root == ir.Const("newton_schulz"):
        raise _clash(st, "root = newton_schulz", st, "basis = eigen",
                     "the Newton-Schulz iteration keeps no factors, so there is no eigenbasis "
                     "to rotate into")
    c, it, ln = opt.curvature, opt.iterate, opt.length
    if c.kind != "empirical_fisher" or c.of is not None or c.every is not None:
        what = "curvature empirical_fisher(of = ...)" if c.kind == "empirical_fisher" \
            else f"curvature {c.kind}"
        raise _clash(c, what, st, me, inside + "so its curvature is the rotated gradient's "
                     "square, the empirical Fisher's diagonal in that basis (curvature "
                     "empirical_fisher, of the gradient, every step)")
    if it.kind not in ("ema", "sum", "instant") or it.every is not None or it.keep_max \
            not in (None, ir.Const(False)):
        what = f"iterate {it.kind}" + (" every k" if it.every is not None else "") + (
            "(keep_max)" if it.keep_max not in (None, ir.Const(False)) else "")
        raise _clash(it, what, st, me, inside + "accumulated every step by ema, sum or "
                     "instant (a running maximum or a skipped step would mix coordinates "
                     "of different bases at a refresh)")
    if ln.kind == "normalized":
        raise _clash(ln, "length normalized", st, me,
                     inside + "and the normalized length is not rendered there yet: use "
                     "gradient_norm, none or eigen_sign, or `update = direction / ...`")
