"""Grafting in the Triton rendering against the torch rendering of the same plan: an
elementwise step rescaled per tensor (tensor-scope sums), and Distributed Shampoo's head
and tail kernels around the blocked extern (the grafted step a third extern operand). Odd
shapes ride along: a 0-d tensor, an empty one, one of two interpreter blocks. Without CUDA
the kernels run in Triton's interpreter (TRITON_INTERPRET=1, set before triton is imported).
"""
from __future__ import annotations

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

triton = pytest.importorskip("triton")

import curvc  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
pytestmark = [
    pytest.mark.filterwarnings("ignore:divide by zero encountered in log2:RuntimeWarning"),
    pytest.mark.skipif(not (INTERPRET or HAS_CUDA), reason="needs CUDA or TRITON_INTERPRET=1")]

GRAFTED = """optimizer GraftedSign
hyper lr = 0.05, betas = (0.9, 0.99), eps = 1e-8, start = 3
curvature constant
structure scalar
length    eigen_sign
momentum  ema(betas[0]) bias_corrected
decay     decoupled(0.01)
graft     adam(betas[1], eps, start = start)
"""
SPECS = {"grafted_sign": GRAFTED, "distributed_shampoo": None}
GROUP2 = {"grafted_sign": dict(lr=0.02, start=1),
          "distributed_shampoo": dict(lr=0.02, max_preconditioner_dim=4, betas=(0.8, 0.95),
                                      precondition_frequency=2, start_preconditioning_step=3,
                                      epsilon=1e-6)}


def _load(tmp_path, name, backend):
    if SPECS[name] is None:
        return curvc.load(name, backend=backend)
    path = tmp_path / f"{name}_{backend}.curv"
    path.write_text(SPECS[name])
    return curvc.load(str(path), backend=backend)


def _trajectory(cls, name, device, dtype, steps=5):
    g = torch.Generator().manual_seed(0)
    shapes = [[(), (300,), (6, 5)], [(3,), (0,), (4, 2, 3), (7,)]]
    groups = [[torch.randn(s, generator=g).to(device=device, dtype=dtype).requires_grad_(True)
               for s in group] for group in shapes]
    opt = cls([{"params": groups[0]}, {"params": groups[1], **GROUP2[name]}])
    params = groups[0] + groups[1]
    for step in range(steps):
        gen = torch.Generator().manual_seed(50 + step)
        for p in params:
            p.grad = (3.0 * torch.randn(p.shape, generator=gen)).to(device=device, dtype=dtype)
        opt.step()
    return params


@pytest.mark.parametrize("name", sorted(SPECS))
def test_triton_equals_the_torch_rendering(tmp_path, name):
    device, dtype = ("cuda" if HAS_CUDA else "cpu"), torch.float64
    rel = 1e-6 if INTERPRET else 1e-12  # the interpreter passes float arguments as float32
    ours = _trajectory(_load(tmp_path, name, "triton"), name, device, dtype)
    ref = _trajectory(_load(tmp_path, name, "torch"), name, device, dtype)
    for k, (a, b) in enumerate(zip(ours, ref)):
        a, b = a.detach().cpu(), b.detach().cpu()
        assert torch.isfinite(a).all(), (name, k)
        if b.numel():
            assert float((a - b).abs().max()) <= rel * float(b.abs().max()), (name, k)
