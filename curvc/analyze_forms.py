"""The paper's closed forms for its rows of Table 1, beside what ``curvc.analyze`` measures.

Section 1 gives, for each row's first step d from gradient g and Hessian
H = Q diag(lambda) Q^T, the decrease Delta_d and the length ||d||_H^2. Section 2 gives
the minibatch noise term N_b = tr(H A Sigma_b A^T) / 2 for the rows whose step is
linear in the gradient, d = -A g (Newton: A = alpha H^-1; GN-normalized NGD, the
paper's "normalized NGD" of Section 2: A = alpha H^-1/2; GD: A = alpha I), with
Sigma_b the covariance of a minibatch's gradient. Here Sigma_b is the exact one of the
problem's data for batches of B drawn without replacement from N examples,
Sigma_b = (N - B) / ((N - 1) B) Sigma, and A is held at the full-batch curvature (the
paper's assumption: only the gradient is noisy). The paper then takes Sigma_b ~ (k/B) H;
with k/B fitted so that the traces agree, that approximation is printed as well.
(Written out, its N_b carry alpha^2: (k/B) alpha^2 n / 2 for Newton, (k/B) alpha^2 tr H / 2
and (k/B) alpha^2 tr H^2 / 2; the paper's text prints alpha.)
"""
from __future__ import annotations

import torch

from curvc import ir


def _default(opt: ir.Optimizer, arg, hypers: dict) -> float:
    if isinstance(arg, ir.Const):
        return float(arg.value)
    value = hypers.get(arg.name, opt.hyper(arg.name).default)
    return float(value if arg.index is None else value[arg.index])


def _first_step_scale(opt: ir.Optimizer, hypers: dict) -> float | None:
    """c such that the first step's momentum output is c * g; None if not a multiple."""
    m = opt.momentum
    if m.kind in ("none", "heavy_ball"):  # heavy ball starts its buffer at g
        return 1.0
    if m.kind == "ema":
        on = m.bias_corrected
        if isinstance(on, ir.HyperRef):  # bias_corrected(flag): the flag's value
            on = bool(hypers.get(on.name, opt.hyper(on.name).default))
        return 1.0 if on else 1.0 - _default(opt, m.beta, hypers)
    return None


def _plain(opt: ir.Optimizer, hypers: dict) -> float | None:
    """c of a first step d = c * (the row's step) if ``opt`` is one of the paper's rows as
    written: no decay, clip, damping or schedule, the norm over every parameter."""
    if not isinstance(opt, ir.Optimizer):  # a routed spec: several rows, none of the paper's
        return None
    plain = all(getattr(opt, a).kind in ("none", "constant", "instant")
                for a in ("clip", "gradient_clip", "damping", "schedule", "iterate"))
    # the paper's rows take the norm over every parameter
    plain = plain and getattr(opt.length.scope, "value", "global") == "global"
    if opt.decay.kind != "none" and _default(opt, opt.decay.rate, hypers) != 0.0:
        plain = False
    return _first_step_scale(opt, hypers) if plain else None


def closed_forms(opt: ir.Optimizer, g, h, lam, q, hypers: dict) -> dict:
    """{quantity: value} of the paper's formulas for the row ``opt`` is, if it is one:
    a first step with no decay, clip, damping or schedule, the exact Hessian (dense)
    or the scalar structure. Eigenvalues that are not positive are left out, as the
    dense step drops them (the pseudo-inverse)."""
    c = _plain(opt, hypers)
    if c is None:
        return {}
    lr = _default(opt, ir.HyperRef("lr"), hypers)
    ln = opt.length.kind
    gh = q.T @ g
    g2 = float(g @ g)
    if opt.structure.kind == "dense" and opt.curvature.kind == "hessian":
        keep = lam > 0
        gk, lk = gh[keep], lam[keep]
        if ln == "none":  # Newton with step alpha: alpha (1 - alpha/2) g^T H^-1 g
            a, s = lr * c, float((gk ** 2 / lk).sum())
            return {"row": "Newton", "delta": a * (1 - a / 2) * s, "norm_h_sq": a * a * s}
        if ln == "normalized":  # eps ||g~||_H - eps^2 / 2
            return {"row": "Normalized NGD", "delta": lr * float((gk ** 2 / lk).sum()) ** 0.5
                    - lr * lr / 2, "norm_h_sq": lr * lr}
        if ln == "gradient_norm" and _default(opt, opt.length.power, hypers) == 1.0:
            e = lr * c  # d = -eps H^-1/2 g
            return {"row": "GN-Normalized NGD",
                    "delta": float((e * gk ** 2 / lk.sqrt() - e * e / 2 * gk ** 2).sum()),
                    "norm_h_sq": e * e * float((gk ** 2).sum())}
        if ln == "eigen_sign":  # d^_i = -eps sign(g^_i) / sqrt(lambda_i): ||d_i||_H = eps
            return {"row": "Eigenbasis Normalized NGD",
                    "delta": float((lr * gk.abs() / lk.sqrt()).sum()) - lr * lr / 2 * len(lk),
                    "norm_h_sq": lr * lr * len(lk)}
    if opt.structure.kind == "scalar":
        if ln == "none":  # GD: eta ||g||^2 - eta^2 g^T H g / 2
            e = lr * c
            return {"row": "GD", "delta": e * g2 - e * e / 2 * float(g @ h @ g),
                    "norm_h_sq": e * e * float(g @ h @ g)}
        if ln == "normalized":  # d = -eps g / ||g||
            return {"row": "Normalized GD", "delta": lr * g2 ** 0.5
                    - lr * lr / 2 * float(g @ h @ g) / g2,
                    "norm_h_sq": lr * lr * float(g @ h @ g) / g2}
        if ln == "eigen_sign":  # d = -eta sign(g)
            s = torch.sign(g)
            return {"row": "Sign GD", "delta": lr * float(g.abs().sum())
                    - lr * lr / 2 * float(s @ h @ s), "norm_h_sq": lr * lr * float(s @ h @ s)}
    return {}


def _linear_row(opt: ir.Optimizer, lam: torch.Tensor, hypers: dict):
    """(row, a * f(lambda)) for the rows whose step is d = -a f(H) g, or None."""
    c = _plain(opt, hypers)
    if c is None:
        return None
    a = c * _default(opt, ir.HyperRef("lr"), hypers)
    ln, pos = opt.length.kind, lam > 0
    inverse = torch.where(pos, 1 / lam.where(pos, 1.0), 0.0)  # the pseudo-inverse's
    if opt.structure.kind == "dense" and opt.curvature.kind == "hessian":
        if ln == "none":
            return "Newton", a * inverse
        if ln == "gradient_norm" and _default(opt, opt.length.power, hypers) == 1.0:
            return "GN-Normalized NGD", a * inverse.sqrt()
    if opt.structure.kind == "scalar" and ln == "none":
        return "GD", a * torch.ones_like(lam)
    return None


def noise_forms(opt: ir.Optimizer, lam: torch.Tensor, q: torch.Tensor,
                sigma_b: torch.Tensor, hypers: dict) -> dict:
    """N_b = tr(H A Sigma_b A^T) / 2 and E[(e_i^T d_xi)^2] = (a f(lambda_i))^2 (Q^T Sigma_b Q)_ii
    for a row with d = -a f(H) g, and the same under the paper's Sigma_b ~ (k/B) H
    (k/B = tr Sigma_b / tr H); {} for any other spec."""
    row = _linear_row(opt, lam, hypers)
    if row is None:
        return {}
    name, scale = row
    s_ii = torch.einsum("ji,jk,ki->i", q, sigma_b, q)
    per = scale ** 2 * s_ii
    kb = float(torch.trace(sigma_b) / lam.sum())
    per_kh = scale ** 2 * kb * lam
    return {"row": name, "noise": 0.5 * float((lam * per).sum()), "noise_i": per.tolist(),
            "noise_kh": 0.5 * float((lam * per_kh).sum()), "k_over_b": kb}
