"""The check pass: AST -> IR, or a ``CurvError`` that points at the fault.

Which forms, arguments and modifiers each clause accepts is data
(``curvc.language.FORMS``), so the grammar stays tiny and every unknown word
gets a "did you mean". After the forms are known, the combination rules
(``curvc.rules.COMBINATION_RULES``) refuse specs whose axes contradict each
other, each rule saying which clauses clash and why, and the code-generation
refusals (``curvc.rules.REFUSALS``) refuse what means something but does not
compile yet, so nothing passes check that compile then refuses.
"""
from __future__ import annotations

import builtins
import keyword
import math
import sys
from dataclasses import fields

from curvc import check_exprs, ir, names, parse as ast, rules
from curvc.check_fallback import fallback, reserved_hyper_why
from curvc.constraints import CONSTRAINTS
from curvc.errors import CurvError, Span, suggest
from curvc.routing_ast import RoutedAST
from curvc.language import (DEFAULT_FORMS, EVERY, EXPRESSION_CLAUSES, FORMS, LR,
                            MACHINE_EPS, MODIFIER_SWITCHES, NONE, MODIFIER_WHY,
                            REQUIRED_CLAUSES, RESERVED_WHY, ArgSpec, FormSpec)


# The optimizer's name becomes a module-level class, bound after the code that
# reads the module's imports and Python's builtins by name.
_BUILTINS = frozenset(n for n in dir(builtins) if not n.startswith("_"))


# --- AST -> IR ---------------------------------------------------------------

def check(spec: ast.SpecAST, *, compilable: bool = True) -> ir.Optimizer:
    """Validate a parsed spec and build its IR.

    ``compilable``: also refuse the combinations the code generator does not
    render yet (``rules.REFUSALS``), with the error ``compile`` would print, so
    a spec that passes check compiles. ``curvc explain`` passes False: a
    refused spec still has an update rule to show.
    """
    if isinstance(spec, RoutedAST):  # several pipelines and their routes
        from curvc import routing
        return routing.check(spec)
    try:
        opt = _build(spec)
        rules.check_combinations(opt)
        if compilable:
            rules.refuse_uncompiled(opt)
        return opt
    except CurvError as e:
        raise e.with_source(spec.source)


def build_ir(spec: ast.SpecAST) -> ir.Optimizer:
    """The IR of a spec whose forms, arguments and names are valid, before any
    combination rule runs (``curvc.coverage`` asks each rule about it)."""
    try:
        return _build(spec)
    except CurvError as e:
        raise e.with_source(spec.source)


def _build(spec: ast.SpecAST) -> ir.Optimizer:
    _check_optimizer_name(spec.name, spec.name_span)
    hypers = _check_hypers(spec)
    by_name = {h.name: h for h in hypers}
    scope = check_exprs.definitions(spec, by_name)
    axes: dict[str, object] = {}
    first: dict[str, ast.Clause | ast.ExprClause] = {}
    update = None
    for clause in spec.clauses:
        if isinstance(clause, ast.ExprClause):
            axis = clause.keyword
        else:
            node = _check_clause(clause, by_name, scope)
            # a clip of the gradient (`on = gradient`) is a clause of its own beside the step's
            axis = "gradient_clip" if isinstance(node, ir.Clip) and node.on_gradient else \
                clause.keyword
            if isinstance(node, ir.Momentum) and node.on_step:  # the step's, after P
                axis = "step_momentum"
        if axis in first:
            raise CurvError("name.duplicate_clause", clause.keyword_span, clause=clause.keyword,
                            hint=f"the first {clause.keyword} clause is on line "
                                 f"{first[axis].keyword_span.line}" + (
                                     "; a spec may clip the step and (on = gradient) the "
                                     "gradient, once each" if clause.keyword == "clip" else
                                     "; a spec may average the gradient and (on = step) the "
                                     "step, once each" if clause.keyword == "momentum" else ""))
        first[axis] = clause
        if isinstance(clause, ast.ExprClause):
            value = _check_expr_clause(clause, scope)
            if clause.keyword == "update":
                update = value
            else:
                axes[axis] = ir.AXIS_TYPES[axis](kind="expression", value=value,
                                                 span=clause.span)
        else:
            axes[axis] = node
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
    values = {k: getattr(axes.get(k), "value", None) for k in ("curvature", "momentum")}
    values["of"] = getattr(axes.get("curvature"), "of", None)
    values = {k: v for k, v in values.items() if v is not None}
    lets, states = check_exprs.check_all(spec, scope, values,
                                         tuple(values.values()) + ((update,) if update else ()))
    hypers = _word_choices(hypers, spec, axes)
    opt = ir.Optimizer(spec.name, hypers, source=spec.source, file=spec.file,
                       span=spec.name_span, lets=lets, states=states, update=update, **axes)
    _check_structure_keywords(opt)
    return opt


def _word_choices(hypers: tuple[ir.Hyper, ...], spec: ast.SpecAST, axes: dict):
    """Each word hyperparameter with the words of the argument that reads it (check
    refused any other use); one read by none would take any string, so it is refused."""
    read: dict[str, tuple[str, ...]] = {}
    for axis, node in axes.items():
        forms = FORMS[{"gradient_clip": "clip", "step_momentum": "momentum"}.get(axis, axis)]
        if node.kind not in forms:  # an expression reads no word
            continue
        specs = {a.name: a for a in forms[node.kind].args}
        for f in fields(node):
            v = getattr(node, f.name)
            if isinstance(v, ir.HyperRef) and f.name in specs and specs[f.name].kind == "enum":
                read.setdefault(v.name, specs[f.name].choices)
    out = []
    for h in hypers:
        if isinstance(h.default, str):
            if h.name not in read:
                raise CurvError("name.unread_word_hyper", h.span, name=h.name, word=h.default)
            h = ir.Hyper(h.name, h.default, h.span, read[h.name])
        out.append(h)
    return tuple(out)


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


def _check_hypers(spec: ast.SpecAST) -> tuple[ir.Hyper, ...]:
    seen: dict[str, ir.Hyper] = {}
    declared = {p.name for p in spec.params}
    for p in spec.params:
        if p.name in seen:
            first = seen[p.name].span
            raise CurvError("name.duplicate_hyper", p.span, name=p.name,
                            hint=f"first defined at line {first.line}, column {first.column}")
        why = reserved_hyper_why(p.name)
        if why:
            raise CurvError("name.reserved_hyper", p.span, name=p.name, why=why)
        d = p.default
        if isinstance(d, ast.Ref) and d.index is None and d.name == NONE:
            default = None  # optional: None in the constructor, read only under given()
        elif isinstance(d, ast.Ref) and (d.index is not None or d.name in declared):
            default = d  # another hyperparameter's value: resolved below
        elif isinstance(d, ast.Ref):  # a word: its choices come from the argument reading it
            default = d.name
        elif isinstance(d, ast.TupleLiteral):
            default = tuple(_finite(n) for n in d.values)
        elif isinstance(d, ast.Boolean):
            default = d.value
        else:
            default = _finite(d)  # machine_eps: None, the constructor's default
        seen[p.name] = ir.Hyper(p.name, default, p.span, optional=default is None and
                                isinstance(d, ast.Ref))
    for name, h in seen.items():
        if isinstance(h.default, ast.Ref):
            seen[name] = fallback(h, seen)
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
        if isinstance(lr.default, (ast.TupleLiteral, ast.Ref)):
            raise CurvError("value.wrong_kind", lr.default.span, what=what,
                            expected="one number", found=_describe(lr.default))
        _check_kind(seen["lr"].default, LR, what, lr.default.span, _describe(lr.default))
    return tuple(seen.values())


def _finite(n: ast.Number | ast.MachineEps) -> int | float | None:
    if isinstance(n, ast.MachineEps):
        return None  # resolved to torch.finfo(dtype).eps at step time
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


def _check_expr_clause(clause: ast.ExprClause, scope: check_exprs.Scope) -> ir.Expr:
    if clause.keyword not in EXPRESSION_CLAUSES:
        raise CurvError("expr.not_expression_clause", clause.keyword_span, clause=clause.keyword,
                        allowed=", ".join(EXPRESSION_CLAUSES),
                        hint=f"write `{clause.keyword} FORM`, FORM one of: "
                             f"{', '.join(FORMS[clause.keyword])}")
    return check_exprs.expression(clause.expr, scope)


def _check_clause(clause: ast.Clause, hypers: dict[str, ir.Hyper],
                  scope: check_exprs.Scope | None = None):
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
        values[spec_arg.name] = _check_value(arg.value, spec_arg, where, hypers, scope=scope)
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
        values[arg.keyword] = _check_value(arg.value, names[arg.keyword], where, hypers,
                                           scope=scope)
    for spec_arg in form.args:
        if spec_arg.name not in values:
            if spec_arg.required:
                raise CurvError("value.missing_argument", clause.form_span,
                                clause=clause.keyword, form=clause.form, name=spec_arg.name,
                                hint=f"usage: {_signature(clause, form)}")
            if spec_arg.kind != "expr":  # an expression argument's default is the form's own
                values[spec_arg.name] = ir.Const(spec_arg.default)
    flags: dict[str, object] = {}
    for mod in clause.modifiers:
        if mod.name not in form.modifiers:
            raise _bad_modifier(clause, form, mod)
        if mod.name in flags:
            raise CurvError("name.duplicate_modifier", mod.span, name=mod.name)
        if mod.name == "every":
            flags["every"] = _check_value(mod.value, EVERY, where, hypers,
                                          what=f"the step count after 'every' in {where}")
        elif mod.value is not None:  # `bias_corrected(flag)`: on or off by a boolean
            if mod.name not in MODIFIER_SWITCHES:
                raise CurvError("name.modifier_takes_no_value", mod.span, name=mod.name,
                                hint=f"write `{mod.name}` alone")
            v = _check_value(mod.value, MODIFIER_SWITCHES[mod.name], where, hypers,
                             what=f"the switch of {mod.name!r} in {where}")
            # a hyperparameter decides it on the host each step; a literal here and now
            flags[mod.name] = v if isinstance(v, ir.HyperRef) else bool(v.value)
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
                 what: str | None = None, scope: check_exprs.Scope | None = None) -> ir.Arg:
    what = what or f"the {spec_arg.name!r} of {where}"
    check_exprs.refuse_none(value, hypers)
    if spec_arg.kind == "expr":
        value = check_exprs.vector_ref(value, what, scope or check_exprs.Scope(hypers))
        return None if value == ir.Var("grad") else value
    if spec_arg.kind == "enum":
        hyper = hypers.get(value.name) if isinstance(value, ast.Ref) else None
        if hyper is not None and isinstance(hyper.default, str) and value.index is None:
            if not spec_arg.by_hyper:
                raise CurvError("value.wrong_kind", value.span, what=what,
                                expected=f"{' or '.join(spec_arg.choices)}, written in the spec",
                                found=f"the hyperparameter {value.name!r}",
                                hint="this choice decides the code generated, so it cannot "
                                     "change at run time")
            if hyper.default not in spec_arg.choices:  # a word hyperparameter: its default
                close = suggest(hyper.default, spec_arg.choices)
                raise CurvError("value.wrong_kind", value.span, what=what,
                                expected=" or ".join(spec_arg.choices),
                                found=f"{hyper.default!r} (the default of {value.name!r})",
                                hint=f"did you mean {close!r}?" if close else None)
            return ir.HyperRef(value.name, None, value.span)
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
        if hyper is None and value.name == MACHINE_EPS:
            raise CurvError("name.unknown_hyper", value.span, name=value.name,
                            hint=f"{MACHINE_EPS} is a hyperparameter's default: declare "
                                 f"`hyper eps = {MACHINE_EPS}` and write eps here")
        if hyper is None:
            close = suggest(value.name, hypers)
            raise CurvError("name.unknown_hyper", value.span, name=value.name,
                            hint=f"did you mean {close!r}?" if close else
                            "declare it with `hyper NAME = default`")
        default = hyper.default
        if isinstance(default, str):
            raise CurvError("value.wrong_kind", value.span, what=what,
                            expected="a number" if spec_arg.kind != "bool" else "true or false",
                            found=f"the word {default!r} (the default of {value.name!r})")
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
    if v is None:
        return MACHINE_EPS
    if isinstance(v, bool):
        return "true" if v else "false"
    return f"{v:g}"


def _check_kind(v, spec_arg: ArgSpec, what: str, span: Span, shown: str) -> None:
    """``shown``: how the value reads in a message (its text, or a hyper's default)."""
    if v is None:  # machine_eps: a number in (0, 1) whatever the dtype; float64's stands in
        v = sys.float_info.epsilon
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
    if isinstance(value, ast.MachineEps):
        return MACHINE_EPS
    if isinstance(value, ast.Ref) and value.index is None:
        return f"the word {value.name!r}"
    return repr(str(value.name))


def arg_constraints(opt: ir.Optimizer) -> list[tuple[ir.HyperRef, str, str]]:
    """(hyper reference, constraint, where) for every hyperparameter an axis uses.

    The generated constructor re-checks these at run time, so a bad keyword
    (``lr=-1``, ``betas=(1.2, 0.9)``) raises ``ValueError`` like torch.optim does.
    """
    out = [(ir.HyperRef("lr"), "nonneg", "the learning rate")]
    for axis, node in opt.axes():
        if node.kind not in FORMS[axis]:  # an expression: its hyperparameters are any number
            continue
        form = FORMS[axis][node.kind]
        specs = {a.name: a for a in form.args}
        specs["every"] = EVERY
        for f in fields(node):
            v = getattr(node, f.name)
            if isinstance(v, ir.HyperRef) and f.name in specs and \
                    specs[f.name].kind not in ("bool", "enum"):  # a word: checked by WORDS
                out.append((v, specs[f.name].constraint,
                            f"the {f.name} of {ir.clause_label(axis, node)}"))
    return out
