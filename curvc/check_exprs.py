"""The check pass for expressions: ``let``, ``state``, ``CLAUSE = EXPR``, ``update = EXPR``.

Names resolve to hyperparameters, the names every expression reads (``grad``,
``param``, ``step``, ``direction``: ``language.EXPRESSION_NAMES``), lets and
states; functions and operators are ``language.FUNCTIONS`` and ``OPERATORS``.
Beyond names and arities, two rules keep every expression meaningful:

* an ``if`` condition is a host value (hyperparameters and step), decided once
  per step, so no coordinate branches;
* an optional hyperparameter (``hyper NAME = none``, None unless given) is read only
  inside ``if(given(NAME), A, B)``'s ``A``; a let that reads it unguarded may itself
  be read only there;
* this step's values form no cycle: a state read anywhere but in its own
  definition (or through ``old``) is its new value, so ``state u = ... direction``
  with a ``momentum = ... u`` needs ``old(u)``; the error names the cycle.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from curvc import ir, parse as ast
from curvc.errors import CurvError, suggest
from curvc.language import EXPRESSION_NAMES, FUNCTIONS, OPERATORS, RESERVED_WHY

_HOST_NAMES = frozenset({"step", "ndim"})
# host names that differ per tensor: a buffer's fill value is one per param group
_PER_TENSOR = frozenset({"ndim"})


@dataclass
class Scope:
    """What a name in an expression can be, while checking one spec."""

    hypers: dict[str, ir.Hyper]
    lets: dict[str, ast.Definition] = field(default_factory=dict)
    states: dict[str, ast.Definition] = field(default_factory=dict)
    checked: dict[str, ir.Expr] = field(default_factory=dict)  # let name -> its IR
    read: set[str] = field(default_factory=set)  # lets and states some expression reads
    # optional hyperparameters given() holds for where the expression being checked is
    guarded: frozenset = frozenset()
    # let name -> {optional hyperparameter: where it reads it unguarded}
    unguarded: dict[str, dict] = field(default_factory=dict)

    def is_host(self, e: ir.Expr) -> bool:
        """Whether ``e`` is a per-step host value (reads no tensor)."""
        if isinstance(e, (ir.Const, ir.HyperRef)):
            return True
        if isinstance(e, ir.Var):
            if e.name in self.lets:
                return self.is_host(self.checked[e.name])
            return e.name in _HOST_NAMES
        return all(self.is_host(a) for a in e.args)

    def per_tensor(self, e: ir.Expr) -> ir.Var | None:
        """The first name ``e`` reads (through lets) whose value differs per tensor."""
        for v in _vars(e):
            if v.name in _PER_TENSOR:
                return v
            if v.name in self.lets and self.per_tensor(self.checked[v.name]) is not None:
                return v
        return None


def definitions(spec: ast.SpecAST, hypers: dict[str, ir.Hyper]) -> Scope:
    """The scope of a spec's lets and states; each name checked, none yet resolved."""
    scope = Scope(hypers)
    if spec.definitions or any(isinstance(c, ast.ExprClause) for c in spec.clauses):
        # only a spec with expressions reads these names (`of = grad` needs none)
        for name in EXPRESSION_NAMES:
            if name in hypers:
                raise CurvError("name.reserved_hyper", hypers[name].span, name=name,
                                why=f"expressions read {EXPRESSION_NAMES[name]} under it")
    seen: dict[str, ast.Definition] = {}
    for d in spec.definitions:
        if d.name in seen:
            first = seen[d.name].name_span
            raise CurvError("expr.duplicate_definition", d.name_span, name=d.name,
                            hint=f"first defined at line {first.line}, column {first.column}")
        why = _taken(d.name, hypers)
        if why:
            raise CurvError("expr.name_taken", d.name_span, name=d.name, kind=d.kind, why=why)
        seen[d.name] = d
        (scope.lets if d.kind == "let" else scope.states)[d.name] = d
    return scope


def _taken(name: str, hypers) -> str | None:
    if name in hypers:
        return "a hyperparameter has that name"
    if name in EXPRESSION_NAMES:
        return f"expressions read {EXPRESSION_NAMES[name]} under that name"
    if name in RESERVED_WHY:
        return RESERVED_WHY[name]
    if name.startswith("_"):
        return "names starting with '_' are kept for the generated code"
    return None


def check_all(spec: ast.SpecAST, scope: Scope, clause_exprs: dict[str, ir.Expr],
              extra_reads: tuple[ir.Expr, ...] = ()):
    """Lets and states as IR, after every clause expression is checked (``clause_exprs``),
    with the cycle and unused-name rules applied. Returns (lets, states)."""
    lets = tuple(ir.Let(n, let_expr(scope, n), d.span) for n, d in scope.lets.items())
    states = []
    for n, d in scope.states.items():
        value = expression(d.expr, scope)
        if d.init is None:
            init: ir.Expr = ir.Const(0.0)
        else:
            init = expression(d.init, scope)
            shaped = scope.per_tensor(init)
            if shaped is not None:
                raise CurvError("expr.per_tensor_init", shaped.span, name=shaped.name)
            if not scope.is_host(init):
                bad = next(v for v in _vars(init) if v.name not in _HOST_NAMES
                           and v.name not in scope.lets)
                raise CurvError("expr.host_init", d.init.span, name=bad.name)
        states.append(ir.State(n, value, init, d.span))
    for e in extra_reads:
        _mark_read(e, scope)
    for d in scope.lets.values():
        if d.name not in scope.read:
            raise CurvError("expr.unused", d.name_span, kind="let", name=d.name,
                            hint="remove it, or read it in a clause, a state or update")
    _refuse_cycles(scope, {n: s.expr for n, s in zip(scope.states, states)}, clause_exprs)
    return lets, tuple(states)


def let_expr(scope: Scope, name: str, stack: tuple[str, ...] = ()) -> ir.Expr:
    if name not in scope.checked:
        if name in stack:
            path = " -> ".join((*stack[stack.index(name):], name))
            raise CurvError("expr.cycle", scope.lets[name].name_span, path=f"let {path}")
        # a let means the same wherever it is read: its own guards only
        outer, scope.guarded = scope.guarded, frozenset()
        scope.unguarded[name] = {}
        try:
            scope.checked[name] = expression(scope.lets[name].expr, scope, stack + (name,))
        finally:
            scope.guarded = outer
    return scope.checked[name]


def refuse_none(value, hypers: dict[str, ir.Hyper]) -> None:
    """A form argument (or a default) may not name an optional hyperparameter."""
    if isinstance(value, ast.Ref) and value.name in hypers and hypers[value.name].optional:
        raise CurvError("expr.unguarded_none", value.span, name=value.name,
                        hint="a form's argument is a number at every step; write the clause "
                             "as an expression, or give the hyperparameter a default")


def _read_none(name: str, span, scope: Scope, stack: tuple[str, ...], via=None) -> None:
    """An optional hyperparameter read at ``span`` (``via``: through that let)."""
    if name in scope.guarded:
        return
    if stack:  # inside a let: its readers must guard it
        scope.unguarded[stack[-1]].setdefault(name, span)
        return
    hint = (f"the let {via[0]!r} reads it outside given({name}) (line {span.line}, column "
            f"{span.column})" if via else None)
    raise CurvError("expr.unguarded_none", span if via is None else via[1], name=name, hint=hint)


def expression(e: ast.Expr, scope: Scope, stack: tuple[str, ...] = ()) -> ir.Expr:
    """An AST expression as IR: names resolved, functions and arities checked."""
    if isinstance(e, ast.Number):
        return ir.Const(e.value, e.span)
    if isinstance(e, ast.Ref):
        return _name(e, scope, stack)
    fn, args = e.name, e.args
    if fn in OPERATORS or fn == "op-":
        fn = "neg" if fn == "op-" and len(args) == 1 else fn
    elif fn not in FUNCTIONS:
        close = suggest(fn, FUNCTIONS)
        raise CurvError("expr.unknown_function", e.name_span, name=fn,
                        hint=f"did you mean {close!r}?" if close else
                        f"the functions: {', '.join(FUNCTIONS)}")
    else:
        count = FUNCTIONS[fn][0]
        if len(args) != count:
            raise CurvError("expr.arity", e.span, name=fn, count=count,
                            s="" if count == 1 else "s", given=len(args),
                            hint=FUNCTIONS[fn][1])
    if fn == "old":
        (a,) = args
        if not isinstance(a, ast.Ref) or a.name not in scope.states or a.index is not None:
            found = a.name if isinstance(a, ast.Ref) else "an expression"
            raise CurvError("expr.not_a_state", a.span, name=found,
                            hint=f"the states: {', '.join(scope.states)}" if scope.states
                            else "declare one with `state NAME = EXPR`")
        scope.read.add(a.name)
        return ir.Apply("old", (ir.Var(a.name, a.span),), e.span)
    if fn == "given":
        raise CurvError("expr.given_outside_if", e.span,
                        hint="compare values in a condition; given() only guards if()'s branches")
    if fn == "if" and isinstance(args[0], ast.Call) and args[0].name == "given":
        return _if_given(e, scope, stack)
    out = [expression(a, scope, stack) for a in args]
    if fn == "if":
        cond = out[0]
        if not scope.is_host(cond):
            bad = next(v for v in _vars(cond) if not scope.is_host(v))
            raise CurvError("expr.tensor_condition", args[0].span, name=bad.name)
        operands = out[1:]
    else:
        operands = out
    for a, node in zip(args[len(out) - len(operands):], operands):
        _refuse_boolean(a, node, scope)
    return ir.Apply(fn, tuple(out), e.span)


def _if_given(e: ast.Call, scope: Scope, stack) -> ir.Expr:
    """``if(given(NAME), A, B)``: A may read NAME; decided on the host, lazily (B alone is
    computed where NAME is None)."""
    given, then, other = e.args
    if len(given.args) != 1:
        raise CurvError("expr.arity", given.span, name="given", count=1, s="",
                        given=len(given.args), hint=FUNCTIONS["given"][1])
    (ref,) = given.args
    h = scope.hypers.get(ref.name) if isinstance(ref, ast.Ref) else None
    if h is None or not h.optional or ref.index is not None:
        found = repr(ref.name) if isinstance(ref, ast.Ref) else "an expression"
        optional = [n for n, x in scope.hypers.items() if x.optional]
        raise CurvError("expr.given_not_optional", ref.span, found=found,
                        hint=f"the optional ones: {', '.join(optional)}" if optional else
                        "declare one with `hyper NAME = none`")
    outer, scope.guarded = scope.guarded, scope.guarded | {ref.name}
    try:
        a = expression(then, scope, stack)
    finally:
        scope.guarded = outer
    b = expression(other, scope, stack)
    for x, node in ((then, a), (other, b)):
        _refuse_boolean(x, node, scope)
    cond = ir.Apply("given", (ir.HyperRef(ref.name, None, ref.span),), given.span)
    return ir.Apply("if", (cond, a, b), e.span)


def _refuse_boolean(a: ast.Expr, node: ir.Expr, scope: Scope) -> None:
    if isinstance(node, ir.HyperRef):
        default = scope.hypers[node.name].default
        if node.index is None and isinstance(default, bool):
            raise CurvError("expr.boolean_operand", a.span, name=node.name,
                            hint=f"write if({node.name}, A, B)")


def _name(e: ast.Ref, scope: Scope, stack) -> ir.Expr:
    name = e.name
    if name in scope.hypers:
        default = scope.hypers[name].default
        if isinstance(default, str):
            raise CurvError("value.wrong_kind", e.span, what=f"{name!r} in an expression",
                            expected="a number or a boolean", found=f"the word {default!r}")
        if e.index is not None:
            if not isinstance(default, tuple):
                raise CurvError("value.bad_index", e.span, name=name,
                                hint=f"write {name} without an index")
            if e.index >= len(default):
                raise CurvError("value.index_out_of_range", e.span, name=name, index=e.index,
                                size=len(default), hint="indices start at 0")
        elif isinstance(default, tuple):
            raise CurvError("value.wrong_kind", e.span, what=f"{name!r} in an expression",
                            expected="one value", found=f"the tuple {name!r}",
                            hint=f"pick an entry: {name}[0]")
        if scope.hypers[name].optional:
            _read_none(name, e.span, scope, stack)
        return ir.HyperRef(name, e.index, e.span)
    if e.index is not None:
        raise CurvError("value.bad_index", e.span, name=name,
                        hint=f"only a tuple hyperparameter is indexed; write {name}")
    if name in scope.lets:
        scope.read.add(name)
        let_expr(scope, name, stack)
        for hyper, span in scope.unguarded.get(name, {}).items():
            _read_none(hyper, span, scope, stack, via=(name, e.span))
    elif name in scope.states:
        scope.read.add(name)
    elif name not in EXPRESSION_NAMES:
        known = [*EXPRESSION_NAMES, *scope.hypers, *scope.lets, *scope.states]
        close = suggest(name, known)
        raise CurvError("expr.unknown_name", e.span, name=name,
                        hint=f"did you mean {close!r}?" if close else
                        "an expression reads grad, param, step, direction, a hyperparameter, "
                        "a let or a state")
    return ir.Var(name, e.span)


def vector_ref(value, what: str, scope: Scope) -> ir.Expr:
    """A form argument that names a vector (``empirical_fisher(of = m)``)."""
    if not isinstance(value, ast.Ref) or value.index is not None or (
            value.name not in scope.lets and value.name not in scope.states
            and value.name != "grad"):
        found = repr(getattr(value, "name", None) or getattr(value, "text", "a value"))
        raise CurvError("expr.expected_name", value.span, what=what, found=found)
    return _name(value, scope, ())


def _vars(e: ir.Expr):
    if isinstance(e, ir.Var):
        yield e
    elif isinstance(e, ir.Apply):
        for a in e.args:
            yield from _vars(a)


def _mark_read(e: ir.Expr, scope: Scope) -> None:
    for v in _vars(e):
        scope.read.add(v.name)


def _deps(e: ir.Expr, scope: Scope, self_name: str | None = None) -> set[str]:
    """The values of this step ``e`` needs: lets and states by name, and 'direction'."""
    out: set[str] = set()
    if isinstance(e, ir.Var):
        if e.name in scope.lets:
            out |= {e.name} | _deps(scope.checked[e.name], scope, self_name)
        elif e.name in scope.states and e.name != self_name:
            out.add(e.name)
        elif e.name == "direction":
            out.add("direction")
    elif isinstance(e, ir.Apply) and e.fn != "old":
        for a in e.args:
            out |= _deps(a, scope, self_name)
    return out


def _refuse_cycles(scope: Scope, states: dict[str, ir.Expr], clause_exprs) -> None:
    """No state's new value needs itself through other states or the direction."""
    graph = {n: _deps(e, scope, n) - set(scope.lets) for n, e in states.items()}
    direction: set[str] = set()
    for key in ("curvature", "momentum", "of"):
        if key in clause_exprs:
            direction |= _deps(clause_exprs[key], scope) - set(scope.lets)
    graph["direction"] = direction
    done: set[str] = set()

    def visit(n: str, path: tuple[str, ...]):
        if n in path:
            cycle = path[path.index(n):] + (n,)
            span = scope.states[cycle[0] if cycle[0] != "direction" else cycle[1]].name_span
            first = next(c for c in cycle if c != "direction")
            raise CurvError("expr.cycle", span, path=" -> ".join(cycle),
                            hint=f"read the stored value instead: old({first})")
        if n in done:
            return
        for m in sorted(graph.get(n, ())):
            visit(m, path + (n,))
        done.add(n)

    for n in sorted(graph):
        visit(n, ())
