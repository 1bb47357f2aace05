"""Second-order curvature sources: AdaHessian, Sophia-G and Sophia-H.

The update rules are compared exactly with pytorch-optimizer by handing both
sides the same curvature; whole trajectories (estimator included) are
compared on a separable quadratic, where every +-1 probe returns the exact
Hessian diagonal; the estimators are checked on their own against exact
Hessian and Gauss-Newton diagonals; Sophia-G is checked against a reference
written here from the published algorithm.
"""
import copy
import gc
from pathlib import Path

import pytest
import torch

import curvc
from curvc.runtime import curvature as est
from conftest import batches, make_mlp, max_relative_error, train, two_groups

po = pytest.importorskip("pytorch_optimizer")
SPECS = Path(__file__).parent / "specs"
STEPS = 50


def _loss(model, xb, yb):
    return torch.nn.functional.cross_entropy(model(xb), yb)


# --- update rules with a shared curvature --------------------------------------

@pytest.mark.parametrize("ours, ref, kw", [
    ("adahessian", po.AdaHessian,
     dict(lr=0.02, betas=(0.85, 0.99), eps=1e-4, weight_decay=1e-3, hessian_power=0.7)),
    ("sophia_h", po.SophiaH,
     dict(lr=0.01, betas=(0.9, 0.98), weight_decay=1e-3, p=0.05, update_period=3, eps=1e-3)),
])
def test_update_rule_matches_pytorch_optimizer_given_the_same_curvature(ours, ref, kw, digits):
    Ours = curvc.load(ours, backend="torch")
    period = kw.get("update_period", 1)
    ref_model = make_mlp()
    our_model = copy.deepcopy(ref_model)
    ref_opt = ref(two_groups(ref_model, dict(lr=kw["lr"] * 2), dict()), **kw)
    our_opt = Ours(two_groups(our_model, dict(lr=kw["lr"] * 2), dict()), **kw)
    g = torch.Generator().manual_seed(0)
    for t, (xb, yb) in enumerate(batches(digits, STEPS)):
        hess = [torch.rand(p.shape, generator=g) * 0.1 for p in ref_model.parameters()]
        for m, o in ((ref_model, ref_opt), (our_model, our_opt)):
            o.zero_grad()
            _loss(m, xb, yb).backward()
        if t % period == 0:
            ref_opt.step(hessian=[h.clone() for h in hess])
            our_opt.step(curvature=[h.clone() for h in hess])
        else:
            ref_opt.step()
            our_opt.step()
    assert max_relative_error(ref_model, our_model) <= 1e-5


# --- whole trajectories on a separable quadratic ---------------------------------

def _quadratic(n=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.rand(n, generator=g) * 4 + 0.5  # the exact Hessian diagonal
    b = torch.randn(n, generator=g)
    theta = torch.randn(n, generator=g)
    return a, b, theta


@pytest.mark.parametrize("ours, ref, kw", [
    (SPECS / "adahessian_plain.curv", lambda ps, **k: po.AdaHessian(ps, **k),
     dict(lr=0.05, eps=1e-4, weight_decay=1e-2)),
    (SPECS / "sophia_h_rademacher.curv",
     lambda ps, **k: po.SophiaH(ps, hessian_distribution="rademacher", **k),
     dict(lr=0.05, p=0.5, update_period=4, eps=1e-3)),
])
def test_whole_trajectory_with_internal_hutchinson_matches_on_a_separable_quadratic(ours, ref, kw):
    a, b, theta = _quadratic()
    Ours = curvc.load(str(ours), backend="torch")
    p_ref = torch.nn.Parameter(theta.clone())
    p_our = torch.nn.Parameter(theta.clone())
    ref_opt, our_opt = ref([p_ref], **kw), Ours([p_our], **kw)
    for _ in range(STEPS):
        for p, o in ((p_ref, ref_opt), (p_our, our_opt)):
            o.zero_grad()
            loss = 0.5 * (a * p * p).sum() + (b * p).sum()
            loss.backward(create_graph=True)
            o.step()
    assert ((p_ref - p_our).norm() / p_ref.norm()).item() <= 1e-5
    # and it optimizes: the minimum is -b/a
    assert (p_our + b / a).norm() < (theta + b / a).norm()


# --- the estimators on their own -------------------------------------------------

def _tiny_model():
    torch.manual_seed(3)
    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 3))


def _flat_hessian_diagonal(model, x, y):
    params = dict(model.named_parameters())
    names = list(params)

    def f(*flat):
        out = torch.func.functional_call(model, dict(zip(names, flat)), (x,))
        return torch.nn.functional.cross_entropy(out, y)

    hess = torch.func.hessian(f, argnums=tuple(range(len(names))))(*params.values())
    return [hess[i][i].reshape(p.numel(), p.numel()).diagonal().reshape(p.shape)
            for i, p in enumerate(params.values())]


@pytest.mark.parametrize("distribution", ["rademacher", "gaussian"])
def test_hutchinson_converges_to_the_exact_hessian_diagonal(distribution):
    model = _tiny_model()
    x, y = torch.randn(8, 4, generator=torch.Generator().manual_seed(0)), torch.arange(8) % 3
    exact = torch.cat([d.flatten() for d in _flat_hessian_diagonal(model, x, y)])
    params = list(model.parameters())
    errors = []
    for samples in (4, 400):
        grads = torch.autograd.grad(_loss(model, x, y), params, create_graph=True)
        gen = torch.Generator().manual_seed(1)
        got = torch.cat([e.flatten() for e in est.hutchinson(
            params, grads, samples, distribution, generator=gen)])
        errors.append((got - exact).norm().item() / exact.norm().item())
    assert errors[1] < errors[0] / 3  # ~ 1/sqrt(samples)
    assert errors[1] < 0.25


def test_gauss_newton_bartlett_is_unbiased_for_the_gauss_newton_diagonal():
    model = _tiny_model()
    x = torch.randn(6, 4, generator=torch.Generator().manual_seed(0))
    params = dict(model.named_parameters())
    names = list(params)
    # Exact Gauss-Newton diagonal of the mean cross-entropy: mean_i J_i^T (diag p - p p^T) J_i
    jac = torch.func.jacrev(lambda *flat: torch.func.functional_call(
        model, dict(zip(names, flat)), (x,)), argnums=tuple(range(len(names))))(*params.values())
    probs = torch.softmax(model(x), dim=-1).detach()
    exact = []
    for j in jac:
        jf = j.reshape(6, 3, -1)  # batch, class, parameter
        hmid = torch.diag_embed(probs) - probs[:, :, None] * probs[:, None, :]
        gn = torch.einsum("bcp,bcd,bdp->p", jf, hmid, jf) / 6
        exact.append(gn)
    exact = torch.cat(exact)
    logits = model(x)
    gen = torch.Generator().manual_seed(5)
    got = torch.cat([e.flatten() for e in est.gauss_newton_bartlett(
        list(params.values()), logits, samples=4000, generator=gen)])
    assert (got - exact).norm() / exact.norm() < 0.1


# --- Sophia-G against the published algorithm ------------------------------------

def _sophia_reference(model, data, steps, lr, betas, rho, wd, k, seed):
    """Sophia-G as released: the step every iteration, the Hessian EMA after steps k, 2k, ..."""
    params = list(model.parameters())
    m = [torch.zeros_like(p) for p in params]
    h = [torch.zeros_like(p) for p in params]
    stream = list(batches(data, steps + 1))
    for t in range(1, steps + 1):
        xb, yb = stream[t - 1]
        model.zero_grad()
        _loss(model, xb, yb).backward()
        with torch.no_grad():
            for p, mi, hi in zip(params, m, h):
                p.mul_(1 - lr * wd)
                mi.mul_(betas[0]).add_(p.grad, alpha=1 - betas[0])
                ratio = (mi.abs() / (rho * len(xb) * hi + 1e-15)).clamp(max=1)
                p.addcmul_(mi.sign(), ratio, value=-lr)
        if t % k == 0:  # labels sampled from the model on the next batch
            xn = stream[t][0]
            logits = model(xn)
            torch.manual_seed(seed + t)
            with torch.no_grad():
                labels = torch.multinomial(torch.softmax(logits.detach(), -1), 1).squeeze(-1)
            model.zero_grad()
            torch.nn.functional.cross_entropy(logits, labels).backward()
            with torch.no_grad():
                for p, hi in zip(params, h):
                    hi.mul_(betas[1]).addcmul_(p.grad, p.grad, value=1 - betas[1])


def test_sophia_g_matches_the_published_algorithm(digits):
    kw = dict(lr=2e-3, betas=(0.9, 0.95), rho=0.05, weight_decay=0.1, k=3)
    ref = make_mlp()
    ours = copy.deepcopy(ref)
    _sophia_reference(ref, digits, STEPS, kw["lr"], kw["betas"], kw["rho"], kw["weight_decay"],
                      kw["k"], seed=100)
    Sophia = curvc.load("sophia", backend="torch")
    opt = Sophia(ours.parameters(), **kw)
    for t, (xb, yb) in enumerate(batches(digits, STEPS), start=1):
        logits = ours(xb)
        if opt.wants_curvature():
            torch.manual_seed(100 + t - 1)  # the reference's seed for this refresh
            opt.estimate_curvature(logits=logits)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(logits, yb).backward()
        opt.step()
    assert max_relative_error(ref, ours) <= 1e-5


# --- what users see ----------------------------------------------------------------

def test_hutchinson_without_a_graph_says_what_to_do_and_changes_nothing(digits):
    AdaHessian = curvc.load("adahessian", backend="torch")
    model = make_mlp()
    opt = AdaHessian(model.parameters())
    xb, yb = next(batches(digits, 1))
    _loss(model, xb, yb).backward()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match=r"create_graph=opt.wants_curvature\(\)"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert not opt.state  # no step was counted


def test_sophia_without_logits_says_what_to_do(digits):
    Sophia = curvc.load("sophia", backend="torch")
    model = make_mlp()
    opt = Sophia(model.parameters(), k=1)
    stream = batches(digits, 3)
    xb, yb = next(stream)
    _loss(model, xb, yb).backward()
    opt.step()  # step 1: Sophia's first refresh comes after k steps
    assert opt.wants_curvature()
    opt.zero_grad()
    _loss(model, *next(stream)).backward()
    with pytest.raises(RuntimeError, match=r"estimate_curvature\(logits=logits\)"):
        opt.step()
    assert float(opt.state[next(model.parameters())]["step"]) == 1.0


def test_estimate_curvature_from_the_loss_needs_no_create_graph(digits):
    AdaHessian = curvc.load("adahessian", backend="torch")
    model = make_mlp()
    opt = AdaHessian(model.parameters(), lr=0.05)
    losses = []
    for xb, yb in batches(digits, 5):
        opt.zero_grad()
        loss = _loss(model, xb, yb)
        opt.estimate_curvature(loss=loss)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


# walking gc.get_objects() touches torch.distributed's deprecated reduce_op alias
@pytest.mark.filterwarnings("ignore:`torch.distributed.reduce_op` is deprecated:FutureWarning")
def test_create_graph_training_does_not_leak_graphs(digits):
    AdaHessian = curvc.load("adahessian", backend="torch")
    model = make_mlp(hidden=8)
    opt = AdaHessian(model.parameters(), lr=0.05)

    def live_tensors():
        gc.collect()
        return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))

    counts = []
    for i, (xb, yb) in enumerate(batches(digits, 300)):
        opt.zero_grad()
        _loss(model, xb, yb).backward(create_graph=opt.wants_curvature())
        opt.step()
        if i in (50, 299):
            counts.append(live_tensors())
    assert counts[1] <= counts[0] + 5


@pytest.mark.parametrize("spec, lr", [("adahessian", 0.05), ("sophia_h", 0.05), ("sophia", 3e-3)])
def test_second_order_specs_train_digits_about_as_well_as_adam(spec, lr, digits):
    steps = 150
    adam_model = make_mlp()
    adam_losses = train(adam_model, torch.optim.Adam(adam_model.parameters(), lr=3e-3), digits,
                        steps)
    Opt = curvc.load(spec, backend="torch")
    model = make_mlp()
    kwargs = dict(lr=lr)
    if spec == "sophia_h":
        kwargs.update(p=0.2, update_period=2)
    if spec == "sophia":
        kwargs.update(k=2, rho=0.05, weight_decay=0.0)
    opt = Opt(model.parameters(), **kwargs)
    losses = []
    for xb, yb in batches(digits, steps):
        opt.zero_grad()
        logits = model(xb)
        if spec == "sophia" and opt.wants_curvature():
            opt.estimate_curvature(logits=logits)
        loss = torch.nn.functional.cross_entropy(logits, yb)
        loss.backward(create_graph=spec != "sophia" and opt.wants_curvature())
        opt.step()
        losses.append(loss.item())
    final, adam_final = sum(losses[-10:]) / 10, sum(adam_losses[-10:]) / 10
    assert final < losses[0] / 3, (spec, final, losses[0])
    assert final < 2.5 * adam_final + 0.05, (spec, final, adam_final)


def test_adahessian_averages_convolution_kernels_over_their_spatial_positions():
    conv = torch.nn.Conv2d(2, 3, kernel_size=3)
    x = torch.randn(4, 2, 6, 6, generator=torch.Generator().manual_seed(0))
    loss = (conv(x) ** 2).mean() + (conv(x) ** 3).mean()
    params = [conv.weight]
    grads = torch.autograd.grad(loss, params, create_graph=True)
    gen = torch.Generator().manual_seed(2)
    plain = est.hutchinson(params, grads, 1, "rademacher", False, generator=gen,
                           keep_graph=True)[0]
    gen = torch.Generator().manual_seed(2)
    averaged = est.hutchinson(params, grads, 1, "rademacher", True, generator=gen)[0]
    expected = plain.abs().mean(dim=(2, 3), keepdim=True).expand_as(plain)
    torch.testing.assert_close(averaged, expected)


@pytest.mark.parametrize("spec, kw", [
    ("adahessian", dict(lr=0.05, weight_decay=0.01, update_each=2, hessian_power=0.8)),
    ("sophia", dict(lr=0.01, k=2)),
    ("sophia_h", dict(lr=0.05, update_period=3, p=0.1)),
    ("fisher_adam", dict(lr=0.01, betas=(0.8, 0.99))),
])
def test_triton_kernels_equal_the_torch_rendering(spec, kw):
    """Triton (the interpreter on CPU, or CUDA) and torch, handed the same curvature."""
    pytest.importorskip("triton")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    shapes = [(), (5,), (300,), (2, 3, 5, 7), (3,)]
    results = []
    for backend in ("torch", "triton"):
        Opt = curvc.load(spec, backend=backend)
        g = torch.Generator().manual_seed(0)
        params = [torch.randn(s, generator=g).to(device).requires_grad_() for s in shapes]
        opt = Opt([{"params": params[:3]}, {"params": params[3:], "lr": kw["lr"] / 2}], **kw)
        for _ in range(12):
            for p in params:
                p.grad = torch.randn(p.shape, generator=g).to(device)
            hess = [torch.rand(p.shape, generator=g).to(device) for p in params]
            opt.step(curvature=hess if opt.wants_curvature() else None)
        results.append(params)
    for a, b in zip(*results):
        scale = a.abs().max().item() or 1.0
        assert (a - b).abs().max().item() <= 1e-6 * scale
