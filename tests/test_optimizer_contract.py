"""A compiled optimizer behaves like any torch.optim optimizer."""
import copy
import inspect
import io
import multiprocessing
import os
import sys
import textwrap

import pytest
import torch

import curvc
from conftest import make_mlp, max_relative_error, train, two_groups


@pytest.fixture(scope="module")
def Adam():
    return curvc.load("adam", backend="torch")


def test_resume_from_state_dict_gives_the_uninterrupted_trajectory(Adam, digits):
    straight = make_mlp()
    resumed = copy.deepcopy(straight)
    opt = Adam(two_groups(straight, dict(lr=3e-3), dict(weight_decay=1e-2)), lr=1e-3)
    train(straight, opt, digits, 40)

    first = Adam(two_groups(resumed, dict(lr=3e-3), dict(weight_decay=1e-2)), lr=1e-3)
    train(resumed, first, digits, 20)
    blob = io.BytesIO()
    torch.save({"model": resumed.state_dict(), "opt": first.state_dict()}, blob)
    blob.seek(0)
    saved = torch.load(blob)
    fresh = make_mlp(seed=123)
    fresh.load_state_dict(saved["model"])
    second = Adam(two_groups(fresh, dict(lr=0.5), dict()), lr=0.5)  # overwritten by the load
    second.load_state_dict(saved["opt"])
    # The second half sees the same batches as steps 20..39 of the straight run.
    from conftest import batches
    for i, (xb, yb) in enumerate(batches(digits, 40)):
        if i < 20:
            continue
        second.zero_grad()
        torch.nn.functional.cross_entropy(fresh(xb), yb).backward()
        second.step()
    for a, b in zip(straight.parameters(), fresh.parameters()):
        assert torch.equal(a, b)


def test_a_torch_adam_checkpoint_resumes_in_the_compiled_adam(Adam, digits):
    ref = make_mlp()
    ours = copy.deepcopy(ref)
    torch_opt = torch.optim.Adam(ref.parameters(), lr=2e-3, weight_decay=1e-3)
    train(ref, torch_opt, digits, 10)
    ours.load_state_dict(ref.state_dict())
    our_opt = Adam(ours.parameters())
    # Through bytes, as a checkpoint travels (a live state_dict shares tensors).
    blob = io.BytesIO()
    torch.save(torch_opt.state_dict(), blob)
    blob.seek(0)
    our_opt.load_state_dict(torch.load(blob))
    train(ref, torch_opt, digits, 30, seed=1)
    train(ours, our_opt, digits, 30, seed=1)
    assert max_relative_error(ref, ours) <= 1e-5


@pytest.mark.parametrize("make_scheduler", [
    lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=10, gamma=0.5),
    lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=1e-2, total_steps=50),
], ids=["step", "one-cycle"])
def test_lr_schedulers_drive_the_compiled_optimizer_like_torch(Adam, digits, make_scheduler):
    ref = make_mlp()
    ours = copy.deepcopy(ref)
    ropt = torch.optim.Adam(ref.parameters(), lr=3e-3)
    oopt = Adam(ours.parameters(), lr=3e-3)
    train(ref, ropt, digits, 50, scheduler=make_scheduler(ropt))
    train(ours, oopt, digits, 50, scheduler=make_scheduler(oopt))
    assert max_relative_error(ref, ours) <= 1e-5


def test_parameters_without_gradients_are_skipped_and_get_no_state(Adam):
    a, b = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(3))
    opt = Adam([a, b], lr=0.1)
    a.grad = torch.ones(3)
    opt.step()
    assert torch.equal(b.detach(), torch.ones(3))
    assert b not in opt.state and float(opt.state[a]["step"]) == 1.0
    assert not torch.equal(a.detach(), torch.ones(3))


def test_step_with_closure_returns_the_loss(Adam):
    w = torch.nn.Parameter(torch.tensor([2.0]))
    opt = Adam([w], lr=0.1)

    def closure():
        opt.zero_grad()
        loss = (w ** 2).sum()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert loss.item() == pytest.approx(4.0)
    assert w.item() < 2.0


def test_zero_grad_clears_gradients(Adam):
    w = torch.nn.Parameter(torch.ones(2))
    w.grad = torch.ones(2)
    Adam([w]).zero_grad()
    assert w.grad is None


def test_the_users_gradient_is_never_modified(Adam):
    w = torch.nn.Parameter(torch.ones(4))
    g = torch.arange(4.0)
    w.grad = g.clone()
    Adam([w], weight_decay=0.5, maximize=True).step()
    assert torch.equal(w.grad, g)


@pytest.mark.parametrize("kwargs, match", [
    (dict(lr=-1.0), "lr"),
    (dict(betas=(1.0, 0.999)), "betas parameter at index 0"),
    (dict(betas=(0.9, -0.1)), "betas parameter at index 1"),
    (dict(betas=(0.9,)), "betas"),
    (dict(eps=-1e-8), "eps"),
    (dict(weight_decay=-0.1), "weight_decay"),
    (dict(capturable=True), "capturable"),
    (dict(differentiable=True), "differentiable"),
    (dict(state_dtype="half"), "state_dtype"),
])
def test_bad_arguments_raise_value_error_like_torch(Adam, kwargs, match):
    with pytest.raises(ValueError, match=match):
        Adam([torch.nn.Parameter(torch.ones(1))], **kwargs)


def test_a_bad_per_group_value_is_refused_too(Adam):
    with pytest.raises(ValueError, match="lr"):
        Adam([{"params": [torch.nn.Parameter(torch.ones(1))], "lr": -3.0}])


def test_sparse_gradients_get_a_clear_error(Adam):
    emb = torch.nn.Embedding(5, 2, sparse=True)
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse"):
        Adam(emb.parameters()).step()


def test_complex_parameters_get_a_clear_error(Adam):
    w = torch.nn.Parameter(torch.ones(2, dtype=torch.complex64))
    w.grad = torch.ones(2, dtype=torch.complex64)
    with pytest.raises(RuntimeError, match="complex"):
        Adam([w]).step()


@pytest.mark.parametrize("spec, reference", [
    ("sgd", torch.optim.SGD), ("adam", torch.optim.Adam), ("adamw", torch.optim.AdamW),
    ("adagrad", torch.optim.Adagrad)])
def test_constructor_defaults_are_torchs(spec, reference):
    ours = inspect.signature(curvc.load(spec, backend="torch").__init__).parameters
    theirs = inspect.signature(reference.__init__).parameters
    for name, p in ours.items():
        if name in theirs and name not in ("self", "params", "fused", "foreach"):
            assert p.default == theirs[name].default, name


def test_generated_source_is_visible_to_inspect_and_tracebacks(Adam):
    src = inspect.getsource(Adam)
    assert src.startswith("class Adam(CurvOptimizer)")
    module_src = inspect.getsource(sys.modules[Adam.__module__])
    assert "def _update(" in module_src and "# The spec:" in module_src
    assert os.path.exists(inspect.getsourcefile(Adam))


def test_the_class_is_a_torch_optimizer_named_as_in_the_spec(Adam):
    assert issubclass(Adam, torch.optim.Optimizer) and Adam.__name__ == "Adam"


def _load_in_child(args):
    cache, spec = args
    os.environ["CURVC_CACHE_DIR"] = cache
    cls = curvc.load(spec, backend="torch")
    return cls.__name__


def test_processes_compiling_at_once_share_one_valid_cache(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(4) as pool:
        names = pool.map(_load_in_child, [(str(tmp_path), "adamw")] * 8)
    assert names == ["AdamW"] * 8
    files = [f for f in os.listdir(tmp_path) if f.endswith(".py")]
    assert len(files) == 1 and not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]
    compile((tmp_path / files[0]).read_text(), files[0], "exec")


def test_cache_key_depends_on_spec_and_backend():
    from curvc.cache import cache_key
    keys = {cache_key("a", "torch"), cache_key("a", "triton"), cache_key("b", "torch")}
    assert len(keys) == 3


def test_load_finds_shipped_specs_by_name_and_files_by_path(tmp_path):
    spec = tmp_path / "mine.curv"
    spec.write_text(textwrap.dedent("""\
        optimizer Mine
        hyper lr = 0.1
        curvature constant
        structure scalar
        length eigen_sign
        """))
    Mine = curvc.load(str(spec), backend="torch")
    w = torch.nn.Parameter(torch.tensor([1.0, -1.0]))
    w.grad = torch.tensor([3.0, -0.5])
    Mine([w]).step()
    assert torch.allclose(w.detach(), torch.tensor([0.9, -0.9]))
    assert curvc.load("sgd", backend="torch").__name__ == "SGD"
    with pytest.raises(curvc.CurvError, match="no spec named"):
        curvc.load("adamm")


def test_a_deep_copied_optimizer_steps_and_a_kfac_copy_asks_for_its_model(Adam):
    p = torch.nn.Parameter(torch.ones(3))
    opt = Adam([p], lr=0.1)
    p.grad = torch.ones(3)
    opt.step()
    twin = copy.deepcopy(opt)
    q = twin.param_groups[0]["params"][0]
    q.grad = torch.ones(3)
    twin.step()
    assert float(twin.state[q]["step"]) == 2.0 and float(opt.state[p]["step"]) == 1.0
    kfac = copy.deepcopy(curvc.load("kfac")(make_mlp(hidden=4)))
    weight = kfac.param_groups[0]["params"][0]
    weight.grad = torch.zeros_like(weight)
    with pytest.raises(RuntimeError, match=r"opt\.track\(model\)"):
        kfac.step()  # the copy has no hooks on any model


@pytest.mark.parametrize("value", [True, False, "step"])
def test_matrix_split_takes_its_three_settings(value):
    opt = curvc.load("shampoo")([torch.nn.Parameter(torch.ones(2, 2))])
    assert opt.matrix_split is True  # the default
    opt.matrix_split = value
    assert opt.matrix_split == value


@pytest.mark.parametrize("value", ["steps", 1, None, "false"])
def test_matrix_split_refuses_anything_else_and_keeps_its_setting(value):
    opt = curvc.load("kfac")(torch.nn.Sequential(torch.nn.Linear(2, 2)))
    opt.matrix_split = "step"
    with pytest.raises(ValueError, match=r"matrix_split must be True, False or 'step'"):
        opt.matrix_split = value
    assert opt.matrix_split == "step"


def test_a_copy_keeps_the_optimizers_settings():
    """matrix_split, batch_externs and a group choice of False are the instance's own;
    torch's __getstate__ alone would drop them from a copy."""
    p = torch.nn.Parameter(torch.randn(3, 4))
    opt = curvc.load("shampoo")([p], curvature_group=False)
    opt.matrix_split, opt.batch_externs, opt.nonfinite_group = "step", False, False
    other = copy.deepcopy(opt)
    assert other.matrix_split == "step" and other.batch_externs is False
    assert other.nonfinite_group is False and other._group_choice is False
    fresh = copy.deepcopy(curvc.load("shampoo")([p]))
    assert fresh.matrix_split is True and fresh.batch_externs is True


def _pickled_run(spec: str):
    """A Shampoo-like optimizer stepped twice on a seeded 3 x 4 parameter, and its pickle
    (torch.save: the whole optimizer, its parameters with it)."""
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(3, 4))
    opt = curvc.load(spec)([p], lr=0.1)
    for _ in range(2):
        p.grad = torch.randn(3, 4)
        opt.step()
    blob = io.BytesIO()
    torch.save(opt, blob)
    return opt, p, blob.getvalue()


_NEXT_STEPS = """
import io, sys, torch
opt = torch.load(io.BytesIO(sys.stdin.buffer.read()), weights_only=False)
p = opt.param_groups[0]["params"][0]
torch.manual_seed(1)
for _ in range(3):
    p.grad = torch.randn(3, 4)
    opt.step()
sys.stdout.write(repr([type(opt).__name__, float(opt.state[p]["step"]), p.tolist()]))
"""


@pytest.mark.parametrize("spec", ["adam", "shampoo", "muon_adamw"])
def test_a_pickled_optimizer_resumes_in_this_process_and_in_a_fresh_one(spec):
    """A class curvc.load made lives in sys.modules only; its pickle carries the module's
    text, so torch.save(opt) loads anywhere curvc is installed, and steps on exactly."""
    import subprocess
    opt, p, blob = _pickled_run(spec)
    twin = torch.load(io.BytesIO(blob), weights_only=False)
    assert type(twin) is type(opt)  # this process's class, not a second copy of it
    torch.manual_seed(1)
    for _ in range(3):
        p.grad = torch.randn(3, 4)
        opt.step()
    want = [type(opt).__name__, float(opt.state[p]["step"]), p.tolist()]
    out = subprocess.run([sys.executable, "-c", _NEXT_STEPS], input=blob, capture_output=True,
                         check=True, env={**os.environ, "CURVC_QUIET": "1"})
    assert eval(out.stdout.decode()) == want
    q = twin.param_groups[0]["params"][0]
    torch.manual_seed(1)
    for _ in range(3):
        q.grad = torch.randn(3, 4)
        twin.step()
    assert torch.equal(q, p)


def test_a_compiled_files_class_pickles_by_its_import_name(tmp_path, monkeypatch):
    import pickle
    curvc.compile_file("adam", tmp_path / "built_for_pickle")
    monkeypatch.syspath_prepend(str(tmp_path))
    from built_for_pickle.adam import Adam as Built
    opt = Built([torch.nn.Parameter(torch.ones(2))])
    assert type(pickle.loads(pickle.dumps(opt))) is Built
