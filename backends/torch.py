"""The torch backend: a plan as plain PyTorch source, one function per tensor.

``_update(param, grad, <buffers>, <scalars>, <flags>)`` computes the whole
step of one tensor from its old values and then writes the buffers and the
parameter (all loads happen before any store, so the DAG may read a buffer's
old value after computing its new one). Eagerly it is a short chain of torch
ops; wrapped in ``torch.compile`` it becomes one fused pass over memory.
Arithmetic runs in float32 (float64 for float64 parameters), whatever the
parameter dtype.
"""
from __future__ import annotations

import textwrap

from curvc.plan import Const, Load, Op, Plan, Reduced, Scalar, Select, walk
from curvc.schedule import Extern
from curvc.backends.render import (Guard, IndentedBuffer, PythonHost, Renderer, Stmt, flag_name,
                                   guard_text, narrowed, plan_roots, reduced_name, scalar_name,
                                   schedule)


class TorchRenderer(Renderer):
    ops = {**Renderer.ops, "sqrt": "torch.sqrt({0})", "abs": "torch.abs({0})",
           "sign": "torch.sign({0})", "exp": "torch.exp({0})", "log": "torch.log({0})",
           "lerp": "torch.lerp({0}, {1}, {2})",
           "div_or_zero": "torch.where({1} > 0, {0} / {1}, 0.0)",
           "keep_if": "torch.where({0} != 0, {1}, {2})", "narrow": "{0}.to(cdt)"}

    def __init__(self, tensors: set[str]):
        self.tensors = tensors  # names holding tensors (the rest are Python floats)

    def render_op(self, node: Op, args: list[str]) -> str:
        if node.op in ("maximum", "minimum"):
            a, b = args
            tensor_a, tensor_b = a in self.tensors, b in self.tensors
            if tensor_a and tensor_b:
                return f"torch.{node.op}({a}, {b})"
            if not tensor_a:
                a, b = b, a
            return f"torch.clamp({a}, {'min' if node.op == 'maximum' else 'max'}={b})"
        if node.op == "pow" and args[0] not in self.tensors:
            return f"torch.pow({args[0]}, {args[1]})"
        return super().render_op(node, args)

    def render_select(self, node: Select, then: str, other: str) -> str:
        return f"{then} if {flag_name(node.flag)} else {other}"

    def render_stmt(self, st: Stmt, names: dict) -> str:
        """The source of one statement (``names``: the schedule's names of its operands)."""
        node = st.node
        if isinstance(node, Select):
            text = self.render_select(node, names[node.then], names[node.other])
        else:
            text = self.render_op(node, [names[a] for a in node.args])
        return f"{st.name} = {text}"


def _flag_or_true(flag: str | None) -> str:
    return "True" if flag is None else flag_name(flag)


def _leaf(e) -> str:
    if isinstance(e, Const):
        return repr(float(e.value))
    if isinstance(e, Load):
        return f"{e.name}_"
    if isinstance(e, Reduced):
        return reduced_name(e.name)
    return scalar_name(e.name)


def _tensor_names(plan: Plan, sched, roots) -> set[str]:
    """Which statement names hold tensors: anything downstream of a load or a reduction."""
    tensors = {f"{t}_" for t in ("param", "grad", *plan.inputs, *(b.name for b in plan.buffers))}
    tensors |= {reduced_name(r.name) for r in plan.reductions}
    for st in sched.stmts:
        node = st.node
        operands = node.args if isinstance(node, Op) else (node.then, node.other)
        if any(sched.names[a] in tensors for a in operands):
            tensors.add(st.name)
    return tensors


def _emit_statements(buf: IndentedBuffer, stmts: list[Stmt], sched, renderer) -> None:
    current: Guard | None = None
    for st in stmts:
        if st.guard != current:
            if current:
                buf._level -= 1
            current = st.guard
            if current:
                buf.writeline(f"if {guard_text(current)}:")
                buf._level += 1
        buf.splice(renderer.render_stmt(st, sched.names))
    if current:
        buf._level -= 1


def _signature(plan: Plan, sched, tensor_args: list[str]) -> tuple[list[str], list[str], list[str]]:
    scalars = sorted({n.name for n in sched.names if isinstance(n, Scalar)})
    reduced = sorted({n.name for n in sched.names if isinstance(n, Reduced)})
    flags = sorted({f for st in sched.stmts for f, _ in st.guard}
                   | {st.node.flag for st in sched.stmts if isinstance(st.node, Select)})
    return scalars, reduced, flags


def render_update(plan: Plan, buf: IndentedBuffer, suffix: str = "") -> dict:
    """``update(...)``, the step of one tensor. Returns what its signature takes."""
    plan = narrowed(plan)
    roots = plan_roots(plan)
    sched = schedule(roots, _leaf)
    r = TorchRenderer(_tensor_names(plan, sched, roots))
    sig = update_signature(plan, sched)
    tensors = sig["tensors"]
    buf.writeline(f"def _update{suffix}({signature_text(sig)}):")
    with buf.indent():
        buf.writeline('"""One tensor\'s step: every value computed from old state, then stored."""')
        buf.writeline("cdt = torch.promote_types(param.dtype, torch.float32)")
        for t in tensors:
            buf.writeline(f"{t}_ = None if {t} is None else {t}.to(cdt)")
        _emit_statements(buf, sched.stmts, sched, r)
        for st in plan.stores:
            line = f"{st.target}.copy_({sched.names[st.value]})"
            if st.when:
                buf.writeline(f"if {flag_name(st.when)}:")
                with buf.indent():
                    buf.writeline(line)
            else:
                buf.writeline(line)
    return sig


def update_signature(plan: Plan, sched) -> dict:
    """What the update of ``plan`` takes, in order (``sched``: its stores' schedule)."""
    tensors = ["param", "grad", *plan.inputs, *(b.name for b in plan.buffers)]
    scalars, reduced, flags = _signature(plan, sched, tensors)
    flags = sorted(set(flags) | {st.when for st in plan.stores if st.when})
    return {"tensors": tensors, "scalars": scalars, "reduced": reduced, "flags": flags}


def signature_text(sig: dict) -> str:
    """The parameter list of a function taking ``sig`` (as ``update_signature`` returns)."""
    return ", ".join(sig["tensors"] + [scalar_name(n) for n in sig["scalars"]]
                     + [reduced_name(n) for n in sig["reduced"]]
                     + [flag_name(n) for n in sig["flags"]])


def render_reductions(plan: Plan, buf: IndentedBuffer, suffix: str = "") -> dict:
    """One ``reduce_<name>(...)`` per global reduction: this tensor's partial sum."""
    out = {}
    plan = narrowed(plan)
    for red in plan.reductions:
        sched = schedule([(red.value, Guard())], _leaf)
        r = TorchRenderer(_tensor_names(plan, sched, None))
        tensors = ["param", "grad", *plan.inputs, *(b.name for b in plan.buffers)]
        scalars, reduced, flags = _signature(plan, sched, tensors)
        sig = {"tensors": tensors, "scalars": scalars, "reduced": reduced, "flags": flags}
        buf.writeline(f"def _reduce_{red.name}{suffix}({signature_text(sig)}):")
        with buf.indent():
            buf.writeline("cdt = torch.promote_types(param.dtype, torch.float32)")
            for t in tensors:
                buf.writeline(f"{t}_ = None if {t} is None else {t}.to(cdt)")
            _emit_statements(buf, sched.stmts, sched, r)
            buf.writeline(f"return torch.sum({sched.names[red.value]}, dtype=cdt)")
        buf.writeline()
        out[red.name] = {"tensors": tensors, "scalars": scalars, "reduced": reduced,
                         "flags": flags}
    return out


def render(plan: Plan, suffix: str = "") -> str:
    """The torch section of one kernel of a generated module."""
    buf = IndentedBuffer()
    sig = render_update(plan, buf, suffix)
    buf.writeline()
    buf.writeline()
    reds = render_reductions(plan, buf, suffix)
    buf.writeline(f"_UPDATE_ARGS{suffix} = {sig!r}")
    buf.writeline(f"_REDUCE_ARGS{suffix} = {reds!r}")
    return buf.getvalue()


def _extern_call(ext: Extern) -> tuple:
    """(signature, keyword arguments as source, statistic, value, the parameter or None,
    the stage's own tensor operands as (keyword, input) pairs) of an extern's call."""
    stage = ext.stage
    host = PythonHost()
    params = [host.render_inline(e, lambda x: scalar_name(x.name)) for e in ext.params]
    scalars = sorted({n.name for e in ext.params for n in walk(e) if isinstance(n, Scalar)})
    # an input in two roles (a graft's step that is the value itself: graft sgd) is one
    # parameter, which the call passes in both
    sig = {"tensors": ["state", *dict.fromkeys(ext.inputs)], "scalars": scalars, "reduced": [],
           "flags": list(stage.flags)}
    kw = stage.keywords(params, _flag_or_true)
    operands = ext.inputs[:-1] if stage.reads_param else ext.inputs
    named = getattr(stage, "operands", ())  # the stage's own tensors, by keyword
    cut = len(operands) - len(named)
    operands, extra = operands[:cut], operands[cut:]
    # one tensor when the statistic and the value are the same
    param = ext.inputs[-1] if stage.reads_param else None
    return sig, kw, operands[0], operands[-1], param, list(zip(named, extra))


def render_extern(ext: Extern, buf: IndentedBuffer) -> dict:
    """``_<name>(state, <inputs>, <scalars>, <flags>)``: one tensor's call into
    curvc.runtime.matrix, which keeps the factors in ``state`` (the tensor's optimizer
    state) and returns the preconditioned value. Returns what its signature takes."""
    stage = ext.stage
    sig, kw, statistic, value, param, named = _extern_call(ext)
    buf.writeline(f"def _{ext.name}({signature_text(sig)}):")
    with buf.indent():
        doc = textwrap.wrap(stage.doc, buf.room - 6)
        buf.writelines(['"""' + doc[0]] + doc[1:-1] + [doc[-1] + '"""'] if len(doc) > 1
                       else ['"""' + doc[0] + '"""'])
        rest = f"{param}.to(cdt), " if param else ""
        rest += "".join(f"{k}={x}.to(cdt), " for k, x in named)
        # a kernel's temporaries are in the compute dtype already; a raw input may not be
        buf.writeline(f"cdt = torch.promote_types({value}.dtype, torch.float32)")
        # the statistic is None on a step that does not accumulate (an estimate not due)
        buf.writeline(f"return matrix.{stage.function}(state, None if {statistic} is None "
                      f"else {statistic}.to(cdt), {value}.to(cdt), {rest}" + ", ".join(kw) + ")")
    return sig


def render_extern_many(ext: Extern, buf: IndentedBuffer) -> None:
    """``_<name>_many``: ``_<name>`` on lists of tensors (one list per tensor role, the same
    scalars and flags), for a stage with a batched form (``stage.many``, a function of
    curvc.runtime.batched that matrix exports)."""
    sig, kw, statistic, value, param, named = _extern_call(ext)

    def cast(x):  # each tensor in its compute dtype, as the per-tensor call casts it
        return f"matrix.in_compute({x}, {value})"
    rest = f"{cast(param)}, " if param else ""
    rest += "".join(f"{k}={cast(x)}, " for k, x in named)
    buf.writeline(f"def _{ext.name}_many({signature_text(sig)}):")
    with buf.indent():
        buf.writeline('"""The same on lists of tensors: one batched call per group of one '
                      'shape and dtype."""')
        buf.writeline(f"return matrix.{ext.stage.many}(state, {cast(statistic)}, "
                      f"{cast(value)}, {rest}" + ", ".join(kw) + ")")


