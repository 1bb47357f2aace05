"""A checkpoint that does not fit the parameters is refused at load time, nothing changed.

torch.optim loads it silently and the next step fails with torch's raw error
after every step counter has advanced; curvc refuses it in ``load_state_dict``,
naming the parameter, the key and both shapes, and the optimizer stays usable.
"""
import copy
import io

import pytest
import torch

import curvc


def _params(shapes, seed=0):
    torch.manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, dtype=torch.float64)) for s in shapes]


def _closure_driven(opt) -> bool:
    source = opt.curvature_source()
    return source is not None and source.needs_closure


def _run(opt, params, steps=2):
    def closure():
        opt.zero_grad()
        loss = sum((p ** 4).sum() + p.sum() for p in params)
        loss.backward(create_graph=opt.wants_curvature())
        return loss
    for _ in range(steps):
        if _closure_driven(opt):
            opt.step(closure)
        else:
            closure()
            opt.step()


def _through_bytes(state_dict):
    blob = io.BytesIO()
    torch.save(state_dict, blob)
    blob.seek(0)
    return torch.load(blob)


def _kfac_model(bias=True):
    torch.manual_seed(0)
    return torch.nn.Linear(4, 3, bias=bias).double()


def _kfac_run(opt, model, steps=2):
    for _ in range(steps):
        opt.zero_grad()
        model(torch.randn(6, 4, dtype=torch.float64)).pow(2).mean().backward()
        opt.step()


# (spec, saved shapes, loaded shapes, the refusal's text)
MISMATCHES = [
    ("adam", [(3, 4), (3,)], [(5, 4), (5,)], r"parameter 0 \(shape \(5, 4\)\).*'exp_avg\w*' has "
                                             r"shape \(3, 4\), expected \(5, 4\)"),
    ("adam", [(3, 4), (3,)], [(3, 4), (2,)], r"parameter 1 \(shape \(2,\)\).*'exp_avg\w*' has "
                                             r"shape \(3,\), expected \(2,\)"),
    ("shampoo", [(4, 3)], [(3, 4)], r"parameter 0.*'pre_cond_0' has shape \(4, 4\), "
                                    r"expected \(3, 3\)"),
    ("shampoo", [(4, 3)], [(4,)], r"parameter 0.*'pre_cond_1' has shape \(3, 3\), expected "
                                  r"none"),
    ("damped_newton", [(3,)], [(4,)], r"parameter 0.*'curvature' has shape \(3, 3\), expected "
                                      r"\(4, 4\)"),
    ("lbfgs", [(3,)], [(4,)], r"parameter 0.*'d' has shape \(3,\), expected \(4,\)"),
]


def _snapshot(opt):
    return copy.deepcopy(opt.state_dict())


def _assert_same(opt, before):
    after = opt.state_dict()
    assert after["param_groups"] == before["param_groups"]
    assert after["state"].keys() == before["state"].keys()
    for pid, st in before["state"].items():
        assert after["state"][pid].keys() == st.keys()
        for key, value in st.items():
            assert _equal(after["state"][pid][key], value), (pid, key)


def _equal(a, b) -> bool:
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    return a == b


@pytest.mark.parametrize("spec, saved, loaded, message", MISMATCHES,
                         ids=[f"{m[0]}-{i}" for i, m in enumerate(MISMATCHES)])
def test_a_checkpoint_of_other_shapes_is_refused_and_changes_nothing(spec, saved, loaded,
                                                                     message):
    Opt = curvc.load(spec, backend="torch")
    old = _params(saved)
    source = Opt(old)
    _run(source, old)
    checkpoint = _through_bytes(source.state_dict())
    new = _params(loaded, seed=1)
    opt = Opt(new, lr=0.01)
    _run(opt, new, steps=1)
    before = _snapshot(opt)
    with pytest.raises(ValueError, match=message):
        opt.load_state_dict(checkpoint)
    _assert_same(opt, before)
    _run(opt, new, steps=1)  # still steps, from where it was
    if not (_closure_driven(opt)):
        assert all(float(opt.state[p]["step"]) == 2.0 for p in new)


@pytest.mark.parametrize("key, shape, expected", [
    ("kfac_A", (4, 4), r"\(5, 5\)"),  # the layer has a bias: in + 1
    ("kfac_S_inv", (4, 4), r"\(3, 3\)"),
    ("momentum_buffer", (4, 3), r"\(3, 4\)"),
])
def test_a_kfac_checkpoint_with_factors_of_other_shapes_is_refused(key, shape, expected):
    KFAC = curvc.load("kfac")
    model = _kfac_model()
    opt = KFAC(model, stat_every=1, inverse_every=1)
    _kfac_run(opt, model)
    checkpoint = _through_bytes(opt.state_dict())
    checkpoint["state"][0][key] = torch.zeros(shape, dtype=torch.float64)
    before = _snapshot(opt)
    with pytest.raises(ValueError, match=rf"parameter 0 .*'{key}' has shape "
                                         rf"\({shape[0]}, {shape[1]}\), expected {expected}"):
        opt.load_state_dict(checkpoint)
    _assert_same(opt, before)
    _kfac_run(opt, model, steps=1)
    assert float(opt.state[model.weight]["step"]) == 3.0


def test_a_kfac_checkpoint_of_a_layer_without_bias_is_refused_for_one_with_a_bias():
    """The same weight shape; A is in x in without a bias, (in + 1) x (in + 1) with one."""
    KFAC = curvc.load("kfac")
    plain = torch.nn.Sequential(_kfac_model(bias=False),
                                torch.nn.Linear(3, 3, bias=False).double())
    opt = KFAC(plain, stat_every=1, inverse_every=1)
    _kfac_run(opt, plain)
    biased = torch.nn.Sequential(_kfac_model(bias=True))
    target = KFAC(biased)
    with pytest.raises(ValueError, match=r"'kfac_A' has shape \(4, 4\), expected \(5, 5\)"):
        target.load_state_dict(_through_bytes(opt.state_dict()))
    assert not target.state


def test_every_shipped_spec_still_loads_its_own_checkpoint():
    for spec in ("adam", "adahessian", "sophia", "shampoo", "damped_newton", "lbfgs"):
        Opt = curvc.load(spec, backend="torch")
        params = _params([(3, 2), (4,)])
        opt = Opt(params)
        _run(opt, params)
        again = Opt(_params([(3, 2), (4,)], seed=1))
        again.load_state_dict(_through_bytes(opt.state_dict()))
        assert again.state_dict()["state"].keys() == opt.state_dict()["state"].keys()
    model = _kfac_model()
    opt = curvc.load("kfac")(model, stat_every=1, inverse_every=1)
    _kfac_run(opt, model)
    curvc.load("kfac")(_kfac_model()).load_state_dict(_through_bytes(opt.state_dict()))
