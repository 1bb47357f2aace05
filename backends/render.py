"""What every backend shares: scheduling the plan's DAG, and an operator table.

``schedule`` turns the stores and reductions of a ``Plan`` into a list of
statements, each computing one node once (common subexpressions are shared
because equal nodes are equal values) under a *guard*: the host flags that
must hold for the value to be needed. A value used under both settings of a
flag is computed outside the ``if``. Backends print the statements with
their own syntax; they never look at what the optimizer is.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, replace

from curvc.plan import Const, Expr, Load, Op, Plan, Reduced, Scalar, Select, reads_only, walk

Guard = frozenset  # of (flag, bool)


# --- the generated code's namespace -------------------------------------------
#
# A spec's names (its hyperparameters, flattened: ``betas_0``) and the plan's own
# (host scalars, flags, reductions) enter generated functions only under these
# prefixes, and no name a backend generates for itself starts with one. So no
# spec name can shadow a backend's local, a module global or a builtin, and the
# backends need no list of forbidden names. Tensor roles (``param``, ``exp_avg``)
# are the plan's state keys, named by the compiler, and stay as they are.

SCALAR, FLAG, REDUCED = "h_", "f_", "r_"


def scalar_name(name: str) -> str:
    """A host scalar (hyperparameter, step, or computed per step) in generated code."""
    return SCALAR + name


def flag_name(name: str) -> str:
    """A host flag in generated code."""
    return FLAG + name


def reduced_name(name: str) -> str:
    """A global reduction's (0-d tensor) value in generated code."""
    return REDUCED + name


WIDTH = 100  # the longest line a generated module has


def wrap_items(head: str, items: list[str], end: str, width: int = WIDTH,
               hang: str = " " * 8) -> list[str]:
    """``head`` + comma-separated ``items`` + ``end``, packed on lines of at most
    ``width`` (where the items allow); continuation lines start with ``hang``."""
    lines, line = [], head
    for k, item in enumerate(items):
        piece = item + (", " if k < len(items) - 1 else end)
        if line.strip() and len(line) + len(piece) > width:
            lines.append(line.rstrip())
            line = hang + piece
        else:
            line += piece
    lines.append(line)
    return lines


def _brackets(line: str) -> list[tuple[int, int, list[int]]]:
    """Each bracket pair of a code line: (open, close, its top-level comma positions),
    outer pairs first. Strings and a trailing comment are skipped."""
    pairs, stack, quote, i = [], [], None, 0
    while i < len(line):
        c = line[i]
        if quote:
            if c == "\\":
                i += 1
            elif c == quote:
                quote = None
        elif c in "'\"":
            quote = c
        elif c == "#":
            break
        elif c in "([{":
            stack.append((i, []))
        elif c in ")]}" and stack:
            start, commas = stack.pop()
            pairs.append((start, i, commas))
        elif c == "," and stack:
            stack[-1][1].append(i)
        i += 1
    return sorted(pairs)


def wrap_code(line: str, width: int = WIDTH) -> list[str]:
    """A long line of generated code broken inside its first bracket pair whose
    contents can move (after its commas, or after the bracket itself); Python joins
    lines inside brackets, so the result means the same. Comments are left alone."""
    if len(line) <= width or line.lstrip().startswith("#"):
        return [line]
    hang = " " * (len(line) - len(line.lstrip()) + 8)
    pairs = _brackets(line)
    # a list (a pair with commas) wraps best, leftmost first; else the last outermost
    # call moves as a whole: `x = tl.load(p).to(` / `tl.pointer_type(T))`
    lists = [p for p in pairs if p[2]]
    outer = [p for p in pairs if not any(o < p[0] and p[1] < c for o, c, _ in pairs)]
    for start, close, commas in lists + outer[::-1]:
        if start + 1 > width or close - start < 2:
            continue
        cuts = [start] + commas + [close]
        items = [line[a + 1:b].strip() for a, b in zip(cuts, cuts[1:])]
        lines = wrap_items(line[:start + 1], items, line[close:], width, hang)
        if len(lines) == 1:
            continue
        # the last line carries the rest of the statement: it may need a break too
        rest = wrap_code(lines[-1], width) if len(lines[-1]) < len(line) else lines[-1:]
        return lines[:-1] + rest
    return [line]


class IndentedBuffer:
    """A string builder with indentation (the shape of torch Inductor's); a code
    line longer than ``WIDTH`` is wrapped inside its brackets."""

    def __init__(self, tab: str = "    "):
        self._lines: list[str] = []
        self._level = 0
        self._tab = tab

    @property
    def room(self) -> int:
        """The width left for a line at the current indentation."""
        return WIDTH - len(self._tab) * self._level

    def writeline(self, line: str = "") -> None:
        if line:
            self._lines.extend(wrap_code(self._tab * self._level + line))
        else:
            self._lines.append("")

    def writelines(self, lines) -> None:
        for line in lines:
            self.writeline(line)

    def splice(self, text: str) -> None:
        for line in text.splitlines():
            self.writeline(line)

    @contextlib.contextmanager
    def indent(self, n: int = 1):
        self._level += n
        try:
            yield
        finally:
            self._level -= n

    def getvalue(self) -> str:
        return "\n".join(self._lines) + "\n"


@dataclass(frozen=True)
class Stmt:
    name: str
    node: Expr  # an Op or a Select; its operands are names of earlier statements or leaves
    guard: Guard


@dataclass
class Schedule:
    stmts: list[Stmt]
    names: dict  # Expr -> the name (or leaf text) holding its value


def schedule(roots: list[tuple], leaf) -> Schedule:
    """Statements computing every root, children first, each node once.

    ``roots`` are (expression, guard) or (expression, guard, name) tuples;
    a named root's statement gets that name instead of ``t<n>``.

    ``leaf(node)`` names a leaf (Const, Load, Scalar, Reduced) in the backend's syntax.
    """
    guards: dict[Expr, Guard] = {}
    order: list[Expr] = []

    def visit(e: Expr, g: Guard) -> None:
        if e in guards:
            shared = guards[e] & g
            if shared == guards[e]:
                return
            guards[e] = shared
            g = shared
        else:
            guards[e] = g
        if isinstance(e, Op):
            for a in e.args:
                visit(a, g)
        elif isinstance(e, Select):
            visit(e.then, g | {(e.flag, True)})
            visit(e.other, g | {(e.flag, False)})
        if e not in order:
            order.append(e)

    hints: dict[Expr, str] = {}
    for root, guard, *name in roots:
        visit(root, Guard(guard))
        if name and root not in hints and name[0] not in hints.values():
            hints[root] = name[0]
    # Children were appended before parents on first visit; a re-visit that
    # widened a guard keeps positions valid because the DAG did not change.
    names: dict[Expr, str] = {}
    stmts: list[Stmt] = []
    for e in order:
        if isinstance(e, (Const, Load, Scalar, Reduced)):
            names[e] = leaf(e)
            continue
        name = hints.get(e) or f"t{len(stmts)}"
        names[e] = name
        stmts.append(Stmt(name, e, guards[e]))
    return Schedule(stmts, names)


def plan_roots(plan: Plan) -> list[tuple[Expr, Guard, str]]:
    """The stored values, each with its guard and a readable name (``new_exp_avg_``;
    the trailing underscore keeps it apart from every hyperparameter name)."""
    roots = []
    for st in plan.stores:
        roots.append((st.value, Guard({(st.when, True)} if st.when else set()),
                      f"new_{st.target}_"))
    return roots


def _wide(e: Expr) -> bool:
    """A 0-d value of the reductions only (float64): no tensor is loaded under it."""
    return reads_only(e, Reduced, Load)


def narrowed(plan: Plan) -> Plan:
    """The plan with each value of the reductions only (a float64 0-d tensor, or one per
    tensor) cast to the compute dtype where it meets a tensor: ``Op('narrow', (x,))``.

    Triton does the same (its ``narrowed`` values): arithmetic with a tensor runs in the
    compute dtype. For tensors of one or more dimensions torch's type promotion does it
    anyway (a 0-d operand takes the other's dtype), so this changes nothing there; a 0-d
    parameter would otherwise compute in float64, and ops that need equal dtypes (lerp)
    would fail on it. ``keep_if``'s flag is a condition, not an operand: left alone."""
    memo: dict = {}

    def visit(e: Expr) -> Expr:
        if e in memo:
            return memo[e]
        out = e
        if isinstance(e, Select):
            out = Select(e.flag, visit(e.then), visit(e.other))
        elif isinstance(e, Op):
            args = tuple(visit(a) for a in e.args)
            if any(_loads(a) for a in e.args):
                args = tuple(Op("narrow", (new,))
                             if _wide(old) and not (e.op == "keep_if" and i == 0) else new
                             for i, (old, new) in enumerate(zip(e.args, args)))
            out = replace(e, args=args)
        memo[e] = out
        return out

    return replace(plan, stores=tuple(replace(st, value=visit(st.value)) for st in plan.stores),
                   reductions=tuple(replace(r, value=visit(r.value)) for r in plan.reductions))


def _loads(e: Expr) -> bool:
    return any(isinstance(n, Load) for n in walk(e))


class Renderer:
    """Maps operators to source text. Subclasses override the table or a method."""

    ops: dict[str, str] = {
        "neg": "(-{0})", "add": "({0} + {1})", "sub": "({0} - {1})", "mul": "({0} * {1})",
        "div": "({0} / {1})", "mod": "({0} % {1})", "pow": "({0} ** {1})",
        "eq": "({0} == {1})", "ne": "({0} != {1})", "gt": "({0} > {1})",
        "ge": "({0} >= {1})", "not": "(not {0})",
        "and": "({0} and {1})",
    }

    def const(self, v: float) -> str:
        return repr(float(v))

    def render_op(self, node: Op, args: list[str]) -> str:
        fmt = self.ops.get(node.op)
        if fmt is None:
            raise NotImplementedError(f"{type(self).__name__} has no rendering for {node.op!r}")
        return fmt.format(*args)

    def render_inline(self, e: Expr, leaf) -> str:
        """An expression as one nested source expression (host code, small trees)."""
        if isinstance(e, Op):
            return self.render_op(e, [self.render_inline(a, leaf) for a in e.args])
        if isinstance(e, Const):
            return self.const(e.value)
        return leaf(e)


class PythonHost(Renderer):
    """Host scalars and flags as plain Python over floats."""

    ops = {**Renderer.ops, "sqrt": "math.sqrt({0})", "abs": "abs({0})",
           "maximum": "max({0}, {1})", "minimum": "min({0}, {1})",
           "sign": "math.copysign(1.0, {0})", "exp": "math.exp({0})", "log": "math.log({0})",
           # an optional hyperparameter not given is NaN on the host (CurvOptimizer.OPTIONAL)
           "given": "(not math.isnan({0}))", "choose": "({1} if {0} else {2})",
           "not_given": "math.nan"}


def guard_text(guard: Guard) -> str:
    parts = [flag_name(f) if v else f"not {flag_name(f)}" for f, v in sorted(guard)]
    return " and ".join(parts)


def _host_line(buf: IndentedBuffer, r: Renderer, name: str, e: Expr, leaf, taken: set) -> None:
    """``h_name = e``, its operands first as lines of their own while it is too long
    (a spec's long ``let``): the line stays under the page width, the arithmetic as is."""
    if isinstance(e, Op) and e.op == "choose":  # lazy: only the branch taken is computed
        cond = r.render_inline(e.args[0], leaf)
        buf.writeline(f"if {cond[1:-1] if e.args[0].op == 'given' else cond}:")
        for branch in e.args[1:]:
            with buf.indent():
                _host_line(buf, r, name, branch, leaf, taken)
            if branch is e.args[1]:
                buf.writeline("else:")
        return
    text = f"{scalar_name(name)} = {r.render_inline(e, leaf)}"
    if len(text) <= buf.room or not isinstance(e, Op):
        buf.writeline(text)
        return
    args = []
    for i, a in enumerate(e.args):
        if isinstance(a, Op):
            part, k = f"{name}_part{i}", 2
            while part in taken:
                part, k = f"{name}_part{i}_{k}", k + 1
            taken.add(part)
            _host_line(buf, r, part, a, leaf, taken)
            a = Scalar(part)
        args.append(a)
    buf.writeline(f"{scalar_name(name)} = {r.render_inline(Op(e.op, tuple(args)), leaf)}")


def render_host(plan: Plan, buf: IndentedBuffer, name: str = "_host") -> None:
    """``def host(h, step) -> (scalars, flags)``: all per-step host values of one group."""
    r = PythonHost()
    buf.writeline(f"def {name}(h, step):")
    with buf.indent():
        buf.writeline('"""Per-(group, step) scalars and flags, from the group\'s hyperparameters h."""')
        for inp in plan.host_inputs:
            source = "step" if inp == "step" else f"h[{inp!r}]"
            buf.writeline(f"{scalar_name(inp)} = {source}")
        leaf = lambda x: scalar_name(x.name)  # noqa: E731
        taken = {*plan.host_inputs, *(n for n, _ in plan.host), *(n for n, _ in plan.flags)}
        for n, e in plan.host:
            _host_line(buf, r, n, e, leaf, taken)
        names = plan.host_inputs + tuple(n for n, _ in plan.host)
        scal = ", ".join(f"{n!r}: {scalar_name(n)}" for n in names)
        flags = ", ".join([f"{n!r}: bool({r.render_inline(e, leaf)})"
                           for n, e in plan.flags] + ["'maximize': bool(h['maximize'])"])
        buf.writeline(f"scalars = {{{scal}}}")
        buf.writeline(f"flags = {{{flags}}}")
        buf.writeline("return scalars, flags")
