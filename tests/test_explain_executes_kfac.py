"""`curvc explain` is executable for K-FAC too: its lines, run as written on a model's
layers, step as the compiled code (tests/test_explain_executes.py's conventions, and
tests/_explained_kfac.py's reading of the per-layer lines).

The model: two Linear layers with biases and a tanh between (float64), a fresh batch of
8 rows every step, the mean cross-entropy. The explained run gets the step's gradient
and, per layer, the rows the lines name: the input rows with a 1 appended, and the
loss's gradient at the layer's output (hooks on the same model). The specs: every
accepted K-FAC point of the language's cross product and the shipped spec's variants.
"""
from __future__ import annotations

import pytest
import torch

import curvc
from curvc import coverage, explain, resources
from curvc.compiler import _load_cached

from _explained import Explained, assert_same_step  # tests/_explained.py

STEPS = 6
LAYERS = [(5, 4), (3, 5)]  # (out, in)


def _cases() -> list[tuple[str, str, dict]]:
    out = [(s.label, s.source, {}) for s in coverage.cross_product()
           if s.forms["curvature"] == "kfac" and coverage.classify(s).key == coverage.ACCEPTED]
    spec = resources.shipped_specs()["kfac"].read_text()
    for i, hypers in enumerate([dict(stat_every=1, inverse_every=1),
                                dict(stat_every=2, inverse_every=3, momentum=0.5,
                                     weight_decay=0.1, damping=0.05, stat_decay=0.8)]):
        out.append((f"shipped-kfac-{i}", spec, hypers))
    return out


CASES = _cases()


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    (o1, i1), (o2, i2) = LAYERS
    return torch.nn.Sequential(torch.nn.Linear(i1, o1), torch.nn.Tanh(),
                               torch.nn.Linear(i2, o2)).double()


def batches(label: str, rows: int, steps: int):
    """(t, x, y) for steps t = 1.., a fresh batch of ``rows`` each, seeded by the case."""
    gen = torch.Generator().manual_seed(sum(map(ord, label)))
    for t in range(1, steps + 1):
        yield (t, torch.randn(rows, LAYERS[0][1], generator=gen, dtype=torch.float64),
               torch.randint(0, LAYERS[-1][0], (rows,), generator=gen))


def compiled(label: str, source: str, hypers: dict, takes_model: bool):
    """(the model, the compiled optimizer on it, explain's lines, the group's
    hyperparameters) for one case."""
    opt_ir = curvc.to_ir(source)
    model = _model()
    cls = _load_cached(source, f"<{label}>", "torch")
    opt = cls(model if takes_model else list(model.parameters()), **hypers)
    h = dict(opt.param_groups[0])
    h.pop("params")
    return model, opt, explain.equations(opt_ir, curvc.to_plan(opt_ir)), h


def _rows(model: torch.nn.Module, x, y) -> tuple[list, list]:
    """The loss's backward pass on (x, y), and per Linear its rows (a, ds)."""
    linears = [m for m in model if isinstance(m, torch.nn.Linear)]
    seen: dict = {}
    handles = []
    for m in linears:
        def hook(module, args, output):
            seen[module] = [args[0].detach()]
            output.register_hook(lambda g, module=module: seen[module].append(g.detach()))
        handles.append(m.register_forward_hook(hook))
    torch.nn.functional.cross_entropy(model(x), y).backward()
    for h in handles:
        h.remove()
    a = [torch.cat([seen[m][0], seen[m][0].new_ones(len(x), 1)], dim=1) for m in linears]
    return a, [seen[m][1] for m in linears]


def test_the_cases_include_the_shipped_spec_and_the_cross_product():
    assert sum(label.startswith("shipped-kfac-") for label, _, _ in CASES) == 2
    assert len(CASES) > 40


@pytest.mark.parametrize("label,source,hypers", CASES, ids=[c[0] for c in CASES])
def test_explain_computes_what_the_code_computes_for_kfac(label, source, hypers):
    model, opt, lines, h = compiled(label, source, hypers, takes_model=True)
    params = list(model.parameters())
    run = Explained(lines, h, [tuple(p.shape) for p in params], layers=LAYERS)
    theta = torch.cat([p.detach().reshape(-1) for p in params]).clone()
    for t, x, y in batches(label, 8, STEPS):
        opt.zero_grad()
        rows = _rows(model, x, y)
        grad = torch.cat([p.grad.reshape(-1) for p in params]).clone()
        opt.step()
        want = run.step(t, theta, grad, None, rows=rows) - theta
        theta = assert_same_step(t, theta, want, params, lines)
