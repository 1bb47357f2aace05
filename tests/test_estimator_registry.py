"""The curvature sources are data (curvc.runtime.estimators): every compiled optimizer
finds the entry of its curvature, and the runtime follows what an entry declares.

A source swapped in for a class changes what the step asks of the training loop and
which function it calls, with no edit to the optimizer: the step reads the entry's
needs, not its name.
"""
import pytest
import torch

import curvc
from curvc import resources, routing
from curvc.runtime import estimators

SHIPPED = resources.shipped_specs()
PER_TENSOR = {"constant": None, "empirical_fisher": None,  # the gradient alone: no source
              "expression": None}  # the gradient and state buffers: none either


def _model_for(Opt):
    model = torch.nn.Sequential(torch.nn.Linear(3, 2))
    return model, Opt(model)


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_every_shipped_optimizer_finds_the_source_of_its_curvature(name):
    ir = curvc.to_ir(SHIPPED[name].read_text(), str(SHIPPED[name]))
    _, opt = _model_for(curvc.load(str(SHIPPED[name]), backend="torch"))
    if routing.is_routed(ir):  # each pipeline's optimizer finds its own
        children = opt._pipelines()
        assert len(children) == len(ir.pipelines)  # the model has a weight and a bias
        for child, pipe, _ in children:
            _finds_its_source(ir.pipeline(pipe.name).opt, child)
        return
    _finds_its_source(ir, opt)


def _finds_its_source(ir, opt):
    source = estimators.source_of(type(opt))
    kind = ir.curvature.kind
    if ir.structure.kind in ("scalar", "diagonal", "factored", "kronecker") and \
            kind in PER_TENSOR:
        assert source is None
        return
    assert source is not None and source.kind == kind
    node = type(opt).PROGRAM.source  # the program names its entry by (kind, scope)
    scope = {"dense": estimators.MODEL, "low_rank": estimators.MODEL}.get(
        ir.structure.kind, estimators.LAYER if kind == "kfac" else estimators.TENSOR)
    assert (node.kind, node.scope) == (kind, scope)
    assert estimators.SOURCES[kind, scope] is source


SPEC = """optimizer Probe
hyper lr = 0.1
curvature fisher
structure diagonal
length    none
"""


def test_a_source_swapped_in_is_what_the_step_asks_for_and_calls(tmp_path, monkeypatch):
    """The Fisher entry needs logits; one that needs a graph instead and yields c = 2
    makes the step take d = g / 2 from backward(create_graph=True) alone."""
    path = tmp_path / "probe.curv"
    path.write_text(SPEC)
    Opt = curvc.load(str(path), backend="torch")
    calls = []

    def twos(params, grads, args, keep_graph):
        calls.append(len(params))
        return [torch.full_like(p, 2.0) for p in params]
    fake = estimators.Source("fisher", estimators.TENSOR, (estimators.GRAPH,),
                             estimators.ESTIMATE, twos, "{name} wants a graph here",
                             "{name} takes nothing")
    monkeypatch.setattr(Opt, "_curvature_source", fake, raising=False)
    w = torch.tensor([1.0, -2.0, 3.0], requires_grad=True)
    opt = Opt([w])
    (w ** 2).sum().backward()  # no graph: the fake's own message
    with pytest.raises(RuntimeError, match="Probe wants a graph here"):
        opt.step()
    with pytest.raises(TypeError, match="Probe takes nothing"):
        opt.estimate_curvature(logits=torch.zeros(1, 2))  # not estimated on request
    opt.zero_grad()
    (w ** 2).sum().backward(create_graph=True)
    assert opt.wants_curvature()
    opt.step()
    assert calls == [1]
    torch.testing.assert_close(w.detach(), torch.tensor([1.0, -2.0, 3.0]) * (1 - 0.1 * 2 / 2))
