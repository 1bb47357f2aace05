"""Per-tensor RMS outside the factored structure: `clip tensor_rms` and `schedule relative_step`
on any structure the plan steps (tensor-scope reductions), against references nobody here wrote.

* Adafactor's unfactored rule (what ``torch.optim.Adafactor`` does to vectors) written with
  ``structure diagonal`` equals ``torch.optim.Adafactor`` step for step on a model of vectors
  only (float64, non-default hyperparameters, two groups, the per-tensor, foreach and fused paths);
* Adam with an RMS clip and a relative step on matrices, against its equations written
  out below;
* Shampoo with an RMS clip on the step, against ``specs/shampoo.curv``'s own step (the same
  optimizer without the clip) rescaled by the equation.
"""
from __future__ import annotations

import pytest
import torch

import curvc
from curvc.explain import explain

STEPS = 30

DIAGONAL_ADAFACTOR = """
optimizer DiagonalAdafactor
hyper lr = 1e-2, beta2_decay = -0.8, eps = (machine_eps, 1e-3), d = 1.0, weight_decay = 0.0
curvature empirical_fisher
structure diagonal
iterate   power_ema(beta2_decay)
length    gradient_norm
clip      tensor_rms(d)
damping   floor(eps[0])
decay     decoupled(weight_decay)
schedule  relative_step(eps[1])
"""

ADAM_RMS = """
optimizer RmsAdam
hyper lr = 1e-2, betas = (0.9, 0.99), eps = 1e-8, c = 0.5, floor = 1e-3
curvature empirical_fisher
structure diagonal
iterate   ema(betas[1]) bias_corrected
momentum  ema(betas[0]) bias_corrected
length    gradient_norm
damping   add(eps)
clip      tensor_rms(c)
schedule  relative_step(floor)
"""


def _vectors(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(n, generator=g, dtype=torch.float64))
            for n in (7, 5, 3)]


def _loss(params, t):
    # a different quadratic-plus-quartic each step, so gradients change direction
    return sum(((p - 0.1 * t) ** 2).sum() + 0.3 * (p ** 4).sum() * (i + 1)
               for i, p in enumerate(params))


def _train(params, opt):
    for t in range(STEPS):
        opt.zero_grad()
        _loss(params, t).backward()
        opt.step()


@pytest.mark.parametrize("path", [dict(foreach=False), dict(foreach=True), dict(fused=True)])
def test_diagonal_adafactor_equals_torchs_adafactor_on_vectors(tmp_path, path):
    spec = tmp_path / "diagonal_adafactor.curv"
    spec.write_text(DIAGONAL_ADAFACTOR)
    ours, ref = _vectors(), _vectors()
    first = dict(lr=0.05, beta2_decay=-0.6, eps=(1e-4, 2e-3), d=0.7, weight_decay=0.05)
    second = dict(lr=0.02, eps=(None, 5e-3), beta2_decay=-0.9, d=1.3)
    cls = curvc.load(str(spec))
    opt = cls([{"params": ours[:2], **first}, {"params": ours[2:], **second}], **path)
    torch_opt = torch.optim.Adafactor([{"params": ref[:2], **first},
                                       {"params": ref[2:], **second}], foreach=False)
    _train(ours, opt)
    _train(ref, torch_opt)
    for a, b in zip(ours, ref):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12), (a - b).abs().max()
    assert not all(torch.equal(a, b) for a, b in zip(ours, _vectors()))  # it moved


def test_the_rms_clip_binds(tmp_path):
    """With a small d the clip changes the trajectory (so the test above is not vacuous)."""
    spec = tmp_path / "diagonal_adafactor.curv"
    spec.write_text(DIAGONAL_ADAFACTOR)
    a, b = _vectors(), _vectors()
    cls = curvc.load(str(spec))
    _train(a, cls(a, d=0.05))
    _train(b, cls(b, d=1e6))
    assert max((x - y).abs().max().item() for x, y in zip(a, b)) > 1e-3


def _adam_rms_reference(params, lr, betas, eps, c, floor):
    """Adam's bias-corrected u = m^ / (sqrt(v^) + eps), u / max(1, RMS(u) / c), and the
    relative step alpha_t = min(lr, 1/sqrt(t)) max(floor, RMS(theta)), written out."""
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    for t in range(1, STEPS + 1):
        loss = _loss(params, t - 1)
        grads = torch.autograd.grad(loss, params)
        with torch.no_grad():
            for p, g, mi, vi in zip(params, grads, m, v):
                mi.mul_(betas[0]).add_(g, alpha=1 - betas[0])
                vi.mul_(betas[1]).add_(g * g, alpha=1 - betas[1])
                u = (mi / (1 - betas[0] ** t)) / ((vi / (1 - betas[1] ** t)).sqrt() + eps)
                rms = u.pow(2).mean().sqrt()
                u = u / max(1.0, (rms / c).item())
                alpha = min(lr, t ** -0.5) * max(floor, p.pow(2).mean().sqrt().item())
                p.sub_(alpha * u)


def _matrices(seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(*s, generator=g, dtype=torch.float64))
            for s in ((4, 6), (3,), (2, 3, 2))]


@pytest.mark.parametrize("fused", [False, True])
def test_adam_with_an_rms_clip_and_a_relative_step_matches_its_equations(tmp_path, fused):
    spec = tmp_path / "rms_adam.curv"
    spec.write_text(ADAM_RMS)
    hypers = dict(lr=0.2, betas=(0.8, 0.95), eps=1e-6, c=0.3, floor=2e-2)
    ours, ref = _matrices(), _matrices()
    opt = curvc.load(str(spec))(ours, fused=fused, **hypers)
    _train(ours, opt)
    _adam_rms_reference(ref, **hypers)
    for a, b in zip(ours, ref):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-12), (a - b).abs().max()


SHAMPOO_CLIPPED = """
optimizer ClippedShampoo
hyper lr = 1e-1, matrix_eps = 1e-6, c = 0.05
curvature empirical_fisher
structure kronecker
iterate   sum(init = matrix_eps)
length    gradient_norm
clip      tensor_rms(c)
"""


def test_shampoo_with_an_rms_clip_is_shampoos_step_rescaled(tmp_path):
    """One step from the same point: the clipped step is Shampoo's d / max(1, RMS(d) / c)."""
    spec = tmp_path / "clipped_shampoo.curv"
    spec.write_text(SHAMPOO_CLIPPED)
    start = _matrices()
    steps = {}
    for name, cls, kw in (("plain", curvc.load("shampoo"), dict(lr=0.1, matrix_eps=1e-6)),
                          ("clipped", curvc.load(str(spec)), dict(lr=0.1, c=0.05))):
        params = [torch.nn.Parameter(p.detach().clone()) for p in start]
        opt = cls(params, **kw)
        opt.zero_grad()
        _loss(params, 0).backward()
        opt.step()
        steps[name] = [(p - q).detach() for p, q in zip(params, start)]
    for d, dc in zip(steps["plain"], steps["clipped"]):
        rms = (d / 0.1).pow(2).mean().sqrt().item()  # of the step before lr
        assert rms / 0.05 > 1.5  # the clip binds on every tensor here
        assert torch.allclose(dc, d / max(1.0, rms / 0.05), rtol=1e-9, atol=1e-14)


@pytest.mark.parametrize("structure", ["diagonal", "kronecker"])
def test_explain_prints_the_rms_clip_and_the_relative_step(structure):
    text = ADAM_RMS.replace("structure diagonal", f"structure {structure}")
    out = explain(curvc.to_ir(text, "rms_adam.curv"))
    # on the diagonal c is also the curvature's symbol (c = g * g), so the threshold is
    # marked; the Kronecker lines print no c
    c = "(hyperparameter c)" if structure == "diagonal" else "c"
    assert f"d     = d / max(1, RMS(d) / {c})   (RMS over each tensor)" in out
    assert "max(floor, RMS(theta))" in out
