"""The numbers of an update that lowering decides, read from the lowered plan.

Roots and exponents, where eps enters, what a bias correction counts: explain
(the ``curvc explain`` text and every generated module's header) prints these
from the plan the code is generated from, never re-derived from the IR, so
the documentation cannot drift from the code. Only a spec curvc refuses to
compile is read from its IR (``ir_numbers``), and explain says so.
"""
from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

from curvc import ir
from curvc import lower as lower_mod
from curvc.errors import CurvError
from curvc.plan import Const, DenseStage, Expr, Load, Op, Plan, Precondition, Scalar, walk


@dataclass(frozen=True)
class Root:
    """How a preconditioner is made from the accumulated curvature C:
    ``max((C + inside)^exponent + after, floor)``, each part absent when None."""

    exponent: str | None  # as text ('1/2', 'hessian_power/2'); None: no root
    inside: str | None = None
    after: str | None = None
    floor: str | None = None
    # an undamped P divides as the pseudo-inverse does: 0 where P is not positive
    pseudo_inverse: bool = False


@dataclass(frozen=True)
class Numbers:
    root: Root | None = None  # the elementwise P; None: no preconditioner
    matrix: Root | None = None  # Kronecker: the whole product's; K-FAC: each factor's; dense
    # (buffer, beta, exponent, switch) of bias corrections; switch: the hyperparameter of
    # bias_corrected(flag) ("" when always on)
    counts: tuple[tuple[str, str, str, str], ...] = ()
    notes: tuple[str, ...] = ()  # what a symbol in the exponents stands for
    not_compiled: str | None = None  # why curvc refuses the spec (then read from the IR)
    # Kronecker by Newton-Schulz: its arguments as text (steps, a, b, c, eps, precision)
    polar: dict | None = None


_SYMBOLS = {"add": " + ", "sub": " - ", "mul": " * ", "div": "/", "pow": "^", "mod": " mod "}
_PRECEDENCE = {"add": 1, "sub": 1, "mul": 2, "div": 2, "mod": 2, "pow": 3,
               "maximum": 4, "minimum": 4}
_CALLS = {"maximum": "max", "minimum": "min"}  # rendered as calls: f(a, b)


_ARITHMETIC = {"add": float.__add__, "sub": float.__sub__, "mul": float.__mul__,
               "div": float.__truediv__, "pow": float.__pow__}


def _value(e: Expr) -> float | None:
    """The number a constant expression evaluates to; None if it reads a variable."""
    if isinstance(e, Const):
        return float(e.value)
    if isinstance(e, Op) and e.op in _ARITHMETIC:
        a, b = (_value(x) for x in e.args)
        if a is not None and b is not None and (b or e.op != "div"):
            return _ARITHMETIC[e.op](a, b)
    return None


def _fraction(v: float) -> str:
    """1/4 rather than 0.25: exponents read as the paper writes them."""
    f = Fraction(v).limit_denominator(64)
    return str(f) if f and abs(float(f) - v) <= 1e-12 * abs(v) else f"{v:g}"


class _PlanText:
    """Host expressions of a plan as math text, its generated scalars inlined."""

    def __init__(self, plan: Plan):
        self.host = dict(plan.host)
        self.names = {"step": "t"}
        for h in plan.hypers:
            if isinstance(h.default, tuple):
                self.names.update({f"{h.name}_{i}": f"{h.name}[{i}]"
                                   for i in range(len(h.default))})

    def inline(self, e: Expr) -> Expr:
        if isinstance(e, Scalar) and e.name in self.host:
            return self.inline(self.host[e.name])
        if isinstance(e, Op):
            return Op(e.op, tuple(self.inline(a) for a in e.args))
        return e

    def __call__(self, e: Expr, exponent: bool = False) -> str | None:
        """The text of e; None for a zero (an eps that is not there)."""
        e = self.inline(e)
        return None if _value(e) == 0 else self._render(e, exponent)

    def _render(self, e: Expr, exponent: bool) -> str:
        v = _value(e)
        if v is not None:
            return _fraction(v) if exponent else f"{v:g}"
        if isinstance(e, Scalar):
            return self.names.get(e.name, e.name)
        if isinstance(e, Op) and e.op in _CALLS:
            a, b = (self._render(x, exponent) for x in e.args)
            return f"{_CALLS[e.op]}({a}, {b})"
        assert isinstance(e, Op) and e.op in _SYMBOLS, e
        a, b = (f"({self._render(x, exponent)})" if self._grouped(e.op, x, right)
                else self._render(x, exponent) for x, right in zip(e.args, (False, True)))
        return f"{a}{_SYMBOLS[e.op]}{b}"

    @staticmethod
    def _grouped(parent: str, child: Expr, right: bool) -> bool:
        """Whether a child needs parentheses (precedence, and - / ^ not associative)."""
        if not isinstance(child, Op) or _value(child) is not None:
            return False
        p, c = _PRECEDENCE[parent], _PRECEDENCE[child.op]
        return c < p or (c == p and (right or parent == "pow"))


def _reads_tensor(e: Expr) -> bool:
    return any(isinstance(n, Load) for n in walk(e))


def _param_update(plan: Plan) -> Expr:
    return next(st.value for st in plan.stores if st.target == "param")


def _elementwise_root(plan: Plan, text: _PlanText) -> Root | None:
    """P read off the step: the tensor the (preconditioned) update is divided by."""
    # the outermost such division (walk yields children first): a spec's own arithmetic
    # inside the momentum (NAdam's mu_next / (1 - mu_product mu_next)) comes before it
    division = next((n for n in reversed(list(walk(_param_update(plan)))) if isinstance(n, Op)
                     and n.op in ("div", "div_or_zero") and _reads_tensor(n.args[1])), None)
    if division is None:
        return None
    p = division.args[1]
    after = floor = inside = exponent = None
    if isinstance(p, Op) and p.op in ("add", "maximum") and not _reads_tensor(p.args[1]):
        after, floor = (text(p.args[1]), None) if p.op == "add" else (None, text(p.args[1]))
        p = p.args[0]
    if isinstance(p, Op) and p.op == "sqrt":
        exponent, p = "1/2", p.args[0]
    elif isinstance(p, Op) and p.op == "pow" and not _reads_tensor(p.args[1]):
        exponent, p = text(p.args[1], exponent=True) or "0", p.args[0]
    if exponent and isinstance(p, Op) and p.op == "add" and not _reads_tensor(p.args[1]):
        inside = text(p.args[1])
    return Root(exponent, inside, after, floor, division.op == "div_or_zero")


def _dense_exponent(st: DenseStage) -> Expr:
    # curvc.runtime.dense takes these roots of the eigenvalues for each length
    return {"gradient_norm": Op("div", (st.power, Const(2.0))),
            "eigen_sign": Const(0.5)}.get(st.length, Const(1.0))


def _matrix_root(plan: Plan, text: _PlanText) -> Root | None:
    if plan.dense is not None:
        st = plan.dense
        return Root(text(_dense_exponent(st), exponent=True) or "0", text(st.eps_inside),
                    text(st.eps_after))
    if plan.estimator is not None and plan.estimator.kind == "kfac":
        # curvc.runtime.kfac: f(F) = ((F + damping I)^exponent + damping_after I)^-1
        args = dict(plan.estimator.args)
        return Root(text(args["exponent"], exponent=True) or "0", text(args["damping"]),
                    text(args["damping_after"]))
    node = next((n for n in walk(_param_update(plan)) if isinstance(n, Precondition)), None)
    if node is None:
        return None
    args = dict(zip(plan.stage(node.stage).params, node.args[2:]))
    if "exponent" not in args:  # the polar factor: the product's root 1/2, 1/4 per factor
        return Root("1/2")
    return Root(text(args["exponent"], exponent=True) or "0", text(args["eps_inside"]),
                text(args["eps_after"]), text(args["floor"]))


def _polar(plan: Plan, text: _PlanText) -> dict | None:
    """A Newton-Schulz stage's arguments, as text."""
    node = next((n for n in walk(_param_update(plan)) if isinstance(n, Precondition)), None)
    stage = plan.stage(node.stage) if node is not None else None
    if stage is None or "exponent" in stage.params:
        return None
    out = {n: text(e) or "0" for n, e in zip(stage.params, node.args[2:])}
    return {**out, "precision": stage.precision}


def _bias_counts(plan: Plan, text: _PlanText):
    """(buffer, beta, exponent) for each bias correction 1 - beta^n the plan computes."""
    counts, notes = [], []
    for name, e in plan.host:
        for buffer in ("curvature", "momentum", "step_momentum"):
            if not name.startswith(f"{buffer}_bias_correction"):
                continue
            power, switch = e.args[1], ""  # 1 - beta^n
            while isinstance(power, Op) and power.op == "mul":
                power, cond = power.args
                if cond.args[1] == Const(0.0):  # bias_corrected(flag): beta^n (flag != 0)
                    switch = text(cond.args[0])
                else:  # ema_or_sum: beta^n (beta != 1)
                    notes.append(f"no correction at {text(power.args[0])} = 1, a sum")
            beta, n = power.args
            count = text(n)
            if count != "t":  # refreshed every k steps: the refreshes so far
                notes.append(f"r = {count}, the refreshes so far")
                count = "r"
            counts.append((buffer, text(beta), count, switch))
    return tuple(counts), tuple(notes)


def _kfac_counts(plan: Plan, text: _PlanText):
    """K-FAC's bias correction, 1 - beta^n, n counted per layer by curvc.runtime.kfac."""
    args = dict(plan.estimator.args)
    if not args["bias_corrected"]:
        return (), ()
    notes = ("n = the statistics steps of the layer so far",)
    if isinstance(args["bias_corrected"], Op):  # ema_or_sum: beta != 1
        notes += (f"no correction at {text(args['beta'])} = 1, a sum",)
    return (("curvature", text(args["beta"]), "n", ""),), notes


def plan_numbers(plan: Plan) -> Numbers:
    text = _PlanText(plan)
    counts, notes = _bias_counts(plan, text)
    if plan.estimator is not None and plan.estimator.kind == "kfac":
        counts, notes = _kfac_counts(plan, text)
    if plan.secant is not None:  # L-BFGS takes no root
        return Numbers()
    if (not plan.elementwise or plan.dense is not None
            or plan.estimator is not None and plan.estimator.kind == "kfac"):
        return Numbers(None, _matrix_root(plan, text), counts, notes, polar=_polar(plan, text))
    return Numbers(_elementwise_root(plan, text), None, counts, notes)


def _ir_exponent(opt: ir.Optimizer) -> str | None:
    """The root the length asks for, for a spec curvc does not compile."""
    ln = opt.length
    if ln.kind == "eigen_sign":
        return "1/2"
    if ln.kind != "gradient_norm":
        return None
    p = ln.power
    return _fraction(p.value / 2) if isinstance(p, ir.Const) else f"{p}/2"


def ir_numbers(opt: ir.Optimizer, why: str) -> Numbers:
    """The numbers a spec asks for, from the IR alone: for specs curvc does not compile."""
    d, c, it = opt.damping, opt.curvature, opt.iterate
    eps = str(d.eps) if d.kind != "none" else None
    counts = []
    def switch(flag) -> str:  # bias_corrected(flag)
        return str(flag) if isinstance(flag, ir.HyperRef) else ""
    if it.bias_corrected:
        counts.append(("curvature", str(it.beta), "t" if it.every is None else "r",
                       switch(it.bias_corrected)))
    if opt.momentum.bias_corrected:
        counts.append(("momentum", str(opt.momentum.beta), "t",
                       switch(opt.momentum.bias_corrected)))
    notes = ("r = the refreshes so far",) if it.bias_corrected and it.every is not None else ()
    exponent = _ir_exponent(opt)
    if opt.structure.kind in ("scalar", "diagonal"):
        root = None if c.kind == "constant" else Root(
            exponent, eps if d.kind == "inside" and exponent else None,
            eps if d.kind == "add" or (d.kind == "inside" and not exponent) else None,
            eps if d.kind == "floor" else None)
        return Numbers(root, None, tuple(counts), notes, why)
    matrix = Root(exponent or "1", eps if d.kind == "inside" else None, eps if d.kind == "add" else None)
    return Numbers(None, matrix, tuple(counts), notes, why)


def numbers(opt: ir.Optimizer, plan: Plan | None = None) -> Numbers:
    """The plan's numbers, lowering the spec when no plan is given."""
    if plan is None:
        try:
            plan = lower_mod.lower(opt)
        except CurvError as e:
            if e.key != "codegen.unsupported":
                raise
            return ir_numbers(opt, f"{e.fields['what']}: {e.fields['why']}")
    return plan_numbers(plan)
