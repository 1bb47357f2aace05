"""Curvature estimators: the calculating approximations that need more than the gradient.

Each returns one tensor per parameter, shaped like it: the per-step
estimate ``c`` that the optimizer's fused update then accumulates (EMA,
sum) and divides by. They run on the host side of ``step()`` with autograd;
everything after them is the same fused elementwise plan as Adam's.

* ``hutchinson``: the Hessian diagonal as the mean of ``z * (H z)`` over
  random probes ``z`` (Rademacher: E[z z^T] = I, so E[z * Hz] = diag H).
  Needs gradients that carry their graph (``backward(create_graph=True)``).
* ``fisher``: the Fisher with labels sampled from the model, from
  per-example gradients (its diagonal, or the whole matrix for the dense
  structure); small models, since it costs one gradient per example.
* ``gauss_newton_bartlett``: the Fisher / Gauss-Newton diagonal from labels
  sampled from the model's own output distribution: ``B * (grad of the
  mean loss on the sampled labels)^2``, B the number of sampled labels
  (Sophia-G's estimator).
* ``hessian_diagonal``: the exact diag(H), one vmapped backward pass per chunk of
  entries of each parameter; small models, since it costs one pass per entry.
"""
from __future__ import annotations

import math

import torch


def rademacher_like(p: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """+1 or -1 with equal probability."""
    bits = torch.randint(0, 2, p.shape, device=p.device, generator=generator)
    return bits.to(p.dtype).mul_(2).sub_(1)


def hutchinson(params: list[torch.Tensor], grads: list[torch.Tensor], samples: int = 1,
               distribution: str = "rademacher", spatial_average: bool = False,
               generator: torch.Generator | None = None,
               keep_graph: bool = False) -> list[torch.Tensor]:
    """Hutchinson's estimate of diag(H), H the Hessian of the loss whose ``grads`` are given.

    ``grads`` must have been produced with ``create_graph=True``. A gradient
    without a graph (or None) is constant: its parameter enters the loss
    linearly or not at all, so its Hessian row and its estimate are 0. With
    ``spatial_average`` (AdaHessian), a 4-D convolution kernel's estimate is
    replaced by the mean of its absolute value over the kernel's spatial
    positions, as in the AdaHessian release. ``keep_graph`` leaves the
    loss's graph alive for a later ``backward()``.
    """
    total = [torch.zeros_like(p) for p in params]
    live = [i for i, g in enumerate(grads) if g is not None and g.grad_fn is not None]
    for i in range(samples if live else 0):
        # Probes for the live parameters only: H z restricted to them is all that is
        # not 0 (a constant gradient's row, and by symmetry its column, are 0).
        if distribution == "rademacher":
            zs = [rademacher_like(params[j], generator) for j in live]
        elif distribution == "gaussian":
            zs = [torch.randn(params[j].shape, device=params[j].device,
                              dtype=params[j].dtype, generator=generator) for j in live]
        else:
            raise ValueError(f"unknown probe distribution {distribution!r}")
        hzs = torch.autograd.grad([grads[j] for j in live], [params[j] for j in live],
                                  grad_outputs=zs, retain_graph=keep_graph or i < samples - 1,
                                  allow_unused=True)
        for j, hz, z in zip(live, hzs, zs):
            if hz is not None:  # None: no path from the gradients back to it, H z is 0 there
                total[j].addcmul_(hz, z, value=1.0 / samples)
    if spatial_average:
        total = [t.abs().mean(dim=(2, 3), keepdim=True).expand_as(t).contiguous()
                 if t.dim() == 4 else t for t in total]
    return total


def hessian_diagonal(params: list[torch.Tensor], grads: list[torch.Tensor | None],
                     chunk: int = 256) -> list[torch.Tensor]:
    """The exact diag(H), from gradients that carry their graph: entry i of parameter
    p is d g_i / d p_i, the i-th entry of row i of p's own block of H (no other
    parameter enters the diagonal). Rows come ``chunk`` at a time from vmapped
    backward passes (one per entry where autograd cannot batch). A gradient without a
    graph (or None) is constant: its diagonal is 0. The graph is kept (the user's
    backward, or another parameter's rows, may follow)."""
    out = []
    for p, g in zip(params, grads):
        diag = torch.zeros(p.numel(), dtype=p.dtype, device=p.device)
        if g is not None and g.grad_fn is not None:
            flat, n = g.reshape(-1), p.numel()
            for start in range(0, n, chunk):
                diag[start:start + min(chunk, n - start)] = _diagonal_rows(flat, p, start,
                                                                           min(chunk, n - start))
        out.append(diag.reshape(p.shape))
    return out


def _diagonal_rows(flat: torch.Tensor, p: torch.Tensor, start: int, rows: int) -> torch.Tensor:
    """Entries start .. start + rows of diag(d flat / d p)."""
    at = torch.arange(rows, device=flat.device)
    picks = torch.zeros(rows, flat.numel(), dtype=flat.dtype, device=flat.device)
    picks[at, start + at] = 1.0
    try:
        block, = torch.autograd.grad(flat, p, picks, retain_graph=True, allow_unused=True,
                                     is_grads_batched=True)
        if block is None:  # no path from the gradient back to p: that block of H is 0
            return torch.zeros(rows, dtype=flat.dtype, device=flat.device)
        return block.reshape(rows, -1)[at, start + at]
    except RuntimeError:  # an op without a batching rule: one entry at a time
        out = []
        for i in range(start, start + rows):
            row, = torch.autograd.grad(flat[i], p, retain_graph=True, allow_unused=True)
            out.append(flat.new_zeros(()) if row is None else row.reshape(-1)[i])
        return torch.stack(out)


def gauss_newton_bartlett(params: list[torch.Tensor], logits: torch.Tensor, samples: int = 1,
                          generator: torch.Generator | None = None) -> list[torch.Tensor]:
    """Sophia-G's Gauss-Newton-Bartlett estimate of the Gauss-Newton diagonal.

    ``logits`` are the model's outputs on the current batch, their graph
    still alive (call this before ``loss.backward()``, or keep the graph).
    Labels are drawn from softmax(logits); the estimate is
    ``B * g_hat * g_hat`` with ``g_hat`` the gradient of the mean
    cross-entropy on the drawn labels and ``B`` the number of drawn labels.
    """
    flat = logits.reshape(-1, logits.shape[-1])
    batch = flat.shape[0]
    total = [torch.zeros_like(p) for p in params]
    for i in range(samples):
        with torch.no_grad():
            probs = torch.softmax(flat.detach().float(), dim=-1)
            labels = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
        loss = torch.nn.functional.cross_entropy(flat, labels)
        grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        for acc, g in zip(total, grads):
            if g is not None:
                acc.addcmul_(g, g, value=batch / samples)
    return total


def sampled_label_gradients(params: list[torch.Tensor], logits: torch.Tensor,
                            samples: int = 1,
                            generator: torch.Generator | None = None) -> torch.Tensor:
    """One row per (example, drawn label): the gradient of -log p(y|x) over all
    parameters (flattened), for ``samples`` labels y per example drawn from the
    model's softmax(logits).

    The mean of their outer products estimates the Fisher
    F = E_x E_{y~p(y|x)}[g g^T] (the true Fisher: labels from the model, not
    the data). One vmapped backward pass, or one per row where autograd
    cannot batch.
    """
    flat = logits.reshape(-1, logits.shape[-1])
    with torch.no_grad():
        probs = torch.softmax(flat.detach().float(), dim=-1)
        labels = torch.multinomial(probs, samples, replacement=True, generator=generator)
    per_row = torch.nn.functional.cross_entropy(flat.repeat_interleave(samples, dim=0),
                                                labels.reshape(-1), reduction="none")
    return batched_rows(per_row, params)


def gradient_rows(params: list[torch.Tensor], logits: torch.Tensor, samples: int = 1,
                  per_example: bool = True, scale: float = 1.0,
                  generator: torch.Generator | None = None) -> list[torch.Tensor]:
    """Per parameter, a stack of rows r (shape (rows, *p.shape)) whose sum of outer
    products sum_r r r^T is this batch's curvature estimate; Kronecker factors take the
    Gram matrices of their unfoldings.

    ``per_example`` (the Fisher): one row per (example, drawn label), the gradient of
    -log p(y|x), over sqrt(rows), so sum r r^T = the mean outer product. Otherwise
    (Gauss-Newton-Bartlett): one row per draw, sqrt(B / samples) times the gradient of
    the mean cross-entropy on labels drawn for the whole batch, so sum r r^T is the
    matrix whose diagonal ``gauss_newton_bartlett`` returns. ``scale`` multiplies the
    estimate (each row by its square root).
    """
    flat = logits.reshape(-1, logits.shape[-1])
    if per_example:
        rows = sampled_label_gradients(params, logits, samples, generator)
        rows = rows * math.sqrt(scale / rows.shape[0])
        out, start = [], 0
        for p in params:
            out.append(rows[:, start:start + p.numel()].reshape(-1, *p.shape).to(p.dtype))
            start += p.numel()
        return out
    batch, draws = flat.shape[0], [[] for _ in params]
    for _ in range(samples):
        with torch.no_grad():
            probs = torch.softmax(flat.detach().float(), dim=-1)
            labels = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
        loss = torch.nn.functional.cross_entropy(flat, labels)
        grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        for rows, p, g in zip(draws, params, grads):
            rows.append(torch.zeros_like(p) if g is None else g * math.sqrt(scale * batch / samples))
    return [torch.stack(rows) for rows in draws]


def batched_rows(values: torch.Tensor, params: list[torch.Tensor],
                 chunk: int = 256) -> torch.Tensor:
    """The gradient of each entry of the vector ``values`` with respect to ``params``,
    flattened: one row per entry. Vmapped backward passes over ``chunk`` entries at a
    time (the identity they take is chunk x n, not n x n), or one pass per entry where
    autograd cannot batch."""
    n = values.shape[0]
    sizes = [p.numel() for p in params]
    kw = dict(dtype=values.dtype, device=values.device)

    def flatten(grads, rows):
        return torch.cat([torch.zeros(rows, k, **kw) if g is None else g.reshape(rows, k)
                          for g, k in zip(grads, sizes)], dim=1)
    out = []
    try:
        for start in range(0, n, chunk):
            rows = min(chunk, n - start)
            picks = torch.zeros(rows, n, **kw)
            picks[torch.arange(rows), start + torch.arange(rows)] = 1.0
            out.append(flatten(torch.autograd.grad(values, params, picks, retain_graph=True,
                                                   allow_unused=True, is_grads_batched=True),
                               rows))
    except RuntimeError:  # an op without a batching rule: one entry at a time
        out = [flatten(torch.autograd.grad(values[i], params, retain_graph=True,
                                           allow_unused=True), 1) for i in range(n)]
    return torch.cat(out)


def fisher_diagonal(params: list[torch.Tensor], logits: torch.Tensor, samples: int = 1,
                    generator: torch.Generator | None = None) -> list[torch.Tensor]:
    """diag F: the mean of the squared sampled-label gradients."""
    rows = sampled_label_gradients(params, logits, samples, generator)
    diag = rows.pow(2).mean(dim=0)
    return [d.reshape(p.shape).to(p.dtype) for d, p in
            zip(torch.split(diag, [p.numel() for p in params]), params)]


def fisher_matrix(params: list[torch.Tensor], logits: torch.Tensor, samples: int = 1,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """F over all parameters as one n x n matrix (the dense structure; small models)."""
    rows = sampled_label_gradients(params, logits, samples, generator)
    return rows.T @ rows / rows.shape[0]

