"""Counts that size a loop or an allocation at step time are bounded, in check
(spec defaults and literals) and in the constructor (keywords, param groups);
a nonzero literal that a float cannot hold (1e-999) is refused, not read as 0.

The bounds, written out here: samples <= 10,000, history <= 100,000,
iterations <= 1,000,000, max_dim <= 2**20, every <= 2**24.
"""
from __future__ import annotations

import pytest
import torch

import curvc
from curvc.errors import CurvError

ROOT = curvc.resolve("adam").parent
ADAHESSIAN = (ROOT / "adahessian.curv").read_text()
LBFGS = (ROOT / "lbfgs.curv").read_text()
SHAMPOO = (ROOT / "shampoo.curv").read_text()
ADAM = (ROOT / "adam.curv").read_text()


def refusal(source: str) -> CurvError:
    with pytest.raises(CurvError) as info:
        curvc.to_ir(source, "bounds.curv")
    return info.value


# --- check: the largest allowed count passes, one more is refused --------------

BOUNDS = [  # (spec, hyperparameter default to replace, the setting, its bound)
    (ADAHESSIAN, "n_samples = 1", "n_samples = {}", 10_000),
    (ADAHESSIAN, "update_each = 1,", "update_each = {},", 2 ** 24),
    (LBFGS, "history_size = 100", "history_size = {}", 100_000),
    (LBFGS, "max_iter = 20", "max_iter = {}", 1_000_000),
    (SHAMPOO, "structure kronecker", "structure kronecker(max_dim = {})", 2 ** 20),
]


@pytest.mark.parametrize("spec, old, new, bound", BOUNDS, ids=[b[2] for b in BOUNDS])
def test_a_count_up_to_its_bound_checks(spec, old, new, bound):
    assert old in spec
    curvc.to_ir(spec.replace(old, new.format(bound)), "bounds.curv")


@pytest.mark.parametrize("spec, old, new, bound", BOUNDS, ids=[b[2] for b in BOUNDS])
def test_a_count_above_its_bound_is_refused_with_the_range(spec, old, new, bound):
    err = refusal(spec.replace(old, new.format(bound + 1)))
    assert err.key == "value.out_of_range"
    assert f"must be a whole number from 1 to {bound}, got " in str(err)


def test_samples_1e308_is_refused_in_check():
    err = refusal(ADAHESSIAN.replace("n_samples = 1", "n_samples = 1e308"))
    assert str(err).startswith("bounds.curv:9:32: error: the 'samples' of curvature "
                               "hutchinson must be a whole number from 1 to 10000, got 1e+308")


# --- underflow -------------------------------------------------------------------

@pytest.mark.parametrize("literal", ["1e-999", "1e-330", "0." + "0" * 400 + "1", "-1e-400"],
                         ids=["1e-999", "1e-330", "400_zeros_then_1", "-1e-400"])
def test_a_nonzero_literal_that_underflows_is_refused(literal):
    err = refusal(ADAM.replace("eps = 1e-8", f"eps = {literal}"))
    assert err.key == "value.underflow"
    assert "too small: it underflows to 0" in str(err)


@pytest.mark.parametrize("literal, value", [("0e-999", 0.0), ("0.000e5", 0.0), ("-0", 0.0),
                                            ("5e-324", 5e-324)])
def test_zero_and_the_smallest_subnormal_are_kept(literal, value):
    opt = curvc.to_ir(ADAM.replace("eps = 1e-8", f"eps = {literal}"), "bounds.curv")
    assert {h.name: h.default for h in opt.hypers}["eps"] == value


# --- the constructor and param groups ----------------------------------------------

@pytest.fixture(scope="module")
def classes():
    return {name: curvc.load(name) for name in ("adahessian", "lbfgs", "shampoo", "sophia_h")}


RUNTIME_REFUSALS = [
    ("adahessian", {"n_samples": 1e308}),
    ("adahessian", {"n_samples": 10_001}),
    ("adahessian", {"update_each": 1e15}),
    ("sophia_h", {"num_samples": 1e6}),
    ("sophia_h", {"update_period": 2 ** 24 + 1}),
    ("lbfgs", {"history_size": 1e12}),
    ("lbfgs", {"max_iter": 1e7}),
    ("shampoo", {"update_freq": 1e15}),
    ("adahessian", {"n_samples": 10 ** 400}),  # a Python int no float can hold
]


@pytest.mark.parametrize("name, kwargs", RUNTIME_REFUSALS,
                         ids=[f"{n}-{k}" for n, kw in RUNTIME_REFUSALS for k in kw])
def test_constructor_refuses_an_unbounded_count(classes, name, kwargs):
    p = torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match="must be a whole number from 1 to"):
        classes[name]([p], **kwargs)


def test_param_group_refuses_an_unbounded_count(classes):
    p, q = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2))
    with pytest.raises(ValueError, match="n_samples"):
        classes["adahessian"]([{"params": [p]}, {"params": [q], "n_samples": 1e308}])


def test_constructor_accepts_counts_at_their_bounds(classes):
    p = torch.nn.Parameter(torch.zeros(3))
    opt = classes["adahessian"]([p], n_samples=10_000, update_each=2 ** 24)
    assert opt.param_groups[0]["n_samples"] == 10_000
    opt = classes["lbfgs"]([p], history_size=100_000, max_iter=1_000_000)
    assert opt.param_groups[0]["history_size"] == 100_000
