"""Param groups the usual way: no weight decay on biases and normalisation layers."""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # `import curvc` stays free of torch's import time
    import torch


def param_groups(model: torch.nn.Module, no_decay: tuple[str, ...] = ("bias", "norm"),
                 weight_decay: float | None = None) -> list[dict]:
    """``[{"params": decayed}, {"params": the rest, "weight_decay": 0.0}]`` for ``model``.

    A parameter is not decayed when one of the ``no_decay`` words (case-insensitive)
    is part of its qualified name (``encoder.0.bias``) or of its module's class name
    (``LayerNorm``, ``BatchNorm2d``), as training loops usually sort them by hand.
    ``weight_decay`` sets the decayed group's rate; by default it takes the
    optimizer's. Each parameter is listed once, in ``model.named_parameters()``
    order; a group left empty is dropped.
    """
    words = tuple(w.lower() for w in no_decay)
    decay, plain = [], []
    for mod_name, module in model.named_modules():
        kind = type(module).__name__.lower()
        for name, p in module.named_parameters(recurse=False):
            full = f"{mod_name}.{name}" if mod_name else name
            skip = any(w in full.lower() or w in kind for w in words)
            (plain if skip else decay).append(p)
    first = {"params": decay}
    if weight_decay is not None:
        first["weight_decay"] = weight_decay
    groups = [first, {"params": plain, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]
