"""`curvature hessian` with `structure diagonal`: the exact diag(H), against the
diagonal of torch.autograd.functional.hessian over all parameters, computed here.

The spec below is a damped, clipped diagonal Newton step with an EMA of the diagonal;
its update, written out for each entry i (c the exact Hessian diagonal of this step's
loss, h_0 = 0, no bias correction):

    h_t = 0.9 h_{t-1} + 0.1 c_t
    d_t = clamp(g_t / (h_t + 1e-8), -1, 1)
    theta_t = theta_{t-1} - lr d_t
"""
import pytest
import torch

import curvc

SPEC = """optimizer DiagonalNewton
hyper lr = 0.05
curvature hessian
structure diagonal
iterate   ema(0.9)
length    none
clip      elementwise(1)
damping   add(1e-8)
"""
LR, BETA, EPS, CLIP = 0.05, 0.9, 1e-8, 1.0


@pytest.fixture
def Opt(tmp_path):
    path = tmp_path / "diagonal_newton.curv"
    path.write_text(SPEC)
    return curvc.load(str(path), backend="torch")


def _problem(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(),
                                torch.nn.Linear(4, 2)).double()
    x = torch.randn(16, 3, dtype=torch.float64)
    # Near a minimum (targets close to the outputs): g is small beside diag H, so the
    # clip leaves most entries alone and the step reads the diagonal itself.
    with torch.no_grad():
        y = model(x) + 0.05 * torch.randn(16, 2, dtype=torch.float64)
    return model, x, y


def _loss(model, x, y):
    return torch.nn.functional.mse_loss(model(x), y)


def _reference_diagonal(model, x, y) -> torch.Tensor:
    """diag of the full Hessian of the loss over all parameters, flattened in order."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def loss_of(theta):
        pieces = torch.split(theta, [s.numel() for s in shapes])
        params = {n: t.reshape(s) for n, t, s in zip(names, pieces, shapes)}
        return torch.nn.functional.mse_loss(torch.func.functional_call(model, params, (x,)), y)
    return torch.autograd.functional.hessian(loss_of, flat).diagonal()


def _flat(tensors) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1) for t in tensors])


@pytest.mark.parametrize("via", ["create_graph", "estimate_curvature"])
def test_the_diagonal_newton_step_follows_its_equations(Opt, via):
    model, x, y = _problem()
    opt = Opt(model.parameters())
    theta = _flat(model.parameters())
    h = torch.zeros_like(theta)
    unclipped = []
    for _ in range(4):
        c = _reference_diagonal(model, x, y)  # at the current parameters
        opt.zero_grad()
        assert opt.wants_curvature()
        loss = _loss(model, x, y)
        if via == "create_graph":
            loss.backward(create_graph=True)
        else:
            opt.estimate_curvature(loss=loss)
            loss.backward()
        g = _flat(p.grad for p in model.parameters())
        opt.step()
        h = BETA * h + (1 - BETA) * c
        raw = g / (h + EPS)
        unclipped.append(float((raw.abs() < CLIP).double().mean()))
        theta = theta - LR * torch.clamp(raw, -CLIP, CLIP)
        torch.testing.assert_close(_flat(model.parameters()), theta, rtol=1e-10, atol=1e-12)
    assert min(unclipped) > 0.5, unclipped  # the step reads the diagonal, not only signs


def test_the_diagonal_is_exact_and_zero_where_the_loss_does_not_reach():
    from curvc.runtime.curvature import hessian_diagonal
    model, x, y = _problem(seed=1)
    unused = torch.nn.Parameter(torch.ones(3, dtype=torch.float64))
    params = [*model.parameters(), unused]
    grads = torch.autograd.grad(_loss(model, x, y), params, create_graph=True,
                                allow_unused=True)
    diag = hessian_diagonal(params, list(grads), chunk=5)  # chunks that split tensors
    torch.testing.assert_close(_flat(diag[:-1]), _reference_diagonal(model, x, y),
                               rtol=1e-10, atol=1e-12)
    assert torch.equal(diag[-1], torch.zeros(3, dtype=torch.float64))


def test_a_step_without_second_derivatives_says_how_to_give_them(Opt):
    model, x, y = _problem()
    opt = Opt(model.parameters())
    _loss(model, x, y).backward()  # no create_graph
    before = _flat(model.parameters())
    with pytest.raises(RuntimeError, match=r"create_graph=opt\.wants_curvature\(\)"):
        opt.step()
    torch.testing.assert_close(_flat(model.parameters()), before, rtol=0, atol=0)
    assert all(len(opt.state[p]) == 0 for p in model.parameters())  # no state was created


def test_estimate_curvature_wants_the_loss_not_the_logits(Opt):
    model, x, y = _problem()
    opt = Opt(model.parameters())
    with pytest.raises(TypeError, match=r"estimate_curvature\(loss=\.\.\.\) needs the loss"):
        opt.estimate_curvature(logits=model(x))


def test_a_root_of_the_hessian_diagonal_is_still_refused():
    with pytest.raises(curvc.CurvError) as info:
        curvc.to_ir(SPEC.replace("length    none", "length    gradient_norm")
                    .replace("clip      elementwise(1)\n", ""))
    assert info.value.key == "combo.clash" and "can be negative" in str(info.value)
