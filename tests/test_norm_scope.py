"""The scope of a norm: each tensor, one param group, or every parameter (the default).

`length normalized(scope = ...)` and `clip global_norm(c, scope = ...)` take their norm
over the scope's tensors; `clip ...(on = gradient)` clips g before anything reads it, as
torch.nn.utils.clip_grad_norm_ (clip_grad_value_) does ahead of a torch.optim step.
References are the equations written out below, or torch.nn.utils + torch.optim, in
float64 over 50 steps with two param groups and non-default hyperparameters.
"""
from __future__ import annotations

import math

import pytest
import torch

import curvc
from curvc.errors import CurvError

STEPS = 50
TOL = 1e-6


def _load(tmp_path, body: str, name: str = "Scoped", backend: str = "torch"):
    path = tmp_path / f"{name.lower()}.curv"
    path.write_text(f"optimizer {name}\n{body}")
    return curvc.load(str(path), backend=backend)


def _params():
    """Two groups: a matrix and a vector, then a 0-d tensor and a 3-D tensor."""
    g = torch.Generator().manual_seed(1)
    shapes = [(6, 4), (9,), (), (2, 3, 2)]
    return [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]


def _gradient(theta: list, t: int) -> list:
    """A gradient that depends on the point (so errors compound) plus seeded noise, of
    varying size (so a clip acts on some steps and not on others)."""
    g = torch.Generator().manual_seed(100 + t)
    size = 0.3 + 2.0 * (t % 5)
    return [size * (torch.tanh(x) + 0.5 * torch.randn(x.shape, generator=g, dtype=x.dtype))
            for x in theta]


def _run(opt_of, steps: int = STEPS, groups=((0, 2), (2, 4)), group_kw=({}, {})):
    """Our optimizer from the same start: its parameters after ``steps`` steps."""
    ps = [x.clone().requires_grad_(True) for x in _params()]
    opt = opt_of([{"params": ps[a:b], **kw} for (a, b), kw in zip(groups, group_kw)])
    for t in range(1, steps + 1):
        for p, g in zip(ps, _gradient([p.detach() for p in ps], t)):
            p.grad = g
        opt.step()
    return [p.detach() for p in ps]


def assert_close(ours, ref, tol=TOL):
    for a, b in zip(ours, ref):
        assert a.shape == b.shape
        err = (a - b).abs().max() / max(b.abs().max(), 1e-12)
        assert err <= tol, (float(err), a, b)


def _norm(ts) -> float:
    return math.sqrt(sum(float((t * t).sum()) for t in ts))


# --- normalized gradient descent: d = g / ||g|| over the scope ----------------------

NORMALIZED = ("hyper lr = 0.1\ncurvature constant\nstructure scalar\n"
              "length normalized(scope = {scope})\n")


def _scopes(scope: str):
    """The tensors each tensor's norm sums over: index lists."""
    if scope == "tensor":
        return [[i] for i in range(4)]
    if scope == "group":
        return [[0, 1], [0, 1], [2, 3], [2, 3]]
    return [[0, 1, 2, 3]] * 4


@pytest.mark.parametrize("scope", ["tensor", "group", "global"])
def test_normalized_gradient_descent_divides_by_the_norm_of_its_scope(tmp_path, scope):
    Opt = _load(tmp_path, NORMALIZED.format(scope=scope))
    lrs = (0.07, 0.02)
    ours = _run(lambda groups: Opt(groups), group_kw=({"lr": lrs[0]}, {"lr": lrs[1]}))
    theta = _params()
    lr = [lrs[0], lrs[0], lrs[1], lrs[1]]
    for t in range(1, STEPS + 1):
        g = _gradient(theta, t)
        # d_i = g_i / sqrt(sum over the scope of g_j . g_j)
        norms = [_norm([g[j] for j in js]) for js in _scopes(scope)]
        theta = [x - lr[i] * g[i] / norms[i] for i, x in enumerate(theta)]
    assert_close(ours, theta)


def test_a_tensor_scope_normalized_step_has_unit_length_per_tensor(tmp_path):
    """The defining property, one step from zero state: ||d_i|| = 1 for every tensor."""
    Opt = _load(tmp_path, NORMALIZED.format(scope="tensor"))
    ps = [x.clone().requires_grad_(True) for x in _params()]
    start = [p.detach().clone() for p in ps]
    opt = Opt([{"params": ps}], lr=1.0)
    for p, g in zip(ps, _gradient(start, 3)):
        p.grad = g
    opt.step()
    for p, s in zip(ps, start):
        assert abs(float((s - p.detach()).norm()) - 1.0) < 1e-12


def test_a_tensor_whose_gradient_is_zero_takes_no_step(tmp_path):
    Opt = _load(tmp_path, NORMALIZED.format(scope="tensor"))
    a, b = torch.ones(3, dtype=torch.float64, requires_grad=True), \
        torch.ones(2, dtype=torch.float64, requires_grad=True)
    opt = Opt([a, b], lr=0.5)
    a.grad, b.grad = torch.zeros(3, dtype=torch.float64), torch.tensor([3.0, 4.0], dtype=torch.float64)
    opt.step()
    assert torch.equal(a.detach(), torch.ones(3, dtype=torch.float64))
    torch.testing.assert_close(b.detach(), torch.tensor([1 - 0.3, 1 - 0.4], dtype=torch.float64))


# --- the step's clip: d * min(1, c / ||d||) over the scope ----------------------------

CLIPPED_SGD = ("hyper lr = 0.1, mu = 0.8, c = 1.0\ncurvature constant\nstructure scalar\n"
               "length none\nmomentum heavy_ball(mu)\n"
               "clip global_norm(c, scope = {scope})\n")


@pytest.mark.parametrize("scope", ["tensor", "group", "global"])
def test_the_step_clip_scales_by_the_norm_of_its_scope(tmp_path, scope):
    Opt = _load(tmp_path, CLIPPED_SGD.format(scope=scope))
    kw = ({"lr": 0.05, "c": 2.5}, {"lr": 0.03, "c": 0.7})
    ours = _run(lambda groups: Opt(groups, mu=0.6), group_kw=kw)
    theta = _params()
    lr = [0.05, 0.05, 0.03, 0.03]
    c = [2.5, 2.5, 0.7, 0.7]
    buf = None
    for t in range(1, STEPS + 1):
        g = _gradient(theta, t)
        # heavy ball (b = g at t = 1), then d_i = b_i * min(1, c / ||b||_scope)
        buf = g if buf is None else [0.6 * b + x for b, x in zip(buf, g)]
        norms = [_norm([buf[j] for j in js]) for js in _scopes(scope)]
        theta = [x - lr[i] * buf[i] * min(1.0, c[i] / norms[i]) for i, x in enumerate(theta)]
    assert_close(ours, theta)


def test_tensor_and_global_clips_differ(tmp_path):
    """Not a vacuous scope: on this problem the two clips take different steps."""
    runs = [_run(lambda groups, s=s: _load(tmp_path, CLIPPED_SGD.format(scope=s), f"C{s}")(
        groups, c=1.0), steps=3) for s in ("tensor", "global")]
    assert max(float((a - b).abs().max()) for a, b in zip(*runs)) > 1e-3


# --- the gradient's clip: torch.nn.utils.clip_grad_norm_, then torch.optim.Adam -------

ADAM = """hyper lr = 1e-3, betas = (0.9, 0.999), eps = 1e-8, weight_decay = 0, max_norm = 1.0
curvature empirical_fisher
structure diagonal
iterate   ema(betas[1]) bias_corrected
momentum  ema(betas[0]) bias_corrected
length    gradient_norm
damping   add(eps)
decay     l2(weight_decay)
clip      global_norm(max_norm, scope = {scope}, on = gradient)
"""
ADAM_GROUPS = ({"lr": 0.02, "weight_decay": 0.05}, {"lr": 0.01, "betas": (0.8, 0.95)})


def _torch_clip_then_adam(scope: str, max_norm: float, steps: int = STEPS):
    theta = [x.clone().requires_grad_(True) for x in _params()]
    ref = torch.optim.Adam([{"params": theta[:2], **ADAM_GROUPS[0]},
                            {"params": theta[2:], **ADAM_GROUPS[1]}], eps=1e-3)
    for t in range(1, steps + 1):
        for p, g in zip(theta, _gradient([p.detach() for p in theta], t)):
            p.grad = g
        sets = {"tensor": [[p] for p in theta], "group": [theta[:2], theta[2:]],
                "global": [theta]}[scope]
        for ps in sets:
            torch.nn.utils.clip_grad_norm_(ps, max_norm)
        ref.step()
    return [p.detach() for p in theta]


@pytest.mark.parametrize("scope", ["tensor", "group", "global"])
def test_gradient_clip_then_adam_equals_clip_grad_norm_then_torch_adam(tmp_path, scope):
    """torch's clip_grad_norm_ divides by ||g|| + 1e-6, ours by ||g||: a relative
    difference of 1e-6 / ||g|| in the clipped gradient, on the steps that clip (||g|| >
    max_norm = 3 here), well inside the tolerance."""
    Opt = _load(tmp_path, ADAM.format(scope=scope))
    ours = _run(lambda groups: Opt(groups, eps=1e-3, max_norm=3.0), group_kw=ADAM_GROUPS)
    assert_close(ours, _torch_clip_then_adam(scope, 3.0))


def test_the_gradient_clip_is_not_vacuous(tmp_path):
    """Without the clip (a threshold no gradient reaches) the run is another one."""
    Opt = _load(tmp_path, ADAM.format(scope="global"))
    ours = _run(lambda groups: Opt(groups, eps=1e-3, max_norm=1e9), group_kw=ADAM_GROUPS)
    ref = _torch_clip_then_adam("global", 3.0)
    assert max(float((a - b).abs().max()) for a, b in zip(ours, ref)) > 1e-3


ELEMENTWISE = ADAM.replace("global_norm(max_norm, scope = {scope}, on = gradient)",
                           "elementwise(max_norm, on = gradient)")


def test_elementwise_gradient_clip_equals_clip_grad_value_then_torch_adam(tmp_path):
    Opt = _load(tmp_path, ELEMENTWISE)
    ours = _run(lambda groups: Opt(groups, eps=1e-3, max_norm=0.9), group_kw=ADAM_GROUPS)
    theta = [x.clone().requires_grad_(True) for x in _params()]
    ref = torch.optim.Adam([{"params": theta[:2], **ADAM_GROUPS[0]},
                            {"params": theta[2:], **ADAM_GROUPS[1]}], eps=1e-3)
    for t in range(1, STEPS + 1):
        for p, g in zip(theta, _gradient([p.detach() for p in theta], t)):
            p.grad = g
        torch.nn.utils.clip_grad_value_(theta, 0.9)
        ref.step()
    assert_close(ours, [p.detach() for p in theta])


# --- both clips in one spec ----------------------------------------------------------

BOTH = ("hyper lr = 0.1, c = 1.0, s = 0.5\ncurvature constant\nstructure scalar\n"
        "length none\nmomentum heavy_ball(0.5)\n"
        "clip global_norm(c, scope = group, on = gradient)\n"
        "clip global_norm(s, scope = tensor)\n")


@pytest.mark.parametrize("fused", [False, None])
def test_a_gradient_clip_and_a_step_clip_compose(tmp_path, fused):
    """g_i <- g_i min(1, c / ||g||_group); b = heavy ball of g; d_i = b_i min(1, s / ||b_i||):
    the step's norm reads the clipped gradient (a reduction of a reduction)."""
    Opt = _load(tmp_path, BOTH)
    ours = _run(lambda groups: Opt(groups, fused=fused),
                group_kw=({"c": 2.0, "s": 0.4}, {"c": 0.5, "s": 0.3}))
    theta = _params()
    c, s = [2.0, 2.0, 0.5, 0.5], [0.4, 0.4, 0.3, 0.3]
    buf = None
    for t in range(1, STEPS + 1):
        g = _gradient(theta, t)
        gn = [_norm([g[j] for j in js]) for js in _scopes("group")]
        g = [x * min(1.0, c[i] / gn[i]) for i, x in enumerate(g)]
        buf = g if buf is None else [0.5 * b + x for b, x in zip(buf, g)]
        theta = [x - 0.1 * buf[i] * min(1.0, s[i] / _norm([buf[i]])) for i, x in enumerate(theta)]
    assert_close(ours, theta)


def test_the_fused_cpu_path_takes_each_tensors_own_norm(tmp_path):
    """fused=True compiles the step (torch.compile): the per-tensor values travel in each
    tensor's scalar vector. Against the eager path, 3 steps."""
    Opt = _load(tmp_path, BOTH)
    runs = [_run(lambda groups, f=f: Opt(groups, fused=f), steps=3) for f in (False, True)]
    assert_close(runs[1], runs[0], 1e-12)


# --- the language ----------------------------------------------------------------------

def _ir(body: str):
    return curvc.to_ir(f"optimizer X\nhyper lr = 0.1\n{body}")


def test_scope_defaults_to_global_and_keeps_the_plan():
    base = "curvature constant\nstructure scalar\nlength normalized\n"
    plain, scoped = (curvc.to_plan(_ir(b)) for b in
                     (base, base.replace("normalized", "normalized(scope = global)")))
    assert plain.reductions == scoped.reductions
    assert [r.scope for r in plain.reductions] == ["global"]


def test_two_step_clips_are_refused_with_where_the_first_is():
    with pytest.raises(CurvError) as e:
        _ir("curvature constant\nstructure scalar\nlength none\n"
            "clip global_norm(1)\nclip elementwise(2)\n")
    assert e.value.key == "name.duplicate_clause"
    assert "on = gradient" in str(e.value)


def test_an_unknown_scope_is_refused():
    with pytest.raises(CurvError) as e:
        _ir("curvature constant\nstructure scalar\nlength normalized(scope = layer)\n")
    assert e.value.key == "value.wrong_kind" and "tensor" in str(e.value)


@pytest.mark.parametrize("body, refusal", [
    ("curvature kfac\nstructure kronecker\nlength none\nclip global_norm(1, on = gradient)\n",
     "kfac_gradient_clip"),
    ("curvature hessian\nstructure dense\nlength normalized(scope = tensor)\n",
     "dense_normalized_scope"),
    ("curvature secant\nstructure low_rank\niterate secant(3)\nlength none\n"
     "clip global_norm(1, scope = group)\n", "secant_clip_scope"),
])
def test_what_the_runtime_preconditions_or_sees_as_one_vector_is_refused(body, refusal):
    from curvc import rules
    opt = curvc.to_ir(f"optimizer X\nhyper lr = 0.1\n{body}", compilable=False)
    assert rules.first_refusal(opt).name == refusal


def test_explain_names_each_scope():
    from curvc import explain
    text = explain.explain(_ir("curvature constant\nstructure scalar\n"
                               "length normalized(scope = tensor)\n"
                               "clip global_norm(2, scope = group, on = gradient)\n"))
    assert "norm over each param group's parameters; before decay" in text
    assert "sum over each tensor on its own" in text


# --- sharded parameters ----------------------------------------------------------------

def test_flat_fsdp_shards_are_refused_with_what_to_do(tmp_path, monkeypatch):
    """FSDP1's flat shards hold a slice of each tensor: a norm of them is refused."""
    Opt = _load(tmp_path, NORMALIZED.format(scope="tensor"))
    p = torch.ones(4, dtype=torch.float64, requires_grad=True)
    p._fsdp_flattened = True  # what FullyShardedDataParallel marks its parameters with
    p.grad = torch.ones(4, dtype=torch.float64)
    opt = Opt([p])
    dist = torch.distributed
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    with pytest.raises(RuntimeError, match="fully_shard"):
        opt.step()
    assert torch.equal(p.detach(), torch.ones(4, dtype=torch.float64))


_SHARDED_WORKER = '''
import sys, torch, torch.distributed as dist
rank, port, tensor_spec, group_spec = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
dist.init_process_group("gloo", rank=rank, world_size=2, init_method=f"tcp://127.0.0.1:{port}")
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor
import curvc
mesh = init_device_mesh("cpu", (2,))
g = torch.Generator().manual_seed(0)
starts = [torch.randn(8, 3, generator=g, dtype=torch.float64),
          torch.randn(6, generator=g, dtype=torch.float64)]
grads = [[torch.randn(s.shape, generator=g, dtype=torch.float64) for s in starts]
         for _ in range(3)]
errs = []
for spec, scope in ((tensor_spec, "tensor"), (group_spec, "group")):
    ours = [torch.nn.Parameter(distribute_tensor(s.clone(), mesh, [Shard(0)])) for s in starts]
    opt = curvc.load(spec, backend="torch")(ours, lr=0.1)
    ref = [s.clone() for s in starts]
    for gs in grads:
        for p, gr in zip(ours, gs):
            p.grad = distribute_tensor(gr.clone(), mesh, [Shard(0)])
        opt.step()
        # whole tensors: d_i = g_i / ||g_i|| (tensor), g_i / ||g|| over both (group)
        whole = torch.cat([gr.reshape(-1) for gr in gs]).norm()
        ref = [x - 0.1 * gr / (gr.norm() if scope == "tensor" else whole)
               for x, gr in zip(ref, gs)]
    errs.append(max(float((p.detach().full_tensor() - r).abs().max()) for p, r in zip(ours, ref)))
dist.destroy_process_group()
print(max(errs), flush=True)
import os
os._exit(0)  # skip teardown, where gloo's threads now and then abort (see tests/_gloo.leave)
'''


def test_a_sharded_tensors_norm_is_the_whole_tensors(tmp_path):
    """FSDP2-style DTensor parameters, each sharded over two gloo ranks: a tensor-scope
    (and a group-scope) norm is the whole tensor's, not the local shard's."""
    import os
    import socket
    import subprocess
    import sys
    dist = torch.distributed
    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("needs torch.distributed with gloo")
    worker = tmp_path / "worker.py"
    worker.write_text(_SHARDED_WORKER)
    specs = []
    for scope in ("tensor", "group"):
        path = tmp_path / f"{scope}.curv"
        path.write_text(f"optimizer Sharded\n{NORMALIZED.format(scope=scope)}")
        specs.append(str(path))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    env = {**os.environ, "CURVC_QUIET": "1", "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, str(worker), str(r), port, *specs], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r in range(2)]
    for p in procs:
        out, err = p.communicate(timeout=600)  # a hang guard, not a speed requirement
        assert p.returncode == 0, err[-3000:]
        assert float(out.strip().splitlines()[-1]) <= 1e-12


# --- more than one bucket in a scope; Shampoo's head and tail; a skipped step ----------

def test_a_group_scope_spans_the_buckets_of_its_group(tmp_path):
    """A float32 and a float64 tensor in one group are two buckets: their norm is one."""
    Opt = _load(tmp_path, NORMALIZED.format(scope="group"))
    g = torch.Generator().manual_seed(3)
    start = [torch.randn(5, generator=g, dtype=torch.float64),
             torch.randn(4, 2, generator=g).float(), torch.randn(3, generator=g, dtype=torch.float64)]
    ps = [x.clone().requires_grad_(True) for x in start]
    opt = Opt([{"params": ps[:2]}, {"params": ps[2:], "lr": 0.3}], lr=0.2)
    theta = [x.double() for x in start]
    for t in range(1, 11):
        grads = _gradient([p.detach().double() for p in ps], t)
        for p, gr in zip(ps, grads):
            p.grad = gr.to(p.dtype)
        opt.step()
        grads = [gr.to(x.dtype).double() for gr, x in zip(grads, start)]  # what ours saw
        first = _norm(grads[:2])
        theta = [theta[0] - 0.2 * grads[0] / first, theta[1] - 0.2 * grads[1] / first,
                 theta[2] - 0.3 * grads[2] / _norm(grads[2:])]
    assert_close([p.detach().double() for p in ps], theta, 1e-5)


SHAMPOO = """hyper lr = 0.05, c = 1.5
curvature empirical_fisher
structure kronecker
length    normalized(scope = group)
damping   inside(1e-2)
{clip}"""


def test_a_gradient_clip_before_shampoo_is_shampoo_of_the_clipped_gradient(tmp_path):
    """The definition: clip g (each tensor to norm c), then the same optimizer without the
    clip. Its head kernel sums the clip, its tail the normalization, which reads it."""
    Clipped = _load(tmp_path, SHAMPOO.format(clip="clip global_norm(c, scope = tensor, "
                                                   "on = gradient)\n"), "Clipped")
    Plain = _load(tmp_path, SHAMPOO.format(clip=""), "Plain")
    ps = [x.clone().requires_grad_(True) for x in _params()]
    qs = [x.clone().requires_grad_(True) for x in _params()]
    opt = Clipped([{"params": ps[:2]}, {"params": ps[2:], "c": 0.5}])
    ref = Plain([{"params": qs[:2]}, {"params": qs[2:]}])
    c = [1.5, 1.5, 0.5, 0.5]
    for t in range(1, 21):
        grads = _gradient([p.detach() for p in ps], t)
        for i, (p, q, gr) in enumerate(zip(ps, qs, grads)):
            p.grad = gr.clone()
            q.grad = gr * min(1.0, c[i] / _norm([gr]))  # g_i min(1, c / ||g_i||)
        opt.step()
        ref.step()
    assert_close([p.detach() for p in ps], [q.detach() for q in qs], 1e-9)


def test_a_skipped_step_leaves_everything_as_it_was(tmp_path):
    Opt = _load(tmp_path, BOTH)
    ps = [x.clone().requires_grad_(True) for x in _params()]
    opt = Opt([{"params": ps[:2]}, {"params": ps[2:]}], nonfinite="skip")
    for t in (1, 2):
        for p, g in zip(ps, _gradient([p.detach() for p in ps], t)):
            p.grad = g
        opt.step()
    before = [p.detach().clone() for p in ps]
    state = [opt.state[p]["momentum_buffer"].clone() for p in ps]
    ps[1].grad[0] = float("nan")
    opt.step()
    assert all(torch.equal(p.detach(), b) for p, b in zip(ps, before))
    assert all(torch.equal(opt.state[p]["momentum_buffer"], s) for p, s in zip(ps, state))
