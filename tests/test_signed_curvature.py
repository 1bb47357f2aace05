"""No root of a signed estimate: Hutchinson's z * Hz (and the Hessian's diagonal) can be
negative, so a length that takes its root is refused by check, with the fix in the hint.

"Adam with the Hessian diagonal" (hutchinson + gradient_norm) gave NaN from step 2,
whatever the damping: sqrt of a negative entry is NaN before any eps is added.
"""
import pytest
import torch

import curvc
from curvc import resources
from curvc.errors import CurvError
from conftest import batches, make_mlp

HESSIAN_ADAM = """optimizer HessianAdam
hyper lr = 1e-2, betas = (0.9, 0.999), eps = 1e-4
curvature hutchinson{modifier}
structure diagonal
iterate   ema(betas[1]) bias_corrected
momentum  ema(betas[0]) bias_corrected
length    {length}
damping   {damping}
"""

ROOTS = ["gradient_norm", "gradient_norm(power = 2)", "eigen_sign", "normalized"]
DAMPINGS = ["none", "add(eps)", "inside(eps)", "floor(eps)"]


@pytest.mark.parametrize("damping", DAMPINGS)
@pytest.mark.parametrize("length", ROOTS)
def test_a_root_of_hutchinson_is_refused_by_check_with_the_fix(length, damping):
    with pytest.raises(CurvError) as info:
        curvc.to_ir(HESSIAN_ADAM.format(modifier="", length=length, damping=damping), "h.curv")
    err = info.value
    assert err.key == "combo.clash"
    text = str(err)
    assert "curvature hutchinson clashes with length " + length.split("(")[0] in text
    assert "can be negative" in text and "NaN" in text
    assert "squared" in text and "length none" in text  # both fixes in the hint


def test_the_hessian_diagonal_is_refused_by_check_for_the_same_reason():
    src = ("optimizer DiagNewtonAdam\nhyper lr = 1\ncurvature hessian\nstructure diagonal\n"
           "length gradient_norm\n")
    with pytest.raises(CurvError) as info:
        curvc.to_ir(src)
    assert info.value.key == "combo.clash" and "can be negative" in str(info.value)


@pytest.mark.parametrize("length", ["none", "none\nclip elementwise(1)"])
def test_hutchinson_without_a_root_still_compiles(length):
    plan = curvc.to_plan(curvc.to_ir(HESSIAN_ADAM.format(modifier="", length=length,
                                                         damping="floor(eps)")))
    assert plan.estimator.kind == "hutchinson" and plan.stores


@pytest.mark.parametrize("name", ["adahessian", "sophia_h"])
def test_the_shipped_hutchinson_specs_are_unaffected(name):
    path = resources.shipped_specs()[name]
    plan = curvc.to_plan(curvc.to_ir(path.read_text(), str(path)))
    assert plan.estimator.kind == "hutchinson" and plan.stores


@pytest.mark.parametrize("length", ["gradient_norm", "eigen_sign"])
def test_the_suggested_fix_squared_trains_with_a_finite_loss(digits, tmp_path, length):
    spec = tmp_path / "hessian_adam_squared.curv"
    spec.write_text(HESSIAN_ADAM.format(modifier=" squared", length=length, damping="add(eps)"))
    Opt = curvc.load(spec, backend="torch")
    model = make_mlp(hidden=8)
    opt = Opt(model.parameters())
    losses = []
    for xb, yb in batches(digits, 5, batch=64):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(xb), yb)
        loss.backward(create_graph=opt.wants_curvature())
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses))), losses
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_without_the_rule_the_root_of_hutchinson_is_nan(digits, tmp_path, monkeypatch):
    """What the rule prevents: with it switched off the same spec trains into NaN."""
    from curvc import rules
    kept = tuple(r for r in rules.COMBINATION_RULES
                 if r is not rules._rule_no_root_of_a_signed_estimate)
    monkeypatch.setattr(rules, "COMBINATION_RULES", kept)
    spec = tmp_path / "hessian_adam_unchecked.curv"
    spec.write_text(HESSIAN_ADAM.format(modifier="", length="gradient_norm", damping="add(eps)"))
    Opt = curvc.load(spec, backend="torch")
    model = make_mlp(hidden=8)
    opt = Opt(model.parameters())
    for xb, yb in batches(digits, 2, batch=64):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(xb), yb)
        loss.backward(create_graph=opt.wants_curvature())
        opt.step()
    assert not all(torch.isfinite(p).all() for p in model.parameters())
