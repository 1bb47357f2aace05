"""The combination rule and code-generation refusals of grafting and Kronecker blocks
(Distributed Shampoo; ``curvc.lower_graft``), listed by ``curvc.rules`` among the others."""
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
    )
