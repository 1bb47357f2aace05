"""Batched externs (curvc.runtime.batched): one torch call per group of same-shaped tensors.

* batched == per-tensor (``opt.batch_externs = False``), bitwise where the math is the
  same (Adafactor's factored statistics, Shampoo's roots, Muon's polar factor on the CPU),
  on parameter sets with two groups of shapes, a singleton, a vector, a 3-D tensor and a
  second dtype;
* against references nobody here wrote, on several same-shaped matrices (where batching
  takes over): torch.optim.Muon, torch.optim.Adafactor, pytorch_optimizer.Shampoo;
* the switch takes the per-tensor loop; tensors group by shape, dtype and device;
* a root that fails in the stack takes the per-tensor way (float64 retry, the previous
  root kept); checkpoints round trip bitwise, and a root is its own tensor in them.
"""
import io

import pytest
import torch

import curvc
from curvc.runtime import batched, matrix, roots

# two groups of shapes, a singleton, and a vector
MATRICES = [(16, 32), (16, 32), (16, 32), (32, 16), (32, 16), (8, 8)]
SHAPES = MATRICES + [(32,), (3, 4, 5), (3, 4, 5)]


def _params(shapes, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(*s, dtype=dtype, generator=gen) * 0.5).requires_grad_()
            for s in shapes]


def _twins(name, shapes, dtypes=(torch.float64,), steps=6, **hypers):
    """The same optimizer batched and per tensor on the same parameters and gradients."""
    ps = [p for dt in dtypes for p in _params(shapes, dt)]
    pa = [p.detach().clone().requires_grad_() for p in ps]
    pb = [p.detach().clone().requires_grad_() for p in ps]
    Opt = curvc.load(name)
    a, b = Opt(pa, fused=False, **hypers), Opt(pb, fused=False, **hypers)
    b.batch_externs = False
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for x, y in zip(pa, pb):
            g = torch.randn(x.shape, dtype=x.dtype, generator=gen)
            x.grad, y.grad = g.clone(), g.clone()
        a.step()
        b.step()
    return (a, pa), (b, pb)


def _spy(monkeypatch, module, name, size=lambda args: len(args[0])):
    """Record ``size`` of each call's arguments (a stack's size) to module.name."""
    calls = []
    fn = getattr(module, name)

    def spied(*args, **kwargs):
        calls.append(size(args))
        return fn(*args, **kwargs)
    monkeypatch.setattr(module, name, spied)
    return calls


# --- batched == per tensor ---------------------------------------------------------------

@pytest.mark.parametrize("name, shapes, hypers", [
    ("adafactor", SHAPES + [(32,)], dict(lr=0.05, weight_decay=0.05)),
    ("muon", MATRICES + [(32,)], dict(lr=0.05)),
    ("shampoo", MATRICES + [(32,)], dict(lr=0.05, momentum=0.9)),
])
def test_batched_externs_are_bitwise_the_per_tensor_loop(name, shapes, hypers):
    (a, pa), (b, pb) = _twins(name, shapes, (torch.float64, torch.float32), **hypers)
    for x, y in zip(pa, pb):
        if name == "shampoo":
            # On AVX-512 CPUs a stacked matmul (bmm) and the per-matrix mm take different
            # kernels: equal to a few ulps (3e-8 seen in float32), not bitwise.
            assert (x - y).abs().max() <= 8 * torch.finfo(x.dtype).eps * y.abs().max()
        else:
            assert torch.equal(x, y)
    for x, y in zip(pa, pb):
        sa, sb = a.state[x], b.state[y]
        assert set(sa) == set(sb)
        for key in sa:
            u, v = sa[key], sb[key]
            if name == "shampoo" and u.is_floating_point():  # bmm vs mm, as above
                assert (u - v).abs().max() <= 8 * torch.finfo(u.dtype).eps * v.abs().max(), key
            else:
                assert torch.equal(u, v), key


def test_stacked_roots_of_odd_sizes_are_the_per_tensor_roots_to_rounding():
    # LAPACK on a stack of 3x3, 4x4, 5x5 float64 matrices (not every one aligned as a lone
    # matrix is) may round differently from the lone call: measured up to ~1e-15 relative
    (a, pa), (b, pb) = _twins("shampoo", [(3, 4, 5)] * 3 + [(5, 5)] * 2, steps=6, lr=0.05)
    for x, y in zip(pa, pb):
        assert ((x - y).abs().max() / y.abs().max()).item() <= 1e-12


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-6), (torch.float64, 1e-12)])
def test_stacked_newton_schulz_is_the_per_matrix_iteration(dtype, tol):
    gs = [torch.randn(12, 20, dtype=dtype, generator=torch.Generator().manual_seed(i))
          for i in range(4)]
    kw = dict(steps=5, a=3.4445, b=-4.775, c=2.0315, eps=1e-7)
    stacked = batched.newton_schulz_many(torch.stack(gs), dtype=dtype, **kw)
    for g, out in zip(gs, stacked):
        one = matrix.newton_schulz(g, dtype=dtype, **kw)
        assert (out - one).abs().max().item() <= tol * one.abs().max().item()
    tall = batched.newton_schulz_many(torch.stack(gs).mT, dtype=dtype, **kw)
    torch.testing.assert_close(tall, stacked.mT, rtol=0, atol=tol)


# --- against references nobody here wrote, where batching takes over -----------------------

def _train(params, opt, steps=20, seed=3):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, dtype=p.dtype, generator=gen) * 0.1
        opt.step()


# torch.optim.Muon runs Newton-Schulz in bfloat16 whatever the dtype; on CPUs with AMX-BF16
# its bf16 matmuls accumulate differently from ours, 3e-5 apart after 20 steps (float64).
@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-4), (torch.float32, 1e-4)])
def test_muon_on_same_shaped_matrices_is_torchs(monkeypatch, dtype, tol):
    stacks = _spy(monkeypatch, batched, "newton_schulz_many")
    ref_p, our_p = _params(MATRICES, dtype), _params(MATRICES, dtype)
    _train(ref_p, torch.optim.Muon(ref_p, lr=0.02, weight_decay=0.1))
    _train(our_p, curvc.load("muon")(our_p, lr=0.02, weight_decay=0.1, fused=False))
    assert sorted(set(stacks)) == [2, 3]  # (16, 32) x 3 and (32, 16) x 2 went stacked
    for a, b in zip(ref_p, our_p):
        assert ((a - b).abs().max() / a.abs().max()).item() <= tol


def test_adafactor_on_same_shaped_matrices_is_torchs(monkeypatch):
    diagonals = _spy(monkeypatch, matrix, "factored_diagonal",  # tensors per (row, col) list
                     lambda args: len(args[0][0]) if isinstance(args[0][0], list) else 1)
    ref_p, our_p = _params(SHAPES), _params(SHAPES)
    _train(ref_p, torch.optim.Adafactor(ref_p, lr=0.05, weight_decay=0.05, foreach=False))
    _train(our_p, curvc.load("adafactor")(our_p, lr=0.05, weight_decay=0.05, fused=False))
    assert {3, 2} <= set(diagonals)  # (16, 32) x 3, (32, 16) x 2 and (3, 4, 5) x 2 stacked
    for a, b in zip(ref_p, our_p):
        assert ((a - b).abs().max() / a.abs().max()).item() <= 1e-9


def test_shampoo_on_same_shaped_matrices_is_pytorch_optimizers(monkeypatch):
    po = pytest.importorskip("pytorch_optimizer")
    stacks = _spy(monkeypatch, batched, "_stacked_roots", lambda args: len(args[1]))
    shapes = MATRICES + [(32,), (5,)]
    ref_p, our_p = _params(shapes), _params(shapes)
    _train(ref_p, po.Shampoo(ref_p, lr=0.02))
    _train(our_p, curvc.load("shampoo")(our_p, lr=0.02, fused=False))
    assert 5 in stacks  # the five 16x16 (and 32x32) factors of the two groups, each stacked
    for a, b in zip(ref_p, our_p):
        assert ((a - b).abs().max() / a.abs().max()).item() <= 1e-9


# --- the switch, and the groups --------------------------------------------------------

def test_batch_externs_false_takes_the_per_tensor_loop(monkeypatch):
    def refused(*args, **kwargs):
        raise AssertionError("the batched form ran")
    monkeypatch.setattr(batched, "run", refused)
    polars = _spy(monkeypatch, matrix, "polar", lambda args: 1)
    ps = _params(MATRICES)
    opt = curvc.load("muon")(ps, fused=False)
    opt.batch_externs = False
    _train(ps, opt, steps=2)
    assert len(polars) == 2 * len(MATRICES)  # one call per tensor per step
    opt.batch_externs = True
    with pytest.raises(AssertionError, match="the batched form ran"):
        _train(ps, opt, steps=1)


def test_tensors_group_by_shape_dtype_and_device():
    ts = [torch.zeros(2, 3), torch.zeros(3, 2), torch.zeros(2, 3), torch.zeros(2, 3).double(),
          torch.zeros(3, 2), torch.zeros(4), torch.zeros(2, 3)]
    many, alone = batched.groups(ts)
    assert sorted(many) == [[0, 2, 6], [1, 4]]
    assert alone == [3, 5]  # the float64 (2, 3) and the vector: one of a kind each
    many, alone = batched.groups(ts, lambda t: t.dim() == 2 and t.dtype == torch.float32)
    assert sorted(many) == [[0, 2, 6], [1, 4]] and alone == [3, 5]


def test_mixed_shapes_and_dtypes_make_their_own_stacks(monkeypatch):
    stacks = _spy(monkeypatch, batched, "newton_schulz_many")
    polars = _spy(monkeypatch, matrix, "polar", lambda args: 1)
    ps = _params(MATRICES) + _params([(16, 32), (16, 32)], torch.float32)
    _train(ps, curvc.load("muon")(ps, fused=False), steps=1)
    assert sorted(stacks) == [2, 2, 3]  # f64 (16, 32) x 3, f64 (32, 16) x 2, f32 (16, 32) x 2
    assert polars == [1]  # the (8, 8) alone, per tensor


def test_buckets_with_different_settings_are_not_stacked_together(monkeypatch):
    stacks = _spy(monkeypatch, batched, "newton_schulz_many")
    ps = _params([(16, 32)] * 4)
    groups = [{"params": ps[:2]}, {"params": ps[2:], "ns_steps": 3}]
    _train(ps, curvc.load("muon")(groups, fused=False), steps=1)
    assert stacks == [2, 2]  # ns_steps is the extern's setting: one stack per group


# --- failures and checkpoints -------------------------------------------------------------

def test_a_root_that_fails_in_the_stack_keeps_its_previous_one_and_the_others_do_not():
    gen = torch.Generator().manual_seed(0)
    good = [(lambda x: x @ x.T)(torch.randn(6, 9, generator=gen)) for _ in range(3)]
    bad = torch.full((6, 6), float("nan"))
    previous = torch.eye(6) * 7
    states = [{}, {}, {"r": previous}, {}]
    due = [(states[0], "r", good[0], 0.25), (states[1], "r", good[1], 0.25),
           (states[2], "r", bad, 0.25), (states[3], "r", good[2], 0.25)]
    with pytest.warns(RuntimeWarning, match="previous root is kept"):
        batched.refresh_roots(roots.checked_inverse_root, due, 0.0, 0.0, 0.0)
    assert states[2]["r"] is previous
    for state, g in zip((states[0], states[1], states[3]), good):
        one = roots.checked_inverse_root(g, 0.25, 0.0, torch.float32)
        torch.testing.assert_close(state["r"], one, rtol=0, atol=1e-6)


def test_a_float32_stack_that_fails_is_retried_per_factor_in_float64(monkeypatch):
    eigh = torch.linalg.eigh

    def fails_on_stacks(a, *args, **kwargs):
        if a.dim() == 3:
            raise torch.linalg.LinAlgError("did not converge")
        return eigh(a, *args, **kwargs)
    monkeypatch.setattr(torch.linalg, "eigh", fails_on_stacks)
    gen = torch.Generator().manual_seed(0)
    factors = [(lambda x: x @ x.T)(torch.randn(5, 8, generator=gen)) for _ in range(3)]
    states = [{} for _ in factors]
    batched.refresh_roots(roots.checked_inverse_root,
                          [(s, "r", f, 0.5) for s, f in zip(states, factors)], 0.0, 0.0, 0.0)
    for s, f in zip(states, factors):
        assert torch.equal(s["r"], roots.checked_inverse_root(f, 0.5, 0.0, torch.float32))


@pytest.mark.parametrize("name", ["shampoo", "adafactor", "muon"])
def test_a_resumed_batched_run_is_bitwise_the_uninterrupted_one(name):
    shapes = MATRICES if name == "muon" else SHAPES
    Opt = curvc.load(name)
    pa, pb = _params(shapes), _params(shapes)
    a, b = Opt(pa, lr=0.02, fused=False), Opt(pb, lr=0.02, fused=False)
    _train(pa, a, steps=3, seed=5)
    _train(pb, b, steps=3, seed=5)
    buf = io.BytesIO()
    torch.save(b.state_dict(), buf)
    buf.seek(0)
    resumed = Opt(pb, lr=0.02, fused=False)
    resumed.load_state_dict(torch.load(buf))
    _train(pa, a, steps=3, seed=6)
    _train(pb, resumed, steps=3, seed=6)
    for x, y in zip(pa, pb):
        assert torch.equal(x, y)


def test_a_stacked_root_is_its_own_tensor_in_the_checkpoint():
    ps = _params([(16, 32)] * 3)
    opt = curvc.load("shampoo")(ps, fused=False)
    _train(ps, opt, steps=1)
    for p in ps:
        for key, value in opt.state[p].items():
            if torch.is_tensor(value) and value.dim() == 2:
                assert value.untyped_storage().nbytes() == value.numel() * value.element_size()
