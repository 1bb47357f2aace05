"""Routed specs: ``specs/muon_adamw.curv`` against torch.optim.Muon + torch.optim.AdamW
split the same way, and the routing construct itself (rules, mapping, errors at run time).

The references are torch's optimizers, each given the parameters the split in the test
sends it (written here from the rule "2-D and not in a use_adamw group"), never curvc's
routing.
"""
from __future__ import annotations

import copy
import inspect

import pytest
import torch
from typer.testing import CliRunner

import curvc
from curvc.cli import app

MUON_ADAMW = ["lr", "momentum", "nesterov", "ns_steps", "weight_decay", "adamw_lr",
              "adamw_betas", "adamw_eps", "adamw_weight_decay"]


def _params(dtype):
    """A small model's parameters: an embedding (2-D, marked for AdamW), two hidden 2-D
    weights, their biases, a 1-D gain and a 0-d scale."""
    g = torch.Generator().manual_seed(1)
    shapes = {"emb": (10, 8), "w1": (16, 8), "b1": (16,), "w2": (6, 16), "b2": (6,),
              "gain": (16,), "scale": ()}
    return {k: torch.randn(s, dtype=dtype, generator=g).requires_grad_()
            for k, s in shapes.items()}


X = torch.randint(0, 10, (32,), generator=torch.Generator().manual_seed(2))


def _loss(p):
    h = p["emb"][X]
    h = torch.tanh(h @ p["w1"].T + p["b1"]) * p["gain"]
    return ((h @ p["w2"].T + p["b2"]) ** 2).mean() * p["scale"] ** 2


# Two hidden groups with their own values, and the embedding's group, marked for AdamW.
def _ours_groups(p):
    return [{"params": [p["w1"], p["b1"], p["gain"]]},
            {"params": [p["w2"], p["b2"], p["scale"]], "lr": 0.03, "weight_decay": 0.05,
             "momentum": 0.8, "adamw_lr": 2e-3, "adamw_betas": (0.8, 0.99)},
            {"params": [p["emb"]], "use_adamw": True, "adamw_lr": 5e-3,
             "adamw_weight_decay": 0.0}]


HYPERS = dict(lr=0.02, momentum=0.9, nesterov=False, ns_steps=6, weight_decay=0.2,
              adamw_lr=3e-3, adamw_betas=(0.85, 0.995), adamw_eps=1e-6,
              adamw_weight_decay=0.03)


def _references(p, nesterov=False):
    muon = torch.optim.Muon(
        [{"params": [p["w1"]]}, {"params": [p["w2"]], "lr": 0.03, "weight_decay": 0.05,
                                 "momentum": 0.8}],
        lr=0.02, momentum=0.9, nesterov=nesterov, ns_steps=6, weight_decay=0.2)
    adamw = torch.optim.AdamW(
        [{"params": [p["b1"], p["gain"]]},
         {"params": [p["b2"], p["scale"]], "lr": 2e-3, "betas": (0.8, 0.99)},
         {"params": [p["emb"]], "lr": 5e-3, "weight_decay": 0.0}],
        lr=3e-3, betas=(0.85, 0.995), eps=1e-6, weight_decay=0.03)
    return muon, adamw


def _step(opts, p):
    for o in opts:
        o.zero_grad()
    _loss(p).backward()
    for o in opts:
        o.step()


def _worst(pa, pb):
    return max(((pa[k] - pb[k]).abs().max() / pa[k].abs().max()).item() for k in pa)


@pytest.mark.parametrize("dtype, nesterov", [(torch.float64, False), (torch.float64, True),
                                             (torch.float32, True)])
def test_muon_adamw_is_torchs_muon_and_adamw_step_for_step(dtype, nesterov):
    """50 steps; Muon's Newton-Schulz runs in bfloat16 in both (torch's default)."""
    MuonAdamW = curvc.load("muon_adamw")
    pa, pb = _params(dtype), _params(dtype)
    refs = _references(pa, nesterov)
    ours = MuonAdamW(_ours_groups(pb), **{**HYPERS, "nesterov": nesterov}, fused=False)
    worst = 0.0
    for _ in range(50):
        _step(refs, pa)
        _step([ours], pb)
        worst = max(worst, _worst(pa, pb))
    # measured: about 2e-16 in float64 and 1e-7 in float32 (foreach may fuse an op)
    assert worst <= (1e-6 if dtype == torch.float64 else 1e-5), worst
    assert all((pb[k] - _params(dtype)[k]).abs().max() > 0 for k in pb)  # every one moved


def test_each_parameters_state_is_under_its_references_names():
    MuonAdamW = curvc.load("muon_adamw")
    pa, pb = _params(torch.float64), _params(torch.float64)
    refs = _references(pa)
    ours = MuonAdamW(_ours_groups(pb), **HYPERS)
    for _ in range(2):
        _step(refs, pa)
        _step([ours], pb)
    for k in pa:
        ref = next(o for o in refs if pa[k] in o.state).state[pa[k]]
        mine = ours.state[pb[k]]
        assert set(ref) <= set(mine), (k, set(ref), set(mine))
        for key in ref:  # the same values (to rounding: foreach may fuse an op)
            torch.testing.assert_close(torch.as_tensor(ref[key], dtype=mine[key].dtype),
                                       mine[key], rtol=1e-12, atol=0)
    assert set(ours.state[pb["w1"]]) == {"momentum_buffer", "step"}  # curvc counts steps


def test_routes_2d_weights_to_muon_and_the_rest_to_adamw():
    MuonAdamW = curvc.load("muon_adamw")
    p = _params(torch.float32)
    opt = MuonAdamW(_ours_groups(p))
    where = {k: opt.route(t, g) for g in opt.param_groups for k, t in p.items()
             if any(t is q for q in g["params"])}
    assert where == {"w1": "muon", "w2": "muon", "b1": "adamw", "b2": "adamw",
                     "gain": "adamw", "scale": "adamw", "emb": "adamw"}
    conv = torch.zeros(4, 3, 3, 3, requires_grad=True)  # not 2-D: otherwise, AdamW
    assert opt.route(conv, opt.param_groups[0]) == "adamw"


def test_constructor_takes_the_combined_names_with_the_references_defaults():
    MuonAdamW = curvc.load("muon_adamw")
    sig = inspect.signature(MuonAdamW).parameters
    assert list(sig)[:len(MUON_ADAMW) + 1] == ["params"] + MUON_ADAMW
    muon = inspect.signature(torch.optim.Muon).parameters
    adamw = inspect.signature(torch.optim.AdamW).parameters
    for name in ("lr", "momentum", "nesterov", "ns_steps", "weight_decay"):
        assert sig[name].default == muon[name].default, name
    for name in ("lr", "betas", "eps", "weight_decay"):
        assert sig[f"adamw_{name}"].default == adamw[name].default, name
    assert sig["use_adamw"].default is False


def test_state_dict_round_trip_is_bitwise_and_a_fresh_optimizer_continues_identically():
    MuonAdamW = curvc.load("muon_adamw")
    pa, pb = _params(torch.float32), _params(torch.float32)
    a = MuonAdamW(_ours_groups(pa), **HYPERS)
    b = MuonAdamW(_ours_groups(pb), **HYPERS)
    for _ in range(3):
        _step([a], pa)
        _step([b], pb)
    saved = copy.deepcopy(b.state_dict())
    pc = {k: v.detach().clone().requires_grad_() for k, v in pb.items()}
    c = MuonAdamW(_ours_groups(pc))  # the constructor's defaults: the checkpoint's values win
    c.load_state_dict(saved)
    again = c.state_dict()
    assert again["param_groups"] == saved["param_groups"]
    for i, st in saved["state"].items():
        assert set(again["state"][i]) == set(st)
        for key, v in st.items():
            assert v.dtype == again["state"][i][key].dtype and torch.equal(v, again["state"][i][key])
    for _ in range(5):
        _step([a], pa)
        _step([c], pc)
    assert all(torch.equal(pa[k], pc[k]) for k in pa)


def test_a_scheduler_moves_the_muon_lr_and_a_new_group_is_routed():
    MuonAdamW = curvc.load("muon_adamw")
    pa, pb = _params(torch.float64), _params(torch.float64)
    muon = torch.optim.Muon([pa["w1"]], lr=0.02)
    adamw = torch.optim.AdamW([pa["b1"]], lr=1e-3)
    ours = MuonAdamW([pb["w1"], pb["b1"]], lr=0.02)
    scheds = [torch.optim.lr_scheduler.StepLR(o, 2, 0.5) for o in (muon, ours)]
    for i in range(6):
        if i == 3:  # a group added later takes its route then
            muon.add_param_group({"params": [pa["w2"]]})
            adamw.add_param_group({"params": [pa["b2"]], "lr": 1e-3})
            ours.add_param_group({"params": [pb["w2"], pb["b2"]]})
        _step([muon, adamw], pa)
        _step([ours], pb)
        for s in scheds:
            s.step()
    assert _worst({k: pa[k] for k in ("w1", "b1", "w2", "b2")},
                  {k: pb[k] for k in ("w1", "b1", "w2", "b2")}) <= 1e-6


# --- the construct, on a spec of its own -------------------------------------------

ROUTED = """routed Split
hyper lr = 0.1, big_lr = 0.01, big_momentum = (0.5, 0.9), frozen = false
pipeline big = sgd(lr = big_lr, momentum = big_momentum[0], dampening = 0.25)
pipeline small = mine(lr = lr)
route big when numel > 20 or shape[0] == 7
route small when not (numel > 20 or shape[0] == 7) and not frozen
"""
MINE = """optimizer Mine
hyper lr = 1e-3, momentum = 0.3
curvature constant
structure scalar
length    none
momentum  heavy_ball(momentum, nesterov = true)
"""


def _split(tmp_path):
    (tmp_path / "mine.curv").write_text(MINE)  # a pipeline from a file beside the spec
    path = tmp_path / "split.curv"
    path.write_text(ROUTED)
    return curvc.load(str(path), backend="torch")


def test_rules_on_numel_and_shape_with_fixed_and_indexed_values_are_torchs_sgd(tmp_path):
    Split = _split(tmp_path)
    gen = torch.Generator().manual_seed(0)
    shapes = [(5, 5), (7,), (3, 2), (4,)]  # big, big (shape[0] == 7), small, small
    pa = [torch.randn(*s, dtype=torch.float64, generator=gen).requires_grad_() for s in shapes]
    pb = [p.detach().clone().requires_grad_() for p in pa]
    big = torch.optim.SGD(pa[:2], lr=0.02, momentum=0.6, dampening=0.25)
    small = torch.optim.SGD(pa[2:], lr=0.1, momentum=0.3, nesterov=True)
    ours = Split(pb, big_lr=0.02, big_momentum=(0.6, 0.0))
    assert [ours.route(p, ours.param_groups[0]) for p in pb] == ["big", "big", "small", "small"]
    for _ in range(50):
        for ps, opts in ((pa, (big, small)), (pb, (ours,))):
            for o in opts:
                o.zero_grad()
            sum(((p - 1) ** 4).sum() for p in ps).backward()
            for o in opts:
                o.step()
    assert max(((a - b).abs().max() / a.abs().max()).item() for a, b in zip(pa, pb)) <= 1e-6


def test_a_parameter_no_route_takes_is_refused_by_name_at_construction(tmp_path):
    Split = _split(tmp_path)
    small = torch.zeros(2, 2, requires_grad=True)
    with pytest.raises(ValueError, match=r"no route takes param_groups\[1\]\['params'\]\[0\] "
                                         r"\(shape \(2, 2\), ndim 2\).*small when"):
        Split([{"params": [torch.zeros(30, requires_grad=True)]},
               {"params": [small], "frozen": True}])
    opt = Split([torch.zeros(30, requires_grad=True)])
    with pytest.raises(ValueError, match=r"no route takes param_groups\[1\]"):
        opt.add_param_group({"params": [small], "frozen": True})
    assert len(opt.param_groups) == 1  # refused: nothing added
    opt.add_param_group({"params": [small]})
    assert opt.route(small, opt.param_groups[1]) == "small"


def test_explain_and_table_show_each_pipeline_and_its_rule():
    out = CliRunner().invoke(app, ["explain", "muon_adamw"]).output
    assert "route muon       when ndim == 2 and not use_adamw" in out
    assert "pipeline adamw = AdamW" in out and "every parameter no rule takes" in out
    assert "theta = theta - adamw_lr * d" in out  # AdamW's equations in the routed names
    assert "P     = sqrt(C_hat) + adamw_eps" in out
    assert "Newton-Schulz in bfloat16" in out
    assert "fixed at its spec's defaults: ns_coefficients=(3.4445, -4.775, 2.0315)" in out
    table = CliRunner().invoke(app, ["table"]).output
    assert "MuonAdamW/muon" in table and "MuonAdamW/adamw" in table


def test_a_word_and_a_number_fixed_in_the_mapping_reach_the_pipeline(tmp_path):
    path = tmp_path / "rms.curv"
    path.write_text("routed RmsMuon\nhyper lr = 0.02\n"
                    "pipeline muon = muon(lr = lr, adjust_lr_fn = match_rms_adamw, ns_steps = 3)\n"
                    "pipeline sgd = sgd(lr = lr)\n"
                    "route muon when ndim == 2\nroute sgd otherwise\n")
    Rms = curvc.load(str(path))
    gen = torch.Generator().manual_seed(0)
    pa = [torch.randn(8, 5, dtype=torch.float64, generator=gen).requires_grad_(),
          torch.randn(5, dtype=torch.float64, generator=gen).requires_grad_()]
    pb = [p.detach().clone().requires_grad_() for p in pa]
    refs = (torch.optim.Muon([pa[0]], lr=0.02, adjust_lr_fn="match_rms_adamw", ns_steps=3),
            torch.optim.SGD([pa[1]], lr=0.02))
    ours = Rms(pb)
    assert "adjust_lr_fn" not in inspect.signature(Rms).parameters  # fixed, not an argument
    for _ in range(20):
        for ps, opts in ((pa, refs), (pb, (ours,))):
            for o in opts:
                o.zero_grad()
            (torch.tanh(ps[0] @ ps[1]) ** 2).sum().backward()
            for o in opts:
                o.step()
    assert max(((a - b).abs().max() / a.abs().max()).item() for a, b in zip(pa, pb)) <= 1e-6


def test_to_plan_of_a_routed_spec_names_its_pipelines():
    """A routed spec has a plan per pipeline: to_plan says so (a CurvError, not a crash)."""
    from curvc import compiler
    from curvc.errors import CurvError
    routed = curvc.to_ir(*compiler.read("muon_adamw"))
    with pytest.raises(CurvError, match=r"one plan per pipeline \(muon, adamw\)"):
        curvc.to_plan(routed)
    assert curvc.to_plan(routed.pipeline("muon").opt).name == "Muon"


HANDED = """routed Handed
hyper lr = 0.05, sgd_lr = 0.1
pipeline curved = sophia_h(lr = lr, update_period = 1)
pipeline plain = sgd(lr = sgd_lr)
route curved when ndim == 2
route plain otherwise
"""


def test_handed_curvature_reaches_each_pipeline_for_its_own_parameters(tmp_path):
    """step(curvature=...) on the routed optimizer is each pipeline's set_curvature with
    its own parameters' estimates (the 2-D weights' here), in its order."""
    path = tmp_path / "handed.curv"
    path.write_text(HANDED)
    Handed = curvc.load(str(path), backend="torch")
    SophiaH = curvc.load("sophia_h", backend="torch")
    gen = torch.Generator().manual_seed(3)
    shapes = [(4,), (3, 4), (3,), (2, 3)]
    pa = [torch.randn(*s, dtype=torch.float64, generator=gen).requires_grad_() for s in shapes]
    pb = [p.detach().clone().requires_grad_() for p in pa]
    ours = Handed(pa, lr=0.05, sgd_lr=0.1)
    curved = SophiaH([pb[1], pb[3]], lr=0.05, update_period=1)
    plain = torch.optim.SGD([pb[0], pb[2]], lr=0.1)
    for t in range(6):
        est = [torch.rand(*s, dtype=torch.float64, generator=gen) + 0.1 for s in shapes]
        for ps in (pa, pb):
            for p in ps:
                p.grad = None
            sum(((p - 0.5) ** 4).sum() for p in ps).backward()
        ours.step(curvature=[None if len(s) == 1 else e for s, e in zip(shapes, est)])
        curved.step(curvature=[est[1], est[3]])
        plain.step()
    for a, b in zip(pa, pb):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.raises(ValueError, match="got 3 tensors for 4 parameters"):
        ours.set_curvature(est[:3])
