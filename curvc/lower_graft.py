"""Grafting and blocking (Distributed Shampoo, Shi et al. 2023), lowered beside the axes.

* **Grafting** (``graft FORM(...)``): the structure gives the step's direction d, a
  diagonal pipeline on the same momentum m gives its norm, per block:
  d * ||d_g|| / (||d|| + 1e-16), d_g the grafted pipeline's step (``graft_direction``).
  The grafted pipeline is elementwise, so it is written into the plan like any diagonal
  step; the rescaling is per tensor through tensor-scope reductions for the elementwise
  structures, and per block inside the Kronecker extern (``BlockedKroneckerStage``), since
  a block is a piece of one tensor the plan cannot see. Before ``start`` the step is d_g
  alone, and the Kronecker roots are computed on step ``start`` and on the multiples of
  ``structure kronecker every k`` after it (Distributed Shampoo's schedule).
* **Blocking** (``structure kronecker(block = true, merge_dims = true)``): the extern
  reshapes and splits each tensor and gives each block its own factors
  (``curvc.runtime.blocks``).
"""
from __future__ import annotations

from dataclasses import dataclass

from curvc import ir, lower as axes
from curvc.fold import add, div, mul, op, sub
from curvc.lower_step import Step, accumulation, every_flag, iterate_beta, select
from curvc.plan import Const, Expr, KroneckerStage, Precondition, Scalar

# Distributed Shampoo's guard of the direction's norm in the grafting ratio
NORM_GUARD = 1e-16


@dataclass(frozen=True)
class BlockedKroneckerStage(KroneckerStage):
    """A KroneckerStage whose extern (``curvc.runtime.blocks.blocked_kronecker``) may merge
    small dims (``merge``), split modes longer than max_dim into blocks (``block``), each
    with its own factors, and rescale each block of the step to the norm of the same block
    of the operand ``graft`` (``grafted``). ``params`` adds ``weight``, the accumulation's
    weight of this step's Gram matrix (1 - beta, or 1 for ``iterate ema_or_sum`` at 1), and
    ``factor_root`` p: each factor's root is then 2 * exponent / p instead of exponent / k
    for a block of order k (0: the latter; Distributed Shampoo's inv_root_override)."""

    block: str | bool = False  # a flag name, or a value written in the spec
    merge: str | bool = False
    grafted: bool = False

    @property
    def operands(self) -> tuple[str, ...]:
        """Tensor operands after the stage's host parameters, passed by keyword."""
        return ("graft",) if self.grafted else ()

    @property
    def flags(self) -> tuple[str, ...]:
        own = {f for f in (self.block, self.merge) if isinstance(f, str)}
        return tuple(sorted(set(super().flags) | own))

    def keywords(self, params: list[str], flag) -> list[str]:
        def choice(f):
            return flag(f) if isinstance(f, str) else repr(bool(f))
        return [*super().keywords(params, flag), f"block={choice(self.block)}",
                f"merge={choice(self.merge)}"]

    @property
    def doc(self) -> str:
        how = [w for w, on in (("merged", self.merge), ("blocked", self.block)) if on]
        graft = "; each block rescaled to the grafted step's norm" if self.grafted else ""
        return (super().doc.rstrip(".") + (f" ({' and '.join(how)})" if how else "")
                + graft + ".")


def needs_blocks(opt: ir.Optimizer) -> bool:
    """Whether the Kronecker step runs through the blocked extern (anything it adds)."""
    st = opt.structure
    return (opt.graft.kind != "none" or opt.iterate.kind == "ema_or_sum"
            or st.block not in (None, ir.Const(False))
            or st.merge_dims not in (None, ir.Const(False))
            or st.factor_root not in (None, ir.Const(0.0)))


def graft_direction(s: Step, g: Expr, m: Expr) -> Expr | None:
    """d_g, the grafted pipeline's step on the momentum m (None without a graft). Its
    second moment accumulates the gradient g (after coupled decay), as the structure's."""
    gr = s.opt.graft
    if gr.kind == "none":
        return None
    if gr.kind == "sgd":
        return m
    gg = mul(g, g)
    if gr.kind == "adagrad":
        old = s.buffer("graft_sum")
        new = add(old, gg)
    else:
        old = s.buffer("graft_exp_avg_sq")
        beta = s.arg(gr.beta)
        new = add(mul(old, beta), mul(gg, sub(1.0, beta)))
    s.store(old.name, new)
    v = new
    if gr.kind == "adam":
        v = div(new, s.host_scalar("graft_bias_correction",
                                   sub(1.0, op("pow", s.arg(gr.beta), Scalar("step")))))
    return div(m, add(op("sqrt", v), s.arg(gr.eps)))


def _started(s: Step) -> str | bool:
    """The flag of steps t >= start (True when start is 1)."""
    start = s.opt.graft.start
    if start is None or start == ir.Const(1.0):
        return True
    return s.flag("preconditioning", op("ge", Scalar("step"), s.arg(start)))


def started(s: Step, d: Expr, graft: Expr | None) -> Expr:
    """d from the start step on; the grafted pipeline's step before it."""
    if graft is None:
        return d
    return select(_started(s), d, graft)


def grafted_per_tensor(s: Step, d: Expr, graft: Expr | None) -> Expr:
    """d * ||d_g|| / (||d|| + 1e-16), the norms over each tensor (the elementwise
    structures, whose only block is the tensor)."""
    if graft is None:
        return d
    d_sq = axes._reduce(s, "step_norm_sq", mul(d, d), "tensor")
    g_sq = axes._reduce(s, "graft_norm_sq", mul(graft, graft), "tensor")
    ratio = div(op("sqrt", g_sq), add(op("sqrt", d_sq), NORM_GUARD))
    return started(s, mul(d, ratio), graft)


def roots_flag(s: Step) -> str | None:
    """When the roots are recomputed (None: every step). Without a graft, ``every k``'s
    steps 1, k+1, ...; under a graft, Distributed Shampoo's: step ``start``, then the
    steps after it that are multiples of k (k = 1 without ``every``)."""
    gr, st = s.opt.graft, s.opt.structure
    if gr.kind == "none":
        return None if st.every is None else every_flag(s, "refresh_roots", st.every)
    one = ir.Const(1.0)
    if gr.start in (None, one) and st.every in (None, one):
        return None
    t, start = Scalar("step"), s.arg(gr.start or one)
    k = s.arg(st.every) if st.every is not None else Const(1.0)
    # (t == start) + (t > start) (t mod k == 0): a host count, so its line can be split
    due = s.host_scalar("roots_due", add(op("eq", t, start), mul(
        op("gt", t, start), op("eq", op("mod", t, k), 0.0))))
    return s.flag("refresh_roots", op("ne", due, 0.0))


def lower_blocked(s: Step, g: Expr, statistic: Expr, m: Expr, params: dict,
                  accumulate_when: str | None) -> Expr:
    """The Kronecker step through the blocked extern: merged and blocked as the structure
    says, grafted per block, the grafted step alone before ``start``; then normalized and
    clipped as any Kronecker step."""
    st, ln, it = s.opt.structure, s.opt.length, s.opt.iterate
    graft = graft_direction(s, g, m)
    weight = iterate_beta(s)[1] if it.kind in ("ema", "power_ema", "ema_or_sum") else Const(0.0)
    params = {**params, "weight": weight}
    refresh = roots_flag(s)
    stage = BlockedKroneckerStage(
        s.unique("kronecker"), "blocked_kronecker", "pre_cond", "inv_pre_cond",
        accumulation(it.kind), accumulate_when, refresh, per_mode=True,
        length="eigen_sign" if ln.kind == "eigen_sign" else "root",
        params=(*KroneckerStage.params, "weight", "factor_root"),
        block=s.bool_arg("block", st.block) if st.block is not None else False,
        merge=s.bool_arg("merge_dims", st.merge_dims) if st.merge_dims is not None else False,
        grafted=graft is not None)
    s.matrix.append(stage)
    args = (statistic, m, *(params[n] for n in stage.params))
    u = Precondition("precondition", args + ((graft,) if graft is not None else ()),
                     stage=stage.name)
    if ln.kind == "normalized":  # check refuses a graft of a normalized step
        u = axes._normalized(s, m, u)
    return axes.lower_clip(s, started(s, u, graft))
