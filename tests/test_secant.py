"""The secant structure (L-BFGS) against torch.optim.LBFGS, step for step.

Both optimizers get the same model, data and closure; after every step the
parameters must be identical and the two states must have counted the same
closure evaluations and iterations (so early stops agree too).
"""
import copy

import pytest
import torch

import curvc
from conftest import batches, make_mlp


def _closure(model, opt, xb, yb):
    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(xb), yb)
        loss.backward()
        return loss
    return closure


@pytest.mark.parametrize("kw", [
    dict(),
    dict(line_search_fn="strong_wolfe"),
    dict(lr=0.5, max_iter=7, history_size=3),
    dict(max_iter=10, max_eval=4),
    dict(lr=0.1, line_search_fn="strong_wolfe", history_size=5, tolerance_change=1e-4),
    dict(tolerance_grad=1e-2, tolerance_change=1e-3),
])
def test_lbfgs_matches_torch_step_for_step(digits, kw):
    LBFGS = curvc.load("lbfgs")
    ref_model = make_mlp(hidden=16)
    our_model = copy.deepcopy(ref_model)
    ref_opt = torch.optim.LBFGS(ref_model.parameters(), **kw)
    our_opt = LBFGS(our_model.parameters(), **kw)
    losses = []
    for xb, yb in batches(digits, 8, batch=256):
        ref_loss = ref_opt.step(_closure(ref_model, ref_opt, xb, yb))
        our_loss = our_opt.step(_closure(our_model, our_opt, xb, yb))
        assert our_loss.item() == ref_loss.item()
        for p, q in zip(our_model.parameters(), ref_model.parameters()):
            assert torch.equal(p, q)
        ours = our_opt.state[next(our_model.parameters())]
        ref = ref_opt.state[next(ref_model.parameters())]
        assert (ours["func_evals"], ours["n_iter"]) == (ref["func_evals"], ref["n_iter"])
        losses.append(our_loss.item())
    if kw.get("line_search_fn"):  # lr=1 without a line search may diverge, in both
        assert losses[-1] < losses[0]


def test_converges_on_rosenbrock_with_strong_wolfe():
    LBFGS = curvc.load("lbfgs")
    x = torch.tensor([-1.5, 2.0], dtype=torch.float64, requires_grad=True)
    opt = LBFGS([x], line_search_fn="strong_wolfe", max_iter=100, tolerance_grad=1e-12,
                tolerance_change=1e-15)

    def closure():
        opt.zero_grad()
        f = (1 - x[0]) ** 2 + 100 * (x[1] - x[0] ** 2) ** 2
        f.backward()
        return f
    for _ in range(5):
        opt.step(closure)
    torch.testing.assert_close(x.detach(), torch.tensor([1.0, 1.0], dtype=torch.float64),
                               atol=1e-6, rtol=0)


def test_a_torch_lbfgs_checkpoint_resumes_in_the_compiled_lbfgs(digits):
    LBFGS = curvc.load("lbfgs")
    data = list(batches(digits, 6, batch=256))
    ref_model = make_mlp(hidden=16)
    ref_opt = torch.optim.LBFGS(ref_model.parameters(), history_size=4, max_iter=5)
    for xb, yb in data[:3]:
        ref_opt.step(_closure(ref_model, ref_opt, xb, yb))
    our_model = copy.deepcopy(ref_model)
    our_opt = LBFGS(our_model.parameters(), history_size=4, max_iter=5)
    our_opt.load_state_dict(copy.deepcopy(ref_opt.state_dict()))
    for xb, yb in data[3:]:
        ref_opt.step(_closure(ref_model, ref_opt, xb, yb))
        our_opt.step(_closure(our_model, our_opt, xb, yb))
    for p, q in zip(our_model.parameters(), ref_model.parameters()):
        assert torch.equal(p, q)


def test_checkpoint_resume_is_bitwise_the_uninterrupted_run(digits, tmp_path):
    LBFGS = curvc.load("lbfgs")
    data = list(batches(digits, 6, batch=256))
    straight = make_mlp(hidden=16)
    resumed = copy.deepcopy(straight)
    opt = LBFGS(straight.parameters(), max_iter=4)
    for xb, yb in data:
        opt.step(_closure(straight, opt, xb, yb))
    half = LBFGS(resumed.parameters(), max_iter=4)
    for xb, yb in data[:3]:
        half.step(_closure(resumed, half, xb, yb))
    torch.save({"model": resumed.state_dict(), "opt": half.state_dict()}, tmp_path / "ck.pt")
    ck = torch.load(tmp_path / "ck.pt", weights_only=False)
    again = make_mlp(hidden=16, seed=3)
    again.load_state_dict(ck["model"])
    opt2 = LBFGS(again.parameters(), max_iter=4)
    opt2.load_state_dict(ck["opt"])
    for xb, yb in data[3:]:
        opt2.step(_closure(again, opt2, xb, yb))
    for p, q in zip(again.parameters(), straight.parameters()):
        assert torch.equal(p, q)


def test_step_without_a_closure_says_what_to_pass():
    LBFGS = curvc.load("lbfgs")
    p = torch.zeros(3, requires_grad=True)
    opt = LBFGS([p])
    p.grad = torch.ones(3)
    with pytest.raises(RuntimeError, match="needs a closure"):
        opt.step()
    assert torch.equal(p, torch.zeros(3)) and opt.state[p] == {}


@pytest.mark.parametrize("make, match", [
    (lambda LB, a, b: LB([{"params": [a]}, {"params": [b]}]), "parameter groups"),
    (lambda LB, a, b: LB([a, b], maximize=True), "maximize"),
    (lambda LB, a, b: LB([a, b], line_search_fn="armijo"), "line_search_fn"),
    (lambda LB, a, b: LB([a, b], max_eval=0), "max_eval"),
    (lambda LB, a, b: LB([a, b], history_size=0), "history_size"),
    (lambda LB, a, b: LB([a, b], lr=-1.0), "lr"),
])
def test_bad_arguments_raise_value_errors(make, match):
    LBFGS = curvc.load("lbfgs")
    a, b = torch.zeros(2, requires_grad=True), torch.zeros(3, requires_grad=True)
    with pytest.raises(ValueError, match=match):
        make(LBFGS, a, b)


def test_generated_module_names_the_secant_settings(tmp_path):
    text = curvc.compile_file("specs/lbfgs.curv", tmp_path).read_text()
    assert "def _secant(h):" in text
    assert "settings['history'] = int(h['history_size'])" in text
    assert "line_search_fn=None" in text


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_lbfgs_on_cuda_matches_torch_on_cuda(digits):
    LBFGS = curvc.load("lbfgs")
    ref_model = make_mlp(hidden=16).cuda()
    our_model = copy.deepcopy(ref_model)
    ref_opt = torch.optim.LBFGS(ref_model.parameters(), line_search_fn="strong_wolfe")
    our_opt = LBFGS(our_model.parameters(), line_search_fn="strong_wolfe")
    for xb, yb in batches(digits, 4, batch=256):
        xb, yb = xb.cuda(), yb.cuda()
        ref_opt.step(_closure(ref_model, ref_opt, xb, yb))
        our_opt.step(_closure(our_model, our_opt, xb, yb))
    for p, q in zip(our_model.parameters(), ref_model.parameters()):
        assert torch.equal(p, q)
