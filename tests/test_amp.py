"""``torch.amp.GradScaler`` with every shipped spec: the scaled run is the unscaled run.

The scaler multiplies the loss by its scale; the compiled optimizers take
``grad_scale``/``found_inf`` from it (``_step_supports_amp_scaling``, as
torch's fused optimizers do) and unscale the gradients and every curvature
estimate built from the scaled backward pass. In float32 with a scale of
1024 (a power of two: scaling is exact) the two runs agree to rounding.
"""
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from test_nonfinite import (SPECS, curvature_kind, make, snapshot, assert_same,
                            tiny_batches, tiny_model, train_step)

SCALE = 1024.0


def scaler() -> torch.amp.GradScaler:
    return torch.amp.GradScaler("cpu", init_scale=SCALE, growth_interval=10 ** 6)


def run(name, steps=4, scaled=False, **kw):
    model = tiny_model()
    opt = make(name, model, **kw)
    s = scaler() if scaled else None
    for i, batch in enumerate(tiny_batches(steps)):
        train_step(opt, model, batch, i, scaler=s)
    return model, opt


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


def _trains_on_minibatches(name) -> bool:
    return curvature_kind(make(name, tiny_model())) != "closure"


MINIBATCH = [n for n in SPECS if _trains_on_minibatches(n)]


@pytest.mark.parametrize("name", MINIBATCH)
def test_a_gradscaler_run_equals_the_unscaled_run(name):
    model, opt = run(name, scaled=True)
    ref_model, ref_opt = run(name)
    for p, q in zip(model.parameters(), ref_model.parameters()):
        assert relative(p, q) < 1e-6, name
    ours, ref = opt.state_dict()["state"], ref_opt.state_dict()["state"]
    for i in ref:
        for key, value in ref[i].items():
            if isinstance(value, torch.Tensor) and value.is_floating_point() and value.numel():
                assert relative(ours[i][key], value) < 1e-6, (name, i, key)


@pytest.mark.parametrize("name", MINIBATCH)
def test_a_step_with_an_inf_gradient_under_the_scaler_changes_nothing(name):
    model = tiny_model()
    opt = make(name, model)
    s = scaler()
    batches = tiny_batches(3)
    for i, batch in enumerate(batches[:2]):
        train_step(opt, model, batch, i, scaler=s)
    before = snapshot(model, opt)
    train_step(opt, model, batches[2], 2, bad=float("inf"), scaler=s)
    assert_same(snapshot(model, opt), before)
    assert s.get_scale() == SCALE / 2  # the scaler saw the inf and backed off
    if getattr(opt, "_step_supports_amp_scaling", False):  # the step saw the inf itself
        assert all(float(opt.state[p]["skipped_steps"]) == 1.0 for p in model.parameters())
    # (else, as for a routed spec's optimizer, the scaler skipped the step: no counter)


def test_the_optimizer_unscales_the_gradients_in_place_as_the_scaler_would():
    model, ref = tiny_model(), tiny_model()
    opt = make("adam", model)
    s = scaler()
    xb, yb = tiny_batches(1)[0]
    s.scale(F.cross_entropy(model(xb), yb)).backward()
    F.cross_entropy(ref(xb), yb).backward()
    s.step(opt)
    for p, q in zip(model.parameters(), ref.parameters()):
        assert torch.equal(p.grad, q.grad)  # 1024 is a power of two: exact


class _HostReads(TorchDispatchMode):
    """Records every tensor read on the host (``.item()``, ``float()``, ``bool()``)."""

    def __init__(self):
        super().__init__()
        self.reads = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.reads.append(args[0])
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("name,kw", [("adam", {}), ("adam", {"nonfinite": "skip"}),
                                     ("sophia_h", {"nonfinite": "skip"})])
def test_an_elementwise_step_decides_a_skip_on_the_device(name, kw):
    """No host read of anything but the step counters (torch keeps those on the host too)."""
    model = tiny_model()
    opt = make(name, model, **kw)
    s = scaler()
    for i, batch in enumerate(tiny_batches(3)):
        reads = _HostReads()
        with reads:
            train_step(opt, model, batch, i, bad=float("nan") if i == 2 else None, scaler=s)
        counters = [opt.state[p]["step"] for p in model.parameters()]
        assert all(any(r is c for c in counters) for r in reads.reads), reads.reads
    assert all(float(opt.state[p]["step"]) == 2.0 for p in model.parameters())


@pytest.mark.parametrize("name", ["adahessian", "kfac", "newton"])
def test_estimates_of_the_scaled_graph_after_unscale_are_refused(name):
    """After scaler.unscale_(opt) the scaler does not pass its scale: a Hessian or K-FAC
    factor from the scaled backward cannot be unscaled, so the step refuses."""
    model = tiny_model()
    opt = make(name, model)
    s = scaler()
    xb, yb = tiny_batches(1)[0]
    before = snapshot(model, opt)
    s.scale(F.cross_entropy(model(xb), yb)).backward(create_graph=name != "kfac")
    s.unscale_(opt)
    with pytest.raises(RuntimeError, match=r"after scaler\.unscale_\(opt\) the GradScaler does "
                                           r"not tell the optimizer its scale"):
        s.step(opt)
    assert_same(snapshot(model, opt), before)


def test_unscale_then_clip_then_step_equals_the_unscaled_run_for_adam():
    runs = []
    for scaled in (True, False):
        model = tiny_model()
        opt = make("adam", model, lr=1e-2)
        s = scaler()
        for xb, yb in tiny_batches(4):
            opt.zero_grad()
            loss = F.cross_entropy(model(xb), yb)
            (s.scale(loss) if scaled else loss).backward()
            if scaled:
                s.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
            if scaled:
                s.step(opt)
                s.update()
            else:
                opt.step()
        runs.append(model)
    for p, q in zip(runs[0].parameters(), runs[1].parameters()):
        assert relative(p, q) < 1e-6


def test_lbfgs_under_a_gradscaler_is_refused_clearly():
    model = tiny_model()
    opt = make("lbfgs", model)
    s = scaler()
    xb, yb = tiny_batches(1)[0]

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(xb), yb)
        s.scale(loss).backward()
        return loss
    closure()
    with pytest.raises(RuntimeError, match="GradScaler does not support"):
        s.step(opt, closure)


def test_an_estimate_from_the_unscaled_loss_is_taken_as_it_is():
    """estimate_curvature(loss=...) gets the unscaled loss: nothing to unscale."""
    runs = []
    for scaled in (True, False):
        model = tiny_model()
        opt = make("adahessian", model)
        s = scaler()
        for i, (xb, yb) in enumerate(tiny_batches(3)):
            torch.manual_seed(1000 + i)
            opt.zero_grad()
            loss = F.cross_entropy(model(xb), yb)
            opt.estimate_curvature(loss=loss)
            if scaled:
                s.scale(loss).backward()
                s.step(opt)
                s.update()
            else:
                loss.backward()
                opt.step()
        runs.append(model)
    for p, q in zip(runs[0].parameters(), runs[1].parameters()):
        assert relative(p, q) < 1e-6
