"""The combination rules and code-generation refusals of Distributed Shampoo's constructs:
grafting, Kronecker blocks and ``iterate ema_or_sum`` (``curvc.lower_graft``), a factor's
root (``structure kronecker(factor_root)``), the momentum of the step (``momentum ...(on =
step)``) and a bias correction a hyperparameter switches (``bias_corrected(flag)``), listed
by ``curvc.rules`` among the others."""
from __future__ import annotations

from curvc import ir

_SAMPLED = ("fisher", "gauss_newton_bartlett", "kfac")  # rows of a stack, or a layer's factors


def _rule_graft_needs_a_direction(opt: ir.Optimizer) -> None:
    """A graft rescales the structure's direction per block; the polar factor's is fixed
    (its singular values all near 1), and the secant method's step is sized by its line
    search."""
    from curvc.rules import _clash  # curvc.rules imports this module
    gr, st = opt.graft, opt.structure
    if gr.kind == "none":
        return
    if st.kind == "kronecker" and st.root == ir.Const("newton_schulz"):
        raise _clash(gr, f"graft {gr.kind}", st, "structure kronecker(root = newton_schulz)",
                     "the polar factor U V^T is the step whose norm the iteration fixes; "
                     "graft onto root = eigh, whose Kronecker step the graft then rescales")
    if opt.length.kind == "normalized":
        raise _clash(gr, f"graft {gr.kind}", opt.length, "length normalized",
                     "a normalized step has its norm fixed (||d||_P = 1) and a graft gives it "
                     "another pipeline's: the step has one norm; graft a gradient_norm or "
                     "eigen_sign step")
    if opt.clip.kind == "length":
        raise _clash(gr, f"graft {gr.kind}", opt.clip, "clip length",
                     "clip length bounds the step by the length limitation's own norm, and a "
                     "graft gives it another pipeline's: the step has one norm")
    if st.kind == "kronecker" and st.basis == ir.Const("eigen"):
        raise _clash(gr, f"graft {gr.kind}", st, "structure kronecker(basis = eigen)",
                     "the eigenbasis stage takes the whole step inside the factors' basis "
                     "(SOAP); a grafted norm per block is Distributed Shampoo's root = eigh "
                     "step")
    if st.kind == "low_rank":
        raise _clash(gr, f"graft {gr.kind}", st, f"structure {st.kind}",
                     "the secant method's step is sized by its line search over the whole "
                     "parameter vector, so there is no per-block direction to rescale")


def _rule_factor_root_needs_factor_roots(opt: ir.Optimizer) -> None:
    """factor_root replaces the root 2k of each of a block's k factors: it needs the
    factors' roots of a gradient-norm length (what the root divides power by)."""
    from curvc.rules import _clash
    st, ln = opt.structure, opt.length
    if st.factor_root in (None, ir.Const(0.0)):
        return
    what = f"structure kronecker(factor_root = {st.factor_root})"
    if st.root == ir.Const("newton_schulz"):
        raise _clash(st, what, st, "root = newton_schulz",
                     "the polar factor is computed from G by matrix products, with no "
                     "factor whose root could be chosen; use root = eigh")
    if st.basis == ir.Const("eigen"):
        raise _clash(st, what, st, "basis = eigen",
                     "the eigenbasis stage roots the diagonal V in the factors' basis (the "
                     "length's power), not the factors; factor_root is Shampoo's")
    if opt.curvature.kind == "kfac":
        raise _clash(st, what, opt.curvature, "curvature kfac",
                     "K-FAC's two factors per layer take the length's exponent (power/2), "
                     "not a root per mode of a block")
    if ln.kind != "gradient_norm":
        raise _clash(st, what, ln, f"length {ln.kind}",
                     "each factor's root is -power/factor_root, power the gradient-norm "
                     "length's; other lengths fix their own exponent")


def _rule_step_momentum_follows_the_step(opt: ir.Optimizer) -> None:
    """A momentum of the step averages the finished step d, decoupled decay included."""
    from curvc.rules import _clash
    m, sch = opt.step_momentum, opt.schedule
    if m.kind == "none":
        return
    what = f"momentum {m.kind}(on = step)"
    if opt.decay.fixed not in (None, ir.Const(False)):
        raise _clash(m, what, opt.decay, f"decay {opt.decay.kind}(fixed = ...)",
                     "the momentum averages decoupled decay into the step, which lr then "
                     "multiplies, so the decay cannot be kept apart from lr")
    if opt.update is not None:
        raise _clash(m, what, opt.structure, "update = ...",
                     "update = EXPR replaces the step the momentum would average; write the "
                     "momentum in the expression (a state of direction)")
    if sch.kind == "relative_step" or sch.adjust not in (None, ir.Const("none")):
        raise _clash(m, what, sch, f"schedule {sch.kind}"
                     + ("" if sch.kind == "relative_step" else "(adjust)"),
                     "this schedule sizes the step per tensor but keeps decoupled decay at lr, "
                     "and a momentum of the step averages the decay into the step")


def _rule_fixed_decay_is_decoupled(opt: ir.Optimizer) -> None:
    """``fixed`` changes decoupled decay only: coupled l2 with it would drop it silently."""
    from curvc.rules import _clash
    d = opt.decay
    if d.kind == "l2" and d.fixed not in (None, ir.Const(False)) and \
            d.decoupled in (None, ir.Const(False)):
        raise _clash(d, "decay l2(fixed = ...)", d, "decoupled = false",
                     "fixed keeps lr out of decoupled decay, theta (1 - wd); coupled decay "
                     "adds wd * theta to the gradient, which fixed does not change")


RULES = (_rule_graft_needs_a_direction, _rule_factor_root_needs_factor_roots,
         _rule_step_momentum_follows_the_step, _rule_fixed_decay_is_decoupled)


def _blocked(opt: ir.Optimizer) -> bool:
    return any(getattr(opt.structure, n) not in (None, ir.Const(False))
               for n in ("block", "merge_dims"))


def refusals(refusal, clause) -> tuple:
    """The Refusals (``curvc.rules.Refusal``; ``clause``: its node picker), in order."""
    graft = "the grafted pipeline's norm is applied per tensor to an elementwise step, or " \
            "per block inside the Kronecker extern; "
    return (
        *(refusal(f"graft_{path}", path, lambda opt: opt.graft.kind != "none", clause("graft"),
                  what, graft + why)
          for path, what, why in (
              ("kfac", "graft {kind} with curvature kfac", "K-FAC's natural gradient is "
               "computed by its runtime before the plan sees the gradient"),
              ("dense", "graft {kind} with structure dense", "the dense step is computed by "
               "its runtime before the plan sees the gradient"),
              ("factored", "graft {kind} with structure factored", "the factored extern "
               "clips and scales its step itself, so a graft in the tail would rescale after "
               "that"))),
        refusal("kronecker_blocks", ("kfac", "kronecker"),
                lambda opt: _blocked(opt) and opt.curvature.kind in _SAMPLED,
                clause("structure"),
                "structure kronecker(block or merge_dims) with a sampled curvature or kfac",
                "blocks are cut from one tensor's gradient; K-FAC's factors belong to a layer, "
                "and a sampled curvature's rows would be cut along the stack too (not built "
                "yet)"),
        refusal("kfac_bias_switch", "kfac",
                lambda opt: isinstance(opt.iterate.bias_corrected, ir.HyperRef),
                clause("iterate"), "iterate {kind} bias_corrected(flag) with curvature kfac",
                "K-FAC's runtime fixes at construction whether its factors start at 0 and are "
                "corrected, or start at I; write bias_corrected or leave it out"),
        refusal("secant_clip_eps", "secant",
                lambda opt: opt.clip.kind == "global_norm" and opt.clip.eps not in (
                    None, ir.Const(0.0)), clause("clip"),
                "clip global_norm(eps = ...) with structure low_rank",
                "L-BFGS's driver scales its direction by min(1, C / ||d||) itself, with no "
                "eps; leave eps out"),
        refusal("secant_step_momentum", "secant",
                lambda opt: opt.step_momentum.kind != "none", clause("step_momentum"),
                "momentum {kind}(on = step) with structure low_rank",
                "L-BFGS's driver takes its step by a line search over all parameters; there "
                "is no finished step in the plan to average"),
    )
