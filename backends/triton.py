"""The Triton backend: a plan as multi-tensor ``@triton.jit`` kernels.

``render(plan)`` writes the Triton section of a generated module:

* ``_update_kernel``: the whole step (every store of the plan) for one block
  of one tensor. A launch covers every tensor of a bucket: the kernel reads
  the tensor's data pointers from int64 tables (one per tensor role) and its
  block from a block -> (tensor, first element) table. Each parameter,
  gradient and state element is loaded once and stored once.
* ``_reduce_kernel`` (plans with global reductions): each block's partial sum
  of every reduction, summed on the device in float64 (no host sync).
* ``_triton_step`` / ``_triton_reduce``: the host side the runtime calls.

Spec values enter kernels under the prefixed names of ``render.scalar_name`` and
``render.flag_name`` (``h_lr``, ``f_maximize``), so no spec name can take one of
the kernel's own locals (``pid``, ``i``, ``offs``, ``mask``, ``BLOCK``, ...).

Host flags are ``tl.constexpr`` (a guarded statement is a static ``if``);
host scalars are runtime float64 arguments, so an LR scheduler never
recompiles; reductions are read from device pointers. Arithmetic runs in
float32 (float64 for float64 parameters), stores round to the destination
dtype.

The run-time support the generated code imports (``Tables``: building and
caching the pointer tables) is ``backends/triton_tables.py``; it needs torch,
never triton.
"""
from __future__ import annotations


from curvc.plan import Const, Load, Op, Plan, Reduced, Scalar, Select, reduction_levels
from curvc.backends.render import (Guard, IndentedBuffer, Renderer, flag_name, plan_roots,
                                   reduced_name, scalar_name, schedule, wrap_items)

# --- rendering -------------------------------------------------------------------


class TritonRenderer(Renderer):
    """Operators as Triton expressions. Operands are always names or literals,
    so formats may repeat them."""

    ops = {**Renderer.ops,
           "div": "_div({0}, {1})", "sqrt": "_sqrt({0})", "abs": "tl.abs({0})",
           "exp": "tl.exp({0})", "log": "tl.log({0})",
           # torch.sign: 0 at 0 (and at NaN)
           "sign": "tl.where({0} > 0, 1.0, tl.where({0} < 0, -1.0, 0.0))",
           # torch.maximum/clamp propagate NaN; Triton's default does not
           "maximum": "tl.maximum({0}, {1}, propagate_nan=tl.PropagateNan.ALL)",
           "minimum": "tl.minimum({0}, {1}, propagate_nan=tl.PropagateNan.ALL)",
           # torch.lerp's two-sided formula (exact at both ends)
           "lerp": "tl.where(tl.abs({2}) < 0.5, {0} + {2} * ({1} - {0}), "
                   "{1} - ({1} - {0}) * (1.0 - {2}))",
           # the inner where keeps a zero divisor out of the division
           "div_or_zero": "tl.where({1} > 0, _div({0}, tl.where({1} > 0, {1}, 1.0)), 0.0)",
           # the old value, bit for bit, where the 0-d skip value is set
           "keep_if": "tl.where({0} != 0, {1}, {2})",
           # powers of nonnegative curvature; exactly sqrt at 0.5, as torch.pow is
           "pow": "tl.where({1} == 0.5, _sqrt({0}), "
                  "tl.where({1} == 0.0, 1.0, tl.exp2({1} * tl.log2({0}))))"}


def _leaf(e) -> str:
    if isinstance(e, Const):
        return repr(float(e.value))
    if isinstance(e, Load):
        return f"{e.name}_"
    if isinstance(e, Reduced):
        return reduced_name(e.name)
    return scalar_name(e.name)


def _operands(node) -> tuple:
    return node.args if isinstance(node, Op) else (node.then, node.other)


def _load_guards(sched, roots) -> dict[str, Guard]:
    """The flags under which each tensor must be loaded.

    Only statements are guarded by ``schedule``; a load is needed wherever a
    statement reading it runs (a Select's branch adds the Select's flag), so
    its guard is the intersection of its users' guards, as ``schedule``
    merges guards. A buffer whose allocation flag is off is never loaded.
    """
    guards: dict[str, Guard] = {}

    def use(e, g: Guard) -> None:
        if isinstance(e, Load):
            guards[e.name] = guards[e.name] & g if e.name in guards else Guard(g)

    for st in sched.stmts:
        node = st.node
        if isinstance(node, Select):
            use(node.then, st.guard | {(node.flag, True)})
            use(node.other, st.guard | {(node.flag, False)})
        else:
            for a in node.args:
                use(a, st.guard)
    for root, g, *_ in roots:
        use(root, Guard(g))
    return guards


class _Kernel:
    """What one kernel reads: computed from its schedule, rendered in order."""

    def __init__(self, plan: Plan, roots, stores=()):
        self.plan = plan
        self.roots = roots
        self.sched = schedule(roots, _leaf)
        self.stores = stores
        names = self.sched.names
        order = ["param", "grad", *plan.inputs, *(b.name for b in plan.buffers)]
        loaded = {n.name for n in names if isinstance(n, Load)}
        stored = {st.target for st in stores}
        self.tensors = [t for t in order if t in loaded or t in stored]  # roles this kernel touches
        self.loads = _load_guards(self.sched, roots)
        self.scalars = sorted({n.name for n in names if isinstance(n, Scalar)})
        self.reduced = sorted({n.name for n in names if isinstance(n, Reduced)})
        # tensor-scope sums: one per tensor of the bucket, read at the launch's tensor's
        # position in it
        self.per_tensor = {r.name for r in plan.reductions if r.scope == "tensor"} & \
            set(self.reduced)
        stmts = self.sched.stmts
        self.flags = sorted({f for st in stmts for f, _ in st.guard}
                            | {st.node.flag for st in stmts if isinstance(st.node, Select)}
                            | {f for g in self.loads.values() for f, _ in g}
                            | {st.when for st in stores if st.when})
        # Values derived from reductions only stay float64 scalars (as a 0-d
        # float64 tensor does in torch) until they meet a tensor.
        self.wide = {reduced_name(n) for n in self.reduced}
        self.narrowed = set()  # wide values that meet a tensor: cast to CDT once, as `<name>_c`
        tensorish = {f"{t}_" for t in self.tensors}
        for st in self.sched.stmts:
            ops = [names[a] for a in _operands(st.node)]
            if any(o in tensorish for o in ops):
                tensorish.add(st.name)
            elif any(o in self.wide for o in ops):
                self.wide.add(st.name)
            if st.name not in self.wide:
                self.narrowed |= self.wide.intersection(ops)

    def signature(self, buf: IndentedBuffer, extra: list[str]) -> None:
        groups = [([f"{t}_ptrs" for t in self.tensors], "data-pointer tables, one per role"),
                  (["numels", "block_tensor", "block_start"]
                   + (["positions"] if self.per_tensor else []),
                   "each block's tensor and first element" + (
                       "; each tensor's place in the bucket" if self.per_tensor else "")),
                  ([f"{scalar_name(s)}: tl.float64" for s in self.scalars],
                   "host scalars (runtime values)"),
                  ([f"{reduced_name(r)}_ptr" for r in self.reduced],
                   "reductions' sums (float64: 0-d, or one per tensor of the bucket)"
                   if self.per_tensor else "global sums (0-d float64)"),
                  *extra,
                  ([f"{flag_name(f)}: tl.constexpr" for f in self.flags],
                   "host flags (compile-time)"),
                  ([f"{_dtype_arg(t)}: tl.constexpr" for t in self.tensors]
                   + ["CDT: tl.constexpr", "BLOCK: tl.constexpr"], "element types, compute type, block size")]
        groups = [(names, why) for names, why in groups if names]
        for n, (names, why) in enumerate(groups):
            buf.writeline(f"# {why}")
            buf.writelines(wrap_items("", names, "):" if n == len(groups) - 1 else ",",
                                      buf.room, ""))

    def prologue(self, buf: IndentedBuffer) -> None:
        buf.writeline("pid = tl.program_id(0)")
        buf.writeline("i = tl.load(block_tensor + pid)")
        buf.writeline("offs = tl.load(block_start + pid) + tl.arange(0, BLOCK)")
        buf.writeline("mask = offs < tl.load(numels + i)")
        for t in self.tensors:
            buf.writeline(f"{t}_addr = tl.load({t}_ptrs + i).to(tl.pointer_type({_dtype_arg(t)}))")
        for s in map(scalar_name, self.scalars):
            buf.writeline(f"{s} = tl.cast({s}, CDT)")
        if self.per_tensor:
            buf.writeline("at = tl.load(positions + i)")
        for name in self.reduced:
            r = reduced_name(name)
            buf.writeline(f"{r} = tl.load({r}_ptr + at)" if name in self.per_tensor
                          else f"{r} = tl.load({r}_ptr)")
            if r in self.narrowed:
                buf.writeline(f"{r}_c = tl.cast({r}, CDT)")
        items = [(self.loads[t], [f"{t}_ = tl.load({t}_addr + offs, mask=mask).to(CDT)"])
                 for t in self.tensors if t in self.loads]
        _emit_guarded(buf, items)

    def body(self, buf: IndentedBuffer) -> None:
        r = TritonRenderer()
        names = self.sched.names
        items = []
        for st in self.sched.stmts:
            wide = st.name in self.wide
            ops = [names[a] if wide or names[a] not in self.wide else f"{names[a]}_c"
                   for a in _operands(st.node)]
            if isinstance(st.node, Select):
                lines = [f"if {flag_name(st.node.flag)}:", f"    {st.name} = {ops[0]}", "else:",
                         f"    {st.name} = {ops[1]}"]
            else:
                lines = [f"{st.name} = {r.render_op(st.node, ops)}"]
            if st.name in self.narrowed:  # float64 until here, as a 0-d tensor in torch
                lines.append(f"{st.name}_c = tl.cast({st.name}, CDT)")
            items.append((st.guard, lines))
        _emit_guarded(buf, items)


def _dtype_arg(role: str) -> str:
    return f"{role.upper()}_T"


def _emit_guarded(buf: IndentedBuffer, items: list[tuple[Guard, list[str]]]) -> None:
    """Lines under static ifs, one nested ``if`` per flag (Triton folds them at
    compile time; nesting avoids relying on ``and`` over constexprs)."""
    current: tuple = ()
    for guard, lines in items:
        want = tuple(sorted(guard))
        if want != current:
            buf._level -= len(current)
            for flag, value in want:
                buf.writeline(f"if {'' if value else 'not '}{flag_name(flag)}:")
                buf._level += 1
            current = want
        buf.writelines(lines)
    buf._level -= len(current)


def _store_line(target: str, value: str) -> str:
    return f"_store({target}_addr, offs, {value}, mask, {_dtype_arg(target)})"


def render_update(plan: Plan, buf: IndentedBuffer, suffix: str = "") -> _Kernel:
    k = _Kernel(plan, plan_roots(plan), plan.stores)
    buf.writeline("@triton.jit")
    buf.writeline(f"def _update_kernel{suffix}(")
    with buf.indent(2):
        k.signature(buf, [])
    with buf.indent():
        buf.writeline("# The whole step for one BLOCK of one tensor: every value computed from")
        buf.writeline("# the old state, then each buffer and the parameter stored once.")
        k.prologue(buf)
        k.body(buf)
        names = k.sched.names
        _emit_guarded(buf, [(Guard({(st.when, True)} if st.when else set()),
                             [_store_line(st.target, names[st.value])]) for st in plan.stores])
    return k


def render_reduce(plan: Plan, reductions, buf: IndentedBuffer, name: str) -> _Kernel:
    """``name``: one block's partial sums of ``reductions`` (one pass of the plan's)."""
    roots = [(red.value, Guard()) for red in reductions]
    k = _Kernel(plan, roots)
    buf.writeline("@triton.jit")
    buf.writeline(f"def {name}(")
    with buf.indent(2):
        k.signature(buf, [(["partials"], "out: [reductions, blocks] float64")])
    with buf.indent():
        buf.writeline("# One block's partial sums of " + ", ".join(r.name for r in reductions)
                      + ": row r of partials holds reduction r.")
        k.prologue(buf)
        k.body(buf)
        for row, red in enumerate(reductions):
            value = k.sched.names[red.value]
            at = "pid" if row == 0 else f"{row} * tl.num_programs(0) + pid"
            buf.writeline(f"tl.store(partials + {at}, "
                          f"tl.sum(tl.where(mask, {value}, 0.0), axis=0).to(tl.float64))")
    return k


_HELPERS = '''\
@triton.jit
def _div(a, b):
    # IEEE-rounded, as torch: float32 `/` is approximate on NVIDIA GPUs
    q = a / b
    if q.dtype == tl.float32:
        q = tl.div_rn(a, b)
    return q

@triton.jit
def _sqrt(x):
    # IEEE-rounded, as torch: float32 tl.sqrt is approximate on NVIDIA GPUs
    r = tl.sqrt(x)
    if x.dtype == tl.float32:
        r = tl.sqrt_rn(x)
    return r

@triton.jit
def _store(addr, offs, x, mask, T: tl.constexpr):
    # x rounded to nearest-even in the destination dtype T, as torch's copy_;
    # bfloat16 by hand, since the interpreter truncates float32 -> bfloat16
    if T == tl.bfloat16:
        bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        half = tl.where(x != x, 0x7FC0, bits >> 16).to(tl.uint16)
        tl.store(addr + offs, half.to(tl.bfloat16, bitcast=True), mask=mask)
    else:
        tl.store(addr + offs, x.to(T), mask=mask)
'''


def _launch_args(k: _Kernel, buf: IndentedBuffer, extra: list[str]) -> None:
    def wrap(items, end):
        return wrap_items("", items, end, buf.room, "")
    buf.writelines(wrap([f"t.ptrs[{n!r}]" for n in k.tensors], ","))
    buf.writeline("t.numels, t.block_tensor, t.block_start,"
                  + (" t.positions," if k.per_tensor else ""))
    buf.writelines(wrap([f"{scalar_name(s)}=float(scalars[{s!r}])" for s in k.scalars]
                         + [f"{reduced_name(r)}_ptr=reduced[{r!r}]" for r in k.reduced]
                         + extra + [f"{flag_name(f)}=bool(flags[{f!r}])" for f in k.flags], ","))
    buf.writelines(wrap([f"{_dtype_arg(n)}=t.dtypes[{n!r}]" for n in k.tensors]
                         + ["CDT=t.compute", "BLOCK=t.block", "num_warps=t.num_warps"], ")"))


def render(kernels) -> str:
    """The Triton section of a generated module (imports cleanly without Triton):
    ``kernels`` is a plan, or (suffix, plan) pairs, one per kernel of the program."""
    if isinstance(kernels, Plan):
        kernels = [("", kernels)]
    buf = IndentedBuffer()
    nothing = " = ".join(f"_triton_step{x} = _triton_reduce{x}" for x, _ in kernels) + " = None"
    buf.writelines(["try:", "    import triton", "    import triton.language as tl",
                    "except ImportError:  # the torch path works without Triton",
                    "    triton = None", "",
                    "if triton is None:", f"    {nothing}", "else:"])
    with buf.indent():
        buf.writeline("from curvc.backends.triton_tables import Tables as _Tables")
        buf.writeline()
        buf.splice(_HELPERS)
        for suffix, plan in kernels:
            buf.writeline()
            _render_kernel(plan, suffix, buf)
    return buf.getvalue()


def _render_kernel(plan: Plan, x: str, buf: IndentedBuffer) -> None:
    """One kernel's ``_update_kernel``, ``_reduce_kernel`` and their launchers."""
    roles = ["param", "grad", *plan.inputs, *(b.name for b in plan.buffers)]
    stored = [st.target for st in plan.stores]
    upd = render_update(plan, buf, x)
    buf.writeline()
    levels = reduction_levels(plan.reductions)
    reds = [render_reduce(plan, lv, buf, _reduce_kernel(x, n)) for n, lv in enumerate(levels)]
    if reds:
        buf.writeline()
    buf.writeline(f"_TABLES{x} = _Tables({roles!r}, stored={sorted(set(stored))!r})")
    buf.writeline()
    buf.writeline(f"def _triton_step{x}(bucket, scalars, flags, reduced):")
    with buf.indent():
        buf.writeline(f'"""The bucket\'s pass: one _update_kernel{x} launch for all its tensors."""')
        buf.writeline(f"for t in _TABLES{x}.launches(bucket, _update_kernel{x}):")
        with buf.indent():
            buf.writeline(f"_update_kernel{x}[(t.blocks,)](")
            with buf.indent():
                _launch_args(upd, buf, [])
            buf.writeline("t.finish()")
    buf.writeline()
    buf.writeline(f"def _triton_reduce{x}(bucket, scalars, flags, reduced=None, level=0):")
    with buf.indent():
        if not reds:
            buf.writeline('"""No reductions in this kernel."""')
            buf.writeline("return {}")
            return
        buf.writeline('"""A pass of the sums over the bucket: float64 device tensors' + (
            ' (per tensor: 1-D)."""' if any(r.scope == "tensor" for r in plan.reductions)
            else '."""'))
        for n, (lv, red) in enumerate(zip(levels, reds)):
            if len(reds) > 1:
                buf.writeline(f"{'if' if n == 0 else 'elif'} level == {n}:")
                buf._level += 1
            _reduce_launch(lv, red, buf, x, _reduce_kernel(x, n))
            if len(reds) > 1:
                buf._level -= 1


def _reduce_kernel(x: str, level: int) -> str:
    return f"_reduce_kernel{x}" + (f"_pass{level}" if level else "")


def _reduce_launch(reductions, red: _Kernel, buf: IndentedBuffer, x: str, kernel: str) -> None:
    """The host side of one reduce kernel: global and group rows summed over the blocks,
    tensor-scope rows over each tensor's blocks, into its place in the bucket (sums in a
    fixed order, no atomics: replicas under DDP must round alike)."""
    names = [r.name for r in reductions]
    rows = len(names)
    tensor_rows = [i for i, r in enumerate(reductions) if r.scope == "tensor"]
    if len(tensor_rows) < rows:
        buf.writeline("total = None")
    for i in tensor_rows:
        buf.writeline(f"per_tensor{i} = _TABLES{x}.zeros(bucket, len(bucket.params))")
    buf.writeline(f"for t in _TABLES{x}.launches(bucket, {kernel}):")
    with buf.indent():
        buf.writeline(f"partials = t.partials({rows})")
        buf.writeline(f"{kernel}[(t.blocks,)](")
        with buf.indent():
            _launch_args(red, buf, ["partials=partials"])
        if tensor_rows:  # each tensor's blocks are consecutive: a sum per segment, in order
            buf.writeline(f"rows = partials.view({rows}, t.blocks)")
            for i in tensor_rows:
                buf.writeline(f"per_tensor{i}.index_copy_(0, t.positions, torch.segment_reduce("
                              f"rows[{i}], 'sum', lengths=t.counts))")
        if len(tensor_rows) < rows:
            buf.writeline(f"sums = partials.view({rows}, t.blocks).sum(dim=1)")
            buf.writeline("total = sums if total is None else total + sums")
    if len(tensor_rows) < rows:
        buf.writeline("if total is None:  # no elements")
        buf.writeline(f"    total = _TABLES{x}.zeros(bucket, {rows})")
    buf.writeline("return {" + ", ".join(
        f"{n!r}: per_tensor{i}" if i in tensor_rows else f"{n!r}: total[{i}]"
        for i, n in enumerate(names)) + "}")
