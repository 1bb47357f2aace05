"""K-FAC against the equations of Martens & Grosse (2015), written out here.

No package we can install ships a K-FAC for torch.optim, so the reference
is a two-layer network whose forward pass is written by hand (no hooks):
it takes the pre-activations' gradients from autograd, builds the factors
A = a^T a / N and S = N ds^T ds, averages them (EMA from the identity),
inverts the damped factors with numpy, and takes the natural-gradient step
with weight decay and heavy-ball momentum.
"""
import copy

import numpy as np
import pytest
import torch

import curvc
from conftest import batches, make_mlp


def _reference_run(model, data, steps, *, lr, momentum, beta, damping, weight_decay,
                   stat_every, inverse_every):
    params = [model[0].weight, model[0].bias, model[2].weight, model[2].bias]
    params = [p.detach().double().clone() for p in params]
    A = [np.eye(params[0].shape[1] + 1), np.eye(params[2].shape[1] + 1)]
    S = [np.eye(params[0].shape[0]), np.eye(params[2].shape[0])]
    A_inv, S_inv = [None, None], [None, None]
    buf = [None] * 4
    for t, (xb, yb) in enumerate(batches(data, steps), start=1):
        for p in params:
            p.requires_grad_(True)
        W1, b1, W2, b2 = params
        x = xb.double()
        s1 = x @ W1.T + b1
        h = torch.tanh(s1)
        s2 = h @ W2.T + b2
        loss = torch.nn.functional.cross_entropy(s2, yb)
        grads = torch.autograd.grad(loss, [s1, s2, *params])
        ds = [g.numpy() for g in grads[:2]]
        g = [gr.numpy() for gr in grads[2:]]
        params = [p.detach() for p in params]
        inputs = [x.numpy(), h.detach().numpy()]
        n = x.shape[0]
        if (t - 1) % stat_every == 0:
            for i in range(2):
                a = np.concatenate([inputs[i], np.ones((n, 1))], axis=1)
                A[i] = beta * A[i] + (1 - beta) * (a.T @ a / n)
                S[i] = beta * S[i] + (1 - beta) * (n * ds[i].T @ ds[i])
        if (t - 1) % inverse_every == 0:
            for i in range(2):
                A_inv[i] = np.linalg.inv(A[i] + damping * np.eye(len(A[i])))
                S_inv[i] = np.linalg.inv(S[i] + damping * np.eye(len(S[i])))
        natural = []
        for i in range(2):
            gw, gb = g[2 * i], g[2 * i + 1]
            v = S_inv[i] @ np.concatenate([gw, gb[:, None]], axis=1) @ A_inv[i]
            natural += [v[:, :-1], v[:, -1]]
        new = []
        for k, (p, v) in enumerate(zip(params, natural)):
            d = v + weight_decay * p.numpy()
            buf[k] = d if buf[k] is None else momentum * buf[k] + d
            new.append(torch.tensor(p.numpy() - lr * buf[k]))
        params = new
    return [p.numpy() for p in params]


def _our_run(model, data, steps, **kw):
    KFAC = curvc.load("kfac")
    opt = KFAC(model, **kw)
    losses = []
    for xb, yb in batches(data, steps):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(xb), yb)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return opt, losses


@pytest.mark.parametrize("kw", [
    dict(lr=0.05, momentum=0.0, stat_decay=0.9, damping=1e-2, weight_decay=0.0,
         stat_every=1, inverse_every=1),
    dict(lr=0.02, momentum=0.9, stat_decay=0.95, damping=1e-3, weight_decay=1e-3,
         stat_every=2, inverse_every=3),
])
def test_kfac_matches_the_equations(digits, kw):
    model = make_mlp(hidden=16).double()
    reference = _reference_run(model, digits, 25, beta=kw["stat_decay"],
                               **{k: v for k, v in kw.items() if k != "stat_decay"})
    data = (digits[0].double(), digits[1])
    _, losses = _our_run(model, data, 25, **kw)
    for p, r in zip(model.parameters(), reference):
        np.testing.assert_allclose(p.detach().numpy(), r, rtol=1e-8, atol=1e-10)
    assert losses[-1] < losses[0]


def test_kfac_trains_faster_than_sgd_with_the_same_lr(digits):
    model = make_mlp()
    sgd_model = copy.deepcopy(model)
    _, losses = _our_run(model, digits, 40, lr=0.1, damping=1e-2, stat_every=1,
                         inverse_every=5)
    sgd = torch.optim.SGD(sgd_model.parameters(), lr=0.1, momentum=0.9)
    sgd_losses = []
    for xb, yb in batches(digits, 40):
        sgd.zero_grad()
        loss = torch.nn.functional.cross_entropy(sgd_model(xb), yb)
        loss.backward()
        sgd.step()
        sgd_losses.append(loss.item())
    assert np.mean(losses[-10:]) < np.mean(sgd_losses[-10:])


def test_tensors_outside_linear_layers_take_the_plain_gradient():
    """A LayerNorm's parameters have no K-FAC block: theirs is SGD with momentum."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.LayerNorm(6), torch.nn.Linear(6, 2))
    norm = copy.deepcopy(model[1])
    KFAC = curvc.load("kfac")
    opt = KFAC(model, lr=0.1, momentum=0.5)
    sgd = torch.optim.SGD(norm.parameters(), lr=0.1, momentum=0.5)
    x = torch.randn(8, 4)
    for _ in range(3):
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        for p, q in zip(norm.parameters(), model[1].parameters()):
            p.grad = q.grad.clone()
        opt.step()
        sgd.step()
    for p, q in zip(norm.parameters(), model[1].parameters()):
        torch.testing.assert_close(p, q)


def test_step_without_tracked_layers_says_how_and_changes_nothing():
    KFAC = curvc.load("kfac")
    model = make_mlp(hidden=4)
    opt = KFAC(model.parameters())
    before = [p.detach().clone() for p in model.parameters()]
    model(torch.randn(3, 64)).sum().backward()
    with pytest.raises(RuntimeError, match=r"opt\.track\(model\)"):
        opt.step()
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    assert not opt.state
    opt.track(model)
    opt.zero_grad()
    model(torch.randn(3, 64)).sum().backward()
    opt.step()
    assert "kfac_A" in opt.state[model[0].weight]


def test_a_refused_step_leaves_the_statistics_alone():
    KFAC = curvc.load("kfac")
    model = make_mlp(hidden=4)
    opt = KFAC(model)
    model(torch.randn(3, 64)).sum().backward()
    opt.step()
    saved = copy.deepcopy(opt.state_dict())
    opt.zero_grad()
    model(torch.randn(3, 64)).sum().backward()
    model[2].bias.grad = model[2].bias.grad.to_sparse()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()
    after = opt.state_dict()
    for pid, st in saved["state"].items():
        for key, value in st.items():
            assert torch.equal(after["state"][pid][key], value), key


def test_checkpoint_resume_is_bitwise_the_uninterrupted_run(digits, tmp_path):
    kw = dict(lr=0.05, stat_every=2, inverse_every=3)
    straight = make_mlp(hidden=16)
    resumed = copy.deepcopy(straight)
    _our_run(straight, digits, 12, **kw)
    KFAC = curvc.load("kfac")
    data = list(batches(digits, 12))
    opt = KFAC(resumed, **kw)
    for xb, yb in data[:7]:
        opt.zero_grad()
        torch.nn.functional.cross_entropy(resumed(xb), yb).backward()
        opt.step()
    torch.save({"model": resumed.state_dict(), "opt": opt.state_dict()}, tmp_path / "ck.pt")
    ck = torch.load(tmp_path / "ck.pt")
    again = make_mlp(hidden=16, seed=9)
    again.load_state_dict(ck["model"])
    opt2 = KFAC(again, **kw)
    opt2.load_state_dict(ck["opt"])
    for xb, yb in data[7:]:
        opt2.zero_grad()
        torch.nn.functional.cross_entropy(again(xb), yb).backward()
        opt2.step()
    for p, q in zip(again.parameters(), straight.parameters()):
        assert torch.equal(p, q)


@pytest.mark.filterwarnings("ignore:divide by zero encountered in log2:RuntimeWarning")
def test_triton_rendering_of_the_elementwise_tail_equals_the_torch_one(digits):
    """The natural gradient is an input of the fused kernel, as Sophia's estimate is."""
    import os
    if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
        pytest.skip("CPU tensors need TRITON_INTERPRET=1")
    models = {b: make_mlp(hidden=4) for b in ("torch", "triton")}
    for backend, model in models.items():
        opt = curvc.load("kfac", backend=backend)(model, lr=0.05, momentum=0.9,
                                                  weight_decay=1e-2)
        for xb, yb in batches(digits, 3, batch=16):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(xb), yb).backward()
            opt.step()
    for p, q in zip(models["triton"].parameters(), models["torch"].parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_kfac_on_cuda_equals_kfac_on_cpu(digits):
    """The statistics through cuBLAS, the elementwise tail through the Triton kernel."""
    models = {"cpu": make_mlp(hidden=16).double(), "cuda": make_mlp(hidden=16).double().cuda()}
    for device, model in models.items():
        opt = curvc.load("kfac")(model, lr=0.05, momentum=0.9, weight_decay=1e-3,
                                 stat_every=2, inverse_every=3)
        for xb, yb in batches(digits, 10):
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(xb.double().to(device)), yb.to(device))
            loss.backward()
            opt.step()
    for p, q in zip(models["cuda"].parameters(), models["cpu"].parameters()):
        torch.testing.assert_close(p.cpu(), q, rtol=1e-8, atol=1e-10)
