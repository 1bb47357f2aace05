"""The foreach rendering (``foreach_update`` over lists) against ``update`` per tensor.

For every shipped elementwise spec (and the hybrid test specs), with flags
both ways, a bucket of awkward tensors is stepped twice from identical
state: once by ``foreach_update`` on lists, once by ``update`` on each
tensor. Parameters and buffers must agree to 1e-6 relative after every step,
and the caller's gradients (and curvature inputs) must be left untouched.
A synthetic plan covers the operator combinations no shipped spec uses.
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import torch

from curvc.backends import foreach as foreach_backend
from curvc.backends import torch as torch_backend
from curvc.backends.render import IndentedBuffer
from curvc.compiler import _load_cached, read, to_ir, to_plan
from curvc.runtime import program
from curvc.runtime.elementwise_step import _arguments
from curvc.plan import Buffer, Const, Load, Op, Plan, Reduced, Reduction, Scalar, Select, Store

SPECS = Path(__file__).parent / "specs"
STEPS = 4

# spec -> hyperparameter variants (flags both ways). Steps use the spec's k
# / update period so refresh steps (curvature inputs present) and others mix.
VARIANTS = {
    "sgd": [dict(momentum=0.0), dict(momentum=0.9, dampening=0.1, weight_decay=0.1),
            dict(momentum=0.9, nesterov=True, maximize=True)],
    "normalized_gd": [dict(), dict(maximize=True), dict(zero_grad=True)],
    "sign_gd": [dict(momentum=0.0, weight_decay=0.1), dict(momentum=0.8, maximize=True)],
    "adam": [dict(), dict(amsgrad=True, weight_decay=0.1, maximize=True),
             dict(betas=(0.0, 0.99))],
    "adamw": [dict(amsgrad=True), dict(betas=(0.0, 0.9), maximize=True)],
    "adagrad": [dict(), dict(lr_decay=0.01, weight_decay=0.1, maximize=True,
                             initial_accumulator_value=0.1)],
    "adahessian": [dict(update_each=2), dict(hessian_power=0.5, weight_decay=0.1,
                                             maximize=True)],
    "sophia": [dict(k=2), dict(k=3, betas=(0.0, 0.99), maximize=True)],
    "sophia_h": [dict(update_period=2), dict(update_period=3, betas=(0.0, 0.99),
                                             weight_decay=0.1, maximize=True)],
    # expression specs: flags both ways, a state read with old(), a product state
    "adabelief": [dict(weight_decay=0.1), dict(rectify=True, ams_bound=True, maximize=True),
                  dict(rectify=True, degenerated_to_sgd=False, weight_decouple=False,
                       weight_decay=0.1)],
    "adan": [dict(weight_decay=0.1), dict(weight_decouple=True, weight_decay=0.1,
                                          maximize=True), dict(max_grad_norm=0.5)],
    "ademamix": [dict(weight_decay=0.1), dict(weight_decouple=True, weight_decay=0.1,
                                              maximize=True),
                 dict(t_alpha_beta3=3.0, weight_decouple=True, fixed_decay=True,
                      weight_decay=0.1)],
    "nadam": [dict(weight_decay=0.1), dict(decoupled_weight_decay=True, weight_decay=0.1,
                                           maximize=True)],
    # test hybrids: pow, a reduction under a clip, Nesterov heavy-ball, keep_max every k
    "every_keep_max_pow": [dict(power=0.5, k=2, amsgrad=True), dict(k=3, maximize=True)],
    "sign_fisher_clip": [dict(max_norm=0.5), dict(betas=(0.0, 0.99), maximize=True)],
    "sum_normalized_hb": [dict(momentum=0.9, nesterov=True, weight_decay=0.01, lr_decay=0.05),
                          dict(momentum=0.0, maximize=True)],
    # exp and log of a list, and on the host
    "exp_log_step": [dict(beta=0.8, tau=5.0), dict(tau=3.0, maximize=True)],
}

# (spec, variant, param dtype, state dtype: None for float32 state of bf16 params, as the runtime)
CASES = [(spec, i, dtype, None) for spec, vs in VARIANTS.items() for i in range(len(vs))
         for dtype in (torch.float32, torch.bfloat16)]
CASES += [("adam", 1, torch.float64, None), ("normalized_gd", 0, torch.float64, None),
          ("adam", 1, torch.bfloat16, torch.bfloat16),
          ("sophia_h", 1, torch.bfloat16, torch.bfloat16)]


def spec_source(spec: str) -> tuple[str, str]:
    local = SPECS / f"{spec}.curv"
    return read(str(local) if local.exists() else spec)


def generated(spec: str):
    """(the optimizer class, its module, foreach_update, FOREACH_ARGS) of a spec."""
    source, file = spec_source(spec)
    cls = _load_cached(source, file, "torch")
    mod = sys.modules[cls.__module__]
    if getattr(mod, "_foreach_update", None) is not None:  # once emit includes the section
        return cls, mod, mod._foreach_update, mod._FOREACH_ARGS
    ns = dict(vars(mod))
    text = foreach_backend.render(to_plan(to_ir(source, file)))
    exec(compile(text, f"<foreach {spec}>", "exec"), ns)
    return cls, mod, ns["_foreach_update"], ns["_FOREACH_ARGS"]


def make_params(dtype, gen) -> list[torch.Tensor]:
    """Awkward shapes: 0-d, empty, odd sizes, 4-D, a transposed (non-contiguous) one."""
    shapes = [(), (5,), (0,), (3, 4), (2, 3, 2, 2), (17,)]
    ps = [torch.randn(s, generator=gen).to(dtype) for s in shapes]
    ps.append(torch.randn(4, 3, generator=gen).to(dtype).t())
    return ps


def positive_like(p, gen, dtype=None):
    return (torch.rand(p.shape, generator=gen) + 0.05).to(dtype or p.dtype)


def rel_close(a, b, what, rel=1e-6):
    a, b = a.double(), b.double()
    assert a.shape == b.shape, what
    if b.numel() == 0:
        return
    scale = b.abs().max().item() or 1.0
    err = (a - b).abs().max().item()
    assert err <= rel * scale, f"{what}: max error {err:.3g} > {rel:g} * {scale:.3g}"


@pytest.mark.parametrize("spec,variant,dtype,state_dtype", CASES,
                         ids=[f"{s}-{i}-{str(d)[6:]}" + (f"-state_{str(sd)[6:]}" if sd else "")
                              for s, i, d, sd in CASES])
def test_foreach_matches_update(spec, variant, dtype, state_dtype):
    hypers = dict(VARIANTS[spec][variant])
    zero_grad = hypers.pop("zero_grad", False)
    cls, mod, foreach_update, fargs = generated(spec)
    kernel, = cls.PROGRAM.kernels  # an elementwise spec: one kernel
    assert fargs == kernel.args
    gen = torch.Generator().manual_seed(sum(map(ord, spec)) + variant)
    opt = cls([torch.zeros(1, requires_grad=True)], lr=0.05, **hypers)
    h = opt._flat_hypers(opt.param_groups[0])
    sdtype = state_dtype or torch.promote_types(dtype, torch.float32)

    params_a = make_params(dtype, gen)
    params_b = [p.clone() for p in params_a]
    state_a: dict[str, list | None] = {}
    est = cls.PROGRAM.source
    for step in range(1, STEPS + 1):
        scalars, flags = cls.host(h, float(step))
        for name, when, _ in cls.BUFFERS:  # allocated lazily, random positive values
            if name not in state_a and (when is None or flags[when]):
                state_a[name] = [positive_like(p, gen, sdtype) for p in params_a]
        state_b = {n: None if v is None else [t.clone() for t in v] for n, v in state_a.items()}
        grads = [torch.zeros_like(p) if zero_grad else torch.randn(p.shape, generator=gen).to(dtype)
                 for p in params_a]
        inputs = {}
        if est is not None:
            name, when = est.output, est.when
            inputs[name] = ([positive_like(p, gen) for p in params_a]
                            if when is None or flags[when] else None)
        frozen = [g.clone() for g in grads] + [t.clone() for v in inputs.values() if v for t in v]

        def lists(state, params):
            """Absent buffers as lists of None (as the runtime's buckets hold them); absent
            inputs as None."""
            cols = {"param": params, "grad": grads, **inputs}
            return [cols[n] if n in cols else state.get(n, [None] * len(params))
                    for n in kernel.args["tensors"]]

        # Reductions: summed over the bucket from the (identical) old values, as the runtime does.
        reduced = {}
        for rname, (_, spec_r) in kernel.reduce.items():
            args_r = _arguments(spec_r, scalars, {}, flags)
            cols = dict(zip(kernel.args["tensors"], lists(state_b, params_b)))
            rows = zip(*[[None] * len(params_b) if cols[n] is None else cols[n]
                         for n in spec_r["tensors"]])
            reduced[rname] = sum(mod.__dict__[f"_reduce_{rname}"](*row, *args_r).double()
                                 for row in rows)
        reduced["nonfinite"] = torch.zeros((), dtype=torch.float64)  # the runtime's skip signal,
        flags = {**flags, "nonfinite_skip": False}  # off (curvc.runtime.amp)
        args = _arguments(fargs, scalars, reduced, flags)

        foreach_update(*lists(state_a, params_a), *args)
        cols_b = [[None] * len(params_b) if c is None else c for c in lists(state_b, params_b)]
        for row in zip(*cols_b):
            kernel.update(*row, *args)

        after = [g for g in grads] + [t for v in inputs.values() if v for t in v]
        assert all(torch.equal(x, y) for x, y in zip(after, frozen)), "inputs were modified"
        for k, (pa, pb) in enumerate(zip(params_a, params_b)):
            assert pa.dtype == dtype and pa.shape == pb.shape
            # float32: 1e-6 is about 8 ulps, and AVX-512's vector kernels round a 0-d
            # AdamW step about 10 ulps from the scalar path's after 4 steps
            rel_close(pa, pb, f"step {step}: param {k} {tuple(pa.shape)}",
                      rel=1e-6 if pa.dtype == torch.float64 else 4e-6)
        for name, va in state_a.items():
            for k, (ta, tb) in enumerate(zip(va, state_b[name])):
                assert ta.dtype == sdtype
                rel_close(ta, tb, f"step {step}: {name} of param {k}")


def test_section_shape():
    """The section defines foreach_update with update's argument order, and FOREACH_ARGS."""
    source, file = spec_source("adam")
    text = foreach_backend.render(to_plan(to_ir(source, file)))
    assert "def _foreach_update(param, grad, exp_avg_sq, max_exp_avg_sq, exp_avg," in text
    assert "_FOREACH_ARGS = {'tensors': ['param', 'grad', 'exp_avg_sq'," in text
    # The default body (nonfinite='propagate': the skip flag's `else:`) is checked below.
    text = text[text.index("\n    else:\n"):]
    # In-place ops write only into temporaries (t<N>) and into the compute-dtype lists of
    # the state the step stores (never into the gradient); copies only into stores.
    stored = re.findall(r"torch\._foreach_copy_\((\w+),", text)
    assert stored == ["exp_avg_sq", "max_exp_avg_sq", "exp_avg", "param"]
    for m in re.finditer(r"(\w+)_\((\w+)", text):
        if m.group(1) != "_foreach_copy":
            target = m.group(2)
            assert m.group(1).startswith("_foreach_"), m[0]
            assert re.fullmatch(r"t\d+", target) or target[:-1] in stored, m[0]
    # Chains fold into torch's multi-operand foreach ops: one call each.
    for fused in ("_foreach_addcmul_(", "_foreach_lerp_(", "_foreach_addcdiv_("):
        assert fused in text, fused
    assert text.count("torch._foreach_") - text.count("torch._foreach_copy_") <= 12


# --- operator combinations no shipped spec uses ------------------------------------

def _plan(exprs: dict) -> Plan:
    """Inputs a, b, c; scalars s, z; reductions r, r0; flag f; a buffer per expression."""
    return Plan("Synthetic", (), (), tuple(Buffer(n) for n in exprs), ("a", "b", "c"), (), (),
                (Reduction("r", Const(0.0)), Reduction("r0", Const(0.0))),
                tuple(Store(n, e) for n, e in exprs.items()))


def _synthetic_plan() -> tuple[Plan, dict]:
    a, b, c = Load("a"), Load("b"), Load("c")  # a > 0, b has zeros, c any sign
    s, r, r0 = Scalar("s"), Reduced("r"), Reduced("r0")  # r0 == 0
    one = Const(1.0)
    cc, sq, cs = Op("mul", (a, c)), Op("mul", (c, c)), Op("mul", (c, s))

    def op(name, *args):
        return Op(name, args)

    exprs = {
        "div_or_zero_ll": op("div_or_zero", c, b),
        "div_or_zero_lr": op("div_or_zero", c, r),
        "div_or_zero_lr0": op("div_or_zero", c, r0),
        "div_or_zero_sl": op("div_or_zero", s, b),
        "max_lr": op("maximum", c, r), "min_rl": op("minimum", r, c),
        "max_sl": op("maximum", s, c), "min_ll": op("minimum", c, b),
        "max_ll": op("maximum", a, c), "min_ls": op("minimum", c, s),
        "pow_lr": op("pow", a, r), "pow_sl": op("pow", s, c), "pow_ll": op("pow", a, c),
        "pow_ls": op("pow", a, Const(1.5)), "pow_rl": op("pow", r, c),
        "lerp_llr": op("lerp", a, c, r), "lerp_lll": op("lerp", a, c, b),
        "lerp_lls": op("lerp", a, c, s),
        "sub_sl": op("sub", one, c), "sub_lr": op("sub", c, r), "sub_rl": op("sub", r, c),
        "sub_ls": op("sub", c, s), "sub_ll": op("sub", c, a),
        "div_sl": op("div", s, a), "div_1l": op("div", one, a), "div_rl": op("div", r, a),
        "div_lr": op("div", c, r), "div_ll": op("div", c, a),
        "mul_rl": op("mul", r, c), "add_sl": op("add", s, c), "add_rl": op("add", r, c),
        "neg_abs_sign": op("sign", op("abs", op("neg", c))), "sqrt": op("sqrt", a),
        # a host-only subexpression and a 0-d chain feeding a list op
        "scalar_chain": op("mul", c, op("mul", s, Const(2.0))),
        "tensor_chain": op("mul", c, op("sqrt", op("add", r, op("maximum", s, r)))),
        # a Select mixing a list with a float or a 0-d tensor, both ways
        "select_ls": op("mul", a, Select("f", c, s)),
        "select_sl": op("mul", a, Select("f", s, c)),
        "select_lr": op("mul", a, Select("f", c, r)),
        "select_rl": op("add", a, Select("f", r, c)),
        # guarded computation and the old value of a buffer read after its new one
        "guarded": op("add", a, Select("f", op("mul", c, s), op("div", c, s))),
        # chains whose temporaries die (computed in place), and aliases through Selects
        "chain_a": op("sub", one, op("div", s, op("sqrt", op("abs", op("neg", op("mul", c, s)))))),
        "chain_b": op("lerp", op("pow", op("maximum", op("add", Select("f", cc, a), cc), s),
                                 Const(2.0)), c, Const(0.3)),
        "chain_c": op("sub", Select("f", sq, op("mul", sq, s)), sq),
        "chain_d": op("add", op("add", cs, one), op("mul", Select("f", cs, c), Const(2.0))),
        "chain_e": op("minimum", op("div", op("sub", op("mul", c, a), a), a), op("mul", a, s)),
    }
    return _plan(exprs), exprs


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("flag", [True, False])
def test_synthetic_operators(dtype, flag):
    plan, exprs = _synthetic_plan()
    buf = IndentedBuffer()
    torch_backend.render_update(plan, buf)
    # what a generated module's imports give the rendering
    ns = {"torch": torch, "math": __import__("math"), "_host_scalars": program.host_scalars}
    exec(buf.getvalue(), ns)
    exec(foreach_backend.render(plan), ns)
    update, foreach_update = ns["_update"], ns["_foreach_update"]
    args = _arguments(ns["_FOREACH_ARGS"], {"s": 0.7}, {"r": torch.tensor(0.3, dtype=torch.float64),
                      "r0": torch.tensor(0.0, dtype=torch.float64)}, {"f": flag})
    text = foreach_backend.render(plan)
    # Only combinations without a foreach overload loop in Python: div_or_zero of two
    # lists or with a scalar dividend, maximum/minimum/pow/lerp with a 0-d tensor operand.
    assert text.count(" for _e0") == 7
    assert text.count("_(t") >= 10  # temporaries that die are written in place

    gen = torch.Generator().manual_seed(7)
    shapes = [(), (6,), (2, 3), (0,)]
    a = [positive_like(torch.empty(s), gen, dtype) for s in shapes]
    b = [torch.randn(s, generator=gen).clamp(min=0).to(dtype) for s in shapes]  # zeros
    c = [torch.randn(s, generator=gen).to(dtype) for s in shapes]
    sdt = torch.promote_types(dtype, torch.float32)
    out_a = {n: [torch.zeros(t.shape, dtype=sdt) for t in a] for n in exprs}
    out_b = {n: [t.clone() for t in v] for n, v in out_a.items()}
    param_a = [t.clone() for t in a]
    frozen = [t.clone() for t in a + b + c]
    foreach_update(param_a, [t.clone() for t in a], a, b, c, *out_a.values(), *args)
    assert all(torch.equal(x, y) for x, y in zip(a + b + c, frozen))
    for i in range(len(shapes)):
        update(a[i].clone(), a[i].clone(), a[i], b[i], c[i], *(v[i] for v in out_b.values()),
               *args)
    for n in exprs:
        for i, (x, y) in enumerate(zip(out_a[n], out_b[n])):
            assert torch.equal(torch.isnan(x), torch.isnan(y)), (n, i)
            rel_close(torch.nan_to_num(x), torch.nan_to_num(y), f"{n}[{i}] f={flag}")


def test_synthetic_beyond_update():
    """Cases ``update`` itself cannot render (a float divisor of div_or_zero; a store of a
    float or a 0-d tensor), against their definitions."""
    c, s, z, r = Load("c"), Scalar("s"), Scalar("z"), Reduced("r")
    exprs = {"ls": Op("div_or_zero", (c, s)), "lz": Op("div_or_zero", (c, z)),
             "fill_s": Op("mul", (s, Const(2.0))), "fill_r": Op("sqrt", (r,)), "fill_c": Const(3.0),
             "fill_sel": Select("f", Const(1.0), r)}
    ns = {"torch": torch, "_host_scalars": program.host_scalars}
    exec(foreach_backend.render(_plan(exprs)), ns)
    gen = torch.Generator().manual_seed(3)
    c_list = [torch.randn(sh, generator=gen) for sh in [(), (4,), (2, 3)]]
    c_list[1][0] = float("inf")  # 0, not nan, where the divisor is 0
    outs = {n: [torch.full_like(t, -1.0, dtype=torch.bfloat16) for t in c_list] for n in exprs}
    for f in (True, False):
        args = _arguments(ns["_FOREACH_ARGS"], {"s": 0.5, "z": 0.0},
                          {"r": torch.tensor(4.0, dtype=torch.float64)}, {"f": f})
        ns["_foreach_update"](c_list, c_list, None, None, c_list, *outs.values(), *args)
        for i, t in enumerate(c_list):
            assert torch.equal(outs["ls"][i], (t / 0.5).bfloat16())
            assert torch.equal(outs["lz"][i], torch.zeros_like(outs["lz"][i]))
            for n, v in [("fill_s", 1.0), ("fill_r", 2.0), ("fill_c", 3.0),
                         ("fill_sel", 1.0 if f else 4.0)]:
                assert torch.equal(outs[n][i], torch.full_like(outs[n][i], v)), (n, f)


def test_eager_path_on_awkward_layouts_matches_torch_adam():
    """The optimizer's eager path passes small tensors to the foreach ops whole and splits
    large ones into pieces: transposed and strided parameters, gradients laid out unlike
    their parameters, a 0-d and an empty one, and one larger than a piece all follow
    torch.optim.Adam's per-parameter loop."""
    import curvc
    from curvc.runtime.elementwise_step import _PIECE
    gen = torch.Generator().manual_seed(3)
    base = [torch.randn(7, 5, generator=gen).t(), torch.randn(20, generator=gen)[::2],
            torch.randn((), generator=gen), torch.randn(0, generator=gen),
            torch.randn(3, 2, 4, generator=gen), torch.randn(_PIECE * 2 + 7, generator=gen)]
    ours = [p.clone().requires_grad_() if p.dim() != 1 or p.is_contiguous() else
            p.detach().requires_grad_() for p in base]
    theirs = [p.detach().clone().requires_grad_() for p in base]
    Adam = curvc.load("adam", backend="torch")
    a = Adam(ours, lr=0.01, weight_decay=0.1, fused=False)
    b = torch.optim.Adam(theirs, lr=0.01, weight_decay=0.1, foreach=False)
    for _ in range(5):
        for p, q in zip(ours, theirs):
            g = torch.randn(p.shape, generator=gen)
            p.grad = g.t().contiguous().t() if g.dim() == 2 else g  # column-major gradients
            q.grad = g.clone()
        a.step()
        b.step()
    for p, q in zip(ours, theirs):
        scale = q.detach().abs().max().item() if q.numel() else 1.0
        err = (p.detach() - q.detach()).abs().max().item() if q.numel() else 0.0
        assert p.shape == q.shape and err <= 1e-6 * (scale or 1.0), (tuple(p.shape), err)


def test_host_scalars_round_as_a_new_tensor_does_and_each_thread_has_its_own():
    """The foreach functions' host scalars (curvc.runtime.program.host_scalars) are views
    of a reused buffer: each call's values, rounded to the dtype as torch.tensor rounds
    them, and a thread's calls never see another thread's values."""
    import threading
    values = [0.1, 1 / 3, 1e-40, float("inf"), -2.5]
    for dtype in (torch.float32, torch.float64):
        got = program.host_scalars(values, dtype, torch.device("cpu"))
        assert torch.equal(torch.stack(got), torch.tensor(values, dtype=dtype))
    assert program.host_scalars([2.0], torch.float32, torch.device("meta"))[0].is_meta
    with torch.device("meta"):  # a default device elsewhere: the CPU buffer stays on the CPU
        assert program.host_scalars([2.0, 3.0, 4.0], torch.float32,
                                    torch.device("cpu"))[2].item() == 4.0
    seen, start = {}, threading.Barrier(2)

    def run(k: float):
        start.wait()
        for i in range(2000):
            (a, b) = program.host_scalars([k, k + i], torch.float64, torch.device("cpu"))
            if (a.item(), b.item()) != (k, k + i):
                seen[k] = (a.item(), b.item(), i)
                return
    threads = [threading.Thread(target=run, args=(k,)) for k in (10.0, 20.0)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not seen
