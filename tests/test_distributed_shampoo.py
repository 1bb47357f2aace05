"""``curvc.load("distributed_shampoo")`` against Distributed Shampoo's update (Shi et al. 2023),
written out below in plain torch: merged dims, blocks of at most max_preconditioner_dim,
one EMA (or, at beta2 = 1, sum) of Kronecker factors per mode of each block, bias-corrected,
(L + eps I)^(-1/2k) by eigendecompositions on step start_preconditioning_step and the
multiples of precondition_frequency after it, the bias-corrected filtered gradient
preconditioned per block, its norm grafted per block from Adam's step (the grafted step
alone before the start), decoupled or L2 weight decay, then the momentum of the step.
Float64, 50 steps, two param groups with non-default values; then the state_dict round trip,
bitwise.

The three options after the first release of the spec, with their semantics as
facebookresearch/optimizers (the v2 release of the paper's code, commit df2099d, 2024-02-14)
has them:

* ``momentum``, ``use_nesterov``: ``DistributedShampoo._per_group_step_impl`` (in
  distributed_shampoo/distributed_shampoo.py) computes the filtered gradient, the Shampoo
  search direction, grafts it per block, *then* adds decoupled weight decay wd * theta to
  the search direction, and only then updates the momentum buffer M <- momentum * M + d
  (starting from zero, so M = d on the first step) and takes d = M, or with Nesterov
  d + momentum * M; the parameter moves by -lr * d. So the decoupled decay is averaged by
  the momentum (the older v1 code, commit b4ef566, 2023-09-15, does the same), and that is
  the order the reference below follows; L2 decay is in g before anything reads it.
* ``use_bias_correction``: False drops 1 - beta1^t of the filtered gradient (the same
  function) and 1 - beta2^t of the factors (``ShampooPreconditionerList``,
  distributed_shampoo/utils/shampoo_preconditioner_list.py, ``update_preconditioners``);
  Adam grafting keeps its own correction (``use_bias_correction=isinstance(...,
  AdamGraftingConfig)`` in ``_instantiate_grafting``).
* ``inv_root_override``: ``ShampooPreconditionerList._get_inverse_roots_from_override``
  gives a block of order k the root 2k when the override is 0 and the override p itself
  otherwise, the same p for every factor, and ``matrix_inverse_root`` raises the damped
  factor to -exponent_multiplier / root (exponent_multiplier 1 here). So p > 0 gives
  (L + eps I)^(-1/p) per factor, whatever the order.
"""
from __future__ import annotations

import copy
import itertools

import pytest
import torch

import curvc

STEPS = 50
BASE = [
    dict(lr=0.02, betas=(0.85, 0.97), epsilon=1e-6, weight_decay=0.01, max_preconditioner_dim=6,
         precondition_frequency=3, start_preconditioning_step=5, use_decoupled_weight_decay=True,
         use_merge_dims=True, grafting_beta2=0.99, grafting_epsilon=1e-8),
    dict(lr=0.03, betas=(0.7, 1.0), epsilon=1e-4, weight_decay=0.02, max_preconditioner_dim=6,
         precondition_frequency=2, start_preconditioning_step=4, use_decoupled_weight_decay=False,
         use_merge_dims=True, grafting_beta2=0.9, grafting_epsilon=1e-7),
]
# the constructor's defaults of the later options
DEFAULTS = dict(momentum=0.0, use_nesterov=False, use_bias_correction=True, inv_root_override=0)
# ... and values other than those: Nesterov momentum over decoupled decay and no bias
# correction in one group, heavy ball over L2 decay and the root 5 in the other
OPTIONS = [dict(momentum=0.6, use_nesterov=True, use_bias_correction=False, inv_root_override=3),
           dict(momentum=0.4, use_nesterov=False, use_bias_correction=True, inv_root_override=5)]
GROUPS = [{**b, **o} for b, o in zip(BASE, OPTIONS)]
DEFAULT_GROUPS = [{**b, **DEFAULTS} for b in BASE]
# (10, 7) is cut into 4 blocks; (3, 2, 2) merges to (3, 4); (1, 5) squeezes to (5,); (10,) is
# cut in two
SHAPES = [[(10, 7), (10,)], [(3, 2, 2), (1, 5)]]


# --- the reference, from the paper's algorithm ----------------------------------------

def merge_dims(shape, limit):
    """Drop size-1 dims, then merge neighbours from the last while the product <= limit."""
    kept = [d for d in shape if d != 1][::-1] or [1]
    merged = [kept[0]]
    for d in kept[1:]:
        if merged[-1] * d <= limit:
            merged[-1] = merged[-1] * d
        else:
            merged.append(d)
    return tuple(merged[::-1])


def blocks(x, size):
    """x split along every dim into pieces of at most `size` (views, the first dim slowest)."""
    pieces = [x]
    for dim in range(x.dim()):
        pieces = [q for piece in pieces for q in torch.split(piece, size, dim=dim)]
    return pieces


def inverse_root(a, eps, root):
    """(A + eps I)^(-1/root) by eigh, eigenvalues below eps lifted as Distributed Shampoo does."""
    w, q = torch.linalg.eigh(a + eps * torch.eye(a.shape[0], dtype=a.dtype))
    if w.min() < eps:
        w = w - w.min() + eps
    return q @ torch.diag(w.pow(-1.0 / root)) @ q.T


def precondition(x, roots):
    """x contracted with roots[k] along every mode k (the factor is symmetric)."""
    for k, r in enumerate(roots):
        x = torch.movedim(torch.tensordot(r, torch.movedim(x, k, 0), dims=([1], [0])), 0, k)
    return x


def reference_step(p, grad, st, h, t):
    b1, b2 = h["betas"]
    g = grad.clone()
    if not h["use_decoupled_weight_decay"]:
        g = g + h["weight_decay"] * p
    # Adam grafting and the filtered gradient, elementwise over the whole tensor
    st.setdefault("m", torch.zeros_like(p))
    st.setdefault("v", torch.zeros_like(p))
    st["m"] = b1 * st["m"] + (1 - b1) * g
    corrected = h["use_bias_correction"]
    m = st["m"] / (1 - b1 ** t) if corrected else st["m"]
    gb2 = h["grafting_beta2"]
    st["v"] = gb2 * st["v"] + (1 - gb2) * g * g
    graft = m / ((st["v"] / (1 - gb2 ** t)).sqrt() + h["grafting_epsilon"])
    shape = merge_dims(p.shape, h["max_preconditioner_dim"])
    size = h["max_preconditioner_dim"]
    start, freq = h["start_preconditioning_step"], h["precondition_frequency"]
    refresh = t == start or (t > start and t % freq == 0)
    out = []
    triples = zip(blocks(g.reshape(shape), size), blocks(m.reshape(shape), size),
                  blocks(graft.reshape(shape), size))
    for b, (gb, mb, grb) in enumerate(triples):
        k = gb.dim()
        factors = st.setdefault(("L", b), [torch.zeros(n, n, dtype=p.dtype) for n in gb.shape])
        roots = st.setdefault(("root", b), [torch.eye(n, dtype=p.dtype) for n in gb.shape])
        for i in range(k):
            others = [j for j in range(k) if j != i]
            outer = torch.tensordot(gb, gb, dims=(others, others))
            factors[i] = b2 * factors[i] + (1.0 if b2 == 1.0 else 1 - b2) * outer
        correction = 1 - b2 ** t if b2 < 1 and corrected else 1.0
        root = h["inv_root_override"] or 2 * k
        if refresh:
            roots[:] = [inverse_root(f / correction, h["epsilon"], root) for f in factors]
        if t < start:
            out.append(grb)
        else:
            d = precondition(mb, roots)
            out.append(d * (grb.norm() / (d.norm() + 1e-16)))
    # the blocks back in place, in the order `blocks` cut them
    step = torch.empty(shape, dtype=p.dtype)
    for piece, d in zip(blocks(step, size), out):
        piece.copy_(d)
    step = step.reshape(p.shape)
    if h["use_decoupled_weight_decay"]:
        step = step + h["weight_decay"] * p
    if h["momentum"] != 0.0:  # after decoupled decay: the search direction's momentum
        st["M"] = h["momentum"] * st.get("M", torch.zeros_like(p)) + step
        step = step + h["momentum"] * st["M"] if h["use_nesterov"] else st["M"]
    return p - h["lr"] * step


# --- the problem: a fresh least-squares batch per step ---------------------------------

def make_params(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
            for shapes in SHAPES]


def loss_fn(params, t):
    gen = torch.Generator().manual_seed(1000 + t)
    total = 0.0
    for p in params:
        n = p.numel()
        x = torch.randn(9, n, generator=gen, dtype=torch.float64)
        y = torch.randn(9, generator=gen, dtype=torch.float64)
        total = total + ((x @ p.reshape(-1) - y) ** 2).mean() + 0.05 * (p ** 4).sum()
    return total


def grads_at(params, t):
    leaves = [p.detach().clone().requires_grad_(True) for p in params]
    return torch.autograd.grad(loss_fn(leaves, t), leaves)


def run_reference(steps=STEPS, hypers=GROUPS):
    groups = make_params()
    states = [[{} for _ in g] for g in groups]
    for t in range(1, steps + 1):
        flat = [p for g in groups for p in g]
        grads = iter(grads_at(flat, t))
        groups = [[reference_step(p, next(grads), st, h, t) for p, st in zip(g, sts)]
                  for g, sts, h in zip(groups, states, hypers)]
    return [p for g in groups for p in g]


def compiled(params, hypers=GROUPS):
    opt_cls = curvc.load("distributed_shampoo")
    return opt_cls([dict(params=ps, **h) for ps, h in zip(params, hypers)])


def train(opt, params, steps, first=1):
    flat = [p for g in params for p in g]
    for t in range(first, first + steps):
        for p, g in zip(flat, grads_at(flat, t)):
            p.grad = g.clone()
        opt.step()
    return flat


def test_blocking_and_merging_happen():
    limit = GROUPS[0]["max_preconditioner_dim"]
    assert len(blocks(torch.zeros(10, 7), limit)) == 4
    assert merge_dims((3, 2, 2), limit) == (3, 4) and merge_dims((1, 5), limit) == (5,)


@pytest.mark.parametrize("hypers", [GROUPS, DEFAULT_GROUPS], ids=["options", "defaults"])
def test_matches_the_algorithm_written_out(hypers):
    expected = run_reference(hypers=hypers)
    params = [[p.clone().requires_grad_(True) for p in g] for g in make_params()]
    got = train(compiled(params, hypers), params, STEPS)
    for e, g in zip(expected, got):
        assert (g.detach() - e).norm() <= 1e-6 * e.norm(), (g.shape, (g.detach() - e).norm())
    # and it moved far from where it started, by more than the tolerance
    start = [p for g in make_params() for p in g]
    assert all((e - s).norm() > 1e-2 * s.norm() for e, s in zip(expected, start))


def test_before_the_start_the_step_is_adams():
    """Up to step start - 1 only the grafted Adam step is taken (no eigendecomposition used)."""
    steps = GROUPS[1]["start_preconditioning_step"] - 1
    expected = run_reference(steps)
    params = [[p.clone().requires_grad_(True) for p in g] for g in make_params()]
    got = train(compiled(params), params, steps)
    for e, g in zip(expected, got):
        torch.testing.assert_close(g.detach(), e, rtol=1e-12, atol=0)


def test_state_dict_round_trip_is_bitwise():
    params = [[p.clone().requires_grad_(True) for p in g] for g in make_params()]
    opt = compiled(params)
    train(opt, params, 7)
    saved = copy.deepcopy(opt.state_dict())
    twin = [[p.detach().clone().requires_grad_(True) for p in g] for g in params]
    other = compiled(twin)
    other.load_state_dict(saved)
    a, b = train(opt, params, 8, first=8), train(other, twin, 8, first=8)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    keys = set(itertools.chain.from_iterable(opt.state_dict()["state"][i] for i in range(4)))
    assert any("block3" in k for k in keys)  # the (10, 7) weight's fourth block


@pytest.mark.parametrize("bad", [dict(betas=(0.9, 1.5)), dict(start_preconditioning_step=0),
                                 dict(max_preconditioner_dim=0), dict(grafting_beta2=1.0)])
def test_constructor_checks_its_arguments(bad):
    p = torch.zeros(3, requires_grad=True)
    with pytest.raises(ValueError):
        curvc.load("distributed_shampoo")([p], **bad)


# --- the graft on an elementwise structure: the norm of each tensor ---------------------

GRAFTED_SIGN = """
optimizer GraftedSign
hyper lr = 1e-3, betas = (0.9, 0.999), eps = 1e-8, start = 1
curvature constant
structure scalar
length    eigen_sign
momentum  ema(betas[0]) bias_corrected
graft     adam(betas[1], eps, start = start)
"""


def test_an_elementwise_step_takes_the_grafted_norm_per_tensor(tmp_path):
    """sign(m) per tensor at the norm of Adam's step, Adam's step alone before `start`."""
    spec = tmp_path / "grafted_sign.curv"
    spec.write_text(GRAFTED_SIGN)
    opt_cls = curvc.load(spec)
    hypers = [dict(lr=0.01, betas=(0.8, 0.95), eps=1e-6, start=1),
              dict(lr=0.02, betas=(0.5, 0.9), eps=1e-7, start=6)]
    params = [[p.clone().requires_grad_(True) for p in g] for g in make_params(3)]
    ref = [[p.detach().clone() for p in g] for g in params]
    states = [[{"m": torch.zeros_like(p), "v": torch.zeros_like(p)} for p in g] for g in ref]
    opt = opt_cls([dict(params=ps, **h) for ps, h in zip(params, hypers)])
    for t in range(1, 21):
        flat = [p for g in ref for p in g]
        grads = iter(grads_at(flat, t))
        for g, sts, h in zip(ref, states, hypers):
            b1, b2 = h["betas"]
            for i, (p, st) in enumerate(zip(g, sts)):
                grad = next(grads)
                st["m"] = b1 * st["m"] + (1 - b1) * grad
                st["v"] = b2 * st["v"] + (1 - b2) * grad * grad
                m = st["m"] / (1 - b1 ** t)
                adam = m / ((st["v"] / (1 - b2 ** t)).sqrt() + h["eps"])
                d = torch.sign(m)
                d = d * adam.norm() / (d.norm() + 1e-16) if t >= h["start"] else adam
                g[i] = p - h["lr"] * d
        train(opt, params, 1, first=t)
    for e, g in zip([p for g in ref for p in g], [p for g in params for p in g]):
        assert (g.detach() - e).norm() <= 1e-10 * e.norm()
