"""Which combinations of axes a spec may not have, each rule named and saying why.

Two kinds, in the order a spec meets them:

* ``COMBINATION_RULES`` (run by the check pass): combinations that have no
  meaning, such as ``kfac`` without ``kronecker``. Each is a function that
  raises ``combo.clash`` naming both clauses.
* ``REFUSALS`` (run by the check pass after those, so a spec that passes
  check compiles, and by lowering): combinations that mean something but that
  the code generator does not render yet. Each is a ``Refusal``, data with a
  name, raising ``codegen.unsupported``.

Every rule has a case in ``tests/errors/`` (``tests/test_errors.py`` checks).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from curvc import ir, language, rules_graft
from curvc.errors import CurvError


def check_combinations(opt: ir.Optimizer) -> None:
    """Raise the first combination rule ``opt`` breaks."""
    for rule in COMBINATION_RULES:
        rule(opt)


# --- rules about combinations of axes ----------------------------------------
#
# Each rule names both clashing clauses and says why. The order matters only
# for which message a spec with several clashes gets: the more specific rules
# (an estimator that fixes the structure, the secant triple) come first.

def _clash(a_node, a: str, b_node, b: str, why: str) -> CurvError:
    span = a_node.span if a_node.span.line else b_node.span
    return CurvError("combo.clash", span, a=a, b=b, why=why)


def _rule_estimator_fixes_structure(opt: ir.Optimizer) -> None:
    c, s = opt.curvature, opt.structure
    if c.kind == "hutchinson" and s.kind not in ("diagonal", "factored"):
        raise _clash(c, f"curvature {c.kind}", s, f"structure {s.kind}",
                     f"{c.kind} estimates only the diagonal of the curvature, so it needs "
                     "structure diagonal (or factored, the diagonal's row and column means)")
    if c.kind == "gauss_newton_bartlett" and s.kind not in ("diagonal", "kronecker", "factored"):
        raise _clash(c, f"curvature {c.kind}", s, f"structure {s.kind}",
                     "Gauss-Newton-Bartlett is one sampled gradient per draw: its square is "
                     "a diagonal, its Gram matrices Kronecker factors (structure diagonal, "
                     "factored or kronecker)")
    if c.kind == "kfac" and s.kind != "kronecker":
        raise _clash(c, "curvature kfac", s, f"structure {s.kind}",
                     "K-FAC's factors (a a^T and dL/ds dL/ds^T) form a Kronecker product, so it "
                     "needs structure kronecker")


def _rule_secant_is_low_rank(opt: ir.Optimizer) -> None:
    nodes = (("curvature", opt.curvature, "secant"), ("structure", opt.structure, "low_rank"),
             ("iterate", opt.iterate, "secant"))
    present = [(axis, node) for axis, node, kind in nodes if node.kind == kind]
    absent = [(axis, node) for axis, node, kind in nodes if node.kind != kind]
    if present and absent:
        raise _clash(present[0][1], f"{present[0][0]} {present[0][1].kind}", absent[0][1],
                     " and ".join(f"{a} {n.kind}" for a, n in absent),
                     "the secant method builds a low-rank inverse from a history of pairs, so "
                     "it needs curvature secant, structure low_rank and iterate secant together")


def _rule_constant_is_scalar(opt: ir.Optimizer) -> None:
    c, s = opt.curvature, opt.structure
    if c.kind == "constant" and s.kind != "scalar":
        raise _clash(c, "curvature constant", s, f"structure {s.kind}",
                     "a constant curvature is L*I, which is exactly the scalar structure")
    if s.kind == "scalar" and c.kind != "constant":
        raise _clash(c, f"curvature {c.kind}", s, "structure scalar",
                     "the scalar structure is the constant L*I (folded into lr), so there is "
                     "no curvature to estimate (use curvature constant)")


def _rule_constant_has_nothing_to_iterate(opt: ir.Optimizer) -> None:
    if opt.curvature.kind == "constant":
        for axis in ("iterate", "damping"):
            node = getattr(opt, axis)
            if node.kind not in ("instant", "none"):
                raise _clash(node, f"{axis} {node.kind}", opt.curvature, "curvature constant",
                             f"a constant curvature has nothing to "
                             f"{'accumulate' if axis == 'iterate' else 'damp'}")
        if opt.iterate.every is not None:
            raise _clash(opt.iterate, f"iterate instant every {opt.iterate.every}", opt.curvature,
                         "curvature constant", "a constant curvature has nothing to refresh")


def _rule_secant_has_no_root(opt: ir.Optimizer) -> None:
    # The secant method's H^-1 exists only as the two-loop recursion applied to a
    # vector: forming a root or an eigenbasis of it is what the low-rank structure avoids.
    ln = opt.length
    needs = {"gradient_norm": "the root H^-power/2", "eigen_sign": "the eigenbasis Q and H^-1/2"}
    if opt.structure.kind == "low_rank" and ln.kind in needs:
        raise _clash(ln, f"length {ln.kind}", opt.structure, "structure low_rank",
                     f"the secant method only applies H^-1 to a vector (the two-loop recursion "
                     f"over the last k pairs) and never forms H, so {needs[ln.kind]} that "
                     f"{ln.kind} takes do not exist for it; the step length comes from lr or "
                     "the line search (length none)")


# Curvature estimates whose entries can be negative (Hutchinson's z * Hz, the Hessian's
# diagonal) and the lengths that take a root of them; a root of a negative entry is NaN.
SIGNED_CURVATURES = ("hutchinson", "hessian")
ROOT_LENGTHS = {"gradient_norm": "P^-power/2", "eigen_sign": "P^-1/2",
                "normalized": "sqrt(g^T P^-1 g)"}


def _rule_no_root_of_a_signed_estimate(opt: ir.Optimizer) -> None:
    c, ln = opt.curvature, opt.length
    if (c.kind not in SIGNED_CURVATURES or c.squared or ln.kind not in ROOT_LENGTHS
            or opt.structure.kind not in ("scalar", "diagonal")):
        return
    fix = ("square the estimate, as AdaHessian does (`curvature hutchinson(...) squared`), or "
           if c.kind == "hutchinson" else "use structure dense (its roots skip non-positive "
           "eigenvalues), or ")
    raise CurvError(
        "combo.clash", c.span if c.span.line else ln.span, a=f"curvature {c.kind}",
        b=f"length {ln.kind}",
        why=f"the {c.kind} estimate of the diagonal can be negative, and {ln.kind} takes "
            f"{ROOT_LENGTHS[ln.kind]} of it, which is NaN for a negative entry (damping does "
            "not make it safe: a floor or an eps added after the root comes too late, and an "
            "eps inside the root is a fixed shift that a negative entry can exceed)",
        hint=fix + "take no root: `length none` with a clip (`clip elementwise(...)`), "
                   "as Sophia-H does")


def _rule_factored_needs_nonnegative_estimate(opt: ir.Optimizer) -> None:
    c, s = opt.curvature, opt.structure
    if s.kind == "factored" and c.kind in SIGNED_CURVATURES and not c.squared:
        raise CurvError(
            "combo.clash", c.span if c.span.line else s.span, a=f"curvature {c.kind}",
            b="structure factored",
            why=f"the factored structure fits the diagonal by the outer product of its row "
                f"and column means, the rank-1 fit of a non-negative matrix; the {c.kind} "
                "estimate of the diagonal can be negative, so its means can cancel to 0 or "
                "below, and the fit means nothing",
            hint="square the estimate, as AdaHessian does (`curvature hutchinson(...) "
                 "squared`), or use structure diagonal" if c.kind == "hutchinson"
            else "use structure diagonal or dense")


def _rule_factored_has_no_running_maximum(opt: ir.Optimizer) -> None:
    it, st = opt.iterate, opt.structure
    if st.kind == "factored" and it.keep_max is not None and it.keep_max != ir.Const(False):
        raise _clash(it, "iterate ema(keep_max = ...)", st, "structure factored",
                     "a running maximum of the estimate R C^T / mean(R) needs the whole tensor "
                     "the factored structure exists not to store, and a maximum of R and C "
                     "apart is not the maximum of their product")


def _rule_elementwise_clip_needs_coordinates(opt: ir.Optimizer) -> None:
    if opt.clip.kind == "elementwise" and \
            opt.structure.kind not in ("diagonal", "scalar", "factored"):
        raise _clash(opt.clip, "clip elementwise", opt.structure, f"structure {opt.structure.kind}",
                     "clipping coordinate by coordinate approximates eigenbasis clipping only "
                     "when the eigenbasis is the coordinate basis (a diagonal structure)")


def _rule_running_maximum_needs_coordinates(opt: ir.Optimizer) -> None:
    it, st = opt.iterate, opt.structure
    if it.keep_max is not None and it.keep_max != ir.Const(False) and \
            st.kind not in ("diagonal", "scalar") and st.basis != ir.Const("eigen"):
        raise _clash(it, "iterate ema(keep_max = ...)", st, f"structure {st.kind}",
                     "a running maximum is taken coordinate by coordinate; matrices have no "
                     "maximum (the order of positive semi-definite matrices is partial)")


def _newton_schulz(st: ir.Structure) -> bool:
    return st.kind == "kronecker" and st.root == ir.Const("newton_schulz")


def _rule_newton_schulz_is_the_polar_factor(opt: ir.Optimizer) -> None:
    """root = newton_schulz computes the polar factor U V^T of the value the structure
    preconditions, so it stands for the eigendecomposition path only where that path
    computes the same: L^-1/4 G R^-1/4 of this step's Gram matrices of that value."""
    st = opt.structure
    if st.kind != "kronecker":
        return
    if not _newton_schulz(st):
        given = [n for n in language.NEWTON_SCHULZ_ARGS if getattr(st, n) is not None
                 and getattr(st, n) != ir.Const(language.default("structure", "kronecker", n))]
        if given:
            raise _clash(st, f"structure kronecker({given[0]} = {getattr(st, given[0])})", st,
                         f"root = {st.root or 'eigh'}",
                         f"{given[0]} is an argument of the Newton-Schulz iteration, which "
                         "only root = newton_schulz runs")
        return
    me = "structure kronecker(root = newton_schulz)"
    polar = ("Newton-Schulz computes the polar factor U V^T of the value it preconditions, "
             "which is the eigendecomposition's L^-1/4 G R^-1/4 only when L and R are this "
             "step's Gram matrices of that same value, ")
    it, ln, dmp, c, m = opt.iterate, opt.length, opt.damping, opt.curvature, opt.momentum
    if it.kind != "instant" or it.every is not None:
        raise _clash(it, f"iterate {it.kind}" + (" every k" if it.every is not None else ""),
                     st, me, polar + "not accumulated or held over steps (iterate instant)")
    if ln.kind != "gradient_norm" or ln.power != ir.Const(1.0):
        raise _clash(ln, f"length {ln.kind}" + (f"(power = {ln.power})"
                                                if ln.kind == "gradient_norm" else ""),
                     st, me, polar + "rooted by 1/4 each (length gradient_norm with power 1)")
    if dmp.kind != "none":
        raise _clash(dmp, f"damping {dmp.kind}", st, me,
                     polar + "undamped (an eps in the roots changes every singular value)")
    if c.kind != "empirical_fisher":
        raise _clash(c, f"curvature {c.kind}", st, me,
                     polar + "the Gram matrices of the gradient (curvature empirical_fisher)")
    # the value is the momentum's (the gradient without one); the factors' statistic is
    # `of`'s (the gradient without it): they must be the same vector
    same = (m.kind == "none" and c.of is None) or (
        m.kind == "expression" and c.of is not None and m.value == c.of)
    if not same:
        raise _clash(m, "momentum = ..." if m.kind == "expression" else f"momentum {m.kind}",
                     st, me, polar + "but the factors are of "
                     + (f"{c.of}" if c.of is not None else "the gradient")
                     + " and the value is " + ("the gradient" if m.kind == "none" else
                                               "the momentum")
                     + " (momentum none, or `curvature empirical_fisher(of = NAME)` with "
                       "`momentum = NAME`: Muon's momentum readout)")
    blocking = [n for n in ("block", "merge_dims")
                if getattr(st, n) not in (None, ir.Const(False))]
    if st.every is not None or blocking or st.max_dim != ir.Const(
            language.default("structure", "kronecker", "max_dim")):
        what = f"max_dim = {st.max_dim}"
        if st.every is not None or blocking:
            what = "every k" if st.every is not None else \
                f"{blocking[0]} = {getattr(st, blocking[0])}"
        raise _clash(st, f"structure kronecker({what})", st, "root = newton_schulz",
                     "the Newton-Schulz iteration keeps no factors or roots to refresh or "
                     "to limit: each step is the polar factor of that step's value")


def _rule_normalized_step_needs_no_clip(opt: ir.Optimizer) -> None:
    ln = opt.length
    if ln.kind == "normalized" and opt.clip.kind in ("global_norm", "tensor_rms"):
        raise _clash(ln, "length normalized", opt.clip, f"clip {opt.clip.kind}",
                     "a normalized step already has a fixed norm, so there is nothing to clip")


def _rule_length_clip_needs_a_length_in_an_eigenbasis(opt: ir.Optimizer) -> None:
    ln, st, c = opt.length, opt.structure, opt.curvature
    if opt.clip.kind == "length" and ln.kind == "none":
        raise _clash(opt.clip, "clip length", ln, "length none", "clip length bounds the "
                     "Newton step by the length limitation's step, and length none limits "
                     "nothing; choose the length to relax: normalized, gradient_norm or eigen_sign")
    if opt.clip.kind == "length" and (st.kind not in ("scalar", "diagonal", "dense")
                                      or c.kind == "kfac"):
        raise _clash(opt.clip, "clip length", *((c, "curvature kfac") if c.kind == "kfac" else
                                                (st, f"structure {st.kind}")),
                     "clip length compares the Newton step and the length's step component by "
                     "component in the curvature's eigenbasis, which only the scalar, diagonal "
                     "and dense structures compute")


def _rule_delayed_needs_every(opt: ir.Optimizer) -> None:
    it = opt.iterate
    if it.delayed and it.every is None:
        raise _clash(it, f"iterate {it.kind} delayed", it, "no `every k`",
                     "'delayed' moves the first of the refreshes that `every k` schedules; "
                     "without `every k` the curvature is refreshed on every step")


def _rule_one_refresh_schedule(opt: ir.Optimizer) -> None:
    c, it = opt.curvature, opt.iterate
    if c.every is not None and it.every is not None:
        raise _clash(c, f"curvature {c.kind} every {c.every}", it, f"iterate {it.kind} every "
                     f"{it.every}", "the estimate is either refreshed every k steps and "
                     "accumulated every step (curvature ... every k), or estimated and "
                     "accumulated together every k steps (iterate ... every k), not both")


def _uses_expressions(opt: ir.Optimizer):
    """The first clause or definition written as an expression, if any."""
    for node in (*opt.lets, *opt.states):
        return node, f"{'let' if isinstance(node, ir.Let) else 'state'} {node.name}"
    for axis in ("curvature", "momentum"):
        node = getattr(opt, axis)
        if node.kind == "expression":
            return node, f"{axis} = ..."
    if opt.curvature.of is not None:
        return opt.curvature, "curvature empirical_fisher(of = ...)"
    if opt.update is not None:
        return opt.structure, "update = ..."
    return None


def _rule_expressions_are_elementwise(opt: ir.Optimizer) -> None:
    used = _uses_expressions(opt)
    c, s = opt.curvature, opt.structure
    if used is None:
        return
    node, what = used
    if s.kind in ("dense", "low_rank") or c.kind == "kfac":
        other = f"curvature {c.kind}" if c.kind == "kfac" else f"structure {s.kind}"
        raise _clash(node, what, c if c.kind == "kfac" else s, other,
                     "expressions are elementwise over each tensor's gradient and state; "
                     f"{other} preconditions the raw gradient of the whole model (or layer) in "
                     "its runtime, before any expression could see it")
    if c.kind == "expression" and s.kind != "diagonal":
        raise _clash(c, "curvature = ...", s, f"structure {s.kind}",
                     "an elementwise curvature estimate is the diagonal of a matrix; Kronecker "
                     "factors come from a vector's Gram matrices: write "
                     "`curvature empirical_fisher(of = NAME)`")


def _rule_kronecker_factors_are_gram_matrices(opt: ir.Optimizer) -> None:
    c, s = opt.curvature, opt.structure
    if s.kind == "kronecker" and c.kind == "hessian":
        raise CurvError(
            "combo.clash", c.span if c.span.line else s.span, a="curvature hessian",
            b="structure kronecker",
            why="Kronecker factors are Gram matrices (G G^T, G^T G) of a vector's unfoldings: "
                "the gradient (Shampoo) or sampled gradients (the Fisher, Gauss-Newton-"
                "Bartlett); the exact Hessian is no vector's Gram matrix (it can be "
                "indefinite), and its Kronecker approximations (KFRA, KFLR) factor its "
                "Gauss-Newton part instead",
            hint="use `curvature gauss_newton_bartlett` or `fisher` with structure kronecker "
                 "(the Gauss-Newton's factors), or keep the Hessian with structure dense")


COMBINATION_RULES = (
    _rule_expressions_are_elementwise,
    _rule_estimator_fixes_structure,
    _rule_no_root_of_a_signed_estimate,
    _rule_delayed_needs_every,
    _rule_one_refresh_schedule,
    _rule_secant_is_low_rank,
    _rule_secant_has_no_root,
    _rule_constant_is_scalar,
    _rule_constant_has_nothing_to_iterate,
    _rule_factored_needs_nonnegative_estimate,
    _rule_elementwise_clip_needs_coordinates,
    _rule_factored_has_no_running_maximum,
    _rule_running_maximum_needs_coordinates,
    _rule_newton_schulz_is_the_polar_factor,
    *rules_graft.RULES,
    _rule_normalized_step_needs_no_clip,
    _rule_length_clip_needs_a_length_in_an_eigenbasis,
)
from curvc.rules_eigen import rule_eigenbasis_runs_a_diagonal_pipeline  # noqa: E402
COMBINATION_RULES += (rule_eigenbasis_runs_a_diagonal_pipeline,
                      _rule_kronecker_factors_are_gram_matrices)


# --- what the code generator does not render yet -------------------------------
#
# Structures and curvature sources the code generator renders today, by code
# path. The rest of Table 1 parses, checks and explains; compiling it is refused.
ELEMENTWISE_STRUCTURES = ("scalar", "diagonal")
MATRIX_STRUCTURES = ("kronecker",)
# The diagonal from row and column statistics (Adafactor): a per-tensor extern between
# fused kernels, as Kronecker factors are (curvc.runtime.matrix.factored).
FACTORED_STRUCTURES = ("factored",)
SECANT_STRUCTURES = ("low_rank",)
DENSE_STRUCTURES = ("dense",)
DENSE_CURVATURES = ("hessian", "empirical_fisher", "fisher")
# Curvatures whose runtime returns the preconditioned gradient itself, per
# layer (K-FAC: the Kronecker factors live with the layer, not the tensor).
PRECONDITIONING_CURVATURES = ("kfac",)
# Curvatures whose Kronecker factors are Gram matrices of sampled gradients, handed
# over as a stack of rows (curvc.runtime.curvature.gradient_rows).
ROW_CURVATURES = ("fisher", "gauss_newton_bartlett")


def code_path(opt: ir.Optimizer) -> str:
    """Which lowering renders the spec, and so which refusals apply to it."""
    if opt.structure.kind in DENSE_STRUCTURES:
        return "dense"
    if opt.structure.kind in SECANT_STRUCTURES:
        return "secant"
    if opt.curvature.kind in PRECONDITIONING_CURVATURES:
        return "kfac"
    if opt.structure.kind in MATRIX_STRUCTURES:
        return "kronecker"
    if opt.structure.kind in FACTORED_STRUCTURES:
        return "factored"
    return "elementwise"


@dataclass(frozen=True)
class Refusal:
    """A combination the code generator does not render yet, and why.

    ``applies`` is asked only of specs on the code path ``path``; ``node``
    picks the clause the message points at, whose form fills ``{kind}`` in
    ``what`` (and the spec's structure ``{structure}``: a message names both
    clauses that clash).
    """

    name: str
    path: str | tuple[str, ...]  # a value of code_path, or several
    applies: Callable[[ir.Optimizer], bool]
    node: Callable[[ir.Optimizer], object]
    what: str
    why: str

    def error(self, opt: ir.Optimizer) -> CurvError:
        node = self.node(opt)
        return CurvError("codegen.unsupported", node.span,
                         what=f"{self.what.format(kind=node.kind, structure=opt.structure.kind)} "
                              f"({opt.name})", why=self.why)


def _clause(axis: str) -> Callable[[ir.Optimizer], object]:
    return lambda opt: getattr(opt, axis)


def _used(axis: str) -> Callable[[ir.Optimizer], bool]:
    def used(opt: ir.Optimizer) -> bool:
        node = getattr(opt, axis)
        adjusts = axis == "schedule" and node.adjust not in (None, ir.Const("none"))
        return node.kind not in ("none", "constant") or adjusts
    return used


_FLOOR_WHY = "a floor is elementwise; a matrix is damped by adding eps I (inside or add)"
_SECANT_WHY = ("the secant pairs must see the raw gradient and the steps taken; "
               "add the term to the loss in the closure instead")

def _scoped(node: Callable[[ir.Optimizer], object]) -> Callable[[ir.Optimizer], bool]:
    """Whether the clause's norm is taken over less than every parameter."""
    return lambda opt: getattr(node(opt), "scope", None) not in (None, ir.Const("global"))


_ONE_VECTOR_WHY = ("the step is one vector over all parameters, so its norm is the global "
                   "one (scope = global)")
_RAW_GRADIENT_WHY = ("the runtime preconditions the raw gradient before the elementwise step "
                     "sees it; clip the step instead (a clip without `on = gradient`)")

# In order: on each path the first rule that applies is the one reported.
REFUSALS: tuple[Refusal, ...] = (
    # Shampoo's Kronecker factors (curvc.runtime.matrix); the Hessian has none
    # (rule kronecker_factors_are_gram_matrices)
    Refusal("kronecker_estimate_modifiers", "kronecker",
            lambda opt: opt.curvature.squared or opt.curvature.every is not None,
            _clause("curvature"), "curvature {kind} squared or every k with structure kronecker",
            "the sampled gradients are a stack of rows the factors take when they accumulate; "
            "refresh them with `iterate ... every k` (squaring is elementwise)"),
    # K-FAC's per-layer factors (curvc.runtime.kfac)
    Refusal("kfac_max_dim", "kfac",
            lambda opt: (opt.structure.max_dim is not None and opt.structure.max_dim
                         != ir.Const(language.default("structure", "kronecker", "max_dim"))),
            _clause("structure"), "structure kronecker(max_dim) with curvature kfac",
            "K-FAC keeps both factors of every layer whatever their size; max_dim limits "
            "Shampoo's per-mode factors"),
    # the whole n x n matrix (curvc.runtime.dense); check admits only DENSE_CURVATURES here,
    # unmodified (tests/test_refusals.py)
    Refusal("dense_damping_floor", "dense", lambda opt: opt.damping.kind == "floor",
            _clause("damping"), "damping floor with structure dense", _FLOOR_WHY),
    Refusal("dense_normalized_scope", "dense", _scoped(_clause("length")), _clause("length"),
            "length {kind}(scope = group or tensor) with structure dense", _ONE_VECTOR_WHY),
    # a clip of the gradient where the runtime, not the plan, reads the gradient first
    *(Refusal(f"{path}_gradient_clip", path, lambda opt: opt.gradient_clip.kind != "none",
              _clause("gradient_clip"), what, why)
      for path, what, why in (
          ("kfac", "clip {kind}(on = gradient) with curvature kfac", _RAW_GRADIENT_WHY),
          ("dense", "clip {kind}(on = gradient) with structure dense", _RAW_GRADIENT_WHY),
          ("secant", "clip {kind}(on = gradient) with structure low_rank",
           "the secant pairs and the line search read the raw gradient the closure returns; "
           "clip the direction instead (a clip without `on = gradient`)"))),
    # L-BFGS (curvc.runtime.secant); check refuses gradient_norm and eigen_sign
    *(Refusal(f"secant_{axis}_scope", "secant", _scoped(_clause(axis)), _clause(axis),
              f"{axis} {{kind}}(scope = group or tensor) with structure low_rank",
              _ONE_VECTOR_WHY) for axis in ("length", "clip")),
    *(Refusal(f"secant_{axis}", "secant", _used(axis), _clause(axis),
              f"{axis} {{kind}} with structure low_rank", _SECANT_WHY)
      for axis in ("momentum", "decay", "damping", "schedule")),
    Refusal("relative_step_after_clip", "factored",
            lambda opt: opt.schedule.kind == "relative_step" and (
                opt.clip.kind in ("elementwise", "global_norm")
                or opt.length.kind == "normalized"),
            _clause("schedule"), "schedule relative_step with a clip or normalized length in "
            "the tail (structure {structure})",
            "the factored extern applies the relative step's RMS(theta) scale to the step it "
            "returns, so a clip or a global normalization in the tail kernel would act on the "
            "scaled step instead of before the scale (clip tensor_rms runs in the extern, in "
            "order)"),
    # grafting, Kronecker blocks and ema_or_sum (curvc.rules_graft)
    *rules_graft.refusals(Refusal, _clause),
    # the fused elementwise step: every curvature check admits there has a runtime source
    # (curvc.runtime.estimators), so nothing is refused on that path.
)


def first_refusal(opt: ir.Optimizer) -> Refusal | None:
    """The refusal a spec that passed check meets when compiled, if any."""
    path = code_path(opt)
    return next((r for r in REFUSALS if path in ((r.path,) if isinstance(r.path, str) else r.path)
                 and r.applies(opt)), None)


def refuse_uncompiled(opt: ir.Optimizer) -> None:
    """Raise ``codegen.unsupported`` for a combination the code generator cannot render."""
    refusal = first_refusal(opt)
    if refusal is not None:
        raise refusal.error(opt)
