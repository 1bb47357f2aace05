"""The foreach backend: a plan as ``torch._foreach_*`` source, one call per node per bucket.

``_foreach_update(param, grad, <buffers/inputs>, <scalars>, <reductions>, <flags>)``
takes the same arguments as the torch backend's ``update``, in the same order
(``FOREACH_ARGS`` lists them), except that every tensor argument is a *list*:
one tensor per parameter of a bucket (same dtype and device for the params).
Each node of the plan's DAG becomes one ``torch._foreach_*`` call over the
whole list instead of one torch op per tensor, which removes the per-tensor
Python overhead that dominates small and medium models on CPU.

Semantics are ``update``'s, applied to each tensor: the same schedule and
guards (``schedule(plan_roots(plan), ...)``), arithmetic in float32 (float64
for float64 parameters), every value computed from old state, then the
buffers and the parameter stored with ``torch._foreach_copy_``. A buffer
list may be ``None`` (or hold ``None``) while its allocation flag is off;
the guarded code never reads it then. Results match ``update`` bit for bit
except where noted below (``s / x``).

Values have one of three kinds: lists of tensors (downstream of a load or of a tensor-
scope sum), 0-d tensors (downstream of a global or group sum only: rendered exactly as
``update`` renders them) and Python floats (host scalars, constants). Operators with a
scalar on the left are rewritten: commuted, or ``s - x`` as ``(-x) + s``
(exact), or ``s / x`` as ``s * (1 / x)`` (within an ulp of ``update``).
Combinations with no foreach overload (``div_or_zero`` of two lists,
``maximum``/``minimum``/``pow``/``lerp`` with a 0-d tensor) fall back to a
list comprehension of the torch backend's per-tensor expression.

Two things keep the per-tensor cost of the foreach calls down (CPU foreach
ops loop over the tensors in C++, one ATen op each):

* host scalars multiplying or dividing a list travel as 0-d tensors of the
  compute dtype, made once per call (same rounding, no wrapping per tensor);
* a temporary list that no later statement (or store) reads is overwritten
  in place by the op consuming it (``torch._foreach_add_(t3, t2); t4 = t3``),
  which halves the allocations. Only temporaries created here are written:
  never the caller's parameters, gradients, state or inputs before the final
  copies, and never a value downstream of a 0-d reduction (where a 0-d
  parameter's entry may be float64 by type promotion).
"""
from __future__ import annotations

import math

from dataclasses import replace

from curvc.plan import NONFINITE_FLAG, Const, Op, Plan, Scalar, Select, walk
from curvc.backends.render import (IndentedBuffer, flag_name, narrowed, plan_roots, reduced_name,
                                   schedule)
from curvc.backends.foreach_fuse import FUSED, fuse
from curvc.backends.torch import (TorchRenderer, _emit_statements, _leaf, signature_text,
                                  update_signature)

LIST, TENSOR, SCALAR = "list", "tensor", "scalar"  # a value's kind (see the module docstring)

_F = "torch._foreach_"
# plan ops that are one torch._foreach_<op> (and <op>_ in place) of one list
UNARY = ("neg", "sqrt", "abs", "sign", "exp", "log")


class ForeachRenderer(TorchRenderer):
    """Renders ops over lists of tensors; ops without a list are ``update``'s text."""

    def __init__(self, kinds: dict[str, str], like: str, scalar_leaves: dict[str, str]):
        # TorchRenderer's tensors: the names holding 0-d tensors (its rendering of list-free ops).
        super().__init__({n for n, k in kinds.items() if k == TENSOR})
        self.kinds = kinds  # name -> LIST or TENSOR; anything else is a Python float
        self.like = like  # a list every parameter has (for broadcasting a scalar to a list)
        self.scalar_leaves = scalar_leaves  # host scalar or constant text -> its 0-d tensor's name
        self.scalar_tensors: dict[str, str] = {}  # those the rendered code uses

    # --- reusing temporaries: an op whose list operand dies there writes into it -------------

    def prepare(self, sched, plan: Plan) -> None:
        """Where each name is last read (by a statement, or by a store at the end)."""
        self.index = {st.name: i for i, st in enumerate(sched.stmts)}
        self.last_use: dict[str, float] = {}
        for i, st in enumerate(sched.stmts):
            node = st.node
            for a in node.args if isinstance(node, Op) else (node.then, node.other):
                self.last_use[sched.names[a]] = i
        for store in plan.stores:
            self.last_use[sched.names[store.value]] = math.inf
        self.refs: dict[str, frozenset] = {}  # list -> the temporaries whose tensors it may be
        self.owned: dict[str, bool] = {}  # list -> whether it is surely one of those temporaries
        # State the step overwrites anyway (the parameter, stored buffers) may hold
        # temporaries once its old value is dead: the store then finds the new value
        # already in place and skips its copy. Each with the flag its store waits for,
        # which must hold wherever it is written (else a skipped store would leave the
        # temporary behind).
        self.store_when: dict[str, str | None] = {}
        writable = {"param", *(b.name for b in plan.buffers)}
        for store in plan.stores:
            if store.target in writable:
                name = f"{store.target}_"
                self.store_when[name] = store.when
                self.refs[name] = frozenset({name})
                self.owned[name] = True
        # Lists downstream of a 0-d reduction: a 0-d parameter's entry may be float64 there
        # (type promotion), so writing it into a float32 temporary would round differently.
        self.wide: set[str] = {reduced_name(r.name) for r in plan.reductions
                               if r.scope == "tensor"}

    def _dies(self, name: str, i: int) -> bool:
        """Whether nothing reads the tensors of ``name`` after statement ``i``."""
        mine = self.refs[name]
        return all(self.last_use.get(n, -1) <= i for n, r in self.refs.items() if r & mine)

    def _writable_under(self, name: str, guard) -> bool:
        """Whether the state among ``name``'s tensors is stored whenever ``guard`` holds."""
        for ref in self.refs[name]:
            when = self.store_when.get(ref)
            if when is not None and (when, True) not in guard:
                return False
        return True

    def render_stmt(self, st, names: dict) -> str:
        if self.kind(st.name) != LIST:
            return super().render_stmt(st, names)
        node = st.node
        ops = [names[a] for a in (node.args if isinstance(node, Op) else (node.then, node.other))]
        lists = [o for o in ops if self.kind(o) == LIST]
        if any(o in self.wide or self.kind(o) == TENSOR for o in ops):
            self.wide.add(st.name)
        if isinstance(node, Select):  # an alias of either side
            self.refs[st.name] = frozenset().union(*(self.refs.get(o, ()) for o in lists))
            self.owned[st.name] = all(self.owned.get(o, False) for o in ops)
            return super().render_stmt(st, names)
        reuse = None
        if st.name not in self.wide:
            i = self.index[st.name]
            dying = {o for o in lists if self.owned.get(o) and self._dies(o, i)
                     and self._writable_under(o, st.guard)}
            reuse = self._inplace(node.op, ops, [self.kind(o) for o in ops], dying)
        self.owned[st.name] = True
        if reuse is None:
            self.refs[st.name] = frozenset({st.name})
            return super().render_stmt(st, names)
        target, lines = reuse
        self.refs[st.name] = self.refs[target]
        return "\n".join(lines + [f"{st.name} = {target}"])

    def _inplace(self, op: str, args: list[str], kinds: list[str], dying: set[str]):
        """(the operand written, the in-place calls) computing ``op`` into a dying operand,
        with the out-of-place call's exact arithmetic; None where there is none."""
        if not dying:
            return None
        if op in UNARY:
            return args[0], [f"{_F}{op}_({args[0]})"]
        if op in FUSED:  # written into the accumulated operand, the first
            if args[0] not in dying:
                return None
            return args[0], [FUSED[op].format(*args, f=_F, in_place="_")]
        if op == "lerp":
            a, b, w = args
            if a in dying and kinds[1] == LIST and kinds[2] in (LIST, SCALAR):
                return a, [f"{_F}lerp_({a}, {b}, {w})"]
            return None
        if op not in ("add", "mul", "sub", "div", "maximum", "minimum", "pow"):
            return None
        (a, b), (ka, kb) = args, kinds
        if op in ("add", "mul"):  # commutative: write into whichever operand dies
            for x, y, ky in ((a, b, kb), (b, a, ka)):
                if x in dying:
                    if ky == SCALAR:
                        y = self.scalar_tensor(y) if op == "mul" else self.added(y, x)
                    return x, [f"{_F}{op}_({x}, {y})"]
        elif op == "sub":
            if a in dying:
                return a, [f"{_F}sub_({a}, {b})"]
            return b, [f"{_F}neg_({b})", f"{_F}add_({b}, {a})"]  # (-y) + x == x - y exactly
        elif op == "div":
            if a in dying:
                return a, [f"{_F}div_({a}, {self.scalar_tensor(b)})"]
            if ka == SCALAR:
                lines = [f"{_F}reciprocal_({b})"]
                if a != repr(1.0):
                    lines.append(f"{_F}mul_({b}, {self.scalar_tensor(a)})")
                return b, lines
        elif op in ("maximum", "minimum"):
            clamp = f"clamp_{'min' if op == 'maximum' else 'max'}_"
            if a in dying:
                return a, [f"{_F}{op}_({a}, {b})" if kb == LIST else f"{_F}{clamp}({a}, {b})"]
            if ka == SCALAR:
                return b, [f"{_F}{clamp}({b}, {a})"]
        elif op == "pow" and a in dying:
            return a, [f"{_F}pow_({a}, {b})"]
        return None

    def scalar_tensor(self, name: str) -> str:
        """A host scalar as a 0-d tensor in the compute dtype, where it is a leaf.

        ``_foreach_mul`` and ``_foreach_div`` take a 0-d tensor about twice as fast as a
        Python number (no wrapping per tensor), with the same result: both round the
        number to the compute dtype first.
        """
        if name not in self.scalar_leaves:
            return name
        self.scalar_tensors[name] = self.scalar_leaves[name]
        return self.scalar_leaves[name]

    def added(self, name: str, to: str) -> str:
        """The second operand of ``_foreach_add(to, ...)`` for the host scalar ``name``.

        A 0-d tensor with an explicit ``alpha=1`` takes ATen's tensor-scalar overload,
        several times faster than a Python number or a bare 0-d tensor (which both wrap
        per entry), and ``x + 1 * s`` rounds as ``x + s``. Not into a wide list: a
        float64 entry there would see ``s`` rounded to the compute dtype.
        """
        if to in self.wide or name not in self.scalar_leaves:
            return name
        return f"{self.scalar_tensor(name)}, alpha=1"

    def kind(self, name: str) -> str:
        return self.kinds.get(name, SCALAR)

    def render_op(self, node: Op, args: list[str]) -> str:
        kinds = [self.kind(a) for a in args]
        if LIST not in kinds:
            return super().render_op(node, args)
        text = self._foreach(node.op, args, kinds)
        return text if text is not None else self._per_tensor(node, args, kinds)

    def _foreach(self, op: str, args: list[str], kinds: list[str]) -> str | None:
        """One foreach call (or a short chain) for ``op``; None where no overload fits."""
        if op in UNARY:
            return f"{_F}{op}({args[0]})"
        if op in FUSED:
            return FUSED[op].format(*args, f=_F, in_place="")
        if op == "lerp":
            a, b, w = args
            if kinds[0] == kinds[1] == LIST and kinds[2] in (LIST, SCALAR):
                return f"{_F}lerp({a}, {b}, {w})"
            return None
        if op in ("keep_if", "narrow"):  # no foreach where or cast: update's, per tensor
            return None
        a, b = args
        ka, kb = kinds
        if op in ("add", "mul"):  # list (+|*) list, list, scalar or 0-d tensor; commutative
            if ka != LIST:
                a, b, ka, kb = b, a, kb, ka
            if kb == SCALAR:
                b = self.scalar_tensor(b) if op == "mul" else self.added(b, a)
            return f"{_F}{op}({a}, {b})"
        if op == "sub":
            if ka == LIST and kb != TENSOR:
                return f"{_F}sub({a}, {b})"
            if ka == LIST:  # no _foreach_sub(list, tensor): a + (-1) * b is exact
                return f"{_F}add({a}, {b}, alpha=-1)"
            return f"{_F}add({_F}neg({b}), {a})"  # s - x == (-x) + s exactly
        if op == "div":
            if ka == LIST:
                return f"{_F}div({a}, {self.scalar_tensor(b) if kb == SCALAR else b})"
            if a == repr(1.0):
                return f"{_F}reciprocal({b})"
            if ka == SCALAR:
                a = self.scalar_tensor(a)
            return f"{_F}mul({_F}reciprocal({b}), {a})"  # s / x as s * (1 / x)
        if op in ("maximum", "minimum"):
            if ka == kb == LIST:
                return f"{_F}{op}({a}, {b})"
            if TENSOR in kinds:
                return None
            if ka != LIST:
                a, b = b, a
            return f"{_F}clamp_{'min' if op == 'maximum' else 'max'}({a}, {b})"
        if op == "pow":
            if TENSOR in kinds:
                return None
            return f"{_F}pow({a}, {b})"  # list ** list | scalar, or scalar ** list
        if op == "div_or_zero":  # a / b where b > 0, else 0
            if ka != LIST or kb == LIST:
                return None
            if kb == TENSOR:  # x / inf == 0 for finite x: exactly update's where b > 0
                return f"{_F}div({a}, torch.where({b} > 0, {b}, torch.inf))"
            return f"({_F}div({a}, {b}) if {b} > 0 else [torch.zeros_like(_e) for _e in {a}])"
        return None

    def _per_tensor(self, node: Op, args: list[str], kinds: list[str]) -> str:
        """``update``'s expression for one tensor, over the zipped lists (a Python loop)."""
        lists = [a for a, k in zip(args, kinds) if k == LIST]
        names = {a: f"_e{i}" for i, a in enumerate(dict.fromkeys(lists))}
        per = TorchRenderer(self.tensors | set(names.values()))
        text = per.render_op(node, [names.get(a, a) for a in args])
        if len(names) == 1:
            (a, x), = names.items()
            return f"[{text} for {x} in {a}]"
        return f"[{text} for {', '.join(names.values())} in zip({', '.join(names)})]"

    def render_select(self, node: Select, then: str, other: str) -> str:
        kt, ko = self.kind(then), self.kind(other)
        result = LIST if LIST in (kt, ko) else TENSOR if TENSOR in (kt, ko) else SCALAR
        return (f"{self.broadcast(then, result)} if {flag_name(node.flag)} "
                f"else {self.broadcast(other, result)}")

    def broadcast(self, name: str, kind: str) -> str:
        """``name``'s value as a ``kind`` value (a Select may mix kinds)."""
        have = self.kind(name)
        if have == kind:
            return name
        if kind == LIST and have == TENSOR:
            return f"[{name}.to(_e.dtype).expand_as(_e) for _e in {self.like}]"
        if kind == LIST:
            return f"[torch.full_like(_e, {name}) for _e in {self.like}]"
        return f"torch.tensor({name}, dtype=torch.float64, device={self.like}[0].device)"


def _kinds(plan: Plan, sched) -> dict[str, str]:
    """The kind of every list or 0-d tensor name: loads are lists, reductions 0-d tensors,
    and a statement is a list if an operand is, else a 0-d tensor if an operand is."""
    loads = ("param", "grad", *plan.inputs, *(b.name for b in plan.buffers))
    kinds = {f"{t}_": LIST for t in loads}
    kinds.update({reduced_name(r.name): LIST if r.scope == "tensor" else TENSOR  # one per tensor
                  for r in plan.reductions})
    for st in sched.stmts:
        node = st.node
        operands = node.args if isinstance(node, Op) else (node.then, node.other)
        ks = {kinds.get(sched.names[a]) for a in operands}
        if LIST in ks:
            kinds[st.name] = LIST
        elif TENSOR in ks:
            kinds[st.name] = TENSOR
    return kinds


_CAST = '''\
def _foreach_cast(tensors, cdt):
    """A list of tensors in the compute dtype (itself when it already is); None if absent."""
    if tensors is None or any(t is None for t in tensors):
        return None
    if all(t.dtype == cdt for t in tensors):
        return tensors
    return [t.to(cdt) for t in tensors]
'''


# --- fusing chains into torch's multi-operand foreach ops ---------------------------
#
# The eager path's cost is a fixed overhead per foreach call (a Python call and a
# parallel region per tensor), so fewer, fatter calls win: a + b*c*s is one
def render_foreach_update(plan: Plan, buf: IndentedBuffer, suffix: str = "") -> dict:
    """``foreach_update(...)``, the step of a bucket of tensors. Returns its signature."""
    plan = narrowed(plan)
    fused = fuse(plan)
    sig = update_signature(fused, schedule(plan_roots(fused), _leaf))
    buf.writeline(f"def _foreach_update{suffix}({signature_text(sig)}):")
    with buf.indent():
        buf.writeline('"""A bucket\'s step: ``update`` over lists, one foreach op per node."""')
        buf.writeline("if not param:")
        buf.writeline("    return")
        buf.writeline("cdt = torch.promote_types(param[0].dtype, torch.float32)")
        for t in sig["tensors"]:
            buf.writeline(f"{t}_ = _foreach_cast({t}, cdt)")
        variants = _skip_variants(plan)
        if variants is None:
            _render_body(fused, buf)
        else:
            # One body per setting of the skip flag: the skipping one reads the old state
            # at the end (keep_if), which would keep the other from writing it in place.
            for head, variant in zip((f"if {flag_name(NONFINITE_FLAG)}:", "else:"), variants):
                buf.writeline(head)
                with buf.indent():
                    _render_body(fuse(variant), buf)
    return sig


def _skip_variants(plan: Plan) -> tuple[Plan, Plan] | None:
    """The plan with the skip flag (curvc.passes.keep_on_nonfinite) on, then off; None
    if it has none."""
    if not any(isinstance(n, Select) and n.flag == NONFINITE_FLAG
               for st in plan.stores for n in walk(st.value)):
        return None

    def resolve(e, on: bool):
        if isinstance(e, Select):
            if e.flag == NONFINITE_FLAG:
                return resolve(e.then if on else e.other, on)
            return Select(e.flag, resolve(e.then, on), resolve(e.other, on))
        if isinstance(e, Op):
            return replace(e, args=tuple(resolve(a, on) for a in e.args))
        return e
    return tuple(replace(plan, stores=tuple(replace(st, value=resolve(st.value, on))
                                            for st in plan.stores)) for on in (True, False))


def _render_body(plan: Plan, buf: IndentedBuffer) -> None:
    """The statements and stores of one (fused) plan, after the casts."""
    sched = schedule(plan_roots(plan), _leaf)
    kinds = _kinds(plan, sched)
    # Generated names start with '_' (kept from hyperparameter names by curvc.check).
    leaves = [n for n in sched.names if isinstance(n, (Scalar, Const))]
    scalar_leaves = {sched.names[n]: f"_s_{n.name}" if isinstance(n, Scalar) else f"_c{i}"
                     for i, n in enumerate(leaves)}
    r = ForeachRenderer(kinds, "param_", scalar_leaves)
    r.prepare(sched, plan)
    body = IndentedBuffer()
    _emit_statements(body, sched.stmts, sched, r)
    if r.scalar_tensors:
        # one buffer for all of them (curvc.runtime.program.host_scalars); the names in
        # parentheses, so they wrap
        names = ", ".join(r.scalar_tensors.values())
        values = ", ".join(r.scalar_tensors)
        buf.writeline(f"({names},) = _host_scalars([{values}], cdt, param[0].device)")
    buf.splice(body.getvalue().rstrip("\n"))
    for st in plan.stores:
        value = sched.names[st.value]
        kind = r.kind(value)
        conditions = [flag_name(st.when)] if st.when else []
        if kind == LIST and f"{st.target}_" in r.refs.get(value, ()):
            # already written in place, unless the state needed a compute-dtype copy
            conditions.append(f"{value} is not {st.target}")
        if kind == LIST:
            line = f"torch._foreach_copy_({st.target}, {value})"
        else:  # a store of a host scalar or a 0-d tensor: fill every tensor with it
            line = f"for _e in {st.target}: _e.fill_({value})"
        if conditions:
            line = f"if {' and '.join(conditions)}:\n    " + line
        buf.splice(line)


def render_helpers() -> str:
    """What every foreach kernel of a module calls (emitted once)."""
    return _CAST


def render(plan: Plan, suffix: str = "", helpers: bool = True) -> str:
    """The foreach section of one kernel (after the torch section: it needs ``torch``)."""
    buf = IndentedBuffer()
    if helpers:
        buf.splice(_CAST)
        buf.writeline()
        buf.writeline()
    sig = render_foreach_update(plan, buf, suffix)
    buf.writeline()
    buf.writeline()
    buf.writeline(f"_FOREACH_ARGS{suffix} = {sig!r}")
    return buf.getvalue()
