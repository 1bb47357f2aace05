"""`iterate ... every k delayed`: the curvature is accumulated on steps k+1, 2k+1, ..., so
the bias correction's count (and power_ema's t) is the number of those so far, not one
more. Written out below: before the first accumulation C is its zero start (P = eps);
at step k+1 the corrected estimate is c / (1 - (1 - beta)) ... = c exactly.
"""
from __future__ import annotations

import pytest
import torch

import curvc

SPEC = """
optimizer DelayedAdam
hyper lr = 0.05, beta = 0.8, eps = 1e-3
curvature empirical_fisher
structure diagonal
iterate   {iterate}
length    gradient_norm
damping   add(eps)
"""
EVERY, STEPS = 3, 14


def _grads(t: int, p: torch.Tensor) -> torch.Tensor:
    return torch.sin(p * (t + 1)) + 0.1 * t


def _reference(p: torch.Tensor, kind: str, lr=0.05, beta=0.8, eps=1e-3, decay=-0.7):
    """C accumulated on steps k+1, 2k+1, ...; n counts those so far (at least 1)."""
    c, n = torch.zeros_like(p), 0
    for t in range(1, STEPS + 1):
        g = _grads(t, p)
        if (t - 1) % EVERY == 0 and t > 1:
            n += 1
            b = beta if kind == "ema" else 1 - n ** decay
            c = b * c + (1 - b) * g * g
        est = c / (1 - beta ** max(n, 1)) if kind == "ema" else c
        p = p - lr * g / (est.sqrt() + eps)
    return p


@pytest.mark.parametrize("kind,iterate", [
    ("ema", f"ema(beta) bias_corrected every {EVERY} delayed"),
    ("power_ema", f"power_ema(-0.7) every {EVERY} delayed"),
])
def test_a_delayed_refresh_counts_only_the_steps_that_accumulated(tmp_path, kind, iterate):
    spec = tmp_path / "delayed.curv"
    spec.write_text(SPEC.format(iterate=iterate))
    start = torch.linspace(-1, 1, 9, dtype=torch.float64)
    p = torch.nn.Parameter(start.clone())
    opt = curvc.load(str(spec))([p])
    for t in range(1, STEPS + 1):
        p.grad = _grads(t, p.detach())
        opt.step()
    expected = _reference(start.clone(), kind)
    torch.testing.assert_close(p.detach(), expected, rtol=1e-12, atol=1e-14)
