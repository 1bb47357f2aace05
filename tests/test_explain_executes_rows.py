"""`curvc explain` is executable for the Kronecker factors of sampled rows too (the Fisher
and Gauss-Newton-Bartlett): the lines, run as written, step as the compiled code.

The rows G_r are random: labels drawn from the model's softmax. The code draws them
(``torch.multinomial``, recorded here as it runs); this test then makes the rows from
those labels as the lines define them, with its own backward passes, and the lines take
them from there (tests/_explained.py, tests/_explained_kronecker.py). The model and the
batches are tests/test_explain_executes_kfac.py's.
"""
from __future__ import annotations

import math

import pytest
import torch

from curvc import coverage

from _explained import Explained, assert_same_step  # tests/_explained.py
from test_explain_executes_kfac import batches, compiled

STEPS = 5
CASES = [(s.label, s.source) for s in coverage.cross_product()
         if s.forms["structure"] == "kronecker" and coverage.classify(s).key == coverage.ACCEPTED
         and s.forms["curvature"] in ("fisher", "gauss_newton_bartlett")
         and "newton_schulz" not in s.source]


def _gradient(model, loss) -> list[torch.Tensor]:
    return [g.detach() for g in torch.autograd.grad(loss, list(model.parameters()),
                                                    retain_graph=True)]


def _rows(kind: str, scale: float, model, x, draws: list) -> list[torch.Tensor]:
    """Per parameter, the stack of rows G_r the lines define, from the drawn labels."""
    logits, batch = model(x), x.shape[0]
    rows = []
    if kind == "fisher":  # per example and label: grad of -log p(y|x), over sqrt(rows)
        (labels,) = draws  # batch x samples
        n = labels.numel()
        for i in range(batch):
            for y in labels[i].tolist():
                nll = -torch.log_softmax(logits[i], dim=-1)[y]
                rows.append([g / math.sqrt(n) for g in _gradient(model, nll)])
    else:  # per draw: sqrt(B / samples) times the gradient of the mean loss on its labels
        for labels in draws:
            loss = torch.nn.functional.cross_entropy(logits, labels.reshape(-1))
            rows.append([g * math.sqrt(batch / len(draws)) for g in _gradient(model, loss)])
    return [torch.stack(r) * math.sqrt(scale) for r in zip(*rows)]


def test_the_cases_are_both_sources_accepted_points():
    kinds = {label.split("-")[0] for label, _ in CASES}
    assert kinds == {"fisher", "gauss_newton_bartlett"} and len(CASES) == 100


@pytest.mark.parametrize("label,source", CASES, ids=[c[0] for c in CASES])
def test_explain_computes_what_the_code_computes_for_sampled_rows(label, source, monkeypatch):
    model, opt, lines, h = compiled(label, source, {}, takes_model=False)
    params = list(model.parameters())
    run = Explained(lines, h, [tuple(p.shape) for p in params])
    assert run.sampled is not None, lines
    kind, scale = run.sampled
    draws: list = []
    multinomial = torch.multinomial

    def recorded(*args, **kw):
        out = multinomial(*args, **kw)
        draws.append(out.clone())
        return out
    monkeypatch.setattr(torch, "multinomial", recorded)
    theta = torch.cat([p.detach().reshape(-1) for p in params]).clone()
    for t, x, y in batches(label, 6, STEPS):
        opt.zero_grad()
        logits = model(x)
        draws.clear()
        opt.estimate_curvature(logits=logits)
        torch.nn.functional.cross_entropy(logits, y).backward()
        grad = torch.cat([p.grad.reshape(-1) for p in params]).clone()
        sampled = _rows(kind, float(h.get(scale, scale)), model, x, list(draws))
        opt.step()
        want = run.step(t, theta, grad, None, sampled=sampled) - theta
        # A factor of a few sampled rows can be ill-conditioned (kappa 1e10 and more): its
        # smallest kept eigenvalue, and so its root, is then known to n eps kappa only,
        # whichever side computes it (two LAPACK builds round it differently).
        n = max(max(s) for s in run.shapes)
        rtol = 1e-9 + n * torch.finfo(torch.float64).eps * run.kron.conditioning
        theta = assert_same_step(t, theta, want, params, lines, rtol)
