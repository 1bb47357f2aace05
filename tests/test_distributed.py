"""Under DDP, curvature estimates are averaged over the ranks, so replicas stay identical.

Two gloo processes on 127.0.0.1 (tests/_ddp_worker.py) train the same model on
different data. Without averaging, Sophia's and AdaHessian's estimates and K-FAC's
factors are local, and the ranks drift apart; with it, parameters and the whole
optimizer state are identical on both ranks. Adam and Shampoo (gradient-only
curvature) equal one process trained on both ranks' batches together; the newer
gradient-only specs (NEWER_SPECS, non-default values, two param groups) equal one process
stepping on each step's two per-rank gradients averaged, what DDP hands the optimizer.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import curvc

WORKER = Path(__file__).resolve().parent / "_ddp_worker.py"
CURVATURE_SPECS = ["sophia", "adahessian", "sophia_h", "kfac"]
GRADIENT_SPECS = ["adam", "shampoo"]
# K-FAC with every rank computing everything, and with its steps split too
KFAC_VARIANTS = ["kfac_unsplit", "kfac_step_split"]
NEWER_SPECS = ["lion", "lamb", "lars", "adafactor", "muon", "soap", "distributed_shampoo",
               "adan", "adabelief"]


def _gloo():
    sys.path.insert(0, str(WORKER.parent))
    try:
        import _gloo
    finally:
        sys.path.pop(0)
    return _gloo


def _free_port() -> int:
    return _gloo().free_port()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    specs = CURVATURE_SPECS + GRADIENT_SPECS + NEWER_SPECS + KFAC_VARIANTS
    _gloo().run_ranks(WORKER, out, *specs)
    return {(s, r): torch.load(out / f"{s}_{r}.pt", weights_only=False)
            for s in specs for r in range(2)}


def _tensors(state: dict) -> list:
    return [v for k in sorted(state) for _, v in sorted(state[k].items())
            if isinstance(v, torch.Tensor)]


@pytest.mark.parametrize("spec", CURVATURE_SPECS + GRADIENT_SPECS + NEWER_SPECS
                         + KFAC_VARIANTS)
def test_replicas_stay_identical(spec, runs):
    a, b = runs[(spec, 0)], runs[(spec, 1)]
    for p, q in zip(a["params"], b["params"]):
        assert torch.equal(p, q)
    sa, sb = _tensors(a["state"]), _tensors(b["state"])
    assert len(sa) == len(sb) > 0
    for x, y in zip(sa, sb):
        assert torch.equal(x, y)


def test_kfac_inverts_each_layer_on_one_rank_and_equals_every_rank_inverting(runs):
    """The model's two layers: (S 16, A 65) and (S 10, A 16 + 1 = 17). Split, each rank
    inverts one layer's two factors per refresh, together every factor the unsplit run
    inverts on each rank; the broadcast operators give the same training."""
    split = [runs[("kfac", r)]["inverted"] for r in range(2)]
    every = [runs[("kfac_unsplit", r)]["inverted"] for r in range(2)]
    assert every[0] == every[1] and len(every[0]) > 0
    assert set(split[0]).isdisjoint(split[1])
    assert sorted(split[0] + split[1]) == sorted(every[0])
    assert {len(s) for s in split} == {len(every[0]) // 2}
    for p, q in zip(runs[("kfac", 0)]["params"], runs[("kfac_unsplit", 0)]["params"]):
        assert (p - q).norm() <= 1e-12 * q.norm()


def test_kfac_step_split_computes_each_layers_step_on_one_rank(runs):
    """matrix_split = "step": each layer's step f(S) G f(A) is computed by the rank that
    inverts its factors, and broadcast. Each rank computes one layer's step per step,
    together every step the unsplit run computes on each rank; the inverses split as by
    default; the training is the unsplit run's."""
    steps = [runs[("kfac_step_split", r)]["stepped"] for r in range(2)]
    every = runs[("kfac_unsplit", 0)]["stepped"]
    assert runs[("kfac_unsplit", 1)]["stepped"] == every and len(every) > 0
    assert sorted(steps[0] + steps[1]) == sorted(every)
    assert set(steps[0]).isdisjoint(steps[1]) and len(steps[0]) == len(every) // 2
    inverted = [runs[("kfac_step_split", r)]["inverted"] for r in range(2)]
    assert inverted == [runs[("kfac", r)]["inverted"] for r in range(2)]
    for p, q in zip(runs[("kfac_step_split", 0)]["params"], runs[("kfac_unsplit", 0)]["params"]):
        assert (p - q).norm() <= 1e-12 * q.norm()


def _worker():
    sys.path.insert(0, str(WORKER.parent))
    try:
        import _ddp_worker as w
    finally:
        sys.path.pop(0)
    return w


@pytest.mark.parametrize("spec", NEWER_SPECS)
def test_newer_specs_under_ddp_equal_one_process_on_the_averaged_gradients(spec, runs):
    """One process, each step: the gradient of each rank's batch, averaged (g0 + g1) / 2
    as DDP's all-reduce does (the halving exact), then the same compiled step. Float64,
    20 steps; both ranks end where it does. (Not the whole batch's gradient: SOAP's
    float32 basis turns a 1e-14 change in the gradient into a 3e-2 one in the
    parameters by its first preconditioned step, so only the same gradients agree.)"""
    w = _worker()
    net = w.model()
    start = [p.detach().clone() for p in net.parameters()]
    opt = curvc.load(spec)(w.groups(net), **w.NEWER[spec])
    for batches in zip(w.data(0), w.data(1)):
        grads = []
        for xb, yb in batches:
            net.zero_grad()
            torch.nn.functional.cross_entropy(net(xb), yb).backward()
            grads.append([p.grad.clone() for p in net.parameters()])
        for p, g0, g1 in zip(net.parameters(), *grads):
            p.grad = (g0 + g1) / 2
        opt.step()
    for rank in range(2):
        got = runs[(spec, rank)]["params"]
        for p, q, p0 in zip(net.parameters(), got, start, strict=True):
            assert (p.detach() - q).norm() <= 1e-12 * q.norm()
            assert (q - p0).norm() > 1e-3 * p0.norm()  # it trained


@pytest.mark.parametrize("spec", GRADIENT_SPECS)
def test_gradient_only_specs_equal_one_process_on_both_batches(spec, runs):
    w = _worker()
    net = w.model()
    opt = curvc.load(spec)(net.parameters(), lr=0.01)
    for (x0, y0), (x1, y1) in zip(w.data(0), w.data(1)):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(net(torch.cat([x0, x1])), torch.cat([y0, y1]))
        loss.backward()
        opt.step()
    for p, q in zip(net.parameters(), runs[(spec, 0)]["params"]):
        assert (p.detach() - q).norm() <= 1e-5 * q.norm()


def test_curvature_group_false_keeps_local_estimates(tmp_path):
    """The keyword turns the averaging off: without it the ranks' Sophia states differ,
    which is what the averaging is for."""
    port = _free_port()
    code = (f"import sys; sys.argv = ['w', '{{r}}', '2', '{port}', '{tmp_path}', 'sophia'];"
            "import curvc, _ddp_worker as w;"
            "orig = w.train\n"
            "def train(spec, rank):\n"
            "    load = curvc.load\n"
            "    cls = load(spec)\n"
            "    curvc.load = lambda s: type(cls.__name__, (cls,), {'__init__': "
            "lambda self, p, **k: cls.__init__(self, p, curvature_group=False, **k)})\n"
            "    try:\n"
            "        return orig(spec, rank)\n"
            "    finally:\n"
            "        curvc.load = load\n"
            "w.train = train; w.main()")
    env = {**os.environ, "CURVC_QUIET": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(WORKER.parent) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    procs = [subprocess.Popen([sys.executable, "-c", code.replace("{r}", str(r))], env=env,
                              stderr=subprocess.PIPE, text=True) for r in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=3600)
        assert p.returncode == 0, err[-3000:]
    a, b = (torch.load(tmp_path / f"sophia_{r}.pt", weights_only=False) for r in range(2))
    assert any(not torch.equal(x, y) for x, y in zip(_tensors(a["state"]), _tensors(b["state"])))
