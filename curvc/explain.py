"""Human-readable views of a spec: its row of Table 1 and its update equations.

Both are derived (never typed per optimizer): the shape of each equation from
the IR, and every number lowering decides (roots and exponents, where eps
enters, what a bias correction counts) from the lowered plan, the same
object the code is generated from. So ``curvc table`` regenerates the
paper's Table 1 from the shipped specs and ``curvc explain`` prints the rule
the generated code implements. A spec curvc does not compile is explained
from its IR alone, and says so.
"""
from __future__ import annotations

from fractions import Fraction

from curvc import explain_exprs, explain_graft as graft, explain_matrix as matrix, ir
from curvc import lower as lower_mod
from curvc.plan import Plan
from curvc.plan_numbers import Numbers, Root, numbers

# The order of the paper's Table 1, for listing shipped specs.
PAPER_ORDER = ("Newton", "NGD", "NormalizedNGD", "GNNormalizedNGD", "EigenbasisNormalizedNGD",
               "SGD", "NormalizedGD", "SignGD", "LBFGS", "KFAC", "Shampoo", "Adam", "AdamW",
               "Adagrad", "AdaHessian", "Sophia")

TABLE_COLUMNS = ("Length Limitation", "Calculating Approximation", "Structure Approximation",
                 "Iterative Approximation")


def _half(e: str) -> str:
    """e/2 as text: Shampoo's per-factor exponent of a matrix whose product has root e."""
    try:
        return str(Fraction(e) / 2)
    except ValueError:
        return f"({e})/2"


def _approximate(opt: ir.Optimizer) -> bool:
    """Whether the step uses an approximation H' of H (the paper's primes)."""
    return not (opt.structure.kind == "dense" and opt.curvature.kind in ("hessian", "fisher"))


def table_row(opt: ir.Optimizer, plan: Plan | None = None) -> dict[str, str]:
    """The spec's cells under the paper's four columns ('' where the paper leaves a blank);
    ``plan``: the spec's lowered plan (lowered here when not given)."""
    h = "H'" if _approximate(opt) else "H"
    length = {
        "none": "",
        "gradient_norm": f"||d_i||_{h} = eps*g_i",
        "normalized": f"||d||_{h} = eps",
        "eigen_sign": f"||d_i||_{h} = eps",
    }[opt.length.kind]
    if opt.clip.kind == "length":  # the limit relaxed to a bound, C times the length's
        length = length.replace(" = eps", " <= C*eps")
    ca = {"constant": "", "hessian": "", "hutchinson": "", "secant": "",
          "expression": str(opt.curvature.value),
          "fisher": "F", "gauss_newton_bartlett": "F",
          "empirical_fisher": "F~", "kfac": "F~"}[opt.curvature.kind]
    s = opt.structure.kind
    if s == "kronecker" and opt.structure.basis == ir.Const("eigen"):
        sa = "diagonal in the eigenbasis of L (x) R"
    elif s == "kronecker":
        matrix = numbers(opt, plan).matrix
        x = _half(matrix.exponent) if matrix else None
        sa = f"L^-{x} g R^-{x}" if x and opt.curvature.kind != "kfac" else "block-diagonal"
    else:
        sa = {"scalar": "LI", "diagonal": "diagonal", "factored": "diagonal, R C^T / mean(R)",
              "dense": "", "low_rank": "rank-2 update"}[s]
    ia = []
    if opt.curvature.kind == "hutchinson":
        ia.append("Monte Carlo")
    if opt.iterate.kind == "secant":
        ia.append("iterative (secant assumption), last k")
    if opt.curvature.kind == "kfac":
        ia.append("a a^T (x) dL/ds dL/ds^T")
    if opt.iterate.kind == "sum":
        ia.append("sum")
    if opt.iterate.kind in ("ema", "power_ema", "ema_or_sum"):  # the paper: "momentum"
        ia.append("momentum")
    return dict(zip(TABLE_COLUMNS, (length, ca, sa, ", ".join(ia))))


_v = explain_exprs.arg_text


def equations(opt: ir.Optimizer, plan: Plan | None = None) -> list[str]:
    """The update rule, one assignment per line, in the order the step runs; its numbers
    from ``plan``, the spec's lowered plan (lowered here when not given)."""
    return explain_exprs.resolve_names(_equations(opt, plan))


def _equations(opt: ir.Optimizer, plan: Plan | None) -> list[str]:
    nums = numbers(opt, plan)
    eq: list[str] = []
    lr = "lr"
    if opt.schedule.kind == "inverse_time":
        eq.append(f"lr_t  = lr / (1 + (t-1) * {_v(opt.schedule.rate)})")
        lr = "lr_t"
    elif opt.schedule.kind == "relative_step":
        eq.append(f"lr_t  = min(lr, 1/sqrt(t)) * max({_v(opt.schedule.eps)}, RMS(theta))   "
                  "(RMS over each tensor, before this step)")
        lr = "lr_t"
    decay_lr = "lr" if opt.schedule.kind == "relative_step" else lr  # torch's Adafactor
    if opt.structure.kind == "low_rank":
        return matrix.low_rank(opt, lr)
    eq.append("g     = grad f(theta)            (negated when maximize=True)")
    eq += _clip(opt, opt.gradient_clip, "g")
    if opt.curvature.kind == "kfac":  # preconditioned first: decay and momentum follow
        eq += matrix.kfac_gradient(opt, nums)
    dec = opt.decay
    switch = dec.kind == "l2" and dec.decoupled is not None and dec.decoupled != ir.Const(False)
    # under a momentum of the step, decoupled decay joins the step (_step_momentum)
    into_step = opt.step_momentum.kind != "none"
    if dec.kind == "l2" and switch and dec.decoupled == ir.Const(True):
        if not into_step:
            eq.append(f"theta = theta * (1 - {_decay_rate(dec, decay_lr)})")
    elif dec.kind == "l2":
        if opt.structure.kind != "dense":  # the dense step adds it to d (see _dense)
            eq.append(f"g     = g + {_v(dec.rate)} * theta"
                      + (f"   (if not {_v(dec.decoupled)})" if switch else ""))
        if switch and not into_step:
            eq.append(f"theta = theta * (1 - {_decay_rate(dec, decay_lr)})   "
                      f"(if {_v(dec.decoupled)})")
    elif opt.decay.kind == "decoupled" and not into_step:
        eq.append(f"theta = theta * (1 - {_decay_rate(dec, decay_lr)})")
    lr = _adjusted(opt, lr, eq)
    eq += explain_exprs.definitions(opt, late=False)
    s = opt.structure.kind
    if s in ("scalar", "diagonal"):
        step = _elementwise(opt, lr, nums)
    elif s == "kronecker":
        step = matrix.kronecker(opt, lr, nums)
    elif s == "factored":
        step = _factored(opt, lr, nums)
    elif s == "dense":
        step = matrix.dense(opt, lr, nums)
    else:
        step = matrix.low_rank(opt, lr)
    # the last line is theta's update: the states that read d come before it
    eq += step[:-1] + _step_momentum(opt, nums) + explain_exprs.definitions(opt, late=True)
    eq.append(explain_exprs.update_line(opt, lr) or step[-1])
    return eq + [f"        ({note})" for note in nums.notes]


# The schedule's shape adjustments (curvc.lower.ADJUSTMENTS), for rows x cols
_ADJUSTED = {"original": "sqrt(max(1, rows/cols))", "match_rms_adamw": "0.2 sqrt(max(rows, cols))"}


def _adjusted(opt: ir.Optimizer, lr: str, eq: list[str]) -> str:
    """The step's rate: lr scaled by the tensor's shape, when the schedule adjusts it."""
    a = opt.schedule.adjust
    if a is None or a == ir.Const("none"):
        return lr
    shape = "        (rows x cols: the tensor as a matrix, shape[0] x the rest; a vector 1 x n)"
    if isinstance(a, ir.Const):
        eq += [f"lr_s  = {lr} * {_ADJUSTED[a.value]}   (per tensor; decay keeps {lr})", shape]
    else:
        eq.append(f"lr_s  = {lr} * s(rows, cols)   (per tensor; decay keeps {lr}), s by {a}:")
        eq.append("        " + ", ".join(f"{w}: {_ADJUSTED.get(w, '1')}"
                                         for w in opt.hyper(a.name).choices))
        eq.append(shape)
    return "lr_s"


def _bias_correction(nums: Numbers, buffer: str, name: str) -> list[str]:
    return [f"{name}     = {name} / (1 - {beta}^{n})" + (f"   (if {switch})" if switch else "")
            for b, beta, n, switch in nums.counts if b == buffer]


def _corrected(nums: Numbers, buffer: str, eq: list[str], name: str, value: str) -> str:
    """The value this step reads of a state: ``value`` divided by its bias correction, as
    ``name_hat``, so the state itself (the one the next step averages) stays uncorrected."""
    lines = [(beta, n, switch) for b, beta, n, switch in nums.counts if b == buffer]
    if not lines and value == name:
        return name
    hat = f"{name}_hat"
    for beta, n, switch in lines:
        grouped = f"({value})" if " " in value else value
        eq.append(f"{hat:<5} = {grouped} / (1 - {beta}^{n})"
                  + (f" if {switch} else {value}" if switch else ""))
        value = hat
    if not lines:
        eq.append(f"{hat:<5} = {value}")
    return hat


def _momentum(opt: ir.Optimizer, eq: list[str], nums: Numbers) -> str:
    m = opt.momentum
    if m.kind == "expression":
        eq.append(f"m     = {m.value}")
        return "m"
    if m.kind == "ema":
        eq.append(f"m     = {_v(m.beta)} * m + (1 - {_v(m.beta)}) * g")
        return _corrected(nums, "momentum", eq, "m", "m")
    if m.kind == "heavy_ball":
        damp = "" if m.dampening == ir.Const(0.0) else f"(1 - {_v(m.dampening)}) * "
        eq.append(f"b     = {_v(m.beta)} * b + {damp}g   (b = g at t = 1)")
        if m.nesterov is not None and not (isinstance(m.nesterov, ir.Const) and not m.nesterov.value):
            eq.append(f"m     = g + {_v(m.beta)} * b if {_v(m.nesterov)} else b")
            return "m"
        return "b"
    return "g"


def _step_momentum(opt: ir.Optimizer, nums: Numbers) -> list[str]:
    """``momentum ...(on = step)``: the finished step d (decoupled decay added to it first)
    averaged in M, Distributed Shampoo's momentum after preconditioning."""
    m = opt.step_momentum
    if m.kind == "none":
        return []
    dec, eq = opt.decay, []
    if dec.kind == "decoupled" or dec.kind == "l2" and dec.decoupled not in (None, ir.Const(False)):
        when = f"if {_v(dec.decoupled)}; " if isinstance(dec.decoupled, ir.HyperRef) else ""
        eq.append(f"d     = d + {_v(dec.rate)} * theta   ({when}decoupled decay joins the step)")
    beta = _v(m.beta)
    if m.kind == "ema":
        eq.append(f"M     = {beta} * M + (1 - {beta}) * d   (the momentum of the step)")
        eq += [line.replace("M     = M", "d     = M") for line in
               _bias_correction(nums, "step_momentum", "M")] or ["d     = M"]
        return eq
    damp = "" if m.dampening == ir.Const(0.0) else f"(1 - {_v(m.dampening)}) * "
    eq.append(f"M     = {beta} * M + {damp}d   (the momentum of the step; M = d at t = 1)")
    if m.nesterov is not None and m.nesterov != ir.Const(False):
        when = f" if {_v(m.nesterov)} else M" if isinstance(m.nesterov, ir.HyperRef) else ""
        eq.append(f"d     = d + {beta} * M{when}")
    else:
        eq.append("d     = M")
    return eq


def period(every, delayed: bool = False) -> str:
    """The steps a refresh every k steps runs on (lower_step.every_flag's)."""
    return f"when t - 1 is a {'positive ' if delayed else ''}multiple of {_v(every)}"


def _estimate(opt: ir.Optimizer) -> str:
    c = opt.curvature
    if c.kind == "expression":
        return str(c.value)
    est = {
        "empirical_fisher": f"{c.of} * {c.of}" if c.of is not None else "g * g",
        "hutchinson": "z * (H z),  z ~ " + (_v(c.distribution) if c.distribution else "rademacher")
                      + (f", mean of {_v(c.samples)} probes" if c.samples else ""),
        "gauss_newton_bartlett": "B * grad L(theta; y^ ~ softmax(logits))^2",
        "fisher": "E_{y ~ p(y|x)} [g_y * g_y]",
        "hessian": "diag(grad^2 f(theta))",
    }[c.kind]
    est = f"({est})^2" if c.squared else est
    if c.scale is not None and c.scale != ir.Const(1.0):
        est = f"{_v(c.scale)} * {est}"
    if c.every is not None:
        est += f"   (estimated {period(c.every)}, reused in between)"
    return est


def _accumulate(opt: ir.Optimizer, eq: list[str], new: str, name: str = "C",
                nums: Numbers = Numbers(), hat: bool = False) -> str:
    """The iterate's lines for state ``name`` averaging ``new``; returns the name the step
    reads (``hat``: the kept maximum and the bias correction as ``name_hat``, the state
    itself left as the next step averages it)."""
    it = opt.iterate
    every = ""
    if it.every is not None:
        every = f"   ({period(it.every, it.delayed)})"
    if it.kind == "ema":
        eq.append(f"{name}     = {_v(it.beta)} * {name} + (1 - {_v(it.beta)}) * {new}{every}")
    elif it.kind == "ema_or_sum":
        eq += graft.ema_or_sum(name, new, it.beta, every)
    elif it.kind == "power_ema":
        t = "t" if it.every is None else "r"
        eq.append(f"{name}     = beta_t * {name} + (1 - beta_t) * {new},   beta_t = 1 - "
                  f"{t}^{_v(it.decay)}{every}")
    elif it.kind == "sum":
        init = f", {name}_0 = {_v(it.init)}" if it.init is not None else ""
        eq.append(f"{name}     = {name} + {new}{every}{init.replace(', ', '   (') + ')' if init else ''}")
    else:
        eq.append(f"{name}     = {new}{every}")
    keep = it.keep_max is not None and not (isinstance(it.keep_max, ir.Const)
                                             and not it.keep_max.value)
    if hat:
        read = name
        if keep:
            always = isinstance(it.keep_max, ir.Const)
            eq.append(f"{name}_max = max({name}_max, {name})"
                      + ("" if always else f"   (only if {_v(it.keep_max)})"))
            read = f"{name}_max" if always else f"{name}_max if {_v(it.keep_max)} else {name}"
        return _corrected(nums, "curvature", eq, name, read)
    if keep:
        eq.append(f"{name}_max = max({name}_max, {name});  {name} = {name}_max   (only if {_v(it.keep_max)})")
    eq += _bias_correction(nums, "curvature", name)
    return name


def _preconditioner(root: Root, acc: str) -> str:
    """P as text: the accumulated curvature, rooted and damped as the plan does it."""
    inner = f"{acc} + {root.inside}" if root.inside else acc
    if root.exponent is None:
        p = inner
    elif root.exponent == "1/2":
        p = f"sqrt({inner})"
    else:
        p = f"({inner})^({root.exponent})" if root.inside else f"{inner}^({root.exponent})"
    if root.after:
        p = f"{p} + {root.after}"
    if root.floor:
        p = f"max({p}, {root.floor})"
    return p


def _elementwise(opt: ir.Optimizer, lr: str, nums: Numbers) -> list[str]:
    eq: list[str] = []
    constant = nums.root is None or opt.curvature.kind == "constant"
    newton = acc_name = None  # clip length's Newton step
    if not constant:
        eq.append(f"c     = {_estimate(opt)}")
        acc_name = _accumulate(opt, eq, 'c', nums=nums, hat=True)
        eq.append(f"P     = {_preconditioner(nums.root, acc_name)}")
        r = nums.root
        newton = _preconditioner(Root(None, r.inside, r.after, r.floor), acc_name)
    m = _momentum(opt, eq, nums)
    ln = opt.length.kind
    u = f"{m}" if constant else f"{m} / P"
    # an undamped P (a coordinate the curvature has not seen, g * g at g = 0) divides as
    # the pseudo-inverse: the plan's div_or_zero
    pinv = "" if constant or not nums.root.pseudo_inverse else \
        "0 where P is not positive: the pseudo-inverse"
    if ln == "eigen_sign":
        eq.append("d     = sign(" + m + ")" + ("" if constant else " / P")
                  + (f"   ({pinv})" if pinv else ""))
    elif ln == "normalized":
        norm = f"sqrt(sum({m} * {m}))" if constant else f"sqrt(sum({m} * {m} / P))"
        eq.append(f"d     = {u} / {norm}   (sum over {_over(opt.length)}; "
                  + (f"{pinv}; " if pinv else "") + "d = 0 where the sum is 0)")
    else:
        eq.append(f"d     = {u}" + (f"   ({pinv})" if pinv else ""))
    if opt.graft.kind != "none":
        eq += graft.direction(opt, m) + graft.rescale(opt, "over each tensor")
    if opt.clip.kind == "length":
        wrap = newton and newton != acc_name  # damped: parenthesized
        eq.append(f"n     = {m}" + ((f" / ({newton})" if wrap else f" / {newton}") if newton else "")
                  + "   (the Newton step: the damped curvature, no root"
                  + (f"; {pinv.replace('P', newton, 1)})" if pinv and newton else ")"))
    eq += _clip(opt)
    eq.append(f"theta = theta - {lr} * d")
    return eq


def _factored(opt: ir.Optimizer, lr: str, nums: Numbers) -> list[str]:
    """The factored structure: the diagonal from row and column means, as the extern
    (curvc.runtime.matrix.factored) computes it."""
    eq = [f"c     = {_estimate(opt)}",
          "        (a tensor of order k >= 2 is factored over its last two dims, m x n;",
          "        order < 2 keeps the diagonal, as Adafactor does: V = the accumulated c)"]
    _accumulate(opt, eq, "mean_j c_ij", "R")
    _accumulate(opt, eq, "mean_i c_ij", "C")
    eps = _v(opt.structure.eps) if opt.structure.eps is not None else "0"
    eq.append(f"V     = R C^T / max(mean_i R_i, {eps})   (V = 0 where that is 0)")
    eq += _bias_correction(nums, "curvature", "V")  # the extern divides V, not R and C
    root = nums.matrix or Root("1")
    if root.exponent == "1":  # P = V itself (length none, normalized)
        root = Root(None, root.inside, root.after, root.floor)
    eq.append(f"P     = {_preconditioner(root, 'V')}")
    if not (root.after or root.floor):
        eq[-1] += "   (d = 0 where P is 0)"
    m = _momentum(opt, eq, nums)
    ln = opt.length.kind
    if ln == "eigen_sign":
        eq.append(f"d     = sign({m}) / P")
    else:
        eq.append(f"d     = {m} / P")
    if ln == "normalized":
        eq.append(f"d     = d / sqrt(sum({m} * d))   "
                  "(sum over all parameters; d = 0 where the sum is 0)")
    eq += _clip(opt)
    eq.append(f"theta = theta - {lr} * d")
    return eq


_OVER = {"global": "all parameters", "group": "each param group's parameters",
         "tensor": "each tensor on its own"}


def _over(node) -> str:
    """The tensors a norm of this clause sums over (its scope)."""
    return _OVER[str(node.scope.value) if node.scope is not None else "global"]


def _clip(opt: ir.Optimizer, clip: ir.Clip | None = None, x: str = "d") -> list[str]:
    """The step's clip (d), or with ``x = 'g'`` the gradient's, before anything reads g."""
    clip = opt.clip if clip is None else clip
    first = "before decay, curvature and momentum read it" if x == "g" else ""
    if clip.kind == "elementwise":
        t = _v(clip.threshold)
        return [f"{x}     = clamp({x}, -{t}, {t})" + (f"   ({first})" if first else "")]
    if clip.kind == "length":  # the caller writes n, the Newton step
        return [f"{x}     = sign(n) * min(|n|, {_v(clip.threshold)} * |{x}|)   (clip length: "
                "per coordinate of the curvature's eigenbasis, the Newton step capped at "
                f"{_v(clip.threshold)} times the length's)"]
    if clip.kind == "global_norm":
        norm = f"||{x}||" if clip.eps in (None, ir.Const(0.0)) else f"(||{x}|| + {_v(clip.eps)})"
        off = f"; none where {_v(clip.threshold)} = 0" if isinstance(clip.threshold,
                                                                   ir.HyperRef) else ""
        return [f"{x}     = {x} * min(1, {_v(clip.threshold)} / {norm})   "
                f"(norm over {_over(clip)}{off}" + (f"; {first})" if first else ")")]
    if clip.kind == "tensor_rms":
        return [f"{x}     = {x} / max(1, RMS({x}) / {_v(clip.threshold)})   (RMS over each tensor"
                + (f"; {first})" if first else ")")]
    return []


def _per_mode(e: str) -> str:
    """The exponent of each of an order-k tensor's k factors, for a product rooted at e."""
    try:
        f = Fraction(e)
    except ValueError:
        return f"^-({e})/k"
    return f"^-{f.numerator}/k" if f.denominator == 1 else f"^-{f.numerator}/({f.denominator}k)"


def explain(opt: ir.Optimizer, plan: Plan | None = None) -> str:
    nums = numbers(opt, plan)
    if plan is None and nums.not_compiled is None:
        plan = lower_mod.lower(opt)
    row = table_row(opt, plan)
    lines = [f"{opt.name}  ({opt.file})", ""]
    width = max(len(c) for c in TABLE_COLUMNS)
    for col in TABLE_COLUMNS:
        lines.append(f"  {col:<{width}}  {row[col] or '-'}")
    if nums.not_compiled:
        lines += ["", f"  not compiled ({nums.not_compiled}); the rule the spec asks for:"]
    else:
        lines += ["", "  update, per step t:"]
    lines += [f"    {e}" for e in equations(opt, plan)]
    if opt.hypers:
        lines += ["", "  hyperparameters: " + ", ".join(
            f"{h.name}={h.fallback or ('none' if h.optional else _default(h.default))}"
            for h in opt.hypers)]
        if any(d is None for h in opt.hypers if not h.optional
               for d in (h.default if isinstance(h.default, tuple) else (h.default,))):
            lines.append("  (machine_eps: the parameter dtype's torch.finfo(dtype).eps, at step "
                         "time; None in the constructor)")
        if any(h.optional for h in opt.hypers):
            lines += ["  (none: None in the constructor, not given; if(given(NAME), A, B) is A",
                      "  where NAME is a number, else B, computing only the branch taken)"]
    return "\n".join(lines) + "\n"


def _decay_rate(dec: ir.Decay, lr: str) -> str:
    """What decoupled decay takes off theta's scale: lr * wd, or wd where it is fixed."""
    scaled = f"{lr} * {_v(dec.rate)}"
    if dec.fixed in (None, ir.Const(False)):
        return scaled
    if dec.fixed == ir.Const(True):
        return _v(dec.rate)
    return f"({_v(dec.rate)} if {_v(dec.fixed)} else {scaled})"


def _default(v) -> str:
    if v is None:
        return "machine_eps"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, tuple):
        return "(" + ", ".join(_default(x) for x in v) + ")"
    if isinstance(v, str):
        return v
    return f"{v:g}"
