"""The ``nonfinite`` policy of every compiled optimizer, for every shipped spec.

``propagate`` is torch.optim's behaviour (a NaN gradient flows into the
state); ``skip`` leaves the parameters and the state exactly as they were and
the next finite steps continue as if the step had never happened; ``raise``
names the parameter and changes nothing. The reference for ``skip`` is the
same run without the poisoned batch; for ``propagate`` it is torch.optim.Adam.
"""
import copy
import inspect
import os

import pytest
import torch
import torch.nn.functional as F

import curvc
from curvc import compiler, routing
from curvc.resources import shipped_specs
from curvc.runtime.routed import RoutedOptimizer

SPECS = sorted(shipped_specs())


def _routed(name: str) -> bool:
    return routing.is_routed(curvc.to_ir(*compiler.read(name)))
POISONED = 2  # the (0-based) step whose first gradient gets a NaN


def tiny_model(seed: int = 0) -> torch.nn.Module:
    """Small enough for the dense specs (an n x n matrix over 35 parameters)."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3))


def tiny_batches(steps: int, seed: int = 0) -> list:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(steps, 16, 4, generator=g)
    y = torch.randint(0, 3, (steps, 16), generator=g)
    return list(zip(x, y))


def curvature_kind(opt) -> str | None:
    """What the training loop must do for ``opt``'s curvature on a step."""
    if isinstance(opt, RoutedOptimizer):  # its pipelines' (none of the shipped ones has any)
        kinds = {curvature_kind(child) for child, _, _ in opt._pipelines()} - {None}
        assert len(kinds) <= 1, kinds
        return kinds.pop() if kinds else None
    source = opt.curvature_source()
    if source is not None and source.needs_closure:
        return "closure"
    return source.kind if source is not None else None


def hooks_layers(Opt) -> bool:
    """Whether the optimizer takes the model (K-FAC: its statistics come from hooks)."""
    source = Opt.curvature_source()
    return source is not None and source.hooks_layers


def make(name: str, model, backend: str = "torch", **kw):
    Opt = curvc.load(name, backend=backend)
    routed = issubclass(Opt, RoutedOptimizer)  # no pipeline of one reads the model
    params = model if not routed and hooks_layers(Opt) else model.parameters()
    return Opt(params, **kw)


def poison(model, value=float("nan")) -> None:
    with torch.no_grad():
        next(model.parameters()).grad.view(-1)[0] = value


def train_step(opt, model, batch, index: int, *, bad=None, scaler=None) -> None:
    """One step of the usual loop for ``opt``'s kind; ``bad`` poisons the first gradient."""
    torch.manual_seed(1000 + index)  # Hutchinson's and the Fisher's samples: per batch
    xb, yb = batch
    kind = curvature_kind(opt)
    if kind == "closure":
        def closure():
            opt.zero_grad()
            loss = F.cross_entropy(model(xb), yb)
            loss.backward()
            if bad is not None:
                poison(model, bad)
            return loss
        opt.step(closure)
        return
    opt.zero_grad()
    logits = model(xb)
    if kind in ("gauss_newton_bartlett", "fisher") and opt.wants_curvature():
        opt.estimate_curvature(logits=logits)
    loss = F.cross_entropy(logits, yb)
    graph = kind in ("hutchinson", "hessian") and opt.wants_curvature()
    (loss if scaler is None else scaler.scale(loss)).backward(create_graph=graph)
    if bad is not None:
        poison(model, bad)
    if scaler is None:
        opt.step()
    else:
        scaler.step(opt)
        scaler.update()


def snapshot(model, opt) -> tuple:
    return copy.deepcopy(list(model.parameters())), copy.deepcopy(opt.state_dict()["state"])


def assert_same(a, b, ignore=("skipped_steps",)) -> None:
    params_a, state_a = a
    params_b, state_b = b
    for pa, pb in zip(params_a, params_b):
        assert torch.equal(pa, pb)
    state_a, state_b = ({i: {k: v for k, v in st.items() if k not in ignore}
                         for i, st in state.items()} for state in (state_a, state_b))
    state_a, state_b = ({i: st for i, st in state.items() if st} for state in (state_a, state_b))
    assert state_a.keys() == state_b.keys()
    for i in state_a:
        keys = set(state_a[i])
        assert keys == set(state_b[i]), i
        for k in keys:
            va, vb = state_a[i][k], state_b[i][k]
            if isinstance(va, list):
                assert len(va) == len(vb) and all(
                    torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y
                    for x, y in zip(va, vb)), (i, k)
            elif isinstance(va, torch.Tensor):
                assert torch.equal(va, vb), (i, k)
            else:
                assert va == vb, (i, k)


def _run(name, batches, skip_index=None, poison_index=None, backend="torch", **kw):
    model = tiny_model()
    opt = make(name, model, backend, **kw)
    before = None
    for i, batch in enumerate(batches):
        if i == skip_index:
            continue
        if i == poison_index:
            before = snapshot(model, opt)
            train_step(opt, model, batch, i, bad=float("nan"))
            assert_same(snapshot(model, opt), before)  # the step left everything as it was
            continue
        train_step(opt, model, batch, i)
    return model, opt


@pytest.mark.parametrize("name", SPECS)
def test_skip_leaves_everything_and_later_steps_run_as_if_the_step_never_happened(name):
    batches = tiny_batches(POISONED + 2)
    model, opt = _run(name, batches, poison_index=POISONED, nonfinite="skip")
    ref_model, ref_opt = _run(name, batches, skip_index=POISONED, nonfinite="skip")
    assert_same(snapshot(model, opt), snapshot(ref_model, ref_opt))
    counts = [opt.state[p].get("skipped_steps") for p in model.parameters()]
    assert all(c is not None and float(c) == 1.0 for c in counts), counts
    assert all(float(c) == 0.0 for p in ref_model.parameters()
               for c in [ref_opt.state[p].get("skipped_steps", torch.tensor(0.0))])
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("name", SPECS)
def test_raise_names_the_parameter_and_changes_nothing(name):
    batches = tiny_batches(4)
    model = tiny_model()
    opt = make(name, model, nonfinite="raise")
    for i, batch in enumerate(batches[:POISONED]):
        train_step(opt, model, batch, i)
    before = snapshot(model, opt)
    shape = tuple(next(model.parameters()).shape)
    with pytest.raises(ValueError, match=rf"param_groups\[0\]\['params'\]\[0\] \(shape "
                                         rf"\({shape[0]}, {shape[1]}\)\).*non-finite"):
        train_step(opt, model, batches[POISONED], POISONED, bad=float("inf"))
    assert_same(snapshot(model, opt), before)
    train_step(opt, model, batches[POISONED + 1], POISONED + 1)  # training goes on
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("name", SPECS)
# Shampoo's factor turns NaN, has no root, and keeps the previous one with a warning (documented)
@pytest.mark.filterwarnings("ignore:an inverse root of a:RuntimeWarning")
def test_propagate_is_the_default_and_lets_the_nan_in_as_torch_does(name):
    batches = tiny_batches(POISONED + 1)  # a NaN model cannot sample the Fisher's labels
    runs = []
    for kw in ({}, {"nonfinite": "propagate"}):
        model = tiny_model()
        opt = make(name, model, **kw)
        for i, batch in enumerate(batches):
            train_step(opt, model, batch, i, bad=float("nan") if i == POISONED else None)
        runs.append(snapshot(model, opt))
        assert "skipped_steps" not in str(opt.state_dict())
    (pa, _), (pb, _) = runs
    for a, b in zip(pa, pb):
        assert torch.equal(a.nan_to_num(), b.nan_to_num()) and torch.equal(a.isnan(), b.isnan())


def test_propagate_matches_torch_adam_through_a_nan_gradient():
    batches = tiny_batches(4)
    ours, ref = tiny_model(), tiny_model()
    opt = make("adam", ours, lr=1e-2)
    torch_opt = torch.optim.Adam(ref.parameters(), lr=1e-2)
    for i, batch in enumerate(batches):
        for model, o in ((ours, opt), (ref, torch_opt)):
            o.zero_grad()
            F.cross_entropy(model(batch[0]), batch[1]).backward()
            if i == POISONED:
                poison(model)
            o.step()
    for a, b in zip(ours.parameters(), ref.parameters()):
        assert torch.equal(a.isnan(), b.isnan())
        assert torch.allclose(a.nan_to_num(), b.nan_to_num(), rtol=1e-6, atol=1e-7)


def test_an_unknown_policy_is_refused():
    with pytest.raises(ValueError, match="Invalid nonfinite: 'ignore'"):
        make("adam", tiny_model(), nonfinite="ignore")
    model = tiny_model()
    with pytest.raises(ValueError, match="one policy for the whole optimizer"):
        curvc.load("adam", backend="torch")(
            [{"params": list(model[0].parameters()), "nonfinite": "raise"},
             {"params": list(model[2].parameters())}], nonfinite="skip")


RENDERINGS = [("adam", "torch", {"fused": True}),  # the compiled (inductor) CPU pass
              ("adam", "triton", {}), ("sophia_h", "triton", {}),  # Triton's interpreter
              ("normalized_gd", "triton", {})]  # with a global reduction


@pytest.mark.parametrize("name,backend,kw", RENDERINGS)
def test_skip_on_every_rendering_of_the_step(name, backend, kw):
    if backend == "triton":
        pytest.importorskip("triton")
        if os.environ.get("TRITON_INTERPRET") != "1":
            pytest.skip("CPU tensors need TRITON_INTERPRET=1")
    batches = tiny_batches(4)
    model, opt = _run(name, batches, poison_index=POISONED, backend=backend, nonfinite="skip", **kw)
    ref_model, ref_opt = _run(name, batches, skip_index=POISONED, backend=backend,
                              nonfinite="skip", **kw)
    assert_same(snapshot(model, opt), snapshot(ref_model, ref_opt))
    assert all(float(opt.state[p]["skipped_steps"]) == 1.0 for p in model.parameters())


def test_skip_in_the_per_tensor_update_of_a_strided_parameter():
    """A non-contiguous parameter takes the torch rendering's ``update``, one tensor at a time."""
    def run(poisoned):
        torch.manual_seed(0)
        w = torch.nn.Parameter(torch.randn(6, 5).t())  # a transposed (strided) leaf
        opt = curvc.load("adam", backend="torch")([w], lr=0.1, nonfinite="skip")
        for i in range(4):
            if i == POISONED and not poisoned:
                continue
            opt.zero_grad()
            (w.sin() * (i + 1)).sum().backward()
            assert not w.grad.is_contiguous()
            if i == POISONED:
                w.grad[0, 0] = float("nan")
            opt.step()
        return w.detach().clone(), copy.deepcopy(opt.state[w])
    (w, state), (ref_w, ref_state) = run(True), run(False)
    assert torch.equal(w, ref_w)
    assert float(state.pop("skipped_steps")) == 1.0 and float(ref_state.pop("skipped_steps")) == 0
    assert state.keys() == ref_state.keys() and all(
        torch.equal(state[k], ref_state[k]) for k in state)


def _without_the_skip_pass(name, tmp_path, monkeypatch) -> type:
    """The spec compiled as before the nonfinite policy: no keep_on_nonfinite pass."""
    import importlib.util
    from curvc import compiler, lower
    monkeypatch.setattr(lower, "PASSES", tuple(
        (n, p) for n, p in lower.PASSES if n != "keep_on_nonfinite"))
    source, file = compiler.read(name)
    path = tmp_path / f"{name}_unguarded.py"
    path.write_text(compiler.to_module_source(source, file, "torch"))
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return next(v for v in vars(module).values() if isinstance(v, type)
                and issubclass(v, torch.optim.Optimizer) and v.__module__ == path.stem)


def _has_stores(name) -> bool:
    cls = curvc.load(name, backend="torch")
    if _routed(name):  # its pipelines are shipped specs, tested as such
        return False
    source = cls.curvature_source()
    return source is None or not source.whole_model  # whole-model steps have no stores


@pytest.mark.parametrize("name", [n for n in SPECS if _has_stores(n)])
def test_propagate_is_bitwise_the_step_without_the_skip_pass(name, tmp_path, monkeypatch):
    Unguarded = _without_the_skip_pass(name, tmp_path, monkeypatch)
    assert all("nonfinite" not in inspect.getsource(k.update) for k in Unguarded.PROGRAM.kernels)
    runs = []
    for cls in (Unguarded, curvc.load(name, backend="torch")):
        model = tiny_model()
        opt = cls(model if hooks_layers(cls) else model.parameters())
        for i, batch in enumerate(tiny_batches(4)):
            train_step(opt, model, batch, i)
        runs.append(snapshot(model, opt))
    assert_same(*runs)


@pytest.mark.parametrize("name", [n for n in SPECS if not _routed(n)])  # pipelines: theirs
def test_every_store_of_every_plan_keeps_its_old_value_behind_the_runtime_flag(name):
    from curvc import compiler
    from curvc.plan import NONFINITE_FLAG, NONFINITE_VALUE, Load, Op, Reduced, Select
    plan = compiler.to_plan(compiler.to_ir(*compiler.read(name)))
    for st in plan.stores:
        v = st.value
        assert isinstance(v, Select) and v.flag == NONFINITE_FLAG, st.target
        assert v.then == Op("keep_if", (Reduced(NONFINITE_VALUE), Load(st.target), v.other))
    assert plan.stores or plan.whole_model
