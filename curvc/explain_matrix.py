"""The update equations of the matrix structures (Kronecker factors and their roots,
the polar factor, K-FAC's layer factors, the dense curvature, the secant history),
for ``curvc.explain``: each number (exponent, where eps enters) read off the plan.
"""
from __future__ import annotations

import re

from curvc import explain as base, explain_graft as graft, ir
from curvc.plan_numbers import Numbers, Root


def _kfac_factor(name: str, root: Root) -> str:
    """f(F) of one K-FAC factor as the plan damps and roots it."""
    e = root.exponent
    if root.after:
        return f"({name}{'' if e == '1' else '^' + e} + {root.after} I)^-1"
    inner = f"({name} + {root.inside} I)" if root.inside else name
    return f"{inner}^-{e}"


def _kfac_eigen(name: str, root: Root) -> str:
    """f(lambda) of one eigenvalue of a K-FAC factor, for eigen_sign."""
    if root.after:
        return f"1/({name}^{root.exponent} + {root.after})"
    return f"({name} + {root.inside})^-{root.exponent}" if root.inside \
        else f"{name}^-{root.exponent}"


_KFAC_BATCH = (
    "A_t   = mean_r a_r a_r^T   (a_r: row r of the layer's input, a 1 appended for the bias;",
    "        a conv's rows its im2col patches, one per example and output position)",
    "S_t   = T sum_r ds_r ds_r^T   (ds_r: the loss's gradient at row r of the layer's output;",
    "        T: the rows for a Linear, the examples for a conv)",
)


def kfac_gradient(opt: ir.Optimizer, nums: Numbers) -> list[str]:
    """g <- the layer's K-FAC step: its factors, accumulated, damped and rooted."""
    root, it = nums.matrix, opt.iterate
    start = {"ema": "I" if not it.bias_corrected else "0", "sum": f"I * {base._v(it.init)}",
             "ema_or_sum": "0" if it.bias_corrected else f"I, or 0 when {base._v(it.beta)} = 1"}
    # this batch's factors (curvc.runtime.kfac_layers), named apart from the accumulated
    eq = list(_KFAC_BATCH)
    every = ""
    if it.every is not None:
        every = base.period(it.every, it.delayed)
    for name, new in (("A", "A_t"), ("S", "S_t")):
        if it.kind == "instant" and not every:
            eq.append(f"{name}     = {new}")
            continue
        line = _accumulate_line(opt, name, new).split("   (")[0]
        summed = (f"{name} = {name} + {new} when {base._v(it.beta)} = 1"
                  if it.kind == "ema_or_sum" else "")
        notes = ", ".join(n for n in (summed, f"{name}_0 = {start[it.kind]}" if it.kind in start
                                      else "", every) if n)
        eq.append(line + (f"   ({notes})" if notes else ""))
    for name in ("A", "S"):
        eq += base._bias_correction(nums, "curvature", name)
    roots = f"; roots every {base._v(opt.structure.every)} steps" \
        if opt.structure.every is not None else ""
    g = "[grad W, grad b]"
    if opt.length.kind == "eigen_sign":
        eq.append(f"S     = Q_S diag(s) Q_S^T,  A = Q_A diag(a) Q_A^T   (eigenbases{roots})")
        eq.append(f"g     = Q_S [{_kfac_eigen('s_i', root)} {_kfac_eigen('a_j', root)} "
                  f"sign(Q_S^T {g} Q_A)_ij] Q_A^T")
        eq.append("        (per layer; an entry of Q_S^T G Q_A within 16 (m + n) eps ||G||_F of 0 "
                  "has sign 0, G m x n)")
    else:
        eq.append(f"g     = {_kfac_factor('S', root)} {g} {_kfac_factor('A', root)}   "
                  f"(per layer{roots})")
    eq.append("        (g = grad outside nn.Linear and nn.Conv2d layers)")
    if not root.inside:  # roots.at_rounding, as for the Kronecker factors
        eq += _ROUNDING
    if opt.length.kind == "normalized":
        eq.append(f"g     = g / sqrt(sum(grad * g))   (sum over {base._over(opt.length)}; "
                  "g = 0 where it is 0)")
    return eq


def kronecker(opt: ir.Optimizer, lr: str, nums: Numbers) -> list[str]:
    root_ = nums.matrix
    if opt.curvature.kind == "kfac":  # g is preconditioned already (_kfac_gradient)
        eq: list[str] = []
        m = base._momentum(opt, eq, nums)
        eq.append(f"d     = {m}")
        return eq + base._clip(opt) + [f"theta = theta - {lr} * d"]
    if nums.polar is not None:
        return _polar(opt, lr, nums)
    if opt.structure.basis == ir.Const("eigen"):
        from curvc.explain_eigen import eigenbasis
        return eigenbasis(opt, lr, nums)
    of = str(opt.curvature.of) if opt.curvature.of is not None else "g"
    cut = graft.blocking(opt, of)
    eq = cut + [f"G     = {'G' if cut else of} as a matrix; an order-k tensor has one factor per "
                f"mode i, from G_(i),",
                f"        {'G' if cut else of} unfolded along mode i "
                + ("(a block's modes are all <= max_dim)" if graft._on(opt.structure.block)
                   else "(modes longer than max_dim keep none)")]
    gram_l, gram_r = "G G^T", "G^T G"
    rows = _ROWS.get(opt.curvature.kind)
    if rows:  # the factors' statistic: sampled gradients, as rows
        eq += rows
        if opt.curvature.scale is not None:
            eq.append(f"        (each row times sqrt({base._v(opt.curvature.scale)}))")
        gram_l, gram_r = "sum_r G_r G_r^T", "sum_r G_r^T G_r"
    for name, gram in (("L", gram_l), ("R", gram_r)):  # a start other than 0 is s I
        line = _accumulate_line(opt, name, gram)
        eq.append(line if line.endswith("_0 = 0)") else line.replace("_0 = ", "_0 = I * "))
    for _, beta, n, switch in (c for c in nums.counts if c[0] == "curvature"):
        eq.append(f"L, R  = L / (1 - {beta}^{n}), R / (1 - {beta}^{n})   (for the roots only"
                  + (f"; if {switch})" if switch else ")"))
    left, right = "L", "R"
    power = f"-{base._half(root_.exponent)}"  # a matrix: two factors share the root
    per_mode = f"order-k tensors: {base._per_mode(root_.exponent)} per mode"
    fr, pw = opt.structure.factor_root, base._v(getattr(opt.length, "power", None))
    overridden = []
    if isinstance(fr, ir.Const) and fr.value:  # every factor at -power/p, whatever the order
        power, per_mode = f"-{pw}/{fr}", f"every factor of every order: ^-{pw}/{fr}"
    elif isinstance(fr, ir.HyperRef):  # Distributed Shampoo's inv_root_override
        overridden = [f"        (every factor ^-{pw}/{fr} instead, whatever the order, "
                      f"when {fr} > 0)"]
    m = base._momentum(opt, eq, nums)
    m = "G" if m == "g" else m
    every, schedule = graft.roots_schedule(opt), []
    if opt.graft.kind != "none" and every:  # Distributed Shampoo's: a line of its own
        first, _, rest = every.strip().partition(" and ")
        every, schedule = "", ["        " + first, "         and " + rest]
    inside = f"({{}} + {root_.inside} I)" if root_.inside else "{}"
    after = f" + {root_.after} I" if root_.after else ""

    def root(f: str) -> str:
        if not (after or root_.floor):
            r = f"{inside.format(f)}^{power}"
            return f"({r}{after})" if after else r
        # the spectral function 1 / max(lam^e + after, floor)
        r = f"{inside.format(f)}^{power[1:]}{after}"
        return f"max({r}, {root_.floor})^-1" if root_.floor else f"({r})^-1"

    if opt.length.kind == "eigen_sign":
        eq.append(f"Q_L, w_L, Q_R, w_R = the eigenvectors and eigenvalues of L and R{every}")
        # on eigenvalues the identity is 1: (w_L + eps)^-1/4, not (w_L + eps I)^-1/4
        scale = " ".join(re.sub(r" I(?=[),])", "", root(w)) for w in ("w_L", "w_R"))
        eq.append(f"d     = Q_L [{scale} * sign(Q_L^T {m} Q_R)] Q_R^T"
                  f"   (sign 0 at rounding level; {per_mode})")
    else:
        eq.append(f"d     = {root(left)} {m} {root(right)}{every}"
                  + (f"   ({per_mode})" if per_mode else ""))
    eq += overridden + schedule + ([] if root_.inside else list(_ROUNDING))
    if opt.graft.kind != "none":
        per = "over each block" if graft._on(opt.structure.block) else "over each tensor"
        eq += graft.direction(opt, m) + graft.rescale(opt, per)
    if opt.length.kind == "normalized":
        eq.append(f"d     = d / sqrt(sum({m} * d))   (over {base._over(opt.length)}: ||d||_P = 1)")
    eq += base._clip(opt)
    eq.append(f"theta = theta - {lr} * d")
    return eq


# roots.at_rounding: a singular factor's null space is 0, not the inverse root of noise
_ROUNDING = (
    "        (a factor that starts at 0: each eigenvalue within n eps of its largest is 0,",
    "         n the factor's size and eps its precision's)")


def _polar(opt: ir.Optimizer, lr: str, nums: Numbers) -> list[str]:
    """The polar factor by Newton-Schulz: what L^-1/4 G R^-1/4 is for L = G G^T, R = G^T G."""
    p = nums.polar
    eq: list[str] = []
    m = base._momentum(opt, eq, nums)  # g itself is read as a matrix too (the next line)
    eq += [f"d     = U V^T for {m} = U S V^T (= L^-1/4 {m} R^-1/4, L = {m} {m}^T, R = {m}^T {m}),",
           f"        by Newton-Schulz in {p['precision']} ({m} as a matrix: a vector is 1 x n):",
           f"X     = {m} / max(||{m}||_F, {p['eps']})   (transposed first when it has more rows "
           "than columns)",
           f"X     = {p['a']} X + ({p['b']} A + {p['c']} A A) X,  A = X X^T   ({p['steps']} "
           "times)",
           "d     = X   (transposed back; its singular values near 1, not at 1)"]
    eq += base._clip(opt)
    eq.append(f"theta = theta - {lr} * d")
    return eq


# The rows G_r whose Gram matrices are the Kronecker factors of a sampled curvature
# (curvc.runtime.curvature.gradient_rows).
_ROWS = {
    "fisher": ["G_r   = per example and label y ~ p(y|x) (samples per example), the gradient",
               "        of -log p(y|x), over sqrt(rows): sum_r G_r G_r^T is the mean (the Fisher)"],
    "gauss_newton_bartlett": [
        "G_r   = per draw of labels y ~ p(y|x) for the batch, sqrt(B / samples) times the",
        "        gradient of the mean loss on them (Gauss-Newton-Bartlett)"],
}


def _accumulate_line(opt: ir.Optimizer, name: str, new: str) -> str:
    eq: list[str] = []
    base._accumulate(opt, eq, new, name)
    return eq[0]


def _dense_inverse(root: Root, h: str = "H") -> str:
    """(H + eps_inside I)^-e, or (H^e + eps_after I)^-1, as the plan damps it."""
    e = root.exponent
    if root.after:
        return f"({h}{'' if e == '1' else '^' + e} + {root.after} I)^-1"
    m = f"({h} + {root.inside} I)" if root.inside else h
    return f"{m}^-{e}"


def _spectral(root: Root) -> str:
    """f(lambda), the function of each eigenvalue that curvc.runtime.dense.direction takes
    (lambda of H + eps_inside I), as text; the pseudo-inverse's zero is added by the caller."""
    e = root.exponent
    power = "lambda" if e == "1" else f"lambda^({e})"
    return f"1 / ({power} + {root.after})" if root.after else f"1 / {power}"


# the pseudo-inverse's rule (curvc.runtime.dense.direction): an eigenvalue at rounding
# level of the largest, or below, gives 0, so an indefinite H takes no step uphill
_PSEUDO_INVERSE = "where lambda > N * eps64 * max|lambda|, else 0"
_PSEUDO_INVERSE_NOTE = ("        (N the number of parameters, eps64 = 2^-52: the pseudo-inverse "
                        "drops eigenvalues at rounding level or below)")


def dense(opt: ir.Optimizer, lr: str, nums: Numbers) -> list[str]:
    """The whole n x n curvature's step: the paper's form of d, then the exact one
    (H's eigendecomposition and the function of its eigenvalues the code takes)."""
    eq: list[str] = []
    c = opt.curvature.kind
    # the empirical Fisher's matrix is the step's gradient's outer product (estimators.py)
    src = {"hessian": "grad^2 f(theta)", "fisher": "E_{y ~ p(y|x)} [g_y g_y^T]",
           "empirical_fisher": "g g^T"}.get(c, c)
    line = _accumulate_line(opt, "H", src) if opt.iterate.kind != "instant" else f"H     = {src}"
    eq.append(re.sub(r"\(H_0 = (\S+)\)", lambda m: "(H_0 = 0)" if m[1] == "0" else
                     f"(H_0 = {m[1]} I)", line))  # curvc.runtime.dense.start
    if c == "fisher":
        ngd = "H ~ F, the paper's NGD"
        eq[-1] = eq[-1][:-1] + f"; {ngd})" if eq[-1].endswith(")") and "   (" in eq[-1] \
            else eq[-1] + f"   ({ngd})"
    h = base._corrected(nums, "curvature", eq, "H", "H")  # the stored H stays uncorrected
    r = nums.matrix
    damped = f"{h} + {r.inside} I" if r.inside else h
    eq.append(f"Q, lambda = eigh({damped})")
    eq.append(f"f     = {_spectral(r)} {_PSEUDO_INVERSE}")
    eq.append(_PSEUDO_INVERSE_NOTE)
    m = "g"  # the matrix preconditions the gradient; decay and momentum then apply to d
    ln = opt.length.kind
    inv = _dense_inverse(r, h)
    if ln == "normalized":
        eq.append(f"u     = {inv} {m} = Q diag(f) Q^T {m}")
        eq.append(f"d     = {inv} {m} / sqrt({m}^T {inv} {m}) = u / sqrt({m}^T u)   "
                  f"(||d||_H = 1; 0 where {m}^T u is not positive)")
    elif ln == "eigen_sign":
        eq.append(f"d     = {inv} Q sign(Q^T {m}) = Q diag(f) sign(Q^T {m})   (||d_i||_H = 1; "
                  "sign 0 at rounding level of the largest entry)")
    else:
        eq.append(f"d     = {inv} {m} = Q diag(f) Q^T {m}"
                  + ("   (||d_i||_H = g_i)" if ln == "gradient_norm" else ""))
    if opt.clip.kind == "length":  # in H's eigenbasis, before decay and momentum read d
        newton = Root("1", r.inside, r.after)
        eq.append(f"n     = {_dense_inverse(newton, h)} {m} = Q diag(f_n) Q^T {m},   "
                  f"f_n = {_spectral(newton)} {_PSEUDO_INVERSE}   (the Newton step)")
        t = base._v(opt.clip.threshold)
        eq.append(f"d     = Q (sign(Q^T n) * min(|Q^T n|, {t} * |Q^T d|))   (clip length: "
                  f"in the curvature's eigenbasis, the Newton step capped at {t} times the "
                  "length's)")
    dec = opt.decay
    if dec.kind == "l2" and dec.decoupled != ir.Const(True):
        switch = dec.decoupled is not None and dec.decoupled != ir.Const(False)
        eq.append(f"d     = d + {base._v(dec.rate)} * theta"
                  + (f"   (if not {base._v(dec.decoupled)})" if switch else ""))
    tail: list[str] = []
    if base._momentum(opt, tail, nums) != "g":  # the same axis as elsewhere, on d
        eq += [re.sub(r"\bg\b", "d", line) for line in tail]
        eq.append(f"d     = {base._momentum(opt, [], nums)}")
    if opt.clip.kind != "length":
        eq += base._clip(opt)
    eq.append(f"theta = theta - {lr} * d")
    return eq


def low_rank(opt: ir.Optimizer, lr: str) -> list[str]:
    it = opt.iterate
    k, n = base._v(it.history), base._v(it.iterations) if it.iterations is not None else "20"
    return [
        f"each step(closure) runs up to {n} iterations of:",
        "g     = grad f(theta)            (the closure, re-evaluated)",
        "s     = theta - theta_prev,   y = g - g_prev   (a pair is kept if y^T s > 1e-10; "
        f"the last {k})",
        "H0    = (s^T y / y^T y) I      (scale from the newest pair)",
        "d     = -H g by the two-loop recursion over the pairs (rank-2 update per pair)",
        *(["d     = d / sqrt(-g^T d)          (||d||_H = 1; d = 0 stays 0)"]
          if opt.length.kind == "normalized" else []),
        *base._clip(opt),  # of the direction, before its step size
        f"theta = theta + t * d,   t = {lr} (the first iteration ever: min(1, 1/|g|_1) * {lr};",
        "        with line_search_fn='strong_wolfe', the step the line search finds)",
        f"stop early when max |g_i| <= {base._v(it.tolerance_grad) if it.tolerance_grad else '1e-7'} "
        f"or the step or loss change <= {base._v(it.tolerance_change) if it.tolerance_change else '1e-9'}",
    ]
