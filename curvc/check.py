"""The check pass: AST -> IR, or a ``CurvError`` that points at the fault.

Which forms, arguments and modifiers each clause accepts is data
(``FORMS``), so the grammar stays tiny and every unknown word gets a
"did you mean". After the forms are known, ``COMBINATION_RULES`` refuse
specs whose axes contradict each other, each rule saying which clauses
clash and why.
"""
from __future__ import annotations

import builtins
import keyword
import math
from dataclasses import dataclass, fields

from curvc import ir, names, parse as ast
from curvc.constraints import CONSTRAINTS
from curvc.errors import CurvError, Span, suggest


# --- what each clause accepts ------------------------------------------------

@dataclass(frozen=True)
class ArgSpec:
    name: str
    kind: str  # number | int | bool | enum
    default: object = None  # None: required
    constraint: str = "any"  # a key of constraints.CONSTRAINTS (count_* for bounded counts)
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
        "fisher": FormSpec((ArgSpec("samples", "int", 1.0, "count_samples"),),
                           help="F = E_{y~p(y|x)}[g g^T], labels sampled from the model"),
        "gauss_newton_bartlett": FormSpec(
            (ArgSpec("samples", "int", 1.0, "count_samples"),
             ArgSpec("scale", "number", 1.0, "positive")),
            modifiers=("squared", "every"),
            help="Gauss-Newton-Bartlett: batch size * (grad of loss on sampled labels)^2"),
        "hutchinson": FormSpec(
            (ArgSpec("samples", "int", 1.0, "count_samples"),
             ArgSpec("distribution", "enum", "rademacher", choices=("rademacher", "gaussian")),
             ArgSpec("spatial_average", "bool", False),
             ArgSpec("scale", "number", 1.0, "positive")),
            modifiers=("squared", "every"),
            help="Hessian diagonal: E[z * (H z)] with random probes z"),
        "hessian": FormSpec(help="the exact Hessian H (small models)"),
        "secant": FormSpec(help="secant pairs: H s ~ y with s = dtheta, y = dgrad"),
        "kfac": FormSpec(help="F~ per layer as (a a^T) kron (dL/ds dL/ds^T)"),
    },
    "structure": {
        "scalar": FormSpec(help="L*I"),
        "diagonal": FormSpec(help="diag(lambda_1..lambda_n)"),
        "kronecker": FormSpec((ArgSpec("max_dim", "int", 8192.0, "count_max_dim"),),
                              modifiers=("every",),
                              help="L kron R per tensor (block-diagonal over tensors)"),
        "dense": FormSpec(help="the whole n x n matrix"),
        "low_rank": FormSpec(help="rank-2 updates from the secant pairs (their number: iterate secant)"),
    },
    "iterate": {
        "instant": FormSpec(modifiers=("every",), help="the current estimate only"),
        "ema": FormSpec((_BETA(), ArgSpec("keep_max", "bool", False)),
                        modifiers=("bias_corrected", "every", "delayed"),
                        help="C <- beta*C + (1-beta)*c"),
        "sum": FormSpec((ArgSpec("init", "number", 0.0, "nonneg"),), modifiers=("every",),
                        help="C <- C + c"),
        "secant": FormSpec((ArgSpec("history", "int", constraint="count_history"),
                            ArgSpec("iterations", "int", 20.0, "count_iterations"),
                            ArgSpec("tolerance_grad", "number", 1e-7, "nonneg"),
                            ArgSpec("tolerance_change", "number", 1e-9, "nonneg")),
                           help="two-loop recursion over the last k pairs, up to `iterations` "
                                "closure evaluations per step"),
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
                                help="d_i = clamp(d_i, -threshold, threshold) (Sophia)"),
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
        "l2": FormSpec((ArgSpec("rate", "number", constraint="nonneg"),
                        ArgSpec("decoupled", "bool", False)),
                       help="g <- g + wd*theta (decoupled = true: as `decay decoupled`)"),
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

# Why a modifier exists, for the error that says it is on the wrong form.
MODIFIER_WHY = {
    "bias_corrected": "bias correction undoes the zero start of an exponential moving average",
    "squared": "AdaHessian accumulates the square of Hutchinson's estimate",
    "delayed": "the first refresh after k steps (Sophia's release) needs `every k`",
}

# Hyperparameter names that would clash with something else, and why. Inside
# generated functions a spec's names are prefixed by the backends, so only the
# places where a name is the API itself are listed: the constructor's arguments
# (curvc.names, shared with the emitter) and the words of the language.
_LANGUAGE_WORDS = ("true", "false", "optimizer", "hyper", "every")
RESERVED_WHY: dict[str, str] = {
    **{n: "every compiled optimizer already takes an argument of that name"
       for n in sorted(names.keyword_names() - {n for kws in names.STRUCTURE_KEYWORDS.values()
                                                for n, _ in kws})},
    "params": "every compiled optimizer already takes an argument of that name",
    "self": "it is the constructor's first argument",
    "step": "the step count t is read under that name",
    **{n: "it is a word of the curv language" for n in _LANGUAGE_WORDS},
}
RESERVED = frozenset(RESERVED_WHY)

# The optimizer's name becomes a module-level class, bound after the code that
# reads the module's imports and Python's builtins by name.
_BUILTINS = frozenset(n for n in dir(builtins) if not n.startswith("_"))

_LR = ArgSpec("lr", "number", constraint="nonneg")
_EVERY = ArgSpec("every", "int", constraint="count_every")


# --- AST -> IR ---------------------------------------------------------------

def check(spec: ast.SpecAST) -> ir.Optimizer:
    """Validate a parsed spec and build its IR."""
    try:
        return _check(spec)
    except CurvError as e:
        raise e.with_source(spec.source)


def _check(spec: ast.SpecAST) -> ir.Optimizer:
    _check_optimizer_name(spec.name, spec.name_span)
    hypers = _check_hypers(spec)
    by_name = {h.name: h for h in hypers}
    axes: dict[str, object] = {}
    first: dict[str, ast.Clause] = {}
    for clause in spec.clauses:
        if clause.keyword in axes:
            raise CurvError("name.duplicate_clause", clause.keyword_span, clause=clause.keyword,
                            hint=f"the first {clause.keyword} clause is on line "
                                 f"{first[clause.keyword].keyword_span.line}")
        first[clause.keyword] = clause
        axes[clause.keyword] = _check_clause(clause, by_name)
    for clause, why in REQUIRED_CLAUSES.items():
        if clause not in axes:
            raise CurvError("combo.missing_clause", spec.name_span, clause=clause, why=why,
                            hint=f"add a line `{clause} FORM`, FORM one of: "
                                 f"{', '.join(FORMS[clause])}")
    for clause, form in DEFAULT_FORMS.items():
        axes.setdefault(clause, ir.AXIS_TYPES[clause](kind=form))
    if "lr" not in by_name:
        raise CurvError("combo.missing_lr", spec.name_span,
                        hint="add it to the hyper line: `hyper lr = 1e-3, ...`" if spec.params
                        else "add the line `hyper lr = 1e-3`")
    opt = ir.Optimizer(spec.name, hypers, source=spec.source, file=spec.file,
                       span=spec.name_span, **axes)
    _check_structure_keywords(opt)
    for rule in COMBINATION_RULES:
        rule(opt)
    return opt


def _check_structure_keywords(opt: ir.Optimizer) -> None:
    """A hyperparameter may not take a keyword the structure's driver adds (L-BFGS's)."""
    for name, _ in names.STRUCTURE_KEYWORDS.get(opt.structure.kind, ()):
        if name in opt.hyper_names:
            raise CurvError("name.reserved_hyper", opt.hyper(name).span, name=name,
                            why=f"the compiled optimizer of structure {opt.structure.kind} "
                                "already takes an argument of that name")


def _check_optimizer_name(name: str, span: Span) -> None:
    # The grammar already limits names to [A-Za-z_][A-Za-z0-9_]*; these are
    # the identifiers that would still break the generated module.
    if keyword.iskeyword(name):
        why = "it is a Python keyword, and the optimizer's name becomes a Python class name"
    elif name.startswith("_"):
        why = "names starting with '_' are kept for the generated code"
    elif name in names.MODULE_IMPORTS:
        why = "the generated module imports a module or class under that name"
    elif name in _BUILTINS:
        why = f"the class becomes a module global and would hide Python's builtin {name!r}"
    else:
        return
    raise CurvError("name.reserved_optimizer", span, name=name, why=why)


def _reserved_hyper_why(name: str) -> str | None:
    if name in RESERVED_WHY:
        return RESERVED_WHY[name]
    if keyword.iskeyword(name):
        return "it is a Python keyword, and hyperparameters become Python keyword arguments"
    if name.startswith("_"):
        return "names starting with '_' are kept for the generated code"
    return None


def _check_hypers(spec: ast.SpecAST) -> tuple[ir.Hyper, ...]:
    seen: dict[str, ir.Hyper] = {}
    for p in spec.params:
        if p.name in seen:
            first = seen[p.name].span
            raise CurvError("name.duplicate_hyper", p.span, name=p.name,
                            hint=f"first defined at line {first.line}, column {first.column}")
        why = _reserved_hyper_why(p.name)
        if why:
            raise CurvError("name.reserved_hyper", p.span, name=p.name, why=why)
        d = p.default
        if isinstance(d, ast.TupleLiteral):
            default = tuple(_finite(n) for n in d.values)
        elif isinstance(d, ast.Boolean):
            default = d.value
        else:
            default = _finite(d)
        seen[p.name] = ir.Hyper(p.name, default, p.span)
    # A tuple's entries reach the generated code as NAME_0, NAME_1, ...
    for h in seen.values():
        if isinstance(h.default, tuple):
            entries = [f"{h.name}_{i}" for i in range(len(h.default))]
            for i, entry in enumerate(entries):
                if entry in seen:
                    raise CurvError("name.tuple_entry_clash", seen[entry].span, name=entry,
                                    tuple=h.name, index=i, entries=", ".join(entries))
    lr = next((p for p in spec.params if p.name == "lr"), None)
    if lr is not None:
        what = "the learning rate 'lr'"
        if isinstance(lr.default, ast.TupleLiteral):
            raise CurvError("value.wrong_kind", lr.default.span, what=what,
                            expected="one number", found="a tuple")
        _check_kind(seen["lr"].default, _LR, what, lr.default.span, _describe(lr.default))
    return tuple(seen.values())


def _finite(n: ast.Number) -> int | float:
    if not math.isfinite(n.value):
        raise CurvError("value.not_finite", n.span, text=n.text)
    if n.value == 0:
        digits = n.text.lower().split("e")[0]  # before the exponent
        if any(d in digits for d in "123456789"):
            raise CurvError("value.underflow", n.span, text=n.text,
                            hint="the smallest number above 0 is about 5e-324; write 0 for zero")
    return n.literal


def _signature(clause: ast.Clause, form: FormSpec) -> str:
    def arg(a: ArgSpec) -> str:
        if a.required:
            return a.name
        d = a.default
        if isinstance(d, bool):
            d = "true" if d else "false"
        elif isinstance(d, float):
            d = f"{d:g}"
        return f"{a.name} = {d}"
    return f"{clause.keyword} {clause.form}({', '.join(arg(a) for a in form.args)})"


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
    if clause.args and not form.args:
        raise CurvError("name.no_arguments", clause.args[0].keyword_span,
                        clause=clause.keyword, form=clause.form)
    positional = [a for a in clause.args if a.keyword is None]
    if len(positional) > len(form.args):
        n = len(form.args)
        raise CurvError("value.too_many_arguments", positional[n].span,
                        clause=clause.keyword, form=clause.form, count=n,
                        s="" if n == 1 else "s", names=", ".join(a.name for a in form.args))
    for spec_arg, arg in zip(form.args, positional):
        values[spec_arg.name] = _check_value(arg.value, spec_arg, where, hypers)
    names = {a.name: a for a in form.args}
    for arg in clause.args:
        if arg.keyword is None:
            continue
        if arg.keyword not in names:
            close = suggest(arg.keyword, names)
            raise CurvError("name.unknown_argument", arg.keyword_span, clause=clause.keyword,
                            form=clause.form, name=arg.keyword, allowed=", ".join(names),
                            hint=f"did you mean {close!r}?" if close else
                            f"usage: {_signature(clause, form)}")
        if arg.keyword in values:
            by_position = arg.keyword in [a.name for a in form.args[:len(positional)]]
            raise CurvError("name.duplicate_argument", arg.span, name=arg.keyword,
                            clause=clause.keyword, form=clause.form,
                            hint=f"{arg.keyword!r} is already given by position "
                                 f"(usage: {_signature(clause, form)})" if by_position else None)
        values[arg.keyword] = _check_value(arg.value, names[arg.keyword], where, hypers)
    for spec_arg in form.args:
        if spec_arg.name not in values:
            if spec_arg.required:
                raise CurvError("value.missing_argument", clause.form_span,
                                clause=clause.keyword, form=clause.form, name=spec_arg.name,
                                hint=f"usage: {_signature(clause, form)}")
            values[spec_arg.name] = ir.Const(spec_arg.default)
    flags: dict[str, object] = {}
    for mod in clause.modifiers:
        if mod.name not in form.modifiers:
            raise _bad_modifier(clause, form, mod)
        if mod.name in flags:
            raise CurvError("name.duplicate_modifier", mod.span, name=mod.name)
        if mod.name == "every":
            flags["every"] = _check_value(mod.value, _EVERY, where, hypers,
                                          what=f"the step count after 'every' in {where}")
        else:
            flags[mod.name] = True
    cls = ir.AXIS_TYPES[clause.keyword]
    known = {f.name for f in fields(cls)}
    kwargs = {k: v for k, v in {**values, **flags}.items() if k in known}
    return cls(kind=clause.form, span=clause.span, **kwargs)


def _bad_modifier(clause: ast.Clause, form: FormSpec, mod: ast.Modifier) -> CurvError:
    owners = [f"{c} {f}" for c, fs in FORMS.items() for f, spec in fs.items()
              if mod.name in spec.modifiers]
    if owners:  # a real modifier, on the wrong form
        return CurvError("name.misplaced_modifier", mod.span, name=mod.name,
                         clause=clause.keyword, form=clause.form, owners=_join(owners),
                         hint=MODIFIER_WHY.get(mod.name))
    if mod.name in FORMS[clause.keyword]:
        return CurvError("name.unknown_modifier", mod.span, name=mod.name,
                         clause=clause.keyword, form=clause.form,
                         allowed="it takes " + " or ".join(form.modifiers) if form.modifiers
                         else "it takes no modifiers",
                         hint=f"{mod.name!r} is another {clause.keyword} form; "
                              "a clause takes exactly one")
    close = suggest(mod.name, form.modifiers)
    allowed = ("it takes " + " or ".join(form.modifiers) if form.modifiers
               else "it takes no modifiers")
    return CurvError("name.unknown_modifier", mod.span, name=mod.name,
                     clause=clause.keyword, form=clause.form, allowed=allowed,
                     hint=f"did you mean {close!r}?" if close else None)


def _check_value(value, spec_arg: ArgSpec, where: str, hypers: dict[str, ir.Hyper],
                 what: str | None = None) -> ir.Arg:
    what = what or f"the {spec_arg.name!r} of {where}"
    if spec_arg.kind == "enum":
        if not isinstance(value, ast.Ref) or value.index is not None:
            found = f"the number {value.text}" if isinstance(value, ast.Number) else (
                f"{value.name}[{value.index}]" if isinstance(value, ast.Ref) else _describe(value))
            raise CurvError("value.wrong_kind", value.span, what=what,
                            expected=" or ".join(spec_arg.choices), found=found)
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
                raise CurvError("value.bad_index", value.span, name=value.name,
                                hint=f"write {value.name} without an index")
            if value.index >= len(default):
                raise CurvError("value.index_out_of_range", value.span, name=value.name,
                                index=value.index, size=len(default),
                                hint=f"indices start at 0: {_entries(value.name, default)}")
            default = default[value.index]
        elif isinstance(default, tuple):
            raise CurvError("value.wrong_kind", value.span, what=what,
                            expected="one value", found=f"the tuple {value.name!r}",
                            hint=f"pick an entry: {_entries(value.name, default)}")
        shown = f"{_show(default)} (the default of {value.name!r})"
        _check_kind(default, spec_arg, what, value.span, shown)
        return ir.HyperRef(value.name, value.index, value.span)
    if isinstance(value, ast.Boolean):
        _check_kind(value.value, spec_arg, what, value.span, _describe(value))
        return ir.Const(value.value, value.span)
    _finite(value)
    _check_kind(value.value, spec_arg, what, value.span, value.text)
    return ir.Const(value.value, value.span)


def _join(words: list[str]) -> str:
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " or " + words[-1]


def _entries(name: str, default: tuple) -> str:
    if len(default) == 2:
        return f"{name}[0] or {name}[1]"
    return f"{name}[0] to {name}[{len(default) - 1}]"


def _show(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    return f"{v:g}"


def _check_kind(v, spec_arg: ArgSpec, what: str, span: Span, shown: str) -> None:
    """``shown``: how the value reads in a message (its text, or a hyper's default)."""
    if spec_arg.kind == "bool":
        if not isinstance(v, bool):
            raise CurvError("value.bool_expected", span, what=what, found=shown)
        return
    if isinstance(v, bool):
        raise CurvError("value.wrong_kind", span, what=what, expected="a number", found=shown)
    label, ok = CONSTRAINTS[spec_arg.constraint]
    if spec_arg.kind == "int" and not float(v).is_integer():
        raise CurvError("value.out_of_range", span, what=what, expected="a whole number",
                        value=shown)
    if not ok(v):
        raise CurvError("value.out_of_range", span, what=what, expected=label, value=shown)


def _describe(value) -> str:
    if isinstance(value, ast.Number):
        return value.text
    if isinstance(value, ast.Boolean):
        return "true" if value.value else "false"
    if isinstance(value, ast.TupleLiteral):
        return "a tuple"
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
        specs["every"] = _EVERY
        for f in fields(node):
            v = getattr(node, f.name)
            if isinstance(v, ir.HyperRef) and f.name in specs and specs[f.name].kind != "bool":
                out.append((v, specs[f.name].constraint, f"the {f.name} of {axis} {node.kind}"))
    return out


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
    if c.kind in ("hutchinson", "gauss_newton_bartlett") and s.kind != "diagonal":
        raise _clash(c, f"curvature {c.kind}", s, f"structure {s.kind}",
                     f"{c.kind} estimates only the diagonal of the curvature, so it needs "
                     "structure diagonal")
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
        raise _clash(present[0][1], f"{present[0][0]} {present[0][1].kind}", absent[0][1], " and ".join(f"{a} {n.kind}" for a, n in absent),
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


def _rule_elementwise_clip_needs_coordinates(opt: ir.Optimizer) -> None:
    if opt.clip.kind == "elementwise" and opt.structure.kind not in ("diagonal", "scalar"):
        raise _clash(opt.clip, "clip elementwise", opt.structure, f"structure {opt.structure.kind}",
                     "clipping coordinate by coordinate approximates eigenbasis clipping only "
                     "when the eigenbasis is the coordinate basis (a diagonal structure)")


def _rule_normalized_step_needs_no_clip(opt: ir.Optimizer) -> None:
    ln = opt.length
    if ln.kind == "normalized" and opt.clip.kind == "global_norm":
        raise _clash(ln, "length normalized", opt.clip, "clip global_norm",
                     "a normalized step already has a fixed norm, so there is nothing to clip")


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


COMBINATION_RULES = (
    _rule_estimator_fixes_structure,
    _rule_no_root_of_a_signed_estimate,
    _rule_delayed_needs_every,
    _rule_one_refresh_schedule,
    _rule_secant_is_low_rank,
    _rule_secant_has_no_root,
    _rule_constant_is_scalar,
    _rule_constant_has_nothing_to_iterate,
    _rule_elementwise_clip_needs_coordinates,
    _rule_normalized_step_needs_no_clip,
)
