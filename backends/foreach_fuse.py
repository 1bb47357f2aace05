"""Pattern fusion for the foreach backend: chains of plan nodes that one
``torch._foreach_*`` call computes (``a + b*c*s`` as ``_foreach_addcmul``, ``a + s*b`` as
``_foreach_add(alpha=s)``, ``a - s*b``, ``a - s*(b/c)`` as ``_foreach_addcdiv``, with a
host factor of b folded into its value), as single ops of the plan. A rewrite of the
plan, so the renderer only maps each fused op to its call (``FUSED``)."""
from __future__ import annotations

from dataclasses import replace

from curvc.plan import Load, Op, Plan, Reduced, Scalar, Const, Select, reads_only, walk

# The fused ops (made by ``fuse``): operands are lists, the last a host scalar.
FUSED = {"addcmul": "{f}addcmul{in_place}({0}, {1}, {2}, value={3})",
         "add_scaled": "{f}add{in_place}({0}, {1}, alpha={2})",
         "sub_scaled": "{f}add{in_place}({0}, {1}, alpha=-{2})",
         "subcdiv": "{f}addcdiv{in_place}({0}, {1}, {2}, value=-{3})"}



# _foreach_addcmul, a + b*s one _foreach_add(alpha=s), a - s*b one
# _foreach_add(alpha=-s), a - s*(b/c) one _foreach_addcdiv. Rounding may differ from the
# separate ops in the last bit (ATen evaluates value*b*c, or an FMA), as torch's own
# foreach optimizers do.

def _host_scalar(e) -> bool:
    """A host value: a Scalar, a Const, or an expression of those alone (a Python float
    where the backend renders it, as ``value=`` and ``alpha=`` want)."""
    return isinstance(e, (Scalar, Const)) or (
        isinstance(e, (Op, Select)) and all(isinstance(n, (Scalar, Const, Op, Select))
                                            for n in walk(e)))


def _scaled_numerator(n, on, once):
    """(x, s) where the numerator ``n`` is x times the host scalar s (s = 1 where it is
    not), the product folded into the addcdiv's value as torch.optim's foreach steps fold
    a bias correction into their step size: one pass over the tensors fewer. ``n`` may
    choose by a flag between such a product and a plain list (a momentum that may be
    off): x then chooses too, and s by the same flag between its factor and 1. ``on``:
    the node before its operands were rewritten (its use counts decide)."""
    def factor(e, o):
        if isinstance(e, Op) and e.op == "mul" and once(o):
            for j in (0, 1):
                if _host_scalar(e.args[1 - j]) and _is_list(e.args[j]):
                    return e.args[j], e.args[1 - j]
        return e, None
    if isinstance(n, Select):
        (a, sa), (b, sb) = factor(n.then, on.then), factor(n.other, on.other)
        if sa is None and sb is None:
            return n, None
        one = Const(1.0)
        return Select(n.flag, a, b), Select(n.flag, sa or one, sb or one)
    return factor(n, on)


def _is_list(e) -> bool:
    """Whether ``e`` is a list in this backend: downstream of a load, of no reduction."""
    return reads_only(e, Load, Reduced)


def fuse(plan: Plan) -> Plan:
    """The plan with foreach-fusable chains as single ops (fused only where the inner
    node has no other use, so nothing is computed twice)."""
    uses: dict = {}
    roots = [st.value for st in plan.stores] + [r.value for r in plan.reductions]
    nodes = {n: None for root in roots for n in walk(root)}  # each node once, over all roots
    for n in nodes:
        for a in (n.args if isinstance(n, Op) else (n.then, n.other)
                  if isinstance(n, Select) else ()):
            uses[a] = uses.get(a, 0) + 1
    once = lambda e: uses.get(e, 0) <= 1  # noqa: E731
    memo: dict = {}

    def visit(e):
        if e in memo:
            return memo[e]
        out = e
        if isinstance(e, Select):
            out = Select(e.flag, visit(e.then), visit(e.other))
        elif isinstance(e, Op):
            out = _fused(Op(e.op, tuple(visit(a) for a in e.args)), e, once)
        memo[e] = out
        return out

    return replace(plan, stores=tuple(replace(st, value=visit(st.value)) for st in plan.stores))


def _fused(new: Op, old: Op, once) -> Op:
    """One fusion rule applied at ``new`` (``old``: the same node before its operands were
    rewritten, whose operands' use counts decide)."""
    if new.op == "add":
        for i in (0, 1):
            a, m = new.args[i], new.args[1 - i]
            om = old.args[1 - i]
            if not (_is_list(a) and isinstance(m, Op) and m.op == "mul" and once(om)):
                continue
            for j in (0, 1):
                inner, s = m.args[j], m.args[1 - j]
                if not _host_scalar(s) or not _is_list(inner):
                    continue
                if isinstance(inner, Op) and inner.op == "mul" and once(om.args[j]) and \
                        all(_is_list(x) for x in inner.args):
                    return Op("addcmul", (a, *inner.args, s))
                return Op("add_scaled", (a, inner, s))
    if new.op == "sub":
        a, m = new.args
        om = old.args[1]
        if _is_list(a) and isinstance(m, Op) and m.op == "mul" and once(om):
            for j in (0, 1):
                d, s = m.args[j], m.args[1 - j]
                if _host_scalar(s) and isinstance(d, Op) and d.op == "div" and \
                        once(om.args[j]) and all(_is_list(x) for x in d.args):
                    x, k = _scaled_numerator(d.args[0], om.args[j].args[0], once)
                    return Op("subcdiv", (a, x, d.args[1], s if k is None else Op("mul", (s, k))))
            for j in (0, 1):  # a - s*b: torch.optim's param.add_(d, alpha=-lr)
                b, s = m.args[j], m.args[1 - j]
                if _host_scalar(s) and _is_list(b):
                    return Op("sub_scaled", (a, b, s))
    return new
