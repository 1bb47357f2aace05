"""Scoped norms in the Triton rendering against the torch rendering of the same plan.

A tensor-scope sum is one value per tensor of a bucket (each tensor's blocks summed in
order, kept at the tensor's place in the bucket); a group-scope one is the bucket's
group's. Without CUDA the kernels run in Triton's interpreter (TRITON_INTERPRET=1, set
before triton is imported); tensors stay small.
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
pytestmark = [pytest.mark.filterwarnings("ignore:divide by zero encountered in log2:RuntimeWarning"),
              pytest.mark.skipif(not (INTERPRET or HAS_CUDA), reason="needs CUDA or TRITON_INTERPRET=1")]

SPECS = {
    # a group-scope gradient clip read by a tensor-scope step clip: two passes of sums
    "both_clips": """hyper lr = 0.05, c = 1.0, s = 0.5
curvature empirical_fisher
structure diagonal
iterate   ema(0.9) bias_corrected
momentum  ema(0.8)
length    gradient_norm
damping   add(1e-3)
decay     l2(0.01)
clip      global_norm(c, scope = group, on = gradient)
clip      global_norm(s, scope = tensor)
""",
    # a tensor-scope gradient clip read by a tensor-scope normalization's sum
    "normalized_tensor": """hyper lr = 0.05, c = 2.0
curvature constant
structure scalar
length    normalized(scope = tensor)
momentum  heavy_ball(0.5)
clip      global_norm(c, scope = tensor, on = gradient)
""",
    # Shampoo's head and tail kernels: the tail's normalization reads the head's clip
    "kronecker_group": """hyper lr = 0.05, c = 1.0
curvature empirical_fisher
structure kronecker
length    normalized(scope = group)
damping   inside(1e-2)
clip      global_norm(c, scope = tensor, on = gradient)
""",
    # rms(x): a tensor-scope sum over the tensor's element count (a shape host value)
    "rms_update": """hyper lr = 0.05, c = 1.0
curvature empirical_fisher
structure diagonal
iterate   ema(0.9)
length    gradient_norm
damping   add(1e-3)
update = direction / (rms(direction) + 1e-8) * c
""",
    # the eigenbasis stage between the head and tail kernels, rms in the tail (SOAP's)
    "eigenbasis_rms": """hyper lr = 0.05, c = 1.0
curvature empirical_fisher
structure kronecker(basis = eigen, factor_beta = 0.9) every 2
iterate   ema(0.9)
momentum  ema(0.8)
length    gradient_norm
damping   add(1e-3)
update = direction / (rms(direction) + 1e-8) * c
""",
}


def _load(tmp_path, name: str, backend: str):
    path = tmp_path / f"{name}_{backend}.curv"
    path.write_text(f"optimizer Scoped\n{SPECS[name]}")
    return curvc.load(str(path), backend=backend)


def _params(device, dtype):
    """Two groups: a 0-d tensor, one of two interpreter blocks (300 > 256), a matrix; then
    small ones, an empty one among them."""
    g = torch.Generator().manual_seed(0)
    shapes = [[(), (300,), (6, 5)], [(3,), (0,), (4, 2), (7,)]]
    return [[torch.randn(s, generator=g).to(device=device, dtype=dtype).requires_grad_(True)
             for s in group] for group in shapes]


def _trajectory(cls, device, dtype, steps=4):
    groups = _params(device, dtype)
    opt = cls([{"params": groups[0]}, {"params": groups[1], "lr": 0.02, "c": 0.3}])
    params = groups[0] + groups[1]
    for step in range(steps):
        g = torch.Generator().manual_seed(50 + step)
        for p in params:
            p.grad = (3.0 * torch.randn(p.shape, generator=g)).to(device=device, dtype=dtype)
        opt.step()
    return params, opt


# The interpreter hands float arguments to kernels as float32 (compiled kernels take
# them as float64), so hyperparameters carry ~1e-7 error there.
@pytest.mark.parametrize("dtype, rel", [(torch.float64, 1e-6 if INTERPRET else 1e-12),
                                        (torch.float32, 1e-5)])
@pytest.mark.parametrize("name", sorted(SPECS))
def test_triton_equals_the_torch_rendering(tmp_path, name, dtype, rel):
    device = "cuda" if HAS_CUDA else "cpu"
    if name == "kronecker_group" and dtype == torch.float32:
        rel = 1e-4  # eigendecompositions in float64 of float32 statistics, either way
    ours, opt = _trajectory(_load(tmp_path, name, "triton"), device, dtype)
    ref, ropt = _trajectory(_load(tmp_path, name, "torch"), device, dtype)
    for k, (a, b) in enumerate(zip(ours, ref)):
        a, b = a.detach().double().cpu(), b.detach().double().cpu()
        if b.numel():
            err = float((a - b).abs().max())
            assert err <= rel * max(float(b.abs().max()), 1e-30), (name, k, err)
        for key, v in ropt.state[ref[k]].items():
            if isinstance(v, torch.Tensor) and v.shape == b.shape and v.numel() and \
                    key != "step":
                w = opt.state[ours[k]][key].double().cpu()
                assert float((w - v.double().cpu()).abs().max()) <= \
                    rel * max(float(v.double().abs().max()), 1e-30), (name, k, key)
