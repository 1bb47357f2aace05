"""The secant step: L-BFGS over all parameters of the group as one flat vector.

The curvature is never formed. Each iteration keeps the pair
``s = theta_new - theta_old`` and ``y = g_new - g_old`` (when ``y.s > 1e-10``,
so the inverse stays positive definite), at most ``history`` of them, and
applies the inverse of the secant approximation to the gradient with the
two-loop recursion, starting from ``H0 = (s.y / y.y) I`` of the newest pair.

One ``step(closure)`` runs up to ``iterations`` iterations, re-evaluating
the closure after each move, and stops early when the gradient's largest
entry is below ``tolerance_grad`` or the step, the directional derivative
or the change of the loss is below ``tolerance_change``. The first
iteration ever takes ``min(1, 1/|g|_1) * lr``; later ones ``lr``, or the
step a strong-Wolfe line search finds (torch's implementation of it).

These are the semantics of ``torch.optim.LBFGS``, and the state keeps its
keys (``old_dirs`` holds the y's, ``old_stps`` the s's, ``ro`` their 1/(y.s)),
so a checkpoint of either loads into the other.
"""
from __future__ import annotations

import torch

CURVATURE_PAIR_MIN = 1e-10  # y.s below this: the pair is skipped (it would break positivity)


def flat_grad(params: list[torch.Tensor]) -> torch.Tensor:
    """All gradients as one vector (zeros where a parameter has none)."""
    return torch.cat([p.new_zeros(p.numel()) if p.grad is None
                      else (p.grad.to_dense() if p.grad.is_sparse else p.grad).reshape(-1)
                      for p in params])


def move(params: list[torch.Tensor], t: float, d: torch.Tensor) -> None:
    """theta <- theta + t * d, with d laid out as ``flat_grad`` lays out gradients."""
    offset = 0
    for p in params:
        n = p.numel()
        p.add_(d[offset:offset + n].view_as(p), alpha=t)
        offset += n


def two_loop(g: torch.Tensor, ys: list, ss: list, rho: list, h0, alpha: list) -> torch.Tensor:
    """-H g for the inverse secant approximation H of the pairs (s_i, y_i), oldest first."""
    q = g.neg()
    for i in reversed(range(len(ys))):
        alpha[i] = ss[i].dot(q) * rho[i]
        q.add_(ys[i], alpha=-alpha[i])
    r = torch.mul(q, h0)
    for i in range(len(ys)):
        beta = ys[i].dot(r) * rho[i]
        r.add_(ss[i], alpha=alpha[i] - beta)
    return r


def _shaped(d: torch.Tensor, g: torch.Tensor, settings: dict,
            sizes: list[int]) -> torch.Tensor:
    """The direction after the length and clip axes: d / sqrt(g^T H^-1 g) (d = -H^-1 g,
    so g^T H^-1 g = -g.d; a zero one is left alone), then d * min(1, clip / ||d||), or
    each parameter's slice (``sizes``, as ``flat_grad`` lays them out) divided by
    max(1, RMS(d_p) / rms_clip)."""
    if settings.get("normalized"):
        norm_sq = -g.dot(d)
        if norm_sq > 0:
            d = d / norm_sq.sqrt()
    clip = settings.get("clip", 0.0)
    if clip:
        norm = d.norm()
        if norm > clip:
            d = d * (clip / norm)
    rms_clip = settings.get("rms_clip", 0.0)
    if rms_clip:  # Adafactor's update clip, per tensor of the one vector
        parts = [part / (torch.linalg.vector_norm(part) / (part.numel() ** 0.5 * rms_clip)
                         ).clamp(min=1.0) if part.numel() else part
                 for part in d.split(sizes)]
        d = torch.cat(parts)
    return d


def step(opt, closure, settings: dict):
    """One ``step(closure)`` of a secant optimizer ``opt`` (one param group)."""
    if closure is None:
        raise RuntimeError(f"{type(opt).__name__}.step() needs a closure that clears the "
                           "gradients, computes the loss, calls backward() and returns the loss: "
                           "the secant method evaluates it several times per step")
    group = opt.param_groups[0]
    params = group["params"]
    lr = float(group["lr"])
    iterations = settings["iterations"]
    history = settings["history"]
    tol_grad, tol_change = settings["tolerance_grad"], settings["tolerance_change"]
    max_eval = group.get("max_eval")
    max_eval = int(max_eval) if max_eval is not None else iterations * 5 // 4
    line_search = group.get("line_search_fn")
    closure = torch.enable_grad()(closure)

    state = opt.state[params[0]]  # the method's state is global; it lives with the first tensor
    state.setdefault("func_evals", 0)
    state.setdefault("n_iter", 0)

    first_loss = closure()
    loss = float(first_loss)
    evals = 1
    state["func_evals"] += 1
    g = flat_grad(params)
    converged = bool(g.abs().max() <= tol_grad)
    if converged:
        return first_loss

    d, t = state.get("d"), state.get("t")
    ys, ss, rho = state.get("old_dirs"), state.get("old_stps"), state.get("ro")
    h0 = state.get("H_diag")
    prev_g, prev_loss = state.get("prev_flat_grad"), state.get("prev_loss")

    for it in range(1, iterations + 1):
        state["n_iter"] += 1
        if state["n_iter"] == 1:  # the first iteration ever: steepest descent
            d = g.neg()
            ys, ss, rho, h0 = [], [], [], 1
        else:
            y, s = g.sub(prev_g), d.mul(t)
            y_s = y.dot(s)
            if y_s > CURVATURE_PAIR_MIN:
                if len(ys) == history:
                    del ys[0], ss[0], rho[0]
                ys.append(y)
                ss.append(s)
                rho.append(1.0 / y_s)
                h0 = y_s / y.dot(y)
            alpha = state.setdefault("al", [None] * history)
            d = two_loop(g, ys, ss, rho, h0, alpha)
        if prev_g is None:
            prev_g = g.clone(memory_format=torch.contiguous_format)
        else:
            prev_g.copy_(g)
        prev_loss = loss

        d = _shaped(d, g, settings, [p.numel() for p in params])
        t = min(1.0, 1.0 / g.abs().sum()) * lr if state["n_iter"] == 1 else lr
        slope = g.dot(d)
        if slope > -tol_change:  # not a descent direction (any more)
            break

        used = 0
        if line_search is not None:
            loss, g, t, used = _line_search(line_search, params, closure, t, d, loss, g, slope,
                                            max_eval - evals)
            move(params, t, d)
            converged = bool(g.abs().max() <= tol_grad)
        else:
            move(params, t, d)
            if it != iterations:  # the last iteration's loss would go unused
                loss = float(closure())
                g = flat_grad(params)
                converged = bool(g.abs().max() <= tol_grad)
                used = 1
        evals += used
        state["func_evals"] += used

        if it == iterations or evals >= max_eval or converged:
            break
        if d.mul(t).abs().max() <= tol_change or abs(loss - prev_loss) < tol_change:
            break  # no more progress

    state.update(d=d, t=t, old_dirs=ys, old_stps=ss, ro=rho, H_diag=h0, prev_flat_grad=prev_g,
                 prev_loss=prev_loss)
    return first_loss


def _line_search(kind, params, closure, t, d, loss, g, slope, budget):
    """(loss, gradient, step, evaluations) at the step a line search picks along d."""
    if kind != "strong_wolfe":
        raise RuntimeError(f"line_search_fn={kind!r} is not supported: use None or "
                           "'strong_wolfe'")
    from torch.optim.lbfgs import _strong_wolfe  # torch's implementation, not ours

    start = [p.clone(memory_format=torch.contiguous_format) for p in params]

    def evaluate(x, step, direction):
        move(params, step, direction)
        value = float(closure())
        grad = flat_grad(params)
        with torch.no_grad():
            for p, x0 in zip(params, x):
                p.copy_(x0)
        return value, grad

    return _strong_wolfe(evaluate, start, t, d, loss, g, slope, max_ls=budget)
