"""`structure dense` with every iterate form: the matrix accumulates as the diagonal does.

The dense matrix is one more structure value: the iterate axis's math, written out
here in numpy for the n x n matrix C (x all parameters as one vector, c_t this step's
matrix: the Hessian A + 3 diag(x^2) of L(x) = x^T A x / 2 - b^T x + sum(x^4) / 4, or
the empirical Fisher g g^T):

    ema(beta)             C <- beta C + (1 - beta) c_t                      from C = 0
    power_ema(decay)      C <- (1 - r^decay) C + r^decay c_t                r the refreshes
    ema_or_sum(beta)      as ema(beta) for beta < 1; C <- C + c_t at beta = 1
    bias_corrected        the step reads C / (1 - beta^r) (none at ema_or_sum's beta = 1);
                          the stored C is not corrected
    every k               refreshed on steps 1, k+1, 2k+1, ... (delayed: k+1, 2k+1, ...;
                          before the first refresh C is the zero start)

and the step d from P = C + eps_inside I = Q diag(w) Q^T (eigenvalues that are not
positive get 0, the pseudo-inverse): none d = P^-1 g; gradient_norm(p)
d = Q diag(1 / (w^(p/2) + eps_after)) Q^T g; theta <- theta - lr d. 50 steps in float64
against that reference, within 1e-6 relative. (``keep_max`` with the dense structure is
refused by the rule ``running_maximum_needs_coordinates``: see tests/errors.)
"""
import copy

import numpy as np
import pytest
import torch

import curvc
from curvc.explain import explain
from test_dense_composes import _flat, _loss, _params, _problem  # the same problem

SPEC = """optimizer DenseIterate
hyper lr = {lr}, beta = {beta}, decay = -0.7, eps = {eps}
curvature {curvature}
structure dense
iterate   {iterate}
length    {length}
damping   {damping}(eps)
"""
STEPS = 50

# name -> (spec fields, reference settings)
CASES = {
    "hessian-power_ema-every-delayed": (
        dict(curvature="hessian", iterate="power_ema(decay) every 2 delayed", length="none",
             damping="inside", beta=0.9, eps=0.5, lr=0.3),
        dict(kind="power_ema", every=2, delayed=True)),
    "hessian-ema_or_sum-ema-bias_corrected": (
        dict(curvature="hessian", iterate="ema_or_sum(beta) bias_corrected", length="none",
             damping="inside", beta=0.7, eps=0.2, lr=0.4),
        dict(kind="ema_or_sum", corrected=True)),
    "hessian-ema_or_sum-sum-bias_corrected-every": (
        dict(curvature="hessian", iterate="ema_or_sum(beta) bias_corrected every 3",
             length="gradient_norm(power = 1.5)", damping="inside", beta=1.0, eps=0.1, lr=0.5),
        dict(kind="ema_or_sum", corrected=True, every=3, power=1.5)),
    "hessian-ema-bias_corrected-every-delayed": (
        dict(curvature="hessian", iterate="ema(beta) bias_corrected every 2 delayed",
             length="none", damping="inside", beta=0.8, eps=0.3, lr=0.3),
        dict(kind="ema", corrected=True, every=2, delayed=True)),
    "empirical_fisher-ema-bias_corrected-delayed-add": (
        dict(curvature="empirical_fisher", iterate="ema(beta) bias_corrected every 2 delayed",
             length="gradient_norm(power = 1)", damping="add", beta=0.9, eps=0.1, lr=0.05),
        dict(kind="ema", corrected=True, every=2, delayed=True, power=1.0, fisher=True)),
    "empirical_fisher-power_ema": (
        dict(curvature="empirical_fisher", iterate="power_ema(decay)",
             length="gradient_norm(power = 1)", damping="inside", beta=0.9, eps=0.05, lr=0.05),
        dict(kind="power_ema", power=1.0, fisher=True)),
}


def _direction(C, g, *, power, inside, add):
    """d of the module docstring from the (corrected) accumulated matrix C."""
    w, q = np.linalg.eigh((C + C.T) / 2 + inside * np.eye(len(g)))
    positive = w > np.abs(w).max() * len(w) * np.finfo(float).eps
    root = np.maximum(w, 0.0) ** (power / 2)
    inv = np.where(positive, 1.0 / (root + add), 0.0)
    return q @ (inv * (q.T @ g))


def _reference(spec, ref, A, b, x):
    """The parameters (as one vector) after each of STEPS steps."""
    beta, eps, lr, decay = spec["beta"], spec["eps"], spec["lr"], -0.7
    kind, every, delayed = ref["kind"], ref.get("every", 1), ref.get("delayed", False)
    inside, add = (eps, 0.0) if spec["damping"] == "inside" else (0.0, eps)
    C, r, out = np.zeros((len(x), len(x))), 0, []
    for t in range(1, STEPS + 1):
        g = A @ x - b + x ** 3
        if (t - 1) % every == 0 and not (delayed and t == 1):
            r += 1
            c = np.outer(g, g) if ref.get("fisher") else A + 3 * np.diag(x ** 2)
            if kind == "power_ema":
                w_t = r ** decay
                C = (1 - w_t) * C + w_t * c
            elif kind == "ema_or_sum" and beta == 1.0:
                C = C + c
            else:
                C = beta * C + (1 - beta) * c
        corrected = C
        if ref.get("corrected") and not (kind == "ema_or_sum" and beta == 1.0):
            corrected = C / (1 - beta ** max(r, 1))  # before the first refresh: 0 / (1 - beta)
        x = x - lr * _direction(corrected, g, power=ref.get("power", 2.0), inside=inside,
                                add=add)
        out.append(x.copy())
    return out, C


def _load(tmp_path, spec):
    path = tmp_path / "dense_iterate.curv"
    path.write_text(SPEC.format(**spec))
    return curvc.load(str(path), backend="torch")


@pytest.mark.parametrize("case", CASES)
def test_the_dense_matrix_accumulates_as_its_iterate_says(tmp_path, case):
    spec, ref = CASES[case]
    Opt = _load(tmp_path, spec)
    A, b = _problem()
    params = _params()
    opt = Opt(params)
    expected, C = _reference(spec, ref, A, b, _flat(params).detach().numpy().copy())
    worst = 0.0
    for t in range(STEPS):
        opt.zero_grad()
        _loss(_flat(params), A, b).backward(create_graph=opt.wants_curvature())
        opt.step()
        x = _flat(params).detach().numpy()
        worst = max(worst, np.abs(x - expected[t]).max() / np.abs(expected[t]).max())
        assert worst <= 1e-6, (t + 1, worst)
    # the stored matrix is the uncorrected accumulation
    np.testing.assert_allclose(opt.state[params[0]]["curvature"].numpy(), C, rtol=1e-6,
                               atol=1e-9 * np.abs(C).max())
    # and the run went somewhere: not a fixed point from the start
    assert np.abs(expected[-1] - expected[0]).max() > 1e-3


def test_a_bias_corrected_delayed_dense_step_round_trips_its_state(tmp_path):
    spec, _ = CASES["hessian-ema-bias_corrected-every-delayed"]
    Opt = _load(tmp_path, spec)
    A, b = _problem()

    def run(opt, params, steps):
        for _ in range(steps):
            opt.zero_grad()
            _loss(_flat(params), A, b).backward(create_graph=opt.wants_curvature())
            opt.step()

    params = _params()
    opt = Opt(params)
    run(opt, params, 4)
    state = copy.deepcopy(opt.state_dict())
    other = [p.detach().clone().requires_grad_() for p in params]
    resumed = Opt(other)
    resumed.load_state_dict(state)
    run(opt, params, 3)
    run(resumed, other, 3)
    for p, q in zip(params, other):
        assert torch.equal(p, q)


def test_explain_shows_the_dense_iterate_and_its_correction():
    spec, _ = CASES["hessian-ema_or_sum-ema-bias_corrected"]
    text = explain(curvc.to_ir(SPEC.format(**spec)))
    assert "H     = beta * H + (1 - beta) * grad^2 f(theta)   (H = H + grad^2 f(theta) " \
           "when beta = 1)" in text, text
    assert "H_hat = H / (1 - beta^t)" in text, text  # what the step reads; H stays as kept
    assert "no correction at beta = 1, a sum" in text, text
    spec, _ = CASES["hessian-power_ema-every-delayed"]
    text = explain(curvc.to_ir(SPEC.format(**spec)))
    assert "beta_t = 1 - r^decay" in text, text
