"""The check pass: AST -> IR, or a ``CurvError`` that points at the fault.

Which forms, arguments and modifiers each clause accepts is data
(``FORMS``), so the grammar stays tiny and every unknown word gets a
"did you mean". After the forms are known, ``COMBINATION_RULES`` refuse
specs whose axes contradict each other, each rule saying which clauses
clash and why.
"""
from __future__ import annotations

import keyword
import math
from dataclasses import dataclass, fields
from typing import Callable

from curvc import ir, parse as ast
from curvc.errors import CurvError, Span, suggest


# --- what each clause accepts ------------------------------------------------

@dataclass(frozen=True)
class ArgSpec:
    name: str
    kind: str  # number | int | bool | enum
    default: object = None  # None: required
    constraint: str = "any"  # any | nonneg | positive | unit | unit_closed | positive_int
    choices: tuple[str, ...] = ()

    @property
    def required(self) -> bool:
        return self.default is None


@dataclass(frozen=True)
class FormSpec:
    args: tuple[ArgSpec, ...] = ()
    modifiers: tuple[str, ...] = ()  # bare words and 'every'
    help: str = ""


_BETA = lambda name="beta": ArgSpec(name, "number", constraint="unit")  # noqa: E731

FORMS: dict[str, dict[str, FormSpec]] = {
    "curvature": {
        "constant": FormSpec(help="L*I: the a-priori smoothness constant (folded into lr)"),
        "empirical_fisher": FormSpec(help="F~ = E_data[g g^T]; its diagonal is g*g"),
        "fisher": FormSpec((ArgSpec("samples", "int", 1.0, "positive_int"),),
                           help="F = E_{y~p(y|x)}[g g^T], labels sampled from the model"),
        "gauss_newton_bartlett": FormSpec(
            (ArgSpec("samples", "int", 1.0, "positive_int"),),
            help="Gauss-Newton-Bartlett: batch size * (grad of loss on sampled labels)^2"),
        "hutchinson": FormSpec(
            (ArgSpec("samples", "int", 1.0, "positive_int"),
             ArgSpec("distribution", "enum", "rademacher", choices=("rademacher", "gaussian")),
             ArgSpec("spatial_average", "bool", False)),
            modifiers=("squared",),
            help="Hessian diagonal: E[z * (H z)] with random probes z"),
        "hessian": FormSpec(help="the exact Hessian H (small models)"),
        "secant": FormSpec(help="secant pairs: H s ~ y with s = dtheta, y = dgrad"),
        "kfac": FormSpec(help="F~ per layer as (a a^T) kron (dL/ds dL/ds^T)"),
    },
    "structure": {
        "scalar": FormSpec(help="L*I"),
        "diagonal": FormSpec(help="diag(lambda_1..lambda_n)"),
        "kronecker": FormSpec((ArgSpec("max_dim", "int", 8192.0, "positive_int"),),
                              modifiers=("every",),
                              help="L kron R per tensor (block-diagonal over tensors)"),
        "dense": FormSpec(help="the whole n x n matrix"),
        "low_rank": FormSpec(help="rank-2 updates from the secant pairs (their number: iterate secant)"),
    },
    "iterate": {
        "instant": FormSpec(modifiers=("every",), help="the current estimate only"),
        "ema": FormSpec((_BETA(), ArgSpec("keep_max", "bool", False)),
                        modifiers=("bias_corrected", "every"),
                        help="C <- beta*C + (1-beta)*c"),
        "sum": FormSpec((ArgSpec("init", "number", 0.0, "nonneg"),), modifiers=("every",),
                        help="C <- C + c"),
        "secant": FormSpec((ArgSpec("history", "int", constraint="positive_int"),),
                           help="two-loop recursion over the last k pairs"),
    },
    "length": {
        "none": FormSpec(help="d = P^-1 g (Newton, NGD)"),
        "gradient_norm": FormSpec((ArgSpec("power", "number", 1.0, "positive"),),
                                  help="||d_i||_P = eps*g_i: d = P^-1/2 g (Adam, Adagrad)"),
        "normalized": FormSpec(help="||d||_P = eps: d = P^-1 g / sqrt(g^T P^-1 g)"),
        "eigen_sign": FormSpec(help="||d_i||_P = eps: d = P^-1/2 Q sign(Q^T g) (sign GD)"),
    },
    "clip": {
        "none": FormSpec(),
        "global_norm": FormSpec((ArgSpec("threshold", "number", constraint="positive"),),
                                help="d <- d * min(1, C/||d||)"),
        "elementwise": FormSpec((ArgSpec("threshold", "number", constraint="positive"),),
                                help="d_i = clamp(g_i / (rho * P_i), -1, 1) (Sophia)"),
    },
    "momentum": {
        "none": FormSpec(),
        "ema": FormSpec((_BETA(),), modifiers=("bias_corrected",),
                        help="m <- beta*m + (1-beta)*g"),
        "heavy_ball": FormSpec((_BETA(), ArgSpec("dampening", "number", 0.0, "unit_closed"),
                                ArgSpec("nesterov", "bool", False)),
                               help="b <- beta*b + (1-dampening)*g (b = g on the first step)"),
    },
    "decay": {
        "none": FormSpec(),
        "l2": FormSpec((ArgSpec("rate", "number", constraint="nonneg"),),
                       help="g <- g + wd*theta"),
        "decoupled": FormSpec((ArgSpec("rate", "number", constraint="nonneg"),),
                              help="theta <- theta*(1 - lr*wd)"),
    },
    "damping": {
        "none": FormSpec(),
        "add": FormSpec((ArgSpec("eps", "number", constraint="nonneg"),),
                        help="P <- P + eps, after the root"),
        "inside": FormSpec((ArgSpec("eps", "number", constraint="nonneg"),),
                           help="P <- (C + eps)^power, before the root"),
        "floor": FormSpec((ArgSpec("eps", "number", constraint="nonneg"),),
                          help="P <- max(P, eps)"),
    },
    "schedule": {
        "constant": FormSpec(),
        "inverse_time": FormSpec((ArgSpec("rate", "number", constraint="nonneg"),),
                                 help="lr_t = lr / (1 + (t-1)*rate)"),
    },
}

DEFAULT_FORMS = {"iterate": "instant", "clip": "none", "momentum": "none", "decay": "none",
                 "damping": "none", "schedule": "constant"}
REQUIRED_CLAUSES = {
    "curvature": "the paper's Calculating Approximation column",
    "structure": "the paper's Structure Approximation column",
    "length": "the paper's Length Limitation column: none, gradient_norm, normalized or eigen_sign",
}

# Names every generated optimizer takes itself, and words of the language.
RESERVED = frozenset({
    "params", "defaults", "self", "maximize", "foreach", "fused", "capturable",
    "differentiable", "state", "param_groups", "step", "true", "false", "optimizer",
    "hyper", "every"})

CONSTRAINTS: dict[str, tuple[str, Callable[[float], bool]]] = {
    "any": ("any number", lambda v: True),
    "nonneg": ("a number >= 0", lambda v: v >= 0),
    "positive": ("a number > 0", lambda v: v > 0),
    "unit": ("in [0, 1)", lambda v: 0 <= v < 1),
    "unit_closed": ("in [0, 1]", lambda v: 0 <= v <= 1),
    "positive_int": ("a whole number >= 1", lambda v: v >= 1 and float(v).is_integer()),
}


# --- AST -> IR ---------------------------------------------------------------

def check(spec: ast.SpecAST) -> ir.Optimizer:
    """Validate a parsed spec and build its IR."""
    try:
        return _check(spec)
    except CurvError as e:
        raise e.with_source(spec.source)


def _check(spec: ast.SpecAST) -> ir.Optimizer:
    _check_identifier(spec.name, spec.name_span, "the optimizer's name")
    hypers = _check_hypers(spec)
    by_name = {h.name: h for h in hypers}
    axes: dict[str, object] = {}
    for clause in spec.clauses:
        if clause.keyword in axes:
            raise CurvError("name.duplicate_clause", clause.keyword_span, clause=clause.keyword)
        axes[clause.keyword] = _check_clause(clause, by_name)
    for clause, why in REQUIRED_CLAUSES.items():
        if clause not in axes:
            raise CurvError("combo.missing_clause", spec.name_span, clause=clause, why=why)
    for clause, form in DEFAULT_FORMS.items():
        axes.setdefault(clause, ir.AXIS_TYPES[clause](kind=form))
    if "lr" not in by_name:
        raise CurvError("combo.missing_clause", spec.name_span, clause="hyper lr",
                        why="every step is theta <- theta - lr * d")
    opt = ir.Optimizer(spec.name, hypers, source=spec.source, file=spec.file,
                       span=spec.name_span, **axes)
    for rule in COMBINATION_RULES:
        rule(opt)
    return opt


def _check_identifier(name: str, span: Span, what: str) -> None:
    # The grammar already limits names to [A-Za-z_][A-Za-z0-9_]*; these are
    # the identifiers that would still clash in generated Python.
    if keyword.iskeyword(name) or name.startswith("_"):
        raise CurvError("value.wrong_kind", span, what=what,
                        expected="a name that is not a Python keyword and does not start with '_'",
                        found=repr(name))


def _check_hypers(spec: ast.SpecAST) -> tuple[ir.Hyper, ...]:
    seen: dict[str, ir.Hyper] = {}
    for p in spec.params:
        if p.name in seen:
            raise CurvError("name.duplicate_hyper", p.span, name=p.name)
        if p.name in RESERVED:
            raise CurvError("name.reserved_hyper", p.span, name=p.name)
        _check_identifier(p.name, p.span, "a hyperparameter's name")
        d = p.default
        if isinstance(d, ast.TupleLiteral):
            default = tuple(_finite(n) for n in d.values)
        elif isinstance(d, ast.Boolean):
            default = d.value
        else:
            default = _finite(d)
        seen[p.name] = ir.Hyper(p.name, default, p.span)
    return tuple(seen.values())


def _finite(n: ast.Number) -> float:
    if not math.isfinite(n.value):
        raise CurvError("value.wrong_kind", n.span, what="a number", expected="finite",
                        found=n.text)
    return n.value


def _check_clause(clause: ast.Clause, hypers: dict[str, ir.Hyper]):
    forms = FORMS[clause.keyword]
    form = forms.get(clause.form)
    if form is None:
        close = suggest(clause.form, forms)
        raise CurvError("name.unknown_form", clause.form_span, clause=clause.keyword,
                        name=clause.form,
                        hint=f"did you mean {close!r}?" if close else
                        f"choose one of: {', '.join(forms)}")
    where = f"{clause.keyword} {clause.form}"
    values: dict[str, ir.Arg] = {}
    positional = [a for a in clause.args if a.keyword is None]
    if len(positional) > len(form.args):
        raise CurvError("value.too_many_arguments", positional[len(form.args)].span,
                        clause=clause.keyword, form=clause.form, count=len(form.args))
    for spec_arg, arg in zip(form.args, positional):
        values[spec_arg.name] = _check_value(arg.value, spec_arg, where, hypers)
    names = {a.name: a for a in form.args}
    for arg in clause.args:
        if arg.keyword is None:
            continue
        if arg.keyword not in names:
            close = suggest(arg.keyword, names)
            raise CurvError("name.unknown_argument", arg.span, clause=clause.keyword,
                            form=clause.form, name=arg.keyword,
                            allowed=", ".join(names) or "no arguments",
                            hint=f"did you mean {close!r}?" if close else None)
        if arg.keyword in values:
            raise CurvError("name.duplicate_argument", arg.span, name=arg.keyword)
        values[arg.keyword] = _check_value(arg.value, names[arg.keyword], where, hypers)
    for spec_arg in form.args:
        if spec_arg.name not in values:
            if spec_arg.required:
                raise CurvError("value.missing_argument", clause.form_span,
                                clause=clause.keyword, form=clause.form, name=spec_arg.name)
            values[spec_arg.name] = ir.Const(spec_arg.default)
    flags: dict[str, object] = {}
    for mod in clause.modifiers:
        if mod.name not in form.modifiers:
            allowed = ", ".join(form.modifiers) or "none"
            close = suggest(mod.name, form.modifiers)
            raise CurvError("name.unknown_modifier", mod.span, name=mod.name,
                            clause=clause.keyword, form=clause.form, allowed=allowed,
                            hint=f"did you mean {close!r}?" if close else None)
        if mod.name == "every":
            flags["every"] = _check_value(mod.value, ArgSpec("every", "int", constraint="positive_int"),
                                          f"{where} every", hypers)
        else:
            flags[mod.name] = True
    cls = ir.AXIS_TYPES[clause.keyword]
    known = {f.name for f in fields(cls)}
    kwargs = {k: v for k, v in {**values, **flags}.items() if k in known}
    return cls(kind=clause.form, span=clause.span, **kwargs)


def _check_value(value, spec_arg: ArgSpec, where: str, hypers: dict[str, ir.Hyper]) -> ir.Arg:
    what = f"the {spec_arg.name!r} of {where}"
    if spec_arg.kind == "enum":
        if not isinstance(value, ast.Ref) or value.index is not None:
            raise CurvError("value.wrong_kind", value.span, what=what,
                            expected=" or ".join(spec_arg.choices), found=_describe(value))
        if value.name not in spec_arg.choices:
            close = suggest(value.name, spec_arg.choices)
            raise CurvError("value.wrong_kind", value.span, what=what,
                            expected=" or ".join(spec_arg.choices), found=repr(value.name),
                            hint=f"did you mean {close!r}?" if close else None)
        return ir.Const(value.name, value.span)
    if isinstance(value, ast.Ref):
        hyper = hypers.get(value.name)
        if hyper is None:
            close = suggest(value.name, hypers)
            raise CurvError("name.unknown_hyper", value.span, name=value.name,
                            hint=f"did you mean {close!r}?" if close else
                            "declare it with `hyper NAME = default`")
        default = hyper.default
        if value.index is not None:
            if not isinstance(default, tuple):
                raise CurvError("value.bad_index", value.span, name=value.name)
            if value.index >= len(default):
                raise CurvError("value.index_out_of_range", value.span, name=value.name,
                                index=value.index, size=len(default))
            default = default[value.index]
        elif isinstance(default, tuple):
            raise CurvError("value.wrong_kind", value.span, what=what,
                            expected="one value", found=f"the tuple {value.name!r} (index it)")
        _check_kind(default, spec_arg, what, value.span)
        return ir.HyperRef(value.name, value.index, value.span)
    if isinstance(value, ast.Boolean):
        _check_kind(value.value, spec_arg, what, value.span)
        return ir.Const(value.value, value.span)
    _check_kind(value.value, spec_arg, what, value.span)
    return ir.Const(value.value, value.span)


def _check_kind(v, spec_arg: ArgSpec, what: str, span: Span) -> None:
    if spec_arg.kind == "bool":
        if not isinstance(v, bool):
            raise CurvError("value.bool_expected", span, what=what)
        return
    if isinstance(v, bool):
        raise CurvError("value.wrong_kind", span, what=what, expected="a number",
                        found="a boolean")
    label, ok = CONSTRAINTS[spec_arg.constraint]
    if spec_arg.kind == "int" and not float(v).is_integer():
        raise CurvError("value.out_of_range", span, what=what, expected="a whole number",
                        value=f"{v:g}")
    if not ok(v):
        raise CurvError("value.out_of_range", span, what=what, expected=label, value=f"{v:g}")


def _describe(value) -> str:
    if isinstance(value, ast.Number):
        return f"the number {value.text}"
    if isinstance(value, ast.Boolean):
        return "a boolean"
    return repr(str(value.name))


def arg_constraints(opt: ir.Optimizer) -> list[tuple[ir.HyperRef, str, str]]:
    """(hyper reference, constraint, where) for every hyperparameter an axis uses.

    The generated constructor re-checks these at run time, so a bad keyword
    (``lr=-1``, ``betas=(1.2, 0.9)``) raises ``ValueError`` like torch.optim does.
    """
    out = [(ir.HyperRef("lr"), "nonneg", "the learning rate")]
    for axis in ir.AXES:
        node = getattr(opt, axis)
        form = FORMS[axis][node.kind]
        specs = {a.name: a for a in form.args}
        specs["every"] = ArgSpec("every", "int", constraint="positive_int")
        for f in fields(node):
            v = getattr(node, f.name)
            if isinstance(v, ir.HyperRef) and f.name in specs and specs[f.name].kind != "bool":
                out.append((v, specs[f.name].constraint, f"the {f.name} of {axis} {node.kind}"))
    return out


# --- rules about combinations of axes ----------------------------------------

def _clash(a_node, a: str, b_node, b: str, why: str) -> CurvError:
    span = a_node.span if a_node.span.line else b_node.span
    return CurvError("combo.clash", span, a=a, b=b, why=why)


def _rule_constant_needs_scalar(opt: ir.Optimizer) -> None:
    c, s = opt.curvature, opt.structure
    if (c.kind == "constant") != (s.kind == "scalar"):
        raise _clash(c, f"curvature {c.kind}", s, f"structure {s.kind}",
                     "a constant curvature L*I is exactly the scalar structure, and the scalar "
                     "structure has no per-coordinate curvature to estimate")


def _rule_constant_has_nothing_to_iterate(opt: ir.Optimizer) -> None:
    if opt.curvature.kind == "constant":
        for axis in ("iterate", "damping"):
            node = getattr(opt, axis)
            if node.kind not in ("instant", "none"):
                raise _clash(node, f"{axis} {node.kind}", opt.curvature, "curvature constant",
                             f"a constant curvature has nothing to {'accumulate' if axis == 'iterate' else 'damp'}")


def _rule_diagonal_estimators(opt: ir.Optimizer) -> None:
    c, s = opt.curvature, opt.structure
    if c.kind in ("hutchinson", "gauss_newton_bartlett") and s.kind != "diagonal":
        raise _clash(c, f"curvature {c.kind}", s, f"structure {s.kind}",
                     f"{c.kind} estimates only the diagonal of the curvature")
    if c.kind == "kfac" and s.kind != "kronecker":
        raise _clash(c, "curvature kfac", s, f"structure {s.kind}",
                     "K-FAC's factors (a a^T and dL/ds dL/ds^T) form a Kronecker product")
    if c.kind in ("hessian", "fisher") and s.kind == "scalar":
        raise _clash(c, f"curvature {c.kind}", s, "structure scalar",
                     "a scalar structure takes no estimated curvature")


def _rule_secant_is_low_rank(opt: ir.Optimizer) -> None:
    c, s, it = opt.curvature, opt.structure, opt.iterate
    secant = [c.kind == "secant", s.kind == "low_rank", it.kind == "secant"]
    if any(secant) and not all(secant):
        raise _clash(c, f"curvature {c.kind}", s, f"structure {s.kind} with iterate {it.kind}",
                     "the secant method builds a low-rank inverse from a history of pairs: "
                     "it needs curvature secant, structure low_rank and iterate secant together")


def _rule_bias_correction_needs_ema(opt: ir.Optimizer) -> None:
    it = opt.iterate
    if it.bias_corrected and it.kind != "ema":
        raise _clash(it, f"iterate {it.kind}", it, "bias_corrected",
                     "bias correction undoes the zero start of an exponential moving average")


def _rule_elementwise_clip_needs_coordinates(opt: ir.Optimizer) -> None:
    if opt.clip.kind == "elementwise" and opt.structure.kind not in ("diagonal", "scalar"):
        raise _clash(opt.clip, "clip elementwise", opt.structure, f"structure {opt.structure.kind}",
                     "clipping coordinate by coordinate approximates eigenbasis clipping only "
                     "when the eigenbasis is the coordinate basis (a diagonal structure)")


def _rule_power_needs_gradient_norm(opt: ir.Optimizer) -> None:
    ln = opt.length
    if ln.kind == "normalized" and opt.clip.kind == "global_norm":
        raise _clash(ln, "length normalized", opt.clip, "clip global_norm",
                     "a normalized step already has a fixed norm, so there is nothing to clip")


COMBINATION_RULES = (
    _rule_constant_needs_scalar,
    _rule_constant_has_nothing_to_iterate,
    _rule_diagonal_estimators,
    _rule_secant_is_low_rank,
    _rule_bias_correction_needs_ema,
    _rule_elementwise_clip_needs_coordinates,
    _rule_power_needs_gradient_norm,
)
