"""Lowering the expression language (lets, states, ``CLAUSE = EXPR``, ``update = EXPR``).

Each state is a buffer whose new value is stored once per step; reading a state
anywhere but in its own definition (or through ``old``) gives that new value, so
the stores follow the data, and the scheduler puts a state that reads the
direction of a Kronecker step after the extern, like any other store. Lets are
inlined (plan expressions are values, so a let read twice is one node).
"""
from __future__ import annotations

from curvc import ir
from curvc.fold import add, div, mul, op, sub
from curvc.lower_step import Step, select
from curvc.plan import SHAPE, Const, Expr, Load, Op, Reduced, Reduction, Scalar, Select, walk

_BINARY = {"op+": add, "op-": sub, "op*": mul, "op/": div}
_FUNCTION_OPS = {"sqrt": "sqrt", "abs": "abs", "sign": "sign", "exp": "exp", "log": "log",
                 "max": "maximum",
                 "min": "minimum", "lerp": "lerp"}


class Expressions:
    """The spec's lets and states, lowered on demand into one ``Step``."""

    def __init__(self, s: Step):
        self.s = s
        self.env: dict[str, Expr] = {}  # grad, param, and direction once it is known
        self.lets = {let.name: let.expr for let in s.opt.lets}
        self.states = {st.name: st for st in s.opt.states}
        self.buffers = {n: s.buffer(n, init=self.host(st.init)).name
                        for n, st in self.states.items()}
        self.new: dict[str, Expr] = {}
        self.let_values: dict[tuple, Expr] = {}
        # host names -> the optional hyperparameters they need given: each optional
        # hyperparameter, and each host let computed only where they are
        self.needs: dict[str, frozenset] = {h.name: frozenset({h.name})
                                            for h in s.opt.hypers if h.optional}

    def let(self, name: str, self_state: str | None) -> Expr:
        """A let's value; one that reads no tensor is a named host scalar (``h_rho``), so
        the generated host code reads as the spec does."""
        key = (name, self_state)
        if key not in self.let_values:
            value = self.lower(self.lets[name], self_state)
            if not isinstance(value, Const) and not _reads_tensor(value):
                # one that reads an optional hyperparameter outside given() is computed only
                # where it is given, else NaN (check lets only given()'s branches read it)
                unguarded = sorted(_unguarded(value, self.needs))
                if unguarded:
                    given = [op("given", Scalar(n)) for n in unguarded]
                    while len(given) > 1:
                        given[:2] = [op("and", given[0], given[1])]
                    value = op("choose", given[0], value, op("not_given"))
                value = self.s.host_scalar(name, value)
                if unguarded:
                    self.needs[value.name] = frozenset(unguarded)
            self.let_values[key] = value
        return self.let_values[key]

    def host(self, e: ir.Expr) -> Expr:
        return self.lower(e)

    def state(self, name: str) -> Expr:
        """This step's value of a state, stored the first time it is asked for."""
        if name not in self.new:
            st = self.states[name]
            value = self.lower(st.expr, self_state=name)
            self.s.store(self.buffers[name], value)
            self.new[name] = value
        return self.new[name]

    def finish(self) -> None:
        """Store every state no clause read (a state that reads the direction, say)."""
        for name in self.states:
            self.state(name)

    def lower(self, e: ir.Expr, self_state: str | None = None) -> Expr:
        s = self.s
        if isinstance(e, ir.Const):
            return Const(float(e.value))
        if isinstance(e, ir.HyperRef):
            return s.arg(e)
        if isinstance(e, ir.Var):
            n = e.name
            if n == "step":
                return Scalar("step")
            if n == "ndim":  # set per tensor by the runtime, like the matrix shape
                return Scalar(SHAPE[2])
            if n in self.lets:
                return self.let(n, self_state)
            if n in self.states:
                return Load(self.buffers[n]) if n == self_state else self.state(n)
            return self.env[n]  # grad, param, direction (check orders them)
        fn = e.fn
        if fn == "old":
            return Load(self.buffers[e.args[0].name])
        if fn == "if" and getattr(e.args[0], "fn", None) == "given":
            return self.if_given(*e.args, self_state)
        if fn == "if":
            cond, then, other = e.args
            flag = self.condition(cond)
            return select(flag, self.lower(then, self_state), self.lower(other, self_state))
        args = [self.lower(a, self_state) for a in e.args]
        if fn == "norm":  # a per-tensor sum, read back in the tensor's own step
            value = mul(args[0], args[0])
            # a let read by a state and by update is lowered twice: one sum serves both
            name = next((r.name for r in s.reductions
                         if r.value == value and r.scope == "tensor"), None)
            if name is None:
                name = s.unique("norm_sq")
                s.reductions.append(Reduction(name, value, "tensor"))
            return op("sqrt", Reduced(name))
        if fn == "rms":  # the same sum, over the tensor's element count (rows x cols)
            name = s.unique("rms_sq")
            s.reductions.append(Reduction(name, mul(args[0], args[0]), "tensor"))
            return op("sqrt", div(Reduced(name), mul(Scalar(SHAPE[0]), Scalar(SHAPE[1]))))
        if fn in _BINARY:
            return _BINARY[fn](*args)
        if fn == "neg":
            return op("neg", args[0])
        if fn == "op^":
            return _power(*args)
        if fn in ("op>", "op<", "op>=", "op<="):
            a, b = args if fn in ("op>", "op>=") else args[::-1]
            return op("gt" if fn in ("op>", "op<") else "ge", a, b)
        return op(_FUNCTION_OPS[fn], *args)

    def if_given(self, given: ir.Apply, then: ir.Expr, other: ir.Expr, self_state) -> Expr:
        """``if(given(NAME), A, B)``: a host value is the lazy ``choose`` (the host computes
        only the branch taken, so A never sees the NaN that stands for None); a tensor
        selects on a flag (the kernel computes only the branch taken)."""
        is_given = op("given", self.s.arg(given.args[0]))
        a, b = self.lower(then, self_state), self.lower(other, self_state)
        if _on_host(a) and _on_host(b):
            return a if a == b else op("choose", is_given, a, b)
        return select(self.s.flag(f"{given.args[0].name}_given", is_given), a, b)

    def condition(self, cond: ir.Expr) -> str | bool:
        """A host flag for ``if``: a boolean hyperparameter, or a comparison on the host."""
        if isinstance(cond, ir.HyperRef):
            return self.s.bool_arg(str(cond).replace("[", "_").rstrip("]"), cond)
        value = self.lower(cond)
        if isinstance(value, Const):
            return value.value != 0
        if not (isinstance(value, type(op("gt", 0, 0))) and value.op in ("gt", "ge")):
            value = op("ne", value, 0.0)
        same = next((n for n, v in self.s.flags if v == value), None)
        if same is not None:  # the same condition read twice is one flag
            return same
        name = self.s.unique("condition")
        self.s.flags.append((name, value))
        return name


def _reads_tensor(e: Expr) -> bool:
    return any(isinstance(n, (Load, Reduced)) for n in walk(e))


def _on_host(e: Expr) -> bool:
    return not any(isinstance(n, (Load, Reduced, Select)) for n in walk(e))


def _unguarded(e: Expr, needs: dict) -> set[str]:
    """The optional hyperparameters ``e`` needs outside a ``choose``'s first branch (a let
    check allowed because each of its readers guards them)."""
    if isinstance(e, Scalar):
        return set(needs.get(e.name, ()))
    if isinstance(e, Op) and e.op != "given":
        args = (e.args[2],) if e.op == "choose" else e.args
        return set().union(*(_unguarded(a, needs) for a in args))
    if isinstance(e, Select):
        return _unguarded(e.then, needs) | _unguarded(e.other, needs)
    return set()


def _power(x: Expr, p: Expr) -> Expr:
    """x ^ p: small whole powers as products (exact, and defined for a negative base
    in every backend), 1/2 as sqrt; any other power of a tensor needs x >= 0."""
    if isinstance(p, Const):
        if p.value in (1.0, 2.0, 3.0, 4.0):
            out = x
            for _ in range(int(p.value) - 1):
                out = mul(out, x)
            return out
        if p.value == 0.5:
            return op("sqrt", x)
    return op("pow", x, p)
