"""The fused CPU path (the torch rendering compiled into one pass) equals the eager rendering.

Compiling takes seconds per (spec, flags), so these tests use few specs and
share compiled kernels through the class-level cache.
"""
import copy

import pytest
import torch

import curvc

SHAPES = [(), (7,), (33, 5), (2, 3, 4, 5), (1,), (300, 250)]


def _params(seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g)) for s in SHAPES]


def _run(cls, kwargs, fused, steps=6, lrs=None):
    params = _params(0)
    opt = cls(params, fused=fused, **kwargs)
    g = torch.Generator().manual_seed(1)
    for t in range(steps):
        if lrs:
            for group in opt.param_groups:
                group["lr"] = lrs[t]
        for p in params:
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()
    return params, opt


@pytest.mark.parametrize("spec, kwargs", [
    ("adam", dict(lr=1e-2, weight_decay=0.1, amsgrad=True)),
    ("sgd", dict(lr=1e-2, momentum=0.9, nesterov=True, weight_decay=1e-3)),
    ("normalized_gd", dict(lr=1e-2)),  # a global reduction feeds the kernel
])
def test_fused_path_equals_eager_rendering(spec, kwargs):
    cls = curvc.load(spec, backend="torch")
    eager, _ = _run(cls, kwargs, fused=False)
    fused, _ = _run(cls, kwargs, fused=True)
    for a, b in zip(eager, fused):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)


def test_changing_lr_every_step_compiles_once():
    cls = curvc.load("adam", backend="torch")
    lrs = [1e-2 / (t + 1) for t in range(6)]
    eager, _ = _run(cls, dict(lr=1e-2), fused=False, lrs=lrs)
    before = len(cls.__dict__.get("_fused_kernels", {}))
    fused, _ = _run(cls, dict(lr=1e-2), fused=True, lrs=lrs)
    kernels = cls.__dict__["_fused_kernels"]
    assert len(kernels) - before <= 1
    for a, b in zip(eager, fused):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)


def test_fused_kernels_are_called_without_dynamo_guards():
    cls = curvc.load("adam", backend="torch")
    _run(cls, dict(lr=1e-2), fused=True, steps=1)
    assert all(k._direct is not None for k in cls.__dict__["_fused_kernels"].values())


def test_a_failed_compile_warns_and_falls_back_to_the_eager_path(monkeypatch):
    import curvc.runtime.fused_cpu as fused_cpu

    def broken(*args, **kwargs):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(fused_cpu, "FusedUpdate", broken)
    cls = curvc.load(str(__import__("pathlib").Path(__file__).parent / "specs"
                         / "sign_fisher_clip.curv"), backend="torch")
    eager, _ = _run(cls, dict(lr=1e-2), fused=False)
    with pytest.warns(UserWarning, match="could not be compiled"):
        fused, _ = _run(cls, dict(lr=1e-2), fused=True)
    for a, b in zip(eager, fused):
        torch.testing.assert_close(b, a)


def test_fused_kernels_skip_the_aot_wrapper_once_verified():
    cls = curvc.load("adam", backend="torch")
    # only this run's kernels: others in the class's cache (a skipping variant, whose
    # scratch run keeps the parameter) may rightly use the wrapped call
    cls.__dict__.get("_fused_kernels", {}).clear()
    _run(cls, dict(lr=1e-2), fused=True, steps=1)
    assert all(k._raw is not None for k in cls.__dict__["_fused_kernels"].values())


def test_a_raw_call_that_writes_differently_is_not_used():
    """The check that guards the unwrapped call: a generated call that skips the
    in-place writes (as if the wrapper did them) is refused."""
    from curvc.runtime.fused_cpu import _verified_raw_call

    class Wrapped:
        def __call__(self, n, p, s, step):
            p.sub_(s[0]); step.add_(1)

        def current_callable(self, args):
            args.clear()  # writes nothing: the mutation lived in the wrapper

    order = [("n",), ("t", 0), ("s",), ("c",)]
    assert _verified_raw_call(Wrapped(), order, (torch.float32,), 1, torch.float32) is None

    class Faithful(Wrapped):
        def current_callable(self, args):
            n, p, s, step = args
            args.clear()
            p.sub_(s[0]); step.add_(1)

    assert _verified_raw_call(Faithful(), order, (torch.float32,), 1, torch.float32) is not None


def test_fused_steps_count_every_step_and_accept_old_step_formats():
    """The compiled pass bumps each parameter's float32 step counter; a checkpoint whose
    counters are ints (old torch) or float64 tensors resumes on the fused path as on
    the eager one."""
    cls = curvc.load("adam", backend="torch")
    params, opt = _run(cls, dict(lr=1e-2), fused=True, steps=4)
    assert all(s["step"].dtype == torch.float32 and float(s["step"]) == 4.0
               for s in opt.state.values())
    saved = opt.state_dict()
    for i, s in saved["state"].items():
        s["step"] = 4 if i % 2 else torch.tensor(4.0, dtype=torch.float64)
    results = []
    for fused in (False, True):
        ps = [p.detach().clone().requires_grad_() for p in params]
        o = cls(ps, lr=1e-2, fused=fused)
        o.load_state_dict(copy.deepcopy(saved))  # torch's loading aliases the tensors
        g = torch.Generator().manual_seed(5)
        for _ in range(2):
            for p in ps:
                p.grad = torch.randn(p.shape, generator=g)
            o.step()
        assert all(s["step"].dtype == torch.float32 and float(s["step"]) == 6.0
                   for s in o.state.values())
        results.append(ps)
    for a, b in zip(*results):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)


# --- what may not take the compiled kernel ---------------------------------------
# Its raw call trusts the memory it is given: a meta tensor (no memory) or a DTensor
# (a wrapper without storage) crashed the process, and a row of other dtypes was read
# as the first row's. Crashes are run in a subprocess, so that they fail the test
# instead of killing pytest.

def _in_subprocess(script: str) -> str:
    import os
    import subprocess
    import sys
    import textwrap
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True,
                          text=True, env=dict(os.environ), timeout=600)
    assert done.returncode == 0, f"exit status {done.returncode}\n{done.stderr[-3000:]}"
    return done.stdout.strip().splitlines()[-1]


def test_meta_parameters_of_a_large_bucket_step_like_torch_adam():
    """torch.optim.Adam on meta tensors is a no-op on them and counts the step."""
    out = _in_subprocess("""
        import torch, curvc
        n = 1 << 18  # the size from which the default (fused=None) compiles the step
        states = []
        for make in (torch.optim.Adam, curvc.load("adam")):
            p = torch.nn.Parameter(torch.empty(n, device="meta"))
            opt = make([p])
            for _ in range(2):
                p.grad = torch.empty(n, device="meta")
                opt.step()
            st = opt.state[p]
            states.append(sorted((k, str(v.device), tuple(v.shape), str(v.dtype),
                                  float(v) if v.device.type == "cpu" else None)
                                 for k, v in st.items()) + [str(p.device)])
        print(states[0] == states[1], states[1])
    """)
    assert out.startswith("True"), out


def test_fused_true_on_dtensor_parameters_takes_the_eager_path_and_matches_torch_adam():
    dist = pytest.importorskip("torch.distributed")
    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("needs torch.distributed with gloo")
    out = _in_subprocess("""
        import socket, torch, torch.distributed as dist
        s = socket.socket(); s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]; s.close()
        dist.init_process_group("gloo", rank=0, world_size=1,
                                init_method=f"tcp://127.0.0.1:{port}")
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import Shard, distribute_tensor
        import curvc
        mesh = init_device_mesh("cpu", (1,))
        g = torch.Generator().manual_seed(0)
        start = torch.randn(64, 8, generator=g)
        grads = [torch.randn(64, 8, generator=g) for _ in range(3)]
        ours = torch.nn.Parameter(distribute_tensor(start.clone(), mesh, [Shard(0)]))
        ref = torch.nn.Parameter(start.clone())
        opt = curvc.load("adam")([ours], lr=0.1, fused=True)
        ropt = torch.optim.Adam([ref], lr=0.1)
        for grad in grads:
            ours.grad = distribute_tensor(grad.clone(), mesh, [Shard(0)])
            ref.grad = grad.clone()
            opt.step()
            ropt.step()
        err = ((ours.full_tensor() - ref).abs().max() / ref.abs().max()).item()
        dist.destroy_process_group()
        print(err, flush=True)
        import os
        os._exit(0)  # skip teardown, where gloo's threads now and then abort (_gloo.leave)
    """)
    assert float(out) <= 1e-6


class _Tagged(torch.Tensor):
    """A tensor subclass with no behaviour of its own."""


def test_fused_true_on_a_tensor_subclass_matches_torch_adam():
    g = torch.Generator().manual_seed(0)
    start, grads = torch.randn(300, 250, generator=g), [torch.randn(300, 250, generator=g)
                                                         for _ in range(3)]
    ours = torch.nn.Parameter(torch.Tensor._make_subclass(_Tagged, start.clone()))
    ref = torch.nn.Parameter(start.clone())
    opt = curvc.load("adam", backend="torch")([ours], lr=0.1, fused=True)
    ropt = torch.optim.Adam([ref], lr=0.1)
    for grad in grads:
        ours.grad, ref.grad = grad.clone(), grad.clone()
        opt.step()
        ropt.step()
    torch.testing.assert_close(torch.Tensor(ours.detach()), ref.detach(), rtol=1e-5, atol=1e-6)


def test_a_bucket_with_state_of_other_dtypes_takes_the_eager_path():
    """A checkpoint can give one parameter float64 state and another float32: the kernel
    compiled for the first layout must not read the other's memory (it gave NaN). As
    torch.optim.Adam, which casts the loaded state to the parameter's dtype."""
    Adam = curvc.load("adam", backend="torch")
    results = []
    for make in (lambda ps: torch.optim.Adam(ps, lr=0.1),
                 lambda ps: Adam(ps, lr=0.1, fused=True)):
        g = torch.Generator().manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(1000, generator=g)) for _ in range(2)]
        opt = make(params)
        for p in params:
            p.grad = torch.randn(1000, generator=g)
        opt.step()
        saved = copy.deepcopy(opt.state_dict())
        for key in ("exp_avg", "exp_avg_sq"):
            saved["state"][1][key] = saved["state"][1][key].double()
        opt.load_state_dict(saved)
        for p in params:
            p.grad = torch.randn(1000, generator=g)
        opt.step()
        results.append(params)
    for ref, ours in zip(*results):
        torch.testing.assert_close(ours.detach(), ref.detach(), rtol=1e-5, atol=1e-6)


def test_the_one_time_compile_says_so_on_stderr(capfd, monkeypatch):
    monkeypatch.delenv("CURVC_QUIET", raising=False)
    cls = curvc.load("adagrad", backend="torch")
    cls.__dict__.get("_fused_kernels", {}).clear()
    _run(cls, dict(lr=1e-2), fused=True, steps=2)
    err = capfd.readouterr().err
    assert "compiling Adagrad's fused CPU step for" in err and "compiled in" in err
    assert err.count("compiling") == 1  # once, not per step
    monkeypatch.setenv("CURVC_QUIET", "1")
    cls.__dict__["_fused_kernels"].clear()
    _run(cls, dict(lr=1e-2), fused=True, steps=1)
    assert "compiling" not in capfd.readouterr().err


def test_many_compiled_kernels_in_one_process_do_not_meet_dynamo_s_recompile_limit(monkeypatch):
    """Every fused kernel is compiled from its own code object: with the limit at 1, a
    second optimizer's kernel still compiles (sharing one code object, it fell back)."""
    monkeypatch.setattr(torch._dynamo.config, "recompile_limit", 1)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # a fallback warns
        for spec, kwargs in (("sgd", dict(lr=1e-2, momentum=0.5)), ("adagrad", dict(lr=1e-2))):
            cls = curvc.load(spec, backend="torch")
            _, opt = _run(cls, kwargs, fused=True, steps=1)
            assert all(k is not None for k in cls.__dict__["_fused_kernels"].values())
