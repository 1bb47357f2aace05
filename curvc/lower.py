"""Lowering: IR -> Plan.

The step is built axis by axis, in the order the math composes, each axis a
small named function (``lower_decay``, ``lower_curvature``, ...). Then
the named passes of ``curvc.passes`` rewrite the plan (``PASSES``):
hoisting scalar-only arithmetic to the host, guarding every store by the
runtime's skip flag, then verifying that every name is defined. Backends
only ever see the result.
"""
from __future__ import annotations

from typing import Callable

from curvc import check as checks, ir, lower_graft as grafting, lower_matrix as matrix, rules
from curvc.fold import add, div, mul, op, sub
from curvc.lower_exprs import Expressions
from curvc.lower_step import (Step, bias_correction, ema_bias_correction, every_flag,
                              iterate_beta, nonzero, select)
from curvc.passes import PASSES
from curvc.plan import (Const, Estimator, Expr, Load, Plan, Reduced, Reduction, Scalar, SHAPE,
                        Select, Validator)
from curvc.rules import (DENSE_STRUCTURES, FACTORED_STRUCTURES, MATRIX_STRUCTURES,
                         PRECONDITIONING_CURVATURES, SECANT_STRUCTURES)


# --- axes, in the order the step composes them -----------------------------

def lower_gradient(s: Step) -> Expr:
    return Select("maximize", op("neg", Load("grad")), Load("grad"))


def lower_decay(s: Step, g: Expr, lr: Expr) -> tuple[Expr, Expr, Callable | None]:
    """Returns (gradient, parameter, join) after weight decay. ``join(d)`` is the step d
    with decoupled decay's wd * theta added, when a momentum of the step (``on = step``)
    follows: the term joins d before that momentum (Distributed Shampoo's order), and the
    parameter is not scaled by 1 - lr * wd; else None. Where decay is off or coupled,
    join(d) is d itself, so no zero term is added on every step."""
    d, p = s.opt.decay, Load("param")
    if d.kind == "none":
        return g, p, None
    # A zero rate (the usual default) skips the term rather than adding 0 * theta.
    used = nonzero(s, "has_weight_decay", d.rate)
    into_step = s.opt.step_momentum.kind != "none"
    coupled = (add(g, mul(p, s.arg(d.rate))), p)
    fixed = s.bool_arg("decay_fixed", d.fixed) if d.fixed is not None else False
    decoupled = (g, p, mul(p, s.arg(d.rate))) if into_step else \
        (g, select(fixed, mul(p, sub(1.0, s.arg(d.rate))),
                   mul(p, sub(1.0, mul(lr, s.arg(d.rate))))))
    switch: str | bool = d.kind == "decoupled"
    if d.kind == "l2" and d.decoupled is not None:
        switch = s.bool_arg("decoupled_decay", d.decoupled)
    new = [select(used, select(switch, a, b), old)
           for a, b, old in zip(decoupled[:2], coupled[:2], (g, p))]

    def join(step: Expr) -> Expr:
        return select(used, select(switch, add(step, decoupled[2]), step), step)
    return new[0], new[1], join if into_step else None


def lower_curvature(s: Step, g: Expr) -> Expr | None:
    """The per-step curvature estimate c (None for a constant curvature)."""
    c = s.opt.curvature
    if c.kind == "constant":
        return None
    if c.kind == "expression":
        est = s.exprs.lower(c.value)
    elif c.kind == "empirical_fisher":
        x = s.exprs.lower(c.of) if c.of is not None else g
        est = mul(x, x)
    else:
        est = _lower_estimator(s, c)
    if c.squared:
        est = mul(est, est)
    if c.scale is not None:
        est = mul(est, s.arg(c.scale))
    return est


def _lower_estimator(s: Step, c: ir.Curvature, rows: bool = False) -> Expr:
    """The estimate a runtime estimator provides, held between refreshes if asked;
    ``rows``: as a stack of sampled gradients (Kronecker factors' statistic), scaled
    by the runtime."""
    it = s.opt.iterate
    if c.every is not None:
        when = every_flag(s, "estimate", c.every)
    elif it.every is not None:  # only the refresh steps read the estimate
        when = every_flag(s, "refresh", it.every, it.delayed)
    else:
        when = None
    args = []
    for name in ("samples", "distribution", "spatial_average"):
        a = getattr(c, name)
        if a is None:
            continue
        if isinstance(a, ir.Const) and isinstance(a.value, (str, bool)):
            args.append((name, a.value))
        else:
            args.append((name, s.arg(a)))
    if rows and c.scale is not None:
        args.append(("scale", s.arg(c.scale)))
    fresh = s.input("curvature_estimate")
    s.estimator = Estimator(f"{c.kind}_rows" if rows else c.kind, fresh.name, tuple(args), when)
    if c.every is None:
        return fresh
    held = s.buffer("curvature")
    s.store(held.name, fresh, when=when)
    return Select(when, fresh, held)


def _buffer_name(s: Step, role: str) -> str:
    # Names follow torch.optim and pytorch-optimizer so checkpoints read alike.
    if role == "momentum":
        return "momentum_buffer" if s.opt.momentum.kind == "heavy_ball" else "exp_avg"
    it, c = s.opt.iterate, s.opt.curvature
    if it.kind == "sum":
        return "sum"
    ema = it.kind in ("ema", "power_ema", "ema_or_sum")
    if ema and (c.kind == "empirical_fisher" or c.squared):
        return "exp_avg_sq"
    return "hessian" if ema else "curvature"


def lower_iterate(s: Step, c: Expr | None) -> Expr | None:
    """The accumulated curvature C, bias-corrected if asked."""
    it = s.opt.iterate
    if c is None:
        return None
    refresh: str | bool = True
    if it.every is not None:
        refresh = every_flag(s, "refresh", it.every, it.delayed)
    name = _buffer_name(s, "curvature")
    if it.kind == "instant":
        if refresh is True:
            return c
        old = s.buffer(name)
        s.store(old.name, c, when=refresh)
        return select(refresh, c, old)
    if it.kind in ("ema", "power_ema", "ema_or_sum"):
        old = s.buffer(name)
        name = old.name
        beta, weight = iterate_beta(s)
        new = add(mul(old, beta), mul(c, weight))
    elif it.kind == "sum":
        old = s.buffer(name, init=s.arg(it.init))
        name = old.name
        new = add(old, c)
    else:
        raise AssertionError(it.kind)
    s.store(name, new, when=None if refresh is True else refresh)
    acc = select(refresh, new, old)
    if it.keep_max is not None:
        keep = s.bool_arg("keep_max", it.keep_max)
        if keep is not False:
            prev = s.buffer("max_" + name, when=keep if isinstance(keep, str) else None)
            peak = op("maximum", prev, acc)
            s.store(prev.name, peak, when=keep if isinstance(keep, str) else None)
            acc = select(keep, peak, acc)
    if it.bias_corrected:
        acc = div(acc, s.host_scalar("curvature_bias_correction", ema_bias_correction(s)))
    return acc


def _lerp(s: Step, a: Expr, b: Expr, w: Expr) -> Expr:
    """torch.lerp(a, b, w) for a host weight w: torch's own formula (a + w(b - a) for
    |w| < 0.5, else b - (b - a)(1 - w), each exact at its end), so the moving average
    is bitwise torch's, and one foreach op on the eager path."""
    return op("lerp", a, b, w)


def lower_momentum(s: Step, g: Expr, m: ir.Momentum | None = None) -> Expr:
    """The momentum of g (``m``: the spec's momentum clause, or its step momentum, whose
    buffer is named ``step_`` + the same name and whose g is the finished step)."""
    m = s.opt.momentum if m is None else m
    if m.kind == "none":
        return g
    if m.kind == "expression":
        return s.exprs.lower(m.value)
    name = _buffer_name(s, "momentum")
    if m.on_step:
        name = "step_" + ("momentum_buffer" if m.kind == "heavy_ball" else "exp_avg")
    beta = s.arg(m.beta)
    used = nonzero(s, "has_" + name, m.beta)
    when = used if isinstance(used, str) else None
    old = s.buffer(name, when=when)
    name = old.name
    if m.kind == "ema":
        new = _lerp(s, old, g, sub(1.0, beta))
        s.store(name, new, when=when)
        out = new
        if m.bias_corrected:
            base = "step_momentum_bias_correction" if m.on_step else "momentum_bias_correction"
            out = div(new, s.host_scalar(base, bias_correction(
                s, op("pow", beta, Scalar("step")), m.bias_corrected)))
    else:  # heavy_ball, torch.optim.SGD's convention: the buffer starts at g
        first = s.flag("first_step", op("eq", Scalar("step"), 1.0))
        new = Select(first, g, add(mul(old, beta), mul(g, sub(1.0, s.arg(m.dampening)))))
        s.store(name, new, when=when)
        nesterov = s.bool_arg("nesterov", m.nesterov) if m.nesterov is not None else False
        out = select(nesterov, add(g, mul(new, beta)), new)
    return select(used, out, g)


def lower_preconditioner(s: Step, acc: Expr | None, newton: bool = False) -> Expr | None:
    """P, the (damped, rooted) curvature that divides the step; None for the identity.
    ``newton``: the curvature damped but not rooted, as `length none` takes it."""
    if acc is None:
        return None
    ln, dmp = s.opt.length, s.opt.damping
    eps = s.arg(dmp.eps) if dmp.kind != "none" else None

    def root(x):
        if newton or ln.kind in ("none", "normalized"):
            return x
        if ln.kind == "eigen_sign":
            return op("sqrt", x)
        power = s.arg(ln.power)
        if power == Const(1.0):
            return op("sqrt", x)
        return op("pow", x, div(power, 2.0))

    if dmp.kind == "inside":
        p = root(add(acc, eps))
    else:
        p = root(acc)
    if dmp.kind == "add":
        p = add(p, eps)
    elif dmp.kind == "floor":
        p = op("maximum", p, eps)
    return p


def lower_direction(s: Step, m: Expr, precond: Expr | None, newton: bool = False) -> Expr:
    ln = ir.Length("none") if newton else s.opt.length
    if ln.kind == "eigen_sign":
        u = op("sign", m)
    else:
        u = m
    if precond is not None and s.opt.damping.kind == "none":
        # the pseudo-inverse, as the matrix structures' spectral function takes it: an
        # undamped P that is not positive (a coordinate the curvature has not seen, an
        # instant g*g at g = 0) divides by nothing and gives 0, not 0/0
        u = op("div_or_zero", u, precond)
    elif precond is not None:
        u = div(u, precond)
    if ln.kind == "normalized":
        u = _normalized(s, m, u)
    return u


def _scope(a: ir.Arg | None) -> str:
    """A norm's scope (global | group | tensor); absent means global."""
    return "global" if a is None else str(a.value)


def _reduce(s: Step, base: str, value: Expr, scope: str) -> Reduced:
    """``value`` summed over the tensors of ``scope``: one reduction, read per tensor."""
    name = s.unique(base)
    s.reductions.append(Reduction(name, value, scope))
    return Reduced(name)


def _normalized(s: Step, m: Expr, u: Expr) -> Expr:
    """||d||_P = 1: d = u / sqrt(m^T u) for u = P^-1 m, m^T u summed over the length's scope
    (every tensor, a param group's, or each tensor's own; a zero norm gives a zero step).
    Every structure normalizes so."""
    norm_sq = _reduce(s, "norm_sq", mul(m, u), _scope(s.opt.length.scope))
    return op("div_or_zero", u, op("sqrt", norm_sq))


def lower_length_clip(s: Step, m: Expr, acc: Expr | None, d: Expr) -> Expr:
    """``clip length(C)``: the Newton step n = P^-1 m, each coordinate (the diagonal's
    eigenbasis) capped at C times the length's step d: sign(n) min(|n|, C |d|)."""
    n = lower_direction(s, m, lower_preconditioner(s, acc, newton=True), newton=True)
    cap = mul(s.arg(s.opt.clip.threshold), op("abs", d))
    return mul(op("sign", n), op("minimum", op("abs", n), cap))


def lower_clip(s: Step, d: Expr, clip: ir.Clip | None = None, base: str = "step_norm_sq") -> Expr:
    """d clamped to [-C, C], or scaled by min(1, C / ||d||) with ||d|| over the clip's scope."""
    clip = s.opt.clip if clip is None else clip
    if clip.kind == "elementwise":
        t = s.arg(clip.threshold)
        return op("maximum", op("minimum", d, t), op("neg", t))
    if clip.kind == "global_norm":
        return _global_norm_clip(s, d, clip, lambda: _reduce(s, base, mul(d, d),
                                                             _scope(clip.scope)))
    if clip.kind == "tensor_rms":  # d / max(1, RMS(d) / C), RMS over each tensor (Adafactor's)
        rms = _rms(s, base, d)
        return op("div", d, op("maximum", 1.0, div(rms, s.arg(clip.threshold))))
    return d


def _rms(s: Step, base: str, x: Expr) -> Expr:
    """sqrt(mean(x^2)) over each tensor: a tensor-scope reduction over its element count."""
    return op("sqrt", div(_reduce(s, base, mul(x, x), "tensor"), mul(_ROWS, _COLS)))


def lower_gradient_clip(s: Step, g: Expr) -> Expr:
    """``clip ...(on = gradient)``: g clipped before decay, curvature and momentum read it,
    as torch.nn.utils.clip_grad_norm_ (clip_grad_value_) on .grad before the step. The
    norm is the raw gradient's (ascending, g = -grad has the same norm)."""
    clip = s.opt.gradient_clip
    if clip.kind != "global_norm":
        return lower_clip(s, g, clip)
    return _global_norm_clip(s, g, clip, lambda: _reduce(
        s, "grad_norm_sq", mul(Load("grad"), Load("grad")), _scope(clip.scope)))


def _global_norm_clip(s: Step, x: Expr, clip: ir.Clip, norm_sq: Callable) -> Expr:
    """x * min(1, C / (||x|| + eps)); C = 0 (a hyperparameter's value, a flag) is no clip."""
    on = nonzero(s, "clips", clip.threshold)
    if on is False:
        return x
    norm = op("sqrt", norm_sq())
    if clip.eps not in (None, ir.Const(0.0)):
        norm = add(norm, s.arg(clip.eps))
    return select(on, mul(x, op("minimum", 1.0, op("div", s.arg(clip.threshold), norm))), x)


def lower_learning_rate(s: Step) -> Expr:
    sch = s.opt.schedule
    if sch.kind == "inverse_time":
        return s.host_scalar("lr_t", div(Scalar("lr"), add(1.0, mul(sub(Scalar("step"), 1.0),
                                                               s.arg(sch.rate)))))
    if sch.kind == "relative_step":  # rho_t; the stage multiplies in max(eps, RMS(theta))
        return s.host_scalar("lr_t", op("minimum", Scalar("lr"),
                                        div(1.0, op("sqrt", Scalar("step")))))
    return Scalar("lr")


# The tensor's shape as a matrix, read by the host like the step count (curvc.plan.SHAPE).
_ROWS, _COLS = Scalar(SHAPE[0]), Scalar(SHAPE[1])
# torch.optim.Muon's adjust_lr_fn, each a function of (rows, cols)
ADJUSTMENTS = {
    "none": Const(1.0),
    "original": op("sqrt", op("maximum", 1.0, div(_ROWS, _COLS))),
    "match_rms_adamw": mul(0.2, op("sqrt", op("maximum", _ROWS, _COLS))),
}


def lower_step_rate(s: Step, lr: Expr) -> Expr:
    """The step's rate: lr_t times the schedule's shape adjustment (decoupled decay keeps
    lr_t, as torch.optim.Muon's does). A word hyperparameter picks the adjustment at run
    time: it reaches the host as its index among the words, and each adjustment is
    weighted by (index == i), exactly one 1 and the rest 0."""
    sch = s.opt.schedule
    if sch.kind == "relative_step" and s.opt.structure.kind not in FACTORED_STRUCTURES:
        # alpha_t = rho_t max(eps, RMS(theta)), theta before decay (the factored extern
        # multiplies the same in itself)
        lr = mul(lr, op("maximum", s.arg(sch.eps), _rms(s, "param_norm_sq", Load("param"))))
    a = sch.adjust
    if a is None or a == ir.Const("none"):
        return lr
    if isinstance(a, ir.Const):
        return s.host_scalar("lr_step", mul(lr, ADJUSTMENTS[a.value]))
    words = s.opt.hyper(a.name).choices
    scale = None
    for i, word in enumerate(words):
        term = mul(op("eq", s.arg(a), float(i)), ADJUSTMENTS[word])
        scale = term if scale is None else add(scale, term)
    return s.host_scalar("lr_step", mul(lr, scale))


def build(opt: ir.Optimizer) -> Plan:
    """The axes composed into one step, before any pass runs."""
    rules.refuse_uncompiled(opt)
    validators = tuple(Validator(ref.name, ref.index, cons, where)
                       for ref, cons, where in checks.arg_constraints(opt))
    if opt.structure.kind in SECANT_STRUCTURES:
        return Plan(opt.name, opt.hypers, validators, (), (), (), (), (), (),
                    secant=matrix.lower_secant(opt))
    s = Step(opt)
    s.exprs = Expressions(s)
    lr = lower_learning_rate(s)
    dense = None
    natural = opt.curvature.kind in PRECONDITIONING_CURVATURES
    if opt.structure.kind in DENSE_STRUCTURES:
        dense, g = matrix.lower_dense(s)
    else:
        g = matrix.lower_kfac(s) if natural else lower_gradient_clip(s, lower_gradient(s))
    # the relative step's weight decay keeps lr (torch.optim.Adafactor's choice)
    g, p, decay_step = lower_decay(s, g, Scalar("lr") if opt.schedule.kind == "relative_step"
                                   else lr)
    s.exprs.env.update(grad=g, param=Load("param"))
    if dense is not None or natural:  # preconditioned, length taken, by the runtime already
        d = lower_clip(s, lower_momentum(s, g))
    elif opt.structure.kind in MATRIX_STRUCTURES:
        d = matrix.lower_kronecker(s, g, lower_momentum(s, g))
    elif opt.structure.kind in FACTORED_STRUCTURES:
        d = matrix.lower_factored(s, g, lower_momentum(s, g))
    else:
        acc = lower_iterate(s, lower_curvature(s, g))
        m = lower_momentum(s, g)
        d = lower_direction(s, m, lower_preconditioner(s, acc))
        # a graft's norm per tensor (curvc.lower_graft), before the clip
        d = grafting.grafted_per_tensor(s, d, grafting.graft_direction(s, g, m))
        d = lower_length_clip(s, m, acc, d) if opt.clip.kind == "length" else lower_clip(s, d)
    if opt.step_momentum.kind != "none":  # of the finished step, decoupled decay included
        if decay_step is not None:
            d = decay_step(d)
        d = lower_momentum(s, d, opt.step_momentum)
    s.exprs.env["direction"] = d
    update = s.exprs.lower(opt.update) if opt.update is not None else d
    s.exprs.finish()
    s.store("param", sub(p, mul(lower_step_rate(s, lr), update)))
    return Plan(opt.name, opt.hypers, validators, tuple(s.buffers), tuple(s.inputs),
                tuple(s.host), tuple(s.flags), tuple(s.reductions), tuple(s.stores),
                s.estimator, tuple(s.matrix), dense=dense)


def lower(opt: ir.Optimizer) -> Plan:
    plan = build(opt)
    for _, p in PASSES:
        plan = p(plan)
    return plan
