"""Lowering of the structures that are not elementwise: each an extern stage between
the fused kernels (curvc.plan's KroneckerStage, PolarStage, FactoredStage), or an input
the runtime computes before them (K-FAC's natural gradient, the dense root's step), or
the secant history. The elementwise axes they share (clip, curvature, normalization)
live in curvc.lower, which calls these from ``build``.
"""
from __future__ import annotations

from curvc import ir, lower as axes, lower_graft as blocks
from curvc.fold import div, op
from curvc.lower_step import Step, accumulation, ema_bias_correction, every_flag, iterate_beta
from curvc.plan import (Const, DenseStage, Estimator, Expr, FactoredStage, KroneckerStage, Load,
                        PolarStage, Precondition, Select, SecantStage)
from curvc.rules import ROW_CURVATURES


def lower_kronecker(s: Step, g: Expr, m: Expr) -> Expr:
    """d = f(L_1 kron ... kron L_k) m, one factor per mode of each tensor (Shampoo).

    The factors accumulate the Gram matrices of the gradient's unfoldings (or hold
    this step's, for ``iterate instant``); their spectral function is refreshed
    every ``structure kronecker every k`` steps (every step without it) and reused
    in between. The length axis picks f: P^-power/2 for a gradient-norm length
    (Adam's square root, Shampoo's 1/4 on 2-D tensors), P^-1 for none and
    normalized (then divided by ||m||_P^-1, one global reduction), and P^-1/2 of
    the sign in the eigenbasis for eigen_sign.
    """
    st, it, ln, dmp = s.opt.structure, s.opt.iterate, s.opt.length, s.opt.damping
    if st.root == ir.Const("newton_schulz"):
        return axes.lower_clip(s, _lower_polar(s, m))
    if st.basis == ir.Const("eigen"):  # the diagonal pipeline in the factors' eigenbasis
        from curvc.lower_eigen import lower_eigenbasis
        return lower_eigenbasis(s, g, m, _length_exponent(s))
    accumulate_when = (every_flag(s, "refresh", it.every, it.delayed)
                       if it.every is not None else None)
    statistic = g
    if s.opt.curvature.of is not None:  # the Gram matrices of a named vector (Muon's momentum)
        statistic = s.exprs.lower(s.opt.curvature.of)
    if s.opt.curvature.kind in ROW_CURVATURES:
        # sampled gradients (the Fisher's per example, Gauss-Newton-Bartlett's per draw)
        # as a stack of rows: each factor is the Gram matrix of their unfoldings
        statistic = axes._lower_estimator(s, s.opt.curvature, rows=True)
    exponent = _length_exponent(s)
    eps = s.arg(dmp.eps) if dmp.kind != "none" else Const(0.0)
    correction = Const(1.0)
    if it.kind in ("ema", "ema_or_sum") and it.bias_corrected:
        correction = s.host_scalar("curvature_bias_correction", ema_bias_correction(s))
    params = {
        "beta": iterate_beta(s)[0] if it.kind in ("ema", "power_ema", "ema_or_sum") else Const(0.0),
        "init": s.arg(it.init) if it.kind == "sum" and it.init is not None else Const(0.0),
        "exponent": exponent,
        "eps_inside": eps if dmp.kind == "inside" else Const(0.0),
        "eps_after": eps if dmp.kind == "add" else Const(0.0),
        "floor": eps if dmp.kind == "floor" else Const(0.0),
        "bias_correction": correction,
        "max_dim": s.arg(st.max_dim) if st.max_dim is not None else Const(float(2 ** 63)),
        # the blocked extern's (a factor_root other than 0 takes that path)
        "factor_root": s.arg(st.factor_root) if st.factor_root is not None else Const(0.0),
    }
    if blocks.needs_blocks(s.opt):  # merged or blocked dims, a graft (curvc.lower_graft)
        return blocks.lower_blocked(s, g, statistic, m, params, accumulate_when)
    refresh = every_flag(s, "refresh_roots", st.every) if st.every is not None else None
    stage = KroneckerStage(s.unique("kronecker"), "kronecker", "pre_cond", "inv_pre_cond",
                           accumulation(it.kind), accumulate_when, refresh, per_mode=True,
                           length="eigen_sign" if ln.kind == "eigen_sign" else "root")
    s.matrix.append(stage)
    u = Precondition("precondition", (statistic, m, *(params[n] for n in stage.params)),
                     stage=stage.name)
    if ln.kind == "normalized":
        u = axes._normalized(s, m, u)
    return axes.lower_clip(s, u)


def _lower_polar(s: Step, m: Expr) -> Expr:
    """d = U V^T of m = U S V^T by the Newton-Schulz iteration (Muon): what the
    eigendecomposition path computes where check admits the root (iterate instant, a
    gradient-norm length of power 1, no damping, the statistic m itself), so m is both
    the statistic and the value."""
    st = s.opt.structure
    stage = PolarStage(s.unique("polar"), str(st.precision.value))
    s.matrix.append(stage)
    return Precondition("precondition", (m, m, *(s.arg(getattr(st, n)) for n in stage.params)),
                        stage=stage.name)


def _length_exponent(s: Step) -> Expr:
    """e of a matrix stage's P^-e: power/2 for gradient_norm, 1/2 for eigen_sign, else 1."""
    ln = s.opt.length
    if ln.kind == "gradient_norm":
        return div(s.arg(ln.power), 2.0)
    return Const(0.5) if ln.kind == "eigen_sign" else Const(1.0)


def lower_factored(s: Step, g: Expr, m: Expr) -> Expr:
    """d = f(V) m per tensor, V the diagonal from the estimate's row and column means
    (Adafactor; curvc.plan.FactoredStage, run by curvc.runtime.matrix.factored).

    The means are reductions along one axis, so the stage is an extern between the head
    kernel (the estimate c, weight decay, momentum) and the tail (normalization, clip,
    the parameter). The extern also takes the per-tensor norms a spec asks for: the
    RMS clip of the step and the relative step's RMS(theta), in order (elsewhere they
    are the plan's tensor-scope reductions, ``lower._rms``).
    """
    it, ln, dmp, clip, sch = (s.opt.iterate, s.opt.length, s.opt.damping, s.opt.clip,
                              s.opt.schedule)
    when = every_flag(s, "refresh", it.every, it.delayed) if it.every is not None else None
    c = axes.lower_curvature(s, g)
    # not accumulated on this step: the temporary holds the gradient, never read
    statistic = c if when is None else Select(when, c, Load("grad"))
    eps = s.arg(dmp.eps) if dmp.kind != "none" else Const(0.0)
    beta, weight = Const(0.0), Const(1.0)
    if it.kind in ("ema", "power_ema", "ema_or_sum"):  # ema_or_sum at beta = 1: 1 and 1, a sum
        beta, weight = iterate_beta(s)
    correction = Const(1.0)
    if it.kind in ("ema", "ema_or_sum") and it.bias_corrected:
        correction = s.host_scalar("curvature_bias_correction", ema_bias_correction(s))
    params = {
        "beta": beta,
        "weight": weight,
        "init": s.arg(it.init) if it.kind == "sum" and it.init is not None else Const(0.0),
        "exponent": _length_exponent(s),
        "eps_inside": eps if dmp.kind == "inside" else Const(0.0),
        "eps_after": eps if dmp.kind == "add" else Const(0.0),
        "floor": eps if dmp.kind == "floor" else Const(0.0),
        "eps": s.arg(s.opt.structure.eps) if s.opt.structure.eps is not None else Const(0.0),
        "bias_correction": correction,
        "clip": s.arg(clip.threshold) if clip.kind == "tensor_rms" else Const(0.0),
        "scale_eps": s.arg(sch.eps) if sch.kind == "relative_step" else Const(0.0),
    }
    stage = FactoredStage(s.unique("factored"), accumulation(it.kind), when,
                          "eigen_sign" if ln.kind == "eigen_sign" else "root",
                          clipped=clip.kind == "tensor_rms",
                          relative=sch.kind == "relative_step")
    s.matrix.append(stage)
    u = Precondition("precondition", (statistic, m, *(params[n] for n in stage.params)),
                     stage=stage.name)
    if ln.kind == "normalized":
        u = axes._normalized(s, m, u)
    return u if clip.kind == "tensor_rms" else axes.lower_clip(s, u)


def lower_kfac(s: Step) -> Expr:
    """g <- f(S) G f(A) per layer (curvc.runtime.kfac), from the layer's input and
    output-gradient factors A and S; the rest of the step is elementwise on it.

    The length and damping axes fix f, the same for both factors: (F + eps I)^-1 for
    length none and normalized (the natural gradient F^-1 g), (F + eps I)^(-power/2)
    for gradient_norm (Shampoo's root: K-FAC <-> Shampoo), and the eigenbasis sign
    step with (lambda + eps)^(-1/2) for eigen_sign; damping add puts eps after the
    root, (F^e + eps I)^-1, and floor bounds it, max(F^e, eps)^-1 (roots.spectral).
    normalized divides by sqrt(g^T F^-1 g) over all
    parameters, here, as one reduction of the raw and the preconditioned gradient.
    """
    it, st, ln, dmp = s.opt.iterate, s.opt.structure, s.opt.length, s.opt.damping
    accumulate = every_flag(s, "refresh", it.every, it.delayed) if it.every is not None else None
    invert = every_flag(s, "refresh_roots", st.every) if st.every is not None else None
    eps = s.arg(dmp.eps) if dmp.kind != "none" else Const(0.0)
    exponent = Const(0.5) if ln.kind == "eigen_sign" else Const(1.0)
    if ln.kind == "gradient_norm":
        exponent = div(s.arg(ln.power), 2.0)
    beta = weight = Const(0.0)
    if it.kind in ("ema", "power_ema", "ema_or_sum"):  # power_ema: beta_t of the steps so far
        beta, weight = iterate_beta(s)
    corrected = bool(it.bias_corrected)
    if it.kind == "ema_or_sum" and corrected:  # a sum (beta = 1) has no zero start to undo
        corrected = op("ne", beta, 1.0)
        corrected = bool(corrected.value) if isinstance(corrected, Const) else corrected
    args = (("beta", beta),
            ("damping", eps if dmp.kind == "inside" else Const(0.0)),
            ("accumulate", accumulate), ("invert", invert),
            ("iterate", accumulation(it.kind)),
            ("init", s.arg(it.init) if it.kind == "sum" and it.init is not None else Const(0.0)),
            ("bias_corrected", corrected),
            ("exponent", exponent),
            ("damping_after", eps if dmp.kind == "add" else Const(0.0)),
            ("floor", eps if dmp.kind == "floor" else Const(0.0)),
            ("sign", ln.kind == "eigen_sign"))
    if it.kind == "ema_or_sum":
        # ema(beta) below 1 (K-FAC's start I, 0 when bias-corrected); at 1 the sum from 0,
        # as `iterate sum`: this batch's weight 1 - beta there, 1 here
        start = Const(0.0) if it.bias_corrected else op("ne", beta, 1.0)
        args += (("weight", weight), ("start", start))
    elif it.kind == "power_ema":  # beta_1 = 0: the first batch's factor alone, no start
        args += (("start", Const(0.0)),)
    natural = s.input("natural_gradient")
    s.estimator = Estimator("kfac", natural.name, args, scope="layer")
    if ln.kind == "normalized":  # d = F^-1 g / sqrt(g^T F^-1 g)
        natural = axes._normalized(s, Load("grad"), natural)
    return Select("maximize", op("neg", natural), natural)


def lower_dense(s: Step) -> tuple[DenseStage, Expr]:
    """g <- d = root(C)^-1 g over all parameters as one vector (curvc.runtime.dense: the
    matrix C, its accumulation and the length), as the rest of the step's gradient: the
    elementwise axes (decay, momentum, clip, lr) apply to d as to K-FAC's natural
    gradient. Returns the stage and d."""
    opt = s.opt
    it, ln, dmp = opt.iterate, opt.length, opt.damping
    refresh = every_flag(s, "refresh", it.every, it.delayed) if it.every is not None else None
    eps = s.arg(dmp.eps) if dmp.kind != "none" else Const(0.0)
    c = opt.curvature
    # C <- beta C + weight c, the elementwise iterate's math on the matrix: power_ema's
    # beta_t, ema_or_sum's weight 1 at beta = 1 (the sum), host values of the step
    beta, weight = (iterate_beta(s) if it.kind in ("ema", "power_ema", "ema_or_sum")
                    else (Const(0.0), Const(0.0)))
    correction = Const(1.0)
    if it.kind in ("ema", "ema_or_sum") and it.bias_corrected:
        correction = s.host_scalar("curvature_bias_correction", ema_bias_correction(s))
    stage = DenseStage(
        c.kind, accumulation(it.kind), refresh, ln.kind,
        samples=s.arg(c.samples) if c.samples is not None else Const(1.0),
        beta=beta, weight=weight, bias_correction=correction,
        init=s.arg(it.init) if it.kind == "sum" and it.init is not None else Const(0.0),
        eps_inside=eps if dmp.kind == "inside" else Const(0.0),
        eps_after=eps if dmp.kind == "add" else Const(0.0),
        power=s.arg(ln.power) if ln.kind == "gradient_norm" else Const(1.0),
        clip=s.arg(opt.clip.threshold) if opt.clip.kind == "length" else Const(0.0))
    d = s.input("preconditioned")  # computed on the raw gradient: d is odd in g
    return stage, Select("maximize", op("neg", d), d)


def lower_secant(opt: ir.Optimizer) -> SecantStage:
    s = Step(opt)
    it = opt.iterate
    clip = s.arg(opt.clip.threshold) if opt.clip.kind == "global_norm" else Const(0.0)
    rms = s.arg(opt.clip.threshold) if opt.clip.kind == "tensor_rms" else Const(0.0)
    return SecantStage(s.arg(it.history), s.arg(it.iterations), s.arg(it.tolerance_grad),
                       s.arg(it.tolerance_change), opt.length.kind == "normalized", clip, rms)
