"""Checkpoint validation: every saved tensor must fit the parameter it is loaded for.

torch.optim loads a state dict without looking at shapes, and a checkpoint
from another model then fails at the next ``step()``, with torch's raw error,
after every step counter has advanced. ``load_state_dict`` calls
``check(opt, state_dict)`` first, so a mismatch is a ValueError that names the
parameter, the key and both shapes, and the optimizer is left as it was.

The expected shapes, per parameter p (n: the elements of all parameters, for
the methods whose state is one flat vector or matrix):

* the elementwise buffers (the class's ``BUFFERS``): p's shape;
* Kronecker factors and roots ``pre_cond_i`` / ``inv_pre_cond_i``: d_i x d_i;
* K-FAC's ``kfac_S(_inv)``: out x out; ``kfac_A(_inv)``: in x in, or
  (in + 1) x (in + 1) for a layer with a bias (a Conv2d's in: in_channels * kh * kw);
* the factored structure's ``row_var`` (p's shape with the last dim 1) and
  ``col_var`` (the one before 1), for p of order >= 2, and ``variance`` (p's shape)
  below that (torch.optim.Adafactor's keys);
* the dense structure's ``curvature``: n x n; the secant method's
  ``d``, ``prev_flat_grad`` and its history: n.
"""
from __future__ import annotations

import math
import re

import torch

_KRONECKER = re.compile(r"(?:inv_)?pre_cond_(\d+)$")


def check(opt, state_dict: dict) -> None:
    """Raise ValueError if a tensor of ``state_dict`` does not fit its parameter."""
    saved, groups = state_dict.get("state", {}), state_dict.get("param_groups", [])
    if len(groups) != len(opt.param_groups) or any(
            len(g["params"]) != len(o["params"]) for g, o in zip(groups, opt.param_groups)):
        return  # torch's own load refuses these, before it changes anything
    ids = [i for g in groups for i in g["params"]]
    params = [p for g in opt.param_groups for p in g["params"]]
    n = sum(p.numel() for p in params)
    source = opt._source()
    whole = dict(source.state) if source is not None else {}  # a whole-model step's keys
    for index, (pid, p) in enumerate(zip(ids, params)):
        for key, value in saved.get(pid, {}).items():
            for item in (value if whole.get(key) == "vectors" else [value]):
                if not isinstance(item, torch.Tensor):
                    continue
                expected = _expected(opt, p, key, n, whole)
                if expected is None or (not isinstance(expected, str)
                                        and tuple(item.shape) in expected):
                    continue
                wanted = expected if isinstance(expected, str) else \
                    " or ".join(str(e) for e in expected)
                raise ValueError(
                    f"{type(opt).__name__}.load_state_dict: the state of parameter "
                    f"{index} (shape {tuple(p.shape)}) does not fit: {key!r} has shape "
                    f"{tuple(item.shape)}, expected {wanted}; was the checkpoint saved "
                    "for another model? Nothing was loaded")


def _expected(opt, p: torch.Tensor, key: str, n: int, whole: dict) -> list[tuple] | str | None:
    """The shapes ``key`` may have for parameter ``p``; a string: none (why); None:
    not checked."""
    if key in opt.BUFFER_NAMES:
        return [tuple(p.shape)]
    if key in whole:  # the source's own keys (estimators.Source.state)
        return [(n, n)] if whole[key] == "matrix" else [(n,)]
    if key in _FACTORED:  # no other state uses these keys
        return _factored_shape(p, key)
    match = _KRONECKER.match(key)
    if match:
        mode = int(match.group(1))
        return [(p.shape[mode], p.shape[mode])] if mode < p.dim() else \
            f"none (the parameter has no dimension {mode})"
    if key.startswith("kfac_"):
        return _kfac_shapes(opt, p, key)
    return None


_FACTORED = ("row_var", "col_var", "variance")


def _factored_shape(p: torch.Tensor, key: str) -> list[tuple] | str:
    shape = tuple(p.shape)
    if key == "variance":
        return [shape] if p.dim() < 2 else "none (a tensor of order >= 2 keeps row_var and col_var)"
    if p.dim() < 2:
        return f"none (a tensor of order {p.dim()} keeps variance, not {key})"
    return [shape[:-1] + (1,)] if key == "row_var" else [shape[:-2] + (1, shape[-1])]


def _kfac_shapes(opt, p: torch.Tensor, key: str) -> list[tuple] | str:
    if p.dim() not in (2, 4):
        return ("none (K-FAC factors belong to a Linear layer's 2-D weight or a Conv2d "
                "layer's 4-D one)")
    out, inp = p.shape[0], math.prod(p.shape[1:])  # a conv's patch: in * kh * kw
    if key.startswith("kfac_S"):
        return [(out, out)]
    tracker = getattr(opt, "_tracker", None)
    module = next((m for m in getattr(tracker, "layers", ()) if m.weight is p), None)
    if module is not None:
        k = inp + (module.bias is not None)
        return [(k, k)]
    return [(inp + 1, inp + 1), (inp, inp)]  # the layer (its bias) is not known yet
