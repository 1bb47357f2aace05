"""Compiled shipped specs match implementations nobody here wrote, step for step.

Each case trains the same MLP on the same digits minibatches for 60 steps
with two param groups and non-default hyperparameters, once with the
reference optimizer and once with the compiled spec, and requires every
parameter to agree to 1e-5 relative error.
"""
import copy

import pytest
import torch

import curvc
from conftest import make_mlp, max_relative_error, train, two_groups

STEPS = 60
TOL = 1e-5


def _po(name):
    pytorch_optimizer = pytest.importorskip("pytorch_optimizer")
    return getattr(pytorch_optimizer, name)


# (spec, reference factory, kwargs of group 1, kwargs of group 2, constructor kwargs)
CASES = {
    "sgd-momentum-dampening": ("sgd", lambda: torch.optim.SGD,
                               dict(lr=0.05), dict(lr=0.02, weight_decay=1e-3),
                               dict(lr=0.1, momentum=0.9, dampening=0.1, weight_decay=1e-4)),
    "sgd-nesterov": ("sgd", lambda: torch.optim.SGD, dict(lr=0.05), dict(momentum=0.5),
                     dict(lr=0.1, momentum=0.9, nesterov=True)),
    "sgd-plain-maximize": ("sgd", lambda: torch.optim.SGD, dict(lr=0.05), dict(lr=0.02),
                           dict(lr=0.1, maximize=True)),
    "adam": ("adam", lambda: torch.optim.Adam, dict(lr=3e-3, betas=(0.8, 0.99)),
             dict(eps=1e-6, weight_decay=1e-2), dict(lr=1e-3, weight_decay=1e-4)),
    "adam-amsgrad": ("adam", lambda: torch.optim.Adam, dict(lr=3e-3), dict(amsgrad=False),
                     dict(lr=1e-3, amsgrad=True)),
    "adam-decoupled-decay": ("adam", lambda: torch.optim.Adam, dict(lr=3e-3, weight_decay=0.1),
                             dict(weight_decay=0.0), dict(lr=1e-3, decoupled_weight_decay=True)),
    "adamw": ("adamw", lambda: torch.optim.AdamW, dict(lr=3e-3, weight_decay=0.1),
              dict(betas=(0.85, 0.95)), dict(lr=1e-3, weight_decay=0.05)),
    "adagrad": ("adagrad", lambda: torch.optim.Adagrad, dict(lr=0.05, lr_decay=1e-3),
                # torch reads initial_accumulator_value from the constructor only
                # (a per-group value is ignored there), so it is passed there.
                dict(eps=1e-8), dict(lr=0.02, weight_decay=1e-3, initial_accumulator_value=0.1)),
    "sign-gd": ("sign_gd", lambda: _po("SignSGD"), dict(lr=1e-3, weight_decay=1e-2),
                dict(momentum=0.5), dict(lr=2e-3, momentum=0.9)),
    "sign-gd-no-momentum": ("sign_gd", lambda: _po("SignSGD"), dict(lr=1e-3), dict(lr=5e-4),
                            dict(momentum=0.0)),
}


@pytest.mark.parametrize("case", CASES)
def test_compiled_spec_matches_reference_for_60_steps(case, digits):
    spec, reference, g1, g2, kw = CASES[case]
    Ref = reference()
    Ours = curvc.load(spec, backend="torch")
    ref_model = make_mlp()
    our_model = copy.deepcopy(ref_model)
    ref_opt = Ref(two_groups(ref_model, g1, g2), **kw)
    our_opt = Ours(two_groups(our_model, g1, g2), **kw)
    ref_losses = train(ref_model, ref_opt, digits, STEPS)
    our_losses = train(our_model, our_opt, digits, STEPS)
    assert max_relative_error(ref_model, our_model) <= TOL
    assert our_losses == pytest.approx(ref_losses, rel=1e-4)
    if not kw.get("maximize"):
        assert our_losses[-1] < our_losses[0]  # it trains, not only matches


def test_normalized_gd_matches_the_papers_formula(digits):
    """d = lr * g / ||g||_2 with the norm over all parameters of both groups."""
    NormalizedGD = curvc.load("normalized_gd", backend="torch")
    model = make_mlp()
    ref = copy.deepcopy(model)
    opt = NormalizedGD(two_groups(model, dict(lr=0.05), dict(lr=0.02)))
    lrs = [0.05, 0.05, 0.02, 0.02]  # per parameter of ref, in order
    for xb, yb in __import__("conftest").batches(digits, STEPS):
        for m in (model, ref):
            m.zero_grad()
            torch.nn.functional.cross_entropy(m(xb), yb).backward()
        opt.step()
        with torch.no_grad():
            norm = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in ref.parameters()))
            for p, lr in zip(ref.parameters(), lrs):
                p -= lr * p.grad / norm.float()
    assert max_relative_error(ref, model) <= TOL


def test_normalized_gd_leaves_parameters_alone_when_the_gradient_is_zero():
    NormalizedGD = curvc.load("normalized_gd", backend="torch")
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.zeros(3)
    NormalizedGD([p], lr=0.1).step()
    assert torch.equal(p.detach(), torch.ones(3))
