"""The builder lowering writes a plan with: a scratchpad of names, buffers, flags and
stores (``Step``), and the small rules every axis lowering shares (a static or flagged
choice, an every-k flag, the count of refreshes)."""
from __future__ import annotations

from dataclasses import dataclass, field

from curvc import ir
from curvc.fold import add, div, mul, op, sub
from curvc.plan import Buffer, Const, Estimator, Expr, Load, Scalar, Select, Store, \
    flat_hyper_names


@dataclass
class Step:
    """Mutable scratchpad used while lowering one optimizer; frozen into a Plan."""

    opt: ir.Optimizer
    buffers: list = field(default_factory=list)
    inputs: list = field(default_factory=list)
    estimator: Estimator | None = None
    host: list = field(default_factory=list)
    flags: list = field(default_factory=list)
    reductions: list = field(default_factory=list)
    stores: list = field(default_factory=list)
    matrix: list = field(default_factory=list)
    used: set = field(default_factory=set)
    flag_names: dict = field(default_factory=dict)
    exprs: object = None  # curvc.lower_exprs.Expressions: the spec's lets and states

    def unique(self, base: str) -> str:
        """A name for a generated value that no hyperparameter (or other value) uses.

        Hyperparameters, buffers, flags and host scalars share the generated
        functions' namespace, so a hyperparameter called ``first_step`` must
        not be mistaken for the flag of that name.
        """
        taken = set(flat_hyper_names(self.opt.hypers)) | self.used
        name, i = base, 2
        while name in taken:
            name, i = f"{base}{i}", i + 1
        self.used.add(name)
        return name

    def arg(self, a: ir.Arg | None) -> Expr:
        """An IR argument as a host expression."""
        if isinstance(a, ir.HyperRef):
            return Scalar(a.name if a.index is None else f"{a.name}_{a.index}")
        assert isinstance(a, ir.Const) and not isinstance(a.value, str), a
        return Const(float(a.value))

    def flag(self, base: str, expr: Expr) -> str:
        if base not in self.flag_names:
            name = self.flag_names[base] = self.unique(base)
            self.flags.append((name, expr))
        return self.flag_names[base]

    def bool_arg(self, name: str, a: ir.Arg) -> str | bool:
        """A boolean argument: a flag if it names a hyperparameter, else its value."""
        if isinstance(a, ir.HyperRef):
            return self.flag(name, op("ne", self.arg(a), 0.0))
        return bool(a.value)

    def host_scalar(self, base: str, expr: Expr) -> Scalar:
        name = self.unique(base)
        self.host.append((name, expr))
        return Scalar(name)

    def buffer(self, base: str, init: Expr = Const(0.0), when: str | None = None) -> Load:
        name = self.unique(base)
        self.buffers.append(Buffer(name, init, when))
        return Load(name)

    def input(self, base: str) -> Load:
        name = self.unique(base)
        self.inputs.append(name)
        return Load(name)

    def store(self, target: str, value: Expr, when: str | None = None) -> None:
        self.stores.append(Store(target, value, when))


def select(flag: str | bool, then: Expr, other: Expr) -> Expr:
    if then == other:
        return then
    if isinstance(flag, bool):
        return then if flag else other
    return Select(flag, then, other)


def nonzero(step: Step, name: str, a: ir.Arg) -> str | bool:
    """Whether an EMA/momentum coefficient is in use: a flag when it is a hyperparameter."""
    if isinstance(a, ir.HyperRef):
        return step.flag(name, op("ne", step.arg(a), 0.0))
    return float(a.value) != 0.0


def every_flag(s: Step, name: str, every: ir.Arg, delayed: bool = False) -> str:
    """A flag true on steps 1, k+1, 2k+1, ... (k+1, 2k+1, ... when delayed)."""
    done = sub(Scalar("step"), 1.0)
    due = op("eq", op("mod", done, s.arg(every)), 0.0)
    if delayed:
        due = op("and", due, op("gt", done, 0.0))
    return s.flag(name, due)


def refresh_count(s: Step, every: ir.Arg | None, delayed: bool = False) -> Expr:
    """How many times the curvature has been accumulated by this step (for bias correction
    and power_ema's t): on steps 1, k+1, 2k+1, ..., or k+1, 2k+1, ... when delayed (then at
    least 1: before the first accumulation the zero start is divided by 1 - beta, not 0)."""
    if every is None:
        return Scalar("step")
    k = s.arg(every)
    done = sub(Scalar("step"), 1.0)
    whole = div(sub(done, op("mod", done, k)), k)
    return s.host_scalar("refreshes", op("maximum", whole, 1.0) if delayed else add(whole, 1.0))


def iterate_beta(s: Step) -> tuple[Expr, Expr]:
    """(beta, 1 - beta) of the curvature EMA this step: the spec's for ``ema``; for
    ``power_ema`` 1 - beta = t^decay itself (t the refreshes so far, so beta_1 = 0: the
    first estimate replaces the zero start), not 1 - (1 - t^decay)."""
    it = s.opt.iterate
    if it.kind == "power_ema":
        weight = s.host_scalar("curvature_weight",
                               op("pow", refresh_count(s, it.every, it.delayed), s.arg(it.decay)))
        return sub(1.0, weight), weight
    beta = s.arg(it.beta)
    if it.kind == "ema_or_sum":  # weight 1 at beta = 1: the sum
        return beta, sub(1.0, mul(beta, op("ne", beta, 1.0)))
    return beta, sub(1.0, beta)


def ema_bias_correction(s: Step) -> Expr:
    """1 - beta^n of a bias-corrected EMA iterate, n its refreshes so far; 1 for
    ``ema_or_sum`` at beta = 1 (a sum has no zero start to undo)."""
    it = s.opt.iterate
    power = op("pow", s.arg(it.beta), refresh_count(s, it.every, it.delayed))
    if it.kind == "ema_or_sum":
        power = mul(power, op("ne", s.arg(it.beta), 1.0))
    return bias_correction(s, power, it.bias_corrected)


def bias_correction(s: Step, power: Expr, switch: bool | ir.HyperRef) -> Expr:
    """1 - power (power = beta^n); under ``bias_corrected(flag)``, 1 - power * (flag != 0):
    a host value, 1 (no correction) on the steps the flag is off, so no recompile."""
    if isinstance(switch, ir.HyperRef):
        power = mul(power, op("ne", s.arg(switch), 0.0))
    return sub(1.0, power)


def accumulation(kind: str) -> str:
    """How a matrix stage accumulates for an iterate form: a step-dependent beta is an EMA."""
    return "ema" if kind in ("power_ema", "ema_or_sum") else kind
