"""Lowering ``structure kronecker(basis = eigen)``: the spec's diagonal pipeline (iterate,
length, damping) run in the eigenbasis of Kronecker factors, one extern stage per tensor
(curvc.plan_eigen.EigenbasisStage, run by curvc.runtime.eigenbasis). The momentum, the
lets, the update and the decay stay elementwise around it, in the parameter's own basis.
"""
from __future__ import annotations

from curvc import ir, lower as axes
from curvc.language import FORMS
from curvc.fold import op, sub
from curvc.lower_step import Step, bias_correction, every_flag, iterate_beta
from curvc.plan import Const, Expr, Precondition, Scalar
from curvc.plan_eigen import EigenbasisStage

LAYOUTS = next(a.choices for a in FORMS["structure"]["kronecker"].args if a.name == "layout")


def lower_eigenbasis(s: Step, g: Expr, m: Expr, exponent: Expr) -> Expr:
    """d = Q (M' / P(V)) Q^T per tensor (see EigenbasisStage), the basis refreshed on the
    steps ``every k`` flags (every step without it)."""
    st, it, ln, dmp = s.opt.structure, s.opt.iterate, s.opt.length, s.opt.damping
    refresh = every_flag(s, "refresh_basis", st.every) if st.every is not None else None
    eps = s.arg(dmp.eps) if dmp.kind != "none" else Const(0.0)
    correction = Const(1.0)
    if it.kind == "ema" and it.bias_corrected:
        # V takes its first statistic on the second step (the first has no basis yet)
        correction = s.host_scalar("curvature_bias_correction", bias_correction(
            s, op("pow", s.arg(it.beta), sub(Scalar("step"), 1.0)), it.bias_corrected))
    params = {
        "factor_beta": s.arg(st.factor_beta),
        "weight": iterate_beta(s)[1] if it.kind == "ema" else Const(0.0),
        "init": s.arg(it.init) if it.kind == "sum" and it.init is not None else Const(0.0),
        "exponent": exponent,
        "eps_inside": eps if dmp.kind == "inside" else Const(0.0),
        "eps_after": eps if dmp.kind == "add" else Const(0.0),
        "floor": eps if dmp.kind == "floor" else Const(0.0),
        "bias_correction": correction,
        "max_dim": s.arg(st.max_dim),
        "merge": s.arg(st.merge_dims),
        "vectors": s.arg(st.vectors),
        # a word reaches the host as its index among the choices (channels_last: 1)
        "layout": (s.arg(st.layout) if isinstance(st.layout, ir.HyperRef)
                   else Const(float(LAYOUTS.index(st.layout.value)))),
    }
    stage = EigenbasisStage(s.unique("eigenbasis"), it.kind, refresh, str(st.refresh.value),
                            "eigen_sign" if ln.kind == "eigen_sign" else "root")
    s.matrix.append(stage)
    u = Precondition("precondition", (g, m, *(params[n] for n in stage.params)),
                     stage=stage.name)
    return axes.lower_clip(s, u)
