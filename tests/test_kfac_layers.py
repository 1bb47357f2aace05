"""K-FAC's layer tracking: factors against curvlinops' KFAC, hooks that go with the optimizer.

curvlinops (Dangel et al., ``curvlinops-for-pytorch``) computes K-FAC's
Kronecker factors with its own hooks. With ``fisher_type="empirical"`` (the
gradients of the actual loss, as curvc's K-FAC uses) and the bias folded into
the weight (``separate_weight_and_bias=False``), its input covariance is
curvc's A_t and its gradient covariance curvc's S_t. A layer applied twice per
forward pass contributes both calls to each factor.
"""
import gc

import pytest
import torch

import curvc

curvlinops = pytest.importorskip("curvlinops")


class SharedLayer(torch.nn.Module):
    """``inner`` is applied twice per forward pass, ``head`` once."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.inner = torch.nn.Linear(5, 5)
        self.head = torch.nn.Linear(5, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.inner(torch.tanh(self.inner(x)))))


def _curvlinops_factors(model, x, y):
    """{layer name: (input covariance, gradient covariance)} of one batch."""
    params = [p for p in model.parameters()]
    op = curvlinops.KFACLinearOperator(
        model, torch.nn.CrossEntropyLoss(), params, [(x, y)], fisher_type="empirical",
        separate_weight_and_bias=False, check_deterministic=False)
    op.compute_kronecker_factors()
    state = op.state_dict()
    return {name: (state["input_covariances"][name], state["gradient_covariances"][name])
            for name in state["input_covariances"]}


def _curvc_factors(model, x, y):
    """curvc's A_t and S_t of one step: with stat_decay=0 the EMA is the batch's factor."""
    opt = curvc.load("kfac")(model, stat_decay=0.0, stat_every=1, inverse_every=1, lr=0.0)
    opt.zero_grad()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    return {name: (opt.state[m.weight]["kfac_A"], opt.state[m.weight]["kfac_S"])
            for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


@pytest.mark.parametrize("make_model", [
    SharedLayer,
    lambda: torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3)),
], ids=["applied-twice", "applied-once"])
def test_kfac_factors_equal_curvlinops_kfac(make_model):
    torch.manual_seed(1)
    model = make_model().double()
    x, y = torch.randn(16, 5, dtype=torch.float64), torch.randint(0, 3, (16,))
    reference = _curvlinops_factors(model, x, y)
    ours = _curvc_factors(model, x, y)
    assert set(ours) == set(reference)
    for name, (a_ref, s_ref) in reference.items():
        a, s = ours[name]
        torch.testing.assert_close(a, a_ref, rtol=1e-6, atol=1e-12, msg=f"A of {name}")
        torch.testing.assert_close(s, s_ref, rtol=1e-6, atol=1e-12, msg=f"S of {name}")


def _hook_count(model):
    return sum(len(m._forward_hooks) for m in model.modules())


def _mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 2))


def test_a_dropped_optimizer_takes_its_hooks_and_is_not_kept_alive_by_them():
    import weakref
    model = _mlp()
    opt = curvc.load("kfac")(model)
    assert _hook_count(model) == 2  # one per Linear
    loss = model(torch.randn(3, 4)).sum()  # a live graph carrying the output hooks
    alive = weakref.ref(opt)
    del opt
    gc.collect()
    assert alive() is None
    assert _hook_count(model) == 0
    loss.backward()  # the output hooks of the dropped tracker do nothing


def test_six_optimizers_created_and_dropped_leave_no_hooks():
    model = _mlp()
    KFAC = curvc.load("kfac")
    for _ in range(6):
        opt = KFAC(model)
        opt.zero_grad()
        model(torch.randn(3, 4)).sum().backward()
        opt.step()
    assert _hook_count(model) == 2  # only the last one's
    del opt
    gc.collect()
    assert _hook_count(model) == 0


def test_close_and_the_with_block_remove_the_hooks():
    model = _mlp()
    KFAC = curvc.load("kfac")
    opt = KFAC(model)
    opt.close()
    assert _hook_count(model) == 0
    model(torch.randn(3, 4)).sum().backward()
    with pytest.raises(RuntimeError, match=r"opt\.track\(model\)"):
        opt.step()  # closed: no statistics, and it says how to resume
    opt.close()  # twice is fine
    with KFAC(model) as opt:
        assert _hook_count(model) == 2
        opt.zero_grad()
        model(torch.randn(3, 4)).sum().backward()
        opt.step()
    assert _hook_count(model) == 0


def test_close_is_a_no_op_for_optimizers_without_hooks():
    p = torch.nn.Parameter(torch.ones(3))
    with curvc.load("adam")([p], lr=0.1) as opt:
        p.grad = torch.ones(3)
        opt.step()
    opt.close()
    p.grad = torch.ones(3)
    opt.step()  # still usable
    assert float(opt.state[p]["step"]) == 2.0


def test_each_step_uses_only_the_differentiated_calls_since_the_previous_step():
    """A forward pass with no backward (evaluation with grad enabled) adds nothing, and a
    step's statistics are its own batch's, not the sum with the previous step's."""
    torch.manual_seed(2)
    model = SharedLayer().double()
    opt = curvc.load("kfac")(model, stat_decay=0.0, stat_every=1, inverse_every=1, lr=0.0)
    for _ in range(2):
        x, y = torch.randn(8, 5, dtype=torch.float64), torch.randint(0, 3, (8,))
        model(torch.randn(4, 5, dtype=torch.float64)).sum()  # never differentiated
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        twin = SharedLayer().double()  # without the optimizer's hooks
        twin.load_state_dict(model.state_dict())
        reference = _curvlinops_factors(twin, x, y)
        for name, m in (("inner", model.inner), ("head", model.head)):
            torch.testing.assert_close(opt.state[m.weight]["kfac_A"], reference[name][0])
            torch.testing.assert_close(opt.state[m.weight]["kfac_S"], reference[name][1])
