"""Compiled optimizers under FSDP2, ZeRO and distributed checkpoints.

Two gloo processes on 127.0.0.1 (tests/_sharded_worker.py, run once for every case)
train the model of tests/_ddp_worker.py on different data per rank. References:
torch.optim.Adam under the same FSDP2 setup, and one process trained on both ranks'
batches together (what data parallelism over two ranks computes: FSDP2 and DDP
average the gradients, and K-FAC's factors are averaged over the ranks). A non-finite
gradient on one rank only (its shard, partition or replica) must skip the step on every
rank: the reference is the same setup on the batches without the poisoned one.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import curvc

HERE = Path(__file__).resolve().parent
WORKER = HERE / "_sharded_worker.py"
sys.path.insert(0, str(HERE))
try:
    import _ddp_worker as w
    import _gloo
    import _sharded_worker as s
finally:
    sys.path.pop(0)

pytestmark = pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
    reason="needs torch.distributed with gloo")


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    where = tmp_path_factory.mktemp("sharded")
    _gloo.run_ranks(WORKER, where)
    return where


def _load(out, case, rank=0):
    return torch.load(out / f"{case}_{rank}.pt", weights_only=False)


def assert_close(got, want, tol):
    assert len(got) == len(want) > 0
    for a, b in zip(got, want):
        assert a.shape == b.shape
        assert (a - b).norm() <= tol * b.norm(), ((a - b).norm() / b.norm()).item()


def _one_process(spec, steps=s.STEPS, drop=None, **kw):
    """``spec`` trained on both ranks' batches together, in this process (without the
    step ``drop``'s)."""
    net = w.model()
    opt = curvc.load(spec)(net if spec == "kfac" else net.parameters(), **kw)
    batches = list(zip(w.data(0), w.data(1)))[:steps]
    for (x0, y0), (x1, y1) in [b for i, b in enumerate(batches) if i != drop]:
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(torch.cat([x0, x1])),
                                          torch.cat([y0, y1])).backward()
        opt.step()
    return [p.detach() for p in net.parameters()]


def assert_same_on_both_ranks(out, case):
    for a, b in zip(_load(out, case, 0)["params"], _load(out, case, 1)["params"]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", ["adam", "adam_unfused", "adam_fused"])
def test_fsdp2_compiled_adam_equals_torch_adam(name, out):
    assert_same_on_both_ranks(out, f"fsdp_{name}")
    assert_close(_load(out, f"fsdp_{name}")["params"], _load(out, "fsdp_torch_adam")["params"], 1e-5)


def test_fsdp2_fused_true_compiles_the_local_shards_step(out):
    """fused=True took the compiled CPU kernel (on the local shards), not a fallback."""
    assert _load(out, "fsdp_adam_fused")["fused"] > 0
    assert _load(out, "fsdp_adam_unfused")["fused"] == 0


def test_fsdp2_torch_adam_reference_is_data_parallel_adam(out):
    """The reference itself: torch's Adam under FSDP2 is Adam on the whole batch."""
    net = w.model()
    opt = torch.optim.Adam(s.groups(net), **s.ADAM)
    for (x0, y0), (x1, y1) in list(zip(w.data(0), w.data(1)))[:s.STEPS]:
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(torch.cat([x0, x1])),
                                          torch.cat([y0, y1])).backward()
        opt.step()
    assert_close(_load(out, "fsdp_torch_adam")["params"], [p.detach() for p in net.parameters()], 1e-5)


@pytest.mark.parametrize("case", ["shampoo", "shampoo_replicated", "kfac", "kfac_step_split",
                                  "distributed_shampoo", "distributed_shampoo_replicated"])
def test_fsdp2_matrix_specs_equal_one_process_on_the_whole_batch(case, out):
    assert_same_on_both_ranks(out, f"fsdp_{case}")
    spec = case.removesuffix("_replicated").removesuffix("_step_split")
    assert_close(_load(out, f"fsdp_{case}")["params"], _one_process(spec, **s.MATRIX[spec]), 1e-9)


def test_fsdp2_distributed_shampoo_splits_equal_every_rank_computing_every_block(out):
    """Grafted, blocked Distributed Shampoo: the split roots (each tensor's blocks on its
    owner, broadcast) give what every rank computing every block gives."""
    assert_close(_load(out, "fsdp_distributed_shampoo")["params"],
           _load(out, "fsdp_distributed_shampoo_replicated")["params"], 1e-12)


@pytest.mark.parametrize("spec", ["shampoo", "distributed_shampoo"])
def test_fsdp2_shampoo_splits_its_blocks_over_the_ranks(spec, out):
    """Each tensor's factors (all of its blocks') live on one rank, and both ranks own
    some; with matrix_split off, every rank keeps every tensor's. (Distributed Shampoo's
    grafting and momentum buffers are elementwise: every rank keeps its shard of them.)"""
    keys = [_load(out, f"fsdp_{spec}", r)["keys"] for r in range(2)]
    owned = [[any("pre_cond" in k for k in ks) for ks in keys[r]] for r in range(2)]
    assert all(a != b for a, b in zip(*owned))  # exactly one owner per block
    assert any(owned[0]) and any(owned[1])
    everywhere = [_load(out, f"fsdp_{spec}_replicated", r)["keys"] for r in range(2)]
    assert everywhere[0] == everywhere[1]
    assert all(any("pre_cond" in k for k in ks) for ks in everywhere[0])


@pytest.mark.parametrize("spec", ["shampoo", "distributed_shampoo"])
def test_split_blocks_share_their_results_in_one_buffer_per_owner(spec, out):
    """The result layouts cross once (a first-step object broadcast per owner); every later
    step's only broadcasts are one flat buffer per owner and dtype, not one per block."""
    split = _load(out, f"fsdp_{spec}")["collectives"]
    assert split[0][0] > 0 and all(objects == 0 for objects, _ in split[1:])
    blocks = sum(1 for p in w.model().parameters())  # each tensor a block with an owner
    assert all(0 < tensors <= 2 < blocks for _, tensors in split[1:])
    assert all(c == (0, 0) for c in _load(out, f"fsdp_{spec}_replicated")["collectives"])


@pytest.mark.parametrize("spec", s.ZERO_SPECS)
def test_zero_redundancy_equals_one_process(spec, out):
    assert_same_on_both_ranks(out, f"zero_{spec}")
    assert_close(_load(out, f"zero_{spec}")["params"], _one_process(spec, lr=0.01), 1e-5)


@pytest.mark.parametrize("name", ["adam", "shampoo"])
def test_dcp_checkpoint_under_fsdp2_resumes_identically(name, out):
    """Saved with torch.distributed.checkpoint at half time, loaded into a fresh model and
    optimizer: the rest of the run is the uninterrupted one's, bit for bit."""
    for rank in range(2):
        got, want = _load(out, f"dcp_{name}", rank), _load(out, f"fsdp_{name}", rank)
        for a, b in zip(got["params"], want["params"]):
            assert torch.equal(a, b)


def test_ddp_checkpoint_saved_on_rank_0_resumes_on_every_rank(out):
    a, b = _load(out, "ddp_ckpt", 0), _load(out, "ddp_ckpt", 1)
    assert_same_on_both_ranks(out, "ddp_ckpt")
    sa = [v for k in sorted(a["state"]) for _, v in sorted(a["state"][k].items())]
    sb = [v for k in sorted(b["state"]) for _, v in sorted(b["state"][k].items())]
    assert len(sa) == len(sb) > 0
    for x, y in zip(sa, sb):
        assert torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y
    assert_close(a["params"], _one_process("shampoo", **s.MATRIX["shampoo"]), 1e-5)


NAN_CASES = pytest.mark.parametrize("where, spec, how", s.NONFINITE,
                                    ids=["_".join(c) for c in s.NONFINITE])


@NAN_CASES
def test_a_nonfinite_gradient_on_one_rank_skips_the_step_on_every_rank(where, spec, how, out):
    """Rank 0 alone poisons its shard (FSDP2), a tensor of its partition (ZeRO) or its
    replica's gradient (DDP): on both ranks that step leaves every whole parameter
    bitwise as it was, and only that one; every parameter counts one skipped step (in
    raise mode both ranks raise: rank 0 naming the parameter, rank 1 the other rank)."""
    for rank in range(2):
        got = _load(out, f"nan_{where}_{spec}_{how}", rank)
        assert got["unchanged"] == [i == s.POISONED for i in range(s.NAN_STEPS)], rank
        if how == "raise":
            (step, error), = got["errors"]
            assert step == s.POISONED
            assert ("param_groups[0]['params'][0]" if rank == 0 else "another rank") in error
        else:
            assert got["errors"] == [] and got["skipped"] and set(got["skipped"]) == {1.0}


@NAN_CASES
def test_the_run_after_a_skipped_step_is_the_run_without_its_batch(where, spec, how, out):
    """Bitwise the same setup trained without the poisoned batch, on both ranks (a
    GradScaler's power-of-two scale unscales exactly in float64)."""
    for rank in range(2):
        got = _load(out, f"nan_{where}_{spec}_{how}", rank)
        want = _load(out, f"dropped_{where}_{spec}", rank)
        for a, b in zip(got["params"], want["params"], strict=True):
            assert torch.equal(a, b)


@pytest.mark.parametrize("where, spec", sorted({c[:2] for c in s.NONFINITE}))
def test_the_run_without_the_poisoned_batch_equals_one_process(where, spec, out):
    assert_same_on_both_ranks(out, f"dropped_{where}_{spec}")
    kw = {**dict(lr=0.01), **s.MATRIX.get(spec, {})}
    assert_close(_load(out, f"dropped_{where}_{spec}")["params"],
           _one_process(spec, steps=s.NAN_STEPS, drop=s.POISONED, **kw), 1e-10)
