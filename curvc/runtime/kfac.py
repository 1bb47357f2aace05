"""K-FAC (Martens & Grosse, 2015): per layer, the Fisher block as a Kronecker product.

For an ``nn.Linear`` layer s = W x + b over N rows (the batch, or batch x
sequence), with a = [x, 1] (the 1 when the layer has a bias) and ds the
gradient of the loss at the layer's output,

    A = a^T a / N                 (in+1) x (in+1)
    S = N ds^T ds                 out x out

(ds of a mean-reduced loss carries a 1/N, so S is the mean outer product of
the per-row output gradients). A layer applied several times in one
forward pass (weight sharing) sums the (A, S) of its calls, as curvlinops'
KFAC does. The factors are exponential moving averages
``A <- beta A + (1 - beta) A_t`` starting from the identity, updated on the
plan's ``accumulate`` steps; their damped inverses ``(A + damping I)^-1`` and
``(S + damping I)^-1`` are recomputed on its ``invert`` steps. The layer's
natural gradient is

    [dW db] = (S + damping I)^-1 [gW gb] (A + damping I)^-1,

which the elementwise plan then treats as its gradient (weight decay,
momentum and the learning rate follow, as in the usual K-FAC training loop).
Tensors outside a tracked layer keep their plain gradient (an identity block).

The factors and inverses live in the weight's optimizer state (``kfac_A``,
``kfac_S``, ``kfac_A_inv``, ``kfac_S_inv``), so checkpoints carry them.
"""
from __future__ import annotations

import math
import weakref

import torch

from curvc.runtime import distributed
from curvc.runtime.matrix import inverse_root


class LayerTracker:
    """Hooks on a model's ``nn.Linear`` layers: per layer, the sums of the factors
    (A_t, S_t) of every call since the last step.

    A layer applied c times per forward pass adds the factors of each call,
    each normalised by its own rows (curvlinops' KFAC sums them the same way):
    A_t = sum_c a_c^T a_c / N_c, S_t = sum_c N_c ds_c^T ds_c. A call counts
    once its output gradient arrives, so a forward pass nothing differentiates
    (an evaluation with grad enabled) adds nothing. ``wanted`` (a weak
    reference to a callable, e.g. a ``weakref.WeakMethod``; None: always) says
    whether the next step accumulates statistics; it is asked once per step,
    at the first forward pass, so steps that do not accumulate cost no matrix
    products.

    The hooks hold the tracker weakly, and are removed when it is collected
    (with the optimizer that owns it) or on ``remove()``.
    """

    def __init__(self, model: torch.nn.Module, wanted=None):
        self.layers: list[torch.nn.Linear] = [m for m in model.modules()
                                              if isinstance(m, torch.nn.Linear)]
        self._sums: dict = weakref.WeakKeyDictionary()  # module -> (A_t, S_t)
        self._wanted = wanted
        self._recording: bool | None = None  # asked of ``wanted`` at the first forward
        me = weakref.ref(self)  # the model must not keep the tracker (or its optimizer) alive

        def forward(module, args, output):
            tracker = me()
            if tracker is not None:
                tracker._forward(module, args, output)
        handles = [m.register_forward_hook(forward) for m in self.layers]
        self._finalizer = weakref.finalize(self, _remove_hooks, handles)

    def _forward(self, module, args, output) -> None:
        if not (torch.is_grad_enabled() and isinstance(output, torch.Tensor)
                and output.requires_grad):
            return  # an evaluation pass: nothing will be differentiated
        if self._recording is None:
            wanted = self._wanted() if self._wanted is not None else None
            self._recording = wanted is None or bool(wanted())
        if not self._recording:
            return
        x, me = args[0].detach(), weakref.ref(self)

        def on_grad(grad):
            tracker = me()
            if tracker is not None:
                tracker._add(module, x, grad.detach())
        output.register_hook(on_grad)

    def _add(self, module: torch.nn.Linear, x: torch.Tensor, ds: torch.Tensor) -> None:
        dtype = module.weight.dtype
        a_t, s_t = layer_factors(module, x.to(dtype), ds.to(dtype))
        old = self._sums.get(module)
        self._sums[module] = (a_t, s_t) if old is None else (old[0] + a_t, old[1] + s_t)

    def factors(self, module: torch.nn.Linear):
        """(A_t, S_t) summed over the layer's calls since the last step, or None."""
        return self._sums.get(module)

    def clear(self) -> None:
        """A step used the statistics: the next one gathers its own."""
        self._sums = weakref.WeakKeyDictionary()
        self._recording = None

    def remove(self) -> None:
        self._finalizer()


def _remove_hooks(handles) -> None:
    for h in handles:
        h.remove()


def layer_factors(module: torch.nn.Linear, x: torch.Tensor, ds: torch.Tensor):
    """(A_t, S_t) of one batch (see the module docstring)."""
    n = math.prod(x.shape[:-1])  # rows, spelled out: reshape(-1, 0) is ambiguous
    a = x.reshape(n, x.shape[-1])
    if module.bias is not None:
        a = torch.cat([a, a.new_ones(n, 1)], dim=1)
    ds = ds.reshape(n, ds.shape[-1])
    return a.T @ a / n, ds.T @ ds * n


def natural_gradients(opt, tracker: LayerTracker, params: list[torch.Tensor], *, beta: float,
                      damping: float, accumulate: bool, invert: bool,
                      grad_scale: torch.Tensor | None = None,
                      group=None) -> tuple[dict, list]:
    """({param: its natural gradient} for every param with a gradient, the state updates).

    ``grad_scale``: the GradScaler scale the recorded output gradients carry (the
    backward pass was of ``scale * loss``); S_t is divided by its square. The
    parameters' gradients must already be unscaled.

    Nothing is written: the updates, ``(state, key, value)``, are applied by the
    caller once the rest of the step has been checked, so a refused step leaves
    the statistics as they were.
    """
    out = {p: p.grad for p in params if p.grad is not None}
    updates: list = []
    layers = [m for m in tracker.layers
              if m.weight in out and (m.bias is None or m.bias in out)]  # optimized, with grads
    batch = {}
    if accumulate:
        for module in layers:
            sums = tracker.factors(module)
            if sums is None:
                raise RuntimeError(
                    f"{type(opt).__name__} accumulates K-FAC statistics on this step, but the "
                    f"layer {module} ran no forward and backward pass since the last step")
            batch[module] = sums
        if group is not None:  # every rank's factors, averaged in one bucketed all-reduce
            flat = distributed.average([f for m in layers for f in batch[m]], group)
            batch = {m: (flat[2 * i], flat[2 * i + 1]) for i, m in enumerate(layers)}
    for module in layers:
        w, b = module.weight, module.bias
        state = dict(opt.state.get(w, {}))  # a view to compute from; written back via updates
        if accumulate:
            a_t, s_t = batch[module]
            if grad_scale is not None:
                s_t = s_t / grad_scale.to(s_t.device, s_t.dtype) ** 2
            for key, new in (("kfac_A", a_t), ("kfac_S", s_t)):
                old = state.get(key)
                if old is None:
                    old = torch.eye(new.shape[0], dtype=new.dtype, device=new.device)
                state[key] = old * beta + new * (1.0 - beta)
                updates.append((w, key, state[key]))
        if "kfac_A" not in state:
            continue  # no statistics yet: the plain gradient
        if invert or "kfac_A_inv" not in state:
            for key in ("kfac_A", "kfac_S"):
                state[key + "_inv"] = inverse_root(state[key], 1.0, damping)
                updates.append((w, key + "_inv", state[key + "_inv"]))
        g = w.grad if b is None else torch.cat([w.grad, b.grad[:, None]], dim=1)
        v = state["kfac_S_inv"] @ g.to(state["kfac_S_inv"].dtype) @ state["kfac_A_inv"]
        out[w] = v[:, :w.shape[1]].to(w.grad.dtype)
        if b is not None:
            out[b] = v[:, w.shape[1]].to(b.grad.dtype)
    return out, updates
