"""The Triton backend against the torch rendering of the same plan.

Without CUDA the kernels run in Triton's interpreter (``TRITON_INTERPRET=1``,
set below before triton is imported): backend 'triton' on CPU tensors. The
``cuda``-marked tests repeat the checks on a GPU. Tensors stay small: the
interpreter runs each program in numpy.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import inspect
import os
import sys
from pathlib import Path

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    # Must precede the first `import triton`: kernels are wrapped when decorated.
    os.environ.setdefault("TRITON_INTERPRET", "1")

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

import curvc  # noqa: E402
from curvc.backends import triton as triton_backend  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
SPECS = Path(__file__).parent / "specs"
STEPS = 20
# The interpreter runs each kernel program in numpy (about 0.1-0.5 s a program, a dozen
# programs a step), so its equivalence runs take fewer steps than on a GPU: 8 still cover
# two periods of `every 3` (and four of `every 2`) and the steps on both sides of
# AdaBelief's rectification threshold (n_sma >= 5 from t = 6 at beta2 = 0.999); lower
# precisions check per-step rounding, which 6 steps show as well as 10.
INTERP_STEPS = 8
LOW = 6 if INTERPRET else 10  # steps at a low precision

# log2(0) of masked-off lanes in the interpreter's numpy is harmless
pytestmark = pytest.mark.filterwarnings("ignore:divide by zero encountered in log2:RuntimeWarning")

interpreter = pytest.mark.skipif(not INTERPRET, reason="CPU tensors need TRITON_INTERPRET=1")


def spec_path(spec: str) -> str:
    local = SPECS / f"{spec}.curv"
    return str(local) if local.exists() else spec


def load(spec: str, backend: str):
    return curvc.load(spec_path(spec), backend=backend)


# --- a parameter set with awkward shapes, and seeded gradients -------------------

def make_params(device, dtype, n_small: int = 6, odd_layouts: bool = True) -> tuple[list, list]:
    """Two groups: odd shapes (0-d, not a multiple of the block, 4-D, several
    blocks, non-dense layouts) and many small tensors (one empty)."""
    g = torch.Generator().manual_seed(0)

    def leaf(t):
        return t.to(device=device, dtype=dtype).detach().requires_grad_(True)

    shapes = [(), (5,), (300,), (2, 3, 5, 7)]  # 300: two blocks of the interpreter's 256
    first = [leaf(torch.randn(s, generator=g)) for s in shapes]
    # A transposed parameter (dense, but its layout differs from its gradient's)
    # and a strided one (not dense): both go through contiguous copies.
    if odd_layouts:
        first.append(torch.randn(7, 5, generator=g).to(device=device, dtype=dtype).t().detach()
                     .requires_grad_(True))
        first.append(torch.randn(10, generator=g).to(device=device, dtype=dtype)[::2].detach()
                     .requires_grad_(True))
    small = [(3,), (1,), (4, 1), (2, 2, 2), (7,), (0,) if odd_layouts else (6,)]
    second = [leaf(torch.randn(small[k % len(small)], generator=g)) for k in range(n_small)]
    return first, second


def set_grads(params, step: int) -> None:
    g = torch.Generator().manual_seed(1000 + step)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g).to(device=p.device, dtype=p.dtype)


def trajectory(cls, device="cpu", dtype=torch.float32, hypers=None, group2=None, steps=STEPS,
               state_dtype=None, n_small=6, schedule=None, odd_layouts=True):
    first, second = make_params(device, dtype, n_small, odd_layouts)
    extra = {} if state_dtype is None else {"state_dtype": state_dtype}
    opt = cls([{"params": first}, {"params": second, **(group2 or {})}], **extra, **(hypers or {}))
    sched = schedule(opt) if schedule else None
    for step in range(steps):
        set_grads(first + second, step)
        opt.step()
        if sched:
            sched.step()
    return first + second, opt


def assert_close_rel(a, b, rel: float, what: str) -> None:
    """max |a - b| <= rel * max |b|: relative to the tensor's scale."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    assert a.shape == b.shape, what
    if b.numel() == 0:
        return
    scale = b.abs().max().item() or 1.0
    err = (a - b).abs().max().item()
    assert err <= rel * scale, f"{what}: max error {err:.3g} > {rel:g} * {scale:.3g}"


def assert_same_state(opt_a, params_a, opt_b, params_b, rel: float, state_rel: float | None = None):
    for k, (pa, pb) in enumerate(zip(params_a, params_b)):
        assert_close_rel(pa, pb, rel, f"param {k} {tuple(pa.shape)}")
        sa, sb = opt_a.state[pa], opt_b.state[pb]
        assert set(sa) == set(sb), (k, set(sa), set(sb))
        for key in sa:
            if key != "step":
                assert sa[key].dtype == sb[key].dtype, (k, key)
                assert_close_rel(sa[key], sb[key], state_rel or rel, f"state {key!r} of param {k}")


# Non-default hyperparameters; the second group turns some features off so
# that buffers are absent (None) in one bucket and present in the other.
CASES = {
    "sgd-nesterov": ("sgd", dict(lr=0.01, momentum=0.9, dampening=0.1, weight_decay=0.01,
                                 nesterov=True), dict(lr=0.02)),
    "sgd-maximize": ("sgd", dict(lr=0.01, momentum=0.5, maximize=True), dict(momentum=0.0)),
    "normalized_gd": ("normalized_gd", dict(lr=0.05, maximize=True), dict(lr=0.1)),
    "sign_gd": ("sign_gd", dict(lr=0.01, momentum=0.8, weight_decay=0.1), dict(momentum=0.0)),
    "adam-amsgrad": ("adam", dict(lr=0.01, betas=(0.8, 0.99), weight_decay=0.1, amsgrad=True,
                                  maximize=True), dict(lr=0.005, amsgrad=False)),
    "adamw-amsgrad": ("adamw", dict(lr=0.01, weight_decay=0.05, amsgrad=True),
                      dict(betas=(0.0, 0.9))),
    "adagrad": ("adagrad", dict(lr=0.05, lr_decay=0.01, weight_decay=0.01,
                                initial_accumulator_value=0.1, eps=1e-8), dict(lr=0.1)),
    "sign_fisher_clip": ("sign_fisher_clip", dict(lr=0.01, max_norm=0.5, weight_decay=0.05),
                         dict(max_norm=2.0, betas=(0.0, 0.99))),
    "sum_normalized_hb": ("sum_normalized_hb", dict(lr=0.05, momentum=0.9, nesterov=True,
                                                    weight_decay=0.01, lr_decay=0.05),
                          dict(momentum=0.0)),
    "sign_adagrad": ("sign_adagrad", dict(lr=0.01, rho=0.5, eps=1e-8), dict(rho=2.0)),
    "adabelief-rectify": ("adabelief", dict(lr=0.01, rectify=True, ams_bound=True,
                                            weight_decay=0.05),
                          dict(ams_bound=False, weight_decouple=False)),
    "adan": ("adan", dict(lr=0.01, betas=(0.9, 0.8, 0.95), weight_decay=0.05),
             dict(weight_decouple=True)),
    "ademamix": ("ademamix", dict(lr=0.01, alpha=3.0, weight_decay=0.05),
                 dict(weight_decouple=True)),
    # the warmup (exp and log on the host) in group 1; group 2 without it, decay fixed
    # (beta3 0.99: a slow EMA near 0.9999's, ~1e-4 of g, would cross zero and show the
    # ulp-level differences of torch's vectorized lerp as large relative errors)
    "ademamix-warmup": ("ademamix", dict(lr=0.01, alpha=3.0, weight_decay=0.05,
                                         t_alpha_beta3=5.0, betas=(0.9, 0.999, 0.99)),
                        dict(weight_decouple=True, fixed_decay=True, t_alpha_beta3=None)),
    # the gradients clipped by their global norm (with eps) before everything else
    "adan-clip": ("adan", dict(lr=0.01, betas=(0.9, 0.8, 0.95), max_grad_norm=1.0),
                  dict(weight_decouple=True)),
    "nadam": ("nadam", dict(lr=0.01, momentum_decay=0.01, weight_decay=0.05),
              dict(decoupled_weight_decay=True)),
    "every_keep_max_pow": ("every_keep_max_pow", dict(lr=0.01, power=0.5, k=3, amsgrad=True),
                           dict(power=1.0, amsgrad=False, k=2)),
    # exp and log elementwise (tl.exp, tl.log) and on the host (math.exp, math.log)
    "exp_log_step": ("exp_log_step", dict(lr=0.01, beta=0.8, tau=5.0), dict(tau=3.0)),
}


# --- equivalence on the interpreter ----------------------------------------------

@interpreter
@pytest.mark.parametrize("case", list(CASES))
def test_matches_torch_rendering(case):
    spec, hypers, group2 = CASES[case]
    pa, oa = trajectory(load(spec, "triton"), hypers=hypers, group2=group2, steps=INTERP_STEPS)
    pb, ob = trajectory(load(spec, "torch"), hypers=hypers, group2=group2, steps=INTERP_STEPS)
    assert_same_state(oa, pa, ob, pb, rel=1e-6)


@interpreter
def test_adam_matches_torch_optim():
    hypers = dict(lr=0.01, betas=(0.8, 0.99), weight_decay=0.1, amsgrad=True, maximize=True)
    pa, _ = trajectory(load("adam", "triton"), hypers=hypers, group2=dict(lr=0.003))
    pb, _ = trajectory(torch.optim.Adam, hypers=dict(hypers, foreach=False),
                       group2=dict(lr=0.003))
    for k, (a, b) in enumerate(zip(pa, pb)):
        assert_close_rel(a, b, 1e-6, f"param {k}")


@interpreter
def test_float64_params():
    hypers = dict(lr=0.01, weight_decay=0.1, amsgrad=True)
    pa, oa = trajectory(load("adam", "triton"), dtype=torch.float64, hypers=hypers, steps=5)
    pb, ob = trajectory(load("adam", "torch"), dtype=torch.float64, hypers=hypers, steps=5)
    assert all(oa.state[p]["exp_avg"].dtype == torch.float64 for p in pa)
    # The interpreter hands float arguments to kernels as float32 (compiled
    # kernels take them as float64), so hyperparameters carry ~1e-7 error here.
    assert_same_state(oa, pa, ob, pb, rel=1e-6)


# --- mixed precision -------------------------------------------------------------

ULP = {torch.bfloat16: 2.0 ** -7, torch.float16: 2.0 ** -10}  # spacing at 1, relative


@interpreter
@pytest.mark.parametrize("case,dtype", [("adam-amsgrad", torch.bfloat16),
                                        ("adam-amsgrad", torch.float16),
                                        ("sign_fisher_clip", torch.bfloat16),
                                        ("sgd-nesterov", torch.float16)],
                         ids=["adam-bf16", "adam-fp16", "sign_fisher_clip-bf16", "sgd-fp16"])
def test_low_precision_params(case, dtype):
    spec, hypers, group2 = CASES[case]
    pa, oa = trajectory(load(spec, "triton"), dtype=dtype, hypers=hypers, group2=group2, steps=LOW)
    pb, ob = trajectory(load(spec, "torch"), dtype=dtype, hypers=hypers, group2=group2, steps=LOW)
    for p in pa:
        assert all(v.dtype == torch.float32 for k, v in oa.state[p].items() if k != "step")
    # Both round the float32 result of the same arithmetic to nearest-even, so
    # parameters agree to within a rounding step or two of the low precision;
    # float32 state sees those differences only through weight decay.
    assert_same_state(oa, pa, ob, pb, rel=2 * ULP[dtype], state_rel=1e-3)


@interpreter
@pytest.mark.parametrize("case", ["adam-amsgrad", "sum_normalized_hb"])
def test_state_in_param_dtype(case):
    spec, hypers, group2 = CASES[case]
    dtype = torch.bfloat16
    pa, oa = trajectory(load(spec, "triton"), dtype=dtype, hypers=hypers, group2=group2, steps=LOW,
                        state_dtype="param")
    pb, ob = trajectory(load(spec, "torch"), dtype=dtype, hypers=hypers, group2=group2, steps=LOW,
                        state_dtype="param")
    for p in pa:
        assert all(v.dtype == dtype for k, v in oa.state[p].items() if k != "step")
    assert_same_state(oa, pa, ob, pb, rel=2 * ULP[dtype], state_rel=4 * ULP[dtype])


@interpreter
def test_mixed_state_dtypes_in_one_bucket(monkeypatch):
    """State of different dtypes (a checkpoint saved with other settings) splits
    the bucket into one launch per dtype mix; absent buffers go with any."""
    def run(backend, count=False):
        cls = load("adam", backend)
        params, opt = trajectory(cls, hypers=dict(lr=0.01, amsgrad=True), steps=1)
        for p in params[::2]:
            for key in ("exp_avg", "exp_avg_sq"):
                opt.state[p][key] = opt.state[p][key].to(torch.float64)
        kernels = counted(monkeypatch, cls) if count else {}
        for step in range(1, 4):
            set_grads(params, step)
            opt.step()
        monkeypatch.undo()
        return params, opt, kernels

    pa, oa, kernels = run("triton", count=True)
    pb, ob, _ = run("torch")
    assert_same_state(oa, pa, ob, pb, rel=1e-6)
    assert kernels["_update_kernel"].launches == 3 * 2 * 2  # steps x groups x dtype mixes


# --- launches --------------------------------------------------------------------

class Counted:
    """A kernel whose launches are counted and whose constexpr arguments are recorded."""

    def __init__(self, kernel):
        kernel = getattr(kernel, "__wrapped__", kernel)
        self.__wrapped__ = kernel
        self.launches = 0
        fn = getattr(kernel, "fn", None)
        params = inspect.signature(fn).parameters if fn else {}
        self.constexprs = [n for n, p in params.items() if p.annotation is tl.constexpr]
        self.specializations = set()

    def __getitem__(self, grid):
        launch = self.__wrapped__[grid]

        def run(*args, **kwargs):
            self.launches += 1
            self.specializations.add(tuple((n, str(kwargs.get(n))) for n in self.constexprs))
            return launch(*args, **kwargs)
        return run


def counted(monkeypatch, cls) -> dict[str, Counted]:
    module = sys.modules[cls.__module__]
    out = {}
    for name in ("_update_kernel", "_reduce_kernel"):
        if hasattr(module, name):
            out[name] = Counted(getattr(module, name))
            monkeypatch.setattr(module, name, out[name])
    return out


def _launches_per_step(monkeypatch, cls, n_tensors: int, device="cpu") -> dict[str, int]:
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(3 + k % 5, generator=gen).to(device).requires_grad_(True)
              for k in range(n_tensors)]
    opt = cls(params, lr=0.01)
    set_grads(params, 0)
    opt.step()  # the first step allocates state and builds the tables
    kernels = counted(monkeypatch, cls)
    set_grads(params, 1)
    opt.step()
    monkeypatch.undo()
    return {name: k.launches for name, k in kernels.items()}


@interpreter
@pytest.mark.parametrize("spec", ["adam", "sign_fisher_clip"])
def test_launches_do_not_grow_with_tensors(monkeypatch, spec):
    cls = load(spec, "triton")
    few = _launches_per_step(monkeypatch, cls, 3)
    many = _launches_per_step(monkeypatch, cls, 30)
    assert few == many
    assert few["_update_kernel"] == 1
    if spec == "sign_fisher_clip":
        assert few["_reduce_kernel"] == 1


def _lr_change(monkeypatch, device):
    """Adam through an LR scheduler: no new kernel specialization, and the
    parameters follow the scheduled lr as the torch rendering's do."""
    cls = load("adam", "triton")
    kernels = counted(monkeypatch, cls)
    schedule = lambda opt: torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.5)  # noqa: E731
    hypers = dict(lr=0.01, amsgrad=True)
    pa, oa = trajectory(cls, device=device, hypers=hypers, steps=2)
    before = set(kernels["_update_kernel"].specializations)
    pa, oa = trajectory(cls, device=device, hypers=hypers, steps=6, schedule=schedule)
    assert oa.param_groups[0]["lr"] == pytest.approx(0.01 * 0.5 ** 6)
    assert kernels["_update_kernel"].specializations == before
    pb, ob = trajectory(load("adam", "torch"), device=device, hypers=hypers, steps=6,
                        schedule=schedule)
    assert_same_state(oa, pa, ob, pb, rel=1e-6)
    # Host scalars are runtime float64 arguments, never compile-time constants.
    params = inspect.signature(kernels["_update_kernel"].__wrapped__.fn).parameters
    assert params["h_lr"].annotation is tl.float64
    after = set(kernels["_update_kernel"].specializations)
    monkeypatch.undo()
    return before, after


@interpreter
def test_lr_change_does_not_specialize(monkeypatch):
    before, after = _lr_change(monkeypatch, "cpu")
    assert before and after == before  # compiled once, for the first schedule value


# --- the rendered section ----------------------------------------------------------

def test_render_ignores_the_name():
    plan = curvc.to_plan(curvc.to_ir((SPECS / "sign_fisher_clip.curv").read_text()))
    assert triton_backend.render(plan) == triton_backend.render(dataclasses.replace(plan, name="X"))


def _import_file(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_section_imports_without_triton(tmp_path, monkeypatch):
    path = tmp_path / "adam_without_triton.py"
    path.write_text(curvc.to_module_source(Path(curvc.resolve("adam")).read_text(), "adam.curv",
                                           "triton"))
    monkeypatch.setitem(sys.modules, "triton", None)  # `import triton` raises ImportError
    monkeypatch.setitem(sys.modules, "triton.language", None)
    module = _import_file(path, "adam_without_triton")
    assert module._triton_step is None and module._triton_reduce is None
    assert module.Adam.PROGRAM.kernels[0].triton is None
    p = torch.zeros(3, requires_grad=True)
    p.grad = torch.ones(3)
    module.Adam([p], lr=0.1).step()  # the torch rendering takes over
    assert torch.allclose(p, torch.full((3,), -0.1))


# Run in a fresh process: a process that imported triton in interpreter mode
# cannot compile. Prints one line per kernel compiled.
_COMPILE = r"""
import importlib.util, inspect, json, sys
import triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

for path, flag, dtype in json.loads(sys.argv[1]):
    spec = importlib.util.spec_from_file_location(f"compiled_{len(sys.modules)}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    param_t = getattr(tl, dtype)
    compute = tl.float64 if dtype == "float64" else tl.float32
    for name in ("_update_kernel", "_reduce_kernel"):
        kernel = getattr(module, name, None)
        if kernel is None:
            continue
        signature, constants = {}, {}
        for arg, p in inspect.signature(kernel.fn).parameters.items():
            if p.annotation is tl.constexpr:
                signature[arg] = "constexpr"
                constants[arg] = (1024 if arg == "BLOCK" else param_t if arg == "PARAM_T" else
                                  compute if arg == "CDT" or arg.endswith("_T") else flag)
            elif p.annotation is tl.float64:
                signature[arg] = "fp64"
            else:  # tables of int64, float64 sums and partials
                signature[arg] = ("*fp64" if arg == "partials" or arg.startswith("r_") else "*i64")
        compiled = triton.compile(ASTSource(kernel, signature, constants),
                                  target=GPUTarget("cuda", 90, 32))
        assert "ptx" in compiled.asm
        print("compiled", path, name, flag, dtype)
"""


def test_kernels_compile_for_gpu(tmp_path):
    """The interpreter is lenient: compile every kernel for sm_90 (no GPU needed)
    with all flags on and all off, so what only Triton's code generator
    rejects is caught on CPU too."""
    pytest.importorskip("triton.backends.nvidia")
    import json
    import subprocess

    jobs = []
    for spec in sorted({spec for spec, _, _ in CASES.values()}):
        path = tmp_path / f"{spec}.py"
        source = Path(curvc.resolve(spec_path(spec))).read_text()
        path.write_text(curvc.to_module_source(source, path.name, "triton"))
        jobs += [(str(path), True, "bfloat16"), (str(path), False, "float32")]
    jobs.append((str(tmp_path / "adam.py"), True, "float64"))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", _COMPILE, json.dumps(jobs)], env=env,
                         capture_output=True, text=True, timeout=3600)  # a hang guard only
    assert run.returncode == 0, run.stderr[-4000:]
    assert run.stdout.count("compiled") >= len(jobs)


# --- CUDA ------------------------------------------------------------------------

@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_cuda_matches_torch_rendering(case):
    spec, hypers, group2 = CASES[case]
    pa, oa = trajectory(load(spec, "triton"), device="cuda", hypers=hypers, group2=group2)
    pb, ob = trajectory(load(spec, "torch"), device="cuda", hypers=hypers, group2=group2)
    assert_same_state(oa, pa, ob, pb, rel=1e-6)


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("amsgrad", [False, True])
def test_cuda_adam_matches_fused_torch(amsgrad):
    hypers = dict(lr=0.01, betas=(0.8, 0.99), weight_decay=0.1, amsgrad=amsgrad, maximize=True)
    # fused=True takes dense tensors only: no transposed, strided or empty ones here
    pa, _ = trajectory(load("adam", "triton"), device="cuda", hypers=hypers,
                       group2=dict(lr=0.003), odd_layouts=False)
    pb, _ = trajectory(torch.optim.Adam, device="cuda", hypers=dict(hypers, fused=True),
                       group2=dict(lr=0.003), odd_layouts=False)
    for k, (a, b) in enumerate(zip(pa, pb)):
        assert_close_rel(a, b, 1e-6, f"param {k}")


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_cuda_low_precision_params(dtype):
    spec, hypers, group2 = CASES["adam-amsgrad"]
    pa, oa = trajectory(load(spec, "triton"), "cuda", dtype, hypers, group2, steps=10)
    pb, ob = trajectory(load(spec, "torch"), "cuda", dtype, hypers, group2, steps=10)
    assert_same_state(oa, pa, ob, pb, rel=2 * ULP[dtype], state_rel=1e-3)


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_cuda_launches_and_compiles(monkeypatch):
    cls = load("sign_fisher_clip", "triton")
    assert _launches_per_step(monkeypatch, cls, 3, "cuda") == \
        _launches_per_step(monkeypatch, cls, 30, "cuda")
    kernel = sys.modules[load("adam", "triton").__module__]._update_kernel

    def compiled():  # Triton 3.x: device -> (kernel cache, ...); None where it differs
        try:
            return sum(len(c[0]) for c in kernel.device_caches.values())
        except (AttributeError, TypeError, IndexError):
            return None

    _lr_change(monkeypatch, "cuda")  # compiles what the lr-scheduled run needs...
    before = compiled()
    _lr_change(monkeypatch, "cuda")  # ...so a second run compiles nothing
    assert compiled() == before
