"""Grafting composes with the other axes: every graft over every structure, momentum,
length and iterate is refused at check with a reason, or compiles and trains.

The cross product (tests/test_cross_product.py) leaves the graft at its default, none;
here each of its forms meets each structure (the Kronecker one plain, blocked and merged),
no momentum, a momentum of the gradient and one of the step, every length and two
iterates. `graft sgd` on a momentum once passed check and wrote a module Python could
not import (its step, the momentum itself, was the extern's value and its graft
operand: one name twice in a signature).
"""
from __future__ import annotations

import itertools

import pytest
import torch

import curvc
from curvc.compiler import _load_cached
from curvc.errors import CurvError

GRAFTS = ("sgd", "adagrad(0.1)", "rmsprop(0.9, 0.1)", "adam(0.9, 0.1, start = 2)")
STRUCTURES = ("scalar", "diagonal", "kronecker", "kronecker(max_dim = 2, block = true)",
              "kronecker(merge_dims = true)", "factored", "dense")
MOMENTA = ("", "momentum ema(0.5)\n", "momentum heavy_ball(0.5, on = step)\n")
LENGTHS = ("gradient_norm", "none", "normalized", "eigen_sign")
ITERATES = ("ema(0.9)", "sum")


def _source(graft: str, structure: str, momentum: str, length: str, iterate: str) -> str:
    return (f"optimizer Grafted\nhyper lr = 1e-2\ncurvature empirical_fisher\n"
            f"structure {structure}\niterate {iterate}\nlength {length}\n"
            f"damping add(1e-3)\n{momentum}graft {graft}\n")


@pytest.mark.parametrize("graft,structure,momentum",
                         list(itertools.product(GRAFTS, STRUCTURES, MOMENTA)))
def test_every_graft_combination_is_refused_with_a_reason_or_trains(graft, structure,
                                                                     momentum):
    for length, iterate in itertools.product(LENGTHS, ITERATES):
        source = _source(graft, structure, momentum, length, iterate)
        try:
            curvc.to_ir(source)
        except CurvError as e:
            assert e.key in ("combo.clash", "codegen.unsupported"), (source, str(e))
            continue
        cls = _load_cached(source, "<grafted>", "torch")  # check passed: compile must too
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(),
                                    torch.nn.Linear(3, 2))
        opt = cls(model.parameters())
        before = [p.detach().clone() for p in model.parameters()]
        for _ in range(4):
            opt.zero_grad()
            model(torch.randn(8, 4)).pow(2).mean().backward()
            opt.step()
        assert all(torch.isfinite(p).all() for p in model.parameters()), source
        assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters())), source


def test_some_combinations_of_each_graft_train():
    """The loop above would pass if check refused everything: each graft trains on a
    Kronecker structure at least."""
    for graft in GRAFTS:
        curvc.to_ir(_source(graft, "kronecker", MOMENTA[1], "gradient_norm", "sum"))
