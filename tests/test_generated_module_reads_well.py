"""Generated modules read well: wrapped lines mean what they meant, integer
hyperparameters stay integers, and the class documents its arguments."""
from __future__ import annotations

import ast
import inspect
import pydoc

import pytest
import torch

import curvc
from curvc import compiler
from curvc.backends.render import wrap_code

SPEC = """optimizer Counted
hyper lr = 1e-3, beta = 0.9, eps = 1e-8, k = 10, whole_float = 10.0, exponent = 1e1, unused = 3
curvature empirical_fisher
structure diagonal
iterate   ema(beta) every k
length    gradient_norm
damping   add(eps)
"""


@pytest.fixture(scope="module")
def counted(tmp_path_factory):
    path = tmp_path_factory.mktemp("spec") / "counted.curv"
    path.write_text(SPEC)
    return curvc.load(path)


@pytest.mark.parametrize("line", [
    "    def _update(" + ", ".join(f"h_scalar_{i}" for i in range(20)) + "):",
    "        x = tl.where(tl.abs(h_s3) < 0.5, exp_avg_ + h_s3 * (t6 - exp_avg_), "
    "t6 - (t6 - exp_avg_) * (1.0 - h_s3), 'a, (string', \"b, ]\")",
    "    return {" + ", ".join(f"'k{i}': h_k{i}" for i in range(12)) + "}, {"
    + ", ".join(f"'f{i}': bool(h_f{i})" for i in range(8)) + "}",
    "        max_exp_avg_sq_addr = tl.load(max_exp_avg_sq_ptrs + i).to(tl.pointer_type(MAX_EXP_AVG_SQ_TYPE))",
])
def test_a_wrapped_line_is_the_same_python_in_100_columns(line):
    lines = wrap_code(line)
    assert len(lines) > 1 and all(len(x) <= 100 for x in lines)
    src = "\n".join(lines).strip()
    wrap = (lambda s: "def f():\n " + s + "\n  pass") if src.startswith("def") else (lambda s: s)
    assert ast.dump(ast.parse(wrap(src))) == ast.dump(ast.parse(wrap(line.strip())))


def test_a_whole_number_hyperparameter_stays_an_int(counted):
    defaults = {n: p.default for n, p in inspect.signature(counted).parameters.items()}
    assert type(defaults["k"]) is int and defaults["k"] == 10
    assert type(defaults["unused"]) is int
    assert type(defaults["whole_float"]) is float and type(defaults["exponent"]) is float
    assert dict(counted.HYPERS)["k"] == 10 and type(dict(counted.HYPERS)["k"]) is int
    assert "``k=10``" in counted.__doc__ and "``whole_float=10.0``" in counted.__doc__


def test_an_int_hyperparameter_accepts_a_float_from_the_user(counted):
    p = torch.nn.Parameter(torch.ones(3))
    opt = counted([p], k=10.0)
    p.grad = torch.ones(3)
    opt.step()
    assert torch.isfinite(p).all()


def test_shipped_defaults_have_torch_optims_kinds():
    # torch.optim writes weight_decay=0 and LBFGS's lr=1 as ints: so do the specs
    for name, ref in [("adam", torch.optim.Adam), ("adamw", torch.optim.AdamW),
                      ("sgd", torch.optim.SGD), ("lbfgs", torch.optim.LBFGS),
                      ("adagrad", torch.optim.Adagrad)]:
        ours = inspect.signature(curvc.load(name)).parameters
        theirs = inspect.signature(ref).parameters
        for arg in ("lr", "weight_decay", "max_iter", "history_size", "momentum"):
            if arg in ours and arg in theirs and not isinstance(theirs[arg].default, tuple):
                assert type(ours[arg].default) is type(theirs[arg].default), (name, arg)


def test_the_class_docstring_says_what_each_argument_is(counted):
    doc = pydoc.render_doc(counted, renderer=pydoc.plaintext)
    for text in ["``lr=0.001``: the learning rate", "``beta=0.9``: the beta of iterate ema",
                 "``eps=1e-08``: the eps of damping add", "``k=10``: the period in steps of iterate ema",
                 "``unused=3``: not used by this spec's step",
                 "``maximize=False``", "``state_dtype=None``", "``fused=None``"]:
        assert text in doc, text


def test_every_keyword_only_argument_is_documented():
    from curvc import emit, names
    assert names.keyword_names() == set(emit.KEYWORD_DOCS)


def test_a_tuple_hyperparameter_documents_each_entry():
    doc = curvc.load("adam").__doc__
    assert "betas[0] is the beta of momentum ema; betas[1] is the beta of iterate" in doc
    assert "``weight_decay=0``: the rate of decay l2" in doc


def test_a_hyperparameter_read_only_by_expressions_names_its_readers():
    doc = " ".join(curvc.load("adan").__doc__.split())  # one line: the docstring wraps
    assert "``weight_decay=0``: read by ``let decayed`` and ``update``" in doc
    assert ("betas[1] is read by ``let nesterov_grad``, ``let nesterov`` and "
            "``state exp_avg_diff``") in doc


def test_no_shipped_spec_documents_an_argument_as_unused():
    unused = [name for name in compiler.available()
              if "not used by this spec's step" in (curvc.load(name).__doc__ or "")]
    assert unused == []


def test_a_generated_module_compiles_for_every_shipped_spec():
    for name in compiler.available():
        source, file = compiler.read(name)
        code = compile(compiler.to_module_source(source, file), file, "exec")
        assert compiler.to_ir(source, file).name in code.co_names  # the class is defined
