"""Compiled optimizers as ZeroRedundancyOptimizer's local optimizer: K-FAC, and the
whole-model steps it refuses.

Two gloo processes on 127.0.0.1 (tests/_zero_worker.py, run once for every case) train
under DDP on different data per rank. ZeRO gives each rank a partition of the tensors;
K-FAC's layers are hooked with ``zero.optim.track(model)``, their batch factors averaged
over the ranks, so the run equals one process stepping on both ranks' batches together
(what data parallelism computes: the mean loss over the concatenated batch has the mean
of the ranks' gradients, and its K-FAC factors are the mean of the ranks' factors, the
batches being of one size). The dense structure and L-BFGS span all parameters as one
vector and are refused under ZeRO; under DDP alone they equal one process too.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import curvc

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
try:
    import _ddp_worker as w
    import _gloo
    import _zero_worker as z
finally:
    sys.path.pop(0)

pytestmark = pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
    reason="needs torch.distributed with gloo")


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    where = tmp_path_factory.mktemp("zero")
    _gloo.run_ranks(HERE / "_zero_worker.py", where)
    return where


def _load(out, case, rank):
    return torch.load(out / f"{case}_{rank}.pt", weights_only=False)


def _loss_step(opt, net, x, y, spec):
    if spec == "lbfgs":
        def closure():
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(net(x), y)
            loss.backward()
            return loss.detach()
        opt.step(closure)
        return
    opt.zero_grad()
    loss = torch.nn.functional.cross_entropy(net(x), y)
    if opt.wants_curvature():
        opt.estimate_curvature(loss=loss)
    loss.backward()
    opt.step()


def _one_process(spec, kw, model, batches):
    """``spec`` trained in this process on each step's two per-rank batches together."""
    net = model()
    opt = curvc.load(spec)(net if spec == "kfac" else net.parameters(), **kw)
    for (x0, y0), (x1, y1) in batches:
        _loss_step(opt, net, torch.cat([x0, x1]), torch.cat([y0, y1]), spec)
    return [p.detach() for p in net.parameters()]


def _assert_equal_to(got, want, start, tol):
    assert len(got) == len(want) == len(start) > 0
    for a, b, a0 in zip(got, want, start):
        assert a.shape == b.shape
        assert (a - b).abs().max() <= tol * b.abs().max(), ((a - b).abs().max() /
                                                             b.abs().max()).item()
        assert (a - a0).norm() > 1e-3 * a0.norm()  # it trained


def _same_on_both_ranks(out, case):
    a, b = _load(out, case, 0)["params"], _load(out, case, 1)["params"]
    assert len(a) == len(b) > 0
    for p, q in zip(a, b):
        assert torch.equal(p, q)


@pytest.mark.parametrize("setting", sorted(z.KFAC))
def test_kfac_under_zero_equals_one_process_on_both_ranks_batches(setting, out):
    """Float64, 12 steps: statistics and inverses every step or every few, momentum, decay."""
    _same_on_both_ranks(out, f"kfac_{setting}")
    want = _one_process("kfac", z.KFAC[setting], w.model,
                        list(zip(w.data(0), w.data(1)))[:z.STEPS])
    start = [p.detach() for p in w.model().parameters()]
    _assert_equal_to(_load(out, f"kfac_{setting}", 0)["params"], want, start, 1e-10)


@pytest.mark.parametrize("spec", sorted(z.SCALED))
def test_a_grad_scaler_under_zero_gives_the_unscaled_run(spec, out):
    """The scaler's scale reaches ZeRO's local optimizer: K-FAC's output-gradient factor,
    recorded from the scaled backward pass, is unscaled as in one process (it carried
    the scale squared when the scaler unscaled ZeRO's gradients behind its back)."""
    _same_on_both_ranks(out, f"scaled_{spec}")
    assert _load(out, f"scaled_{spec}", 0)["scale"] == 2.0 ** 12  # no step was skipped
    want = _one_process(spec, z.SCALED[spec], w.model,
                        list(zip(w.data(0), w.data(1)))[:z.STEPS])
    start = [p.detach() for p in w.model().parameters()]
    _assert_equal_to(_load(out, f"scaled_{spec}", 0)["params"], want, start, 1e-10)


def _zero_partition(sizes, ranks=2):
    """ZeroRedundancyOptimizer's documented partition: the largest tensor first, each to
    the rank with the fewest elements so far (the lowest rank on a tie)."""
    load, owner = [0] * ranks, [0] * len(sizes)
    for i in sorted(range(len(sizes)), key=lambda i: -sizes[i]):
        owner[i] = min(range(ranks), key=lambda r: (load[r], r))
        load[owner[i]] += sizes[i]
    return owner


@pytest.mark.parametrize("setting", sorted(z.KFAC))
def test_kfac_under_zero_keeps_each_layers_factors_with_the_ranks_owning_its_tensors(
        setting, out):
    """Each tensor's state lives on its owner only; a layer's factors in the weight's state
    where the rank owns the weight, else in the bias's (the first layer's weight and bias
    fall to different ranks, and both keep its factors); nowhere else."""
    params = list(w.model().parameters())
    owner = _zero_partition([p.numel() for p in params])
    assert owner[0] != owner[1]  # the split layer this test is about
    for rank in range(2):
        keys = _load(out, f"kfac_{setting}", rank)["keys"]
        for i, k in enumerate(keys):
            assert (k is not None) == (owner[i] == rank), (rank, i)
        for weight, bias in ((0, 1), (2, 3)):  # the two Linear layers' tensors
            holder = weight if owner[weight] == rank else bias if owner[bias] == rank else None
            for i in (weight, bias):
                if keys[i] is not None:
                    assert ("kfac_A" in keys[i]) == (i == holder), (rank, i)
                    assert ("kfac_S_inv" in keys[i]) == (i == holder), (rank, i)


def test_consolidated_zero_checkpoint_of_kfac_resumes_bitwise(out):
    """consolidate_state_dict(to=0) and state_dict() at half time, saved on rank 0, loaded
    by every rank into a fresh model and ZeRO (tracking again): the rest of the run is the
    uninterrupted one's, bit for bit; the checkpoint holds every owner's factors."""
    for rank in range(2):
        got, want = _load(out, "kfac_resumed", rank), _load(out, "kfac_every", rank)
        assert len(got["params"]) == len(want["params"]) > 0
        for a, b in zip(got["params"], want["params"]):
            assert torch.equal(a, b)
    saved = _load(out, "kfac_resumed", 0)["saved_keys"]
    assert ["kfac_A" in k for k in saved] == [True, True, True, False]


def test_kfac_under_zero_without_its_layers_says_to_track_the_model(out):
    for rank in range(2):
        error = _load(out, "untracked", rank)["error"]
        assert error is not None and "zero.optim.track(model)" in error


def test_kfac_under_zero_refuses_a_rank_without_tensors(out):
    for rank in range(2):
        error = _load(out, "ownerless", rank)["error"]
        assert error is not None and "own no parameter" in error and "[1]" in error


@pytest.mark.parametrize("spec, structure", [("lbfgs", "low_rank structure"),
                                             ("damped_newton", "dense structure")])
def test_zero_refuses_a_step_over_all_parameters_naming_ddp(spec, structure, out):
    """One line, on both ranks: the structure, why (ZeRO partitions the parameters) and
    the alternative."""
    for rank in range(2):
        error = _load(out, f"refused_{spec}", rank)["error"]
        assert error is not None and "\n" not in error
        for part in (structure, "all parameters", "ZeroRedundancyOptimizer",
                     "partitions the parameters", "DistributedDataParallel"):
            assert part in error, (part, error)


@pytest.mark.parametrize("spec", sorted(z.WHOLE))
def test_whole_model_specs_under_ddp_keep_ranks_identical_and_equal_one_process(spec, out):
    """The alternative the refusal names: L-BFGS (its closure returning the ranks' mean
    loss) and damped Newton (the Hessian averaged over the ranks) under DDP alone keep
    parameters and state bitwise alike on both ranks, and equal one process."""
    _same_on_both_ranks(out, f"ddp_{spec}")
    a, b = (_load(out, f"ddp_{spec}", r)["state"] for r in range(2))
    sa = [v for k in sorted(a) for _, v in sorted(a[k].items()) if isinstance(v, torch.Tensor)]
    sb = [v for k in sorted(b) for _, v in sorted(b[k].items()) if isinstance(v, torch.Tensor)]
    assert len(sa) == len(sb) > 0
    for x, y in zip(sa, sb):
        assert torch.equal(x, y)
    want = _one_process(spec, z.WHOLE[spec], z.tiny, list(zip(z.tiny_data(0), z.tiny_data(1))))
    start = [p.detach() for p in z.tiny().parameters()]
    _assert_equal_to(_load(out, f"ddp_{spec}", 0)["params"], want, start, 1e-10)


def _estimated_one_process(spec):
    """``spec`` in one process on both ranks' batches together, its draws seeded as the
    ranks seed theirs."""
    net = w.model()
    opt = curvc.load(spec)(net.parameters(), **z.ESTIMATED[spec])
    batches = list(zip(w.data(0), w.data(1)))[:z.ESTIMATED_STEPS]
    for i, ((x0, y0), (x1, y1)) in enumerate(batches):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(net(torch.cat([x0, x1])), torch.cat([y0, y1]))
        if opt.wants_curvature():
            z.seed(i)
            opt.estimate_curvature(loss=loss)
        loss.backward()
        opt.step()
    return [p.detach() for p in net.parameters()]


@pytest.mark.parametrize("spec", ["adahessian", "sophia_h"])
def test_hutchinson_under_zero_equals_one_process_on_both_ranks_batches(spec, out):
    """Every rank estimates every tensor with the same probes z, and the owner keeps the
    mean of the ranks' z * H_r z: for given z that is z * H z of the mean loss over both
    batches, what one process estimates (drawing the same z for the same tensors)."""
    _same_on_both_ranks(out, f"estimated_{spec}")
    start = [p.detach() for p in w.model().parameters()]
    _assert_equal_to(_load(out, f"estimated_{spec}", 0)["params"],
                     _estimated_one_process(spec), start, 1e-10)


def test_sophia_under_zero_equals_sophia_under_ddp(out):
    """Sophia's sampled-label estimate is not linear in the data (no one-process
    equivalent), but ZeRO's per-tensor average is DDP's, draw for draw; with
    curvature_group=False each rank keeps its own tensors' estimate of its own batch, a
    different run."""
    _same_on_both_ranks(out, "estimated_sophia")
    start = [p.detach() for p in w.model().parameters()]
    got = _load(out, "estimated_sophia", 0)["params"]
    _assert_equal_to(got, _load(out, "ddp_sophia", 0)["params"], start, 1e-12)
    own = _load(out, "own_sophia", 0)["params"]
    assert any((a - b).abs().max() > 1e-6 * b.abs().max() for a, b in zip(own, got))


def test_outside_zero_nothing_is_refused_or_partitioned():
    """With ZeRO's module loaded but no ZeRO building it, L-BFGS and damped Newton are
    built as ever; a subclass of ZeRO building one (its own method on the stack) is
    seen."""
    from torch.distributed.optim import ZeroRedundancyOptimizer

    from curvc.runtime import zero
    for spec in z.WHOLE:
        opt = curvc.load(spec)(z.tiny().parameters(), **z.WHOLE[spec])
        assert zero.all_params(opt) is None

    class Building(ZeroRedundancyOptimizer):
        def __init__(self):  # no process group needed to be seen building
            pass

        def build(self):
            return curvc.load("lbfgs")(z.tiny().parameters())

    with pytest.raises(curvc.CurvError, match="ZeroRedundancyOptimizer"):
        Building().build()
