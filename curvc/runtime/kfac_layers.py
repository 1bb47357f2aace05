"""The layers K-FAC preconditions, and each one's rows: what its factors are built from.

A layer whose weight W acts as one matrix on many input vectors is, for K-FAC,
a set of rows: a (the input vector, with a 1 for the bias) and ds (the
gradient of the loss at the matching output vector). Per call,

    A_t = a^T a / R        (R: all rows)
    S_t = T ds^T ds        (T: the loss terms a mean-reduced loss averaged over)

* ``nn.Linear``: one row per input vector, over every leading dimension (a
  sequence's positions included), and T = R: each row's output is taken to be
  its own loss term, as a token-level loss has it (curvlinops counts T from
  the loss, so under a per-example loss its S of a Linear applied along extra
  dimensions is R / batch times smaller; on 2-D inputs the two agree).
* ``nn.Conv2d`` (Grosse & Martens, 2016, "A Kronecker-factored approximate
  Fisher matrix for convolution layers"): one row per (example, output
  position): a is the receptive-field patch there (im2col: the input padded as
  the layer's forward pads it, then ``F.unfold`` with its kernel size,
  dilation and stride; channel-major like ``W.reshape(out, in * kh * kw)``),
  ds the output gradient at that position;
  T = the batch, since the loss averages over examples, not over a feature
  map's positions. This is the KFAC-*expand* approximation (Eschenhagen et
  al., 2023): every position an independent row, A the mean over batch and
  positions, S the sum over positions times the batch. A (x) S is Grosse &
  Martens' KFC; how the count of positions is split between the factors
  (which matters once each is damped) is curvlinops', whose default
  (``kfac_approx="expand"``) this is and whose factors it equals.
  KFAC-reduce, curvlinops' other choice, first averages a and sums ds over
  each example's positions, a different matrix; expand is KFC's own
  (positions as independent rows).

A grouped convolution (groups > 1) has one Kronecker pair per group, and the
other convolutions (1-D, 3-D, transposed) other patches; they are refused by
name rather than given the plain gradient beside preconditioned layers.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from curvc.runtime import sharded


def refusal(module: torch.nn.Module) -> str | None:
    """Why K-FAC cannot precondition ``module``'s weight (None: it can, or the module
    is not a convolution and keeps the plain gradient)."""
    conv = torch.nn.modules.conv._ConvNd
    if not isinstance(module, conv):
        return None
    if not isinstance(module, torch.nn.Conv2d) or module.transposed:
        return ("K-FAC here builds Kronecker factors for nn.Linear and nn.Conv2d only, not "
                f"for {type(module).__name__}")
    if module.groups != 1:
        return (f"a grouped convolution (groups={module.groups}) has one Kronecker factor "
                "pair per group, which K-FAC here does not build (groups=1 only)")
    return None


def tracked(module: torch.nn.Module) -> bool:
    """Whether K-FAC builds factors for ``module`` (a supported Linear or Conv2d)."""
    return isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)) and refusal(module) is None


def layer_factors(module: torch.nn.Module, x: torch.Tensor, ds: torch.Tensor):
    """(A_t, S_t) of one call of ``module``, from its input x and output gradient ds."""
    a, ds, terms = _rows(module, x, ds)
    if module.bias is not None:
        a = torch.cat([a, a.new_ones(a.shape[0], 1)], dim=1)
    # scaled in place: a k x k pass fewer each (at k = 513 an extra pass is ~0.1 ms)
    return torch.mm(a.T, a).div_(a.shape[0]), torch.mm(ds.T, ds).mul_(terms)


def _rows(module, x, ds):
    """(a rows, ds rows, loss terms T) of one call."""
    if isinstance(module, torch.nn.Conv2d):
        return _conv_rows(module, x, ds)
    n = math.prod(x.shape[:-1])  # rows, spelled out: reshape(-1, 0) is ambiguous
    return x.reshape(n, x.shape[-1]), ds.reshape(n, ds.shape[-1]), n


def _conv_rows(module: torch.nn.Conv2d, x, ds):
    if x.dim() == 3:  # an unbatched (C, H, W) input: one example
        x, ds = x.unsqueeze(0), ds.unsqueeze(0)
    x = F.pad(x, _pads(module), mode="constant" if module.padding_mode == "zeros"
              else module.padding_mode)
    patches = F.unfold(x, module.kernel_size, dilation=module.dilation, stride=module.stride)
    batch, k, positions = patches.shape
    if ds.shape[0] != batch or ds.shape[2] * ds.shape[3] != positions:
        raise RuntimeError(  # a subclass whose forward is not the convolution itself
            f"K-FAC: the layer {module} gave an output of shape {tuple(ds.shape)}, but its "
            f"input has {positions} patches per example; its forward is not a plain "
            "convolution")
    a = patches.transpose(1, 2).reshape(batch * positions, k)
    ds = ds.reshape(batch, ds.shape[1], positions).transpose(1, 2).reshape(
        batch * positions, ds.shape[1])
    return a, ds, batch


def _pads(module: torch.nn.Conv2d) -> tuple[int, int, int, int]:
    """(left, right, top, bottom): the padding the layer's forward gives its input."""
    pads = []
    for dim in (1, 0):  # F.pad takes the last dimension first
        if module.padding == "same":  # torch's split: the extra one on the right
            total = module.dilation[dim] * (module.kernel_size[dim] - 1)
            pads += [total // 2, total - total // 2]
        else:
            p = 0 if module.padding == "valid" else module.padding[dim]
            pads += [p, p]
    return tuple(pads)


def gradient_matrix(module: torch.nn.Module) -> torch.Tensor:
    """The layer's gradient as K-FAC's matrix: out x (weight's other axes), the
    bias's gradient its last column."""
    w, b = module.weight, module.bias
    # FSDP2's shards: the whole gradient (the layer's step mixes every entry)
    g = sharded.full(w.grad).reshape(w.shape[0], math.prod(w.shape[1:]))  # not -1: zero width
    return g if b is None else torch.cat([g, sharded.full(b.grad)[:, None]], dim=1)


def split_step(module: torch.nn.Module, v: torch.Tensor) -> dict:
    """{weight: its step, bias: its step} from the matrix ``v`` shaped as
    ``gradient_matrix``."""
    w, b = module.weight, module.bias
    k = math.prod(w.shape[1:])
    out = {w: sharded.local_like(v[:, :k].reshape(w.shape).to(w.grad.dtype), w.grad)}
    if b is not None:  # a DTensor's step: this rank's slice of it
        out[b] = sharded.local_like(v[:, k].to(b.grad.dtype), b.grad)
    return out
