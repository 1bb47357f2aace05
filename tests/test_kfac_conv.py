"""K-FAC on convolutions (Grosse & Martens, 2016) and on shared layers, against curvlinops.

The reference is curvlinops' ``KFACLinearOperator`` (``curvlinops-for-pytorch``)
with ``fisher_type="empirical"``: the gradients of the loss on the data's own
labels, which is what the kfac spec's layer hooks see (curvlinops' default is
the MC Fisher, from sampled labels). Its default ``kfac_approx="expand"`` is
Grosse & Martens' KFC: A the mean over the batch and the output positions of
the im2col patches [a, 1], S the batch times the sum over positions of the
output gradients' outer products. The bias is folded into the weight
(``separate_weight_and_bias=False``), as K-FAC's step takes [W b].

Every curvlinops operator is built on a twin of the model (the same weights,
without the optimizer's hooks), so that its passes add nothing to curvc's
statistics.
"""
import warnings

import pytest
import torch
import torch.nn.functional as F

import curvc

curvlinops = pytest.importorskip("curvlinops")

KFAC = curvc.load("kfac")


class CNN(torch.nn.Module):
    """Conv2d -> ReLU -> Conv2d -> ReLU -> flatten -> Linear, on 1 x 8 x 8 images."""

    def __init__(self, seed=0, second=None):
        super().__init__()
        torch.manual_seed(seed)
        self.conv1 = torch.nn.Conv2d(1, 3, 3, padding=1)
        self.conv2 = second() if second is not None else torch.nn.Conv2d(3, 4, 3, stride=2)
        with torch.no_grad():
            size = self.conv2(self.conv1(torch.zeros(1, 1, 8, 8))).numel()
        self.fc = torch.nn.Linear(size, 10)

    def forward(self, x):
        return self.fc(torch.relu(self.conv2(torch.relu(self.conv1(x)))).flatten(-3))


class SharedCNN(torch.nn.Module):
    """``conv`` and ``mix`` are each applied twice per forward pass."""

    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.stem = torch.nn.Conv2d(1, 3, 3, padding=1)
        self.conv = torch.nn.Conv2d(3, 3, 3, padding=1)
        self.proj = torch.nn.Linear(3 * 8 * 8, 6)
        self.mix = torch.nn.Linear(6, 6)
        self.head = torch.nn.Linear(6, 10)

    def forward(self, x):
        h = torch.tanh(self.stem(x))
        h = torch.tanh(self.conv(torch.tanh(self.conv(h))))
        h = torch.tanh(self.proj(h.flatten(1)))
        return self.head(torch.tanh(self.mix(torch.tanh(self.mix(h)))))


SECOND = {  # the second convolution of CNN: kernel, stride, padding, dilation, bias
    "stride2": None,
    "rect-kernel-dilated-no-bias": lambda: torch.nn.Conv2d(
        3, 4, (3, 2), stride=(2, 1), padding=(1, 2), dilation=(2, 1), bias=False),
    "same": lambda: torch.nn.Conv2d(3, 2, 3, padding="same", dilation=2),
}


def _data(n=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 1, 8, 8, dtype=torch.float64, generator=g),
            torch.randint(0, 10, (n,), generator=g))


def _twin(model, make):
    twin = make().double()
    twin.load_state_dict(model.state_dict())
    return twin


def _reference(twin, x, y):
    op = curvlinops.KFACLinearOperator(
        twin, torch.nn.CrossEntropyLoss(), list(twin.parameters()), [(x, y)],
        fisher_type="empirical", separate_weight_and_bias=False, check_deterministic=False)
    op.compute_kronecker_factors()
    return op


def _factors(op):
    """{layer name: (A, S)} of a curvlinops operator."""
    st = op.state_dict()
    return {name: (st["input_covariances"][name], st["gradient_covariances"][name])
            for name in st["input_covariances"]}


def _relative(ours, ref):
    return ((ours - ref).abs().max() / ref.abs().max()).item()


def _one_step(model, x, y, **kw):
    opt = KFAC(model, **kw)
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()
    return opt


def _tracked(model):
    return {name: m for name, m in model.named_modules()
            if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}


def _assert_factors(model, opt, reference):
    layers = _tracked(model)
    assert set(layers) == set(reference)
    for name, (a_ref, s_ref) in reference.items():
        state = opt.state[layers[name].weight]
        assert _relative(state["kfac_A"], a_ref) <= 1e-6, f"A of {name}"
        assert _relative(state["kfac_S"], s_ref) <= 1e-6, f"S of {name}"


@pytest.mark.parametrize("second", list(SECOND), ids=list(SECOND))
def test_conv_factors_equal_curvlinops_kfac_expand(second):
    def make():
        return CNN(second=SECOND[second])
    model = make().double()
    x, y = _data()
    reference = _factors(_reference(_twin(model, make), x, y))
    # stat_decay=0: the EMA is this batch's factor
    opt = _one_step(model, x, y, stat_decay=0.0, stat_every=1, inverse_every=1, lr=0.0)
    _assert_factors(model, opt, reference)
    assert opt.state[model.conv1.weight]["kfac_A"].shape == (1 * 3 * 3 + 1,) * 2


def test_shared_layers_sum_the_factors_of_every_call_as_curvlinops_does():
    model = SharedCNN().double()
    x, y = _data(n=4)
    reference = _factors(_reference(_twin(model, SharedCNN), x, y))
    opt = _one_step(model, x, y, stat_decay=0.0, stat_every=1, inverse_every=1, lr=0.0)
    _assert_factors(model, opt, reference)


class _Padded(torch.nn.Module):
    """``conv`` with its padding done by F.pad in front of it (a reference twin)."""

    def __init__(self, pads, mode, conv):
        super().__init__()
        self.pads, self.mode, self.conv = pads, mode, conv

    def forward(self, x):
        return self.conv(F.pad(x, self.pads, mode=self.mode))


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel:UserWarning")
@pytest.mark.parametrize("padding, mode, pads", [
    ((1, 2), "circular", (2, 2, 1, 1)),
    (1, "reflect", (1, 1, 1, 1)),
    ("same", "zeros", (0, 1, 1, 2)),  # kernel (4, 2), dilation (1, 1): torch pads right
], ids=["circular", "reflect", "same-even-kernel"])
def test_padding_modes_take_the_patches_of_the_padded_input(padding, mode, pads):
    """curvlinops unfolds with zero padding (and refuses uneven padding); its reference
    here is a twin whose convolution gets its input padded by F.pad, checked to compute
    the same function first."""
    def make():
        torch.manual_seed(0)
        return torch.nn.Sequential(
            torch.nn.Conv2d(2, 3, (4, 2) if padding == "same" else 3, padding=padding,
                            padding_mode=mode),
            torch.nn.Tanh(), torch.nn.Flatten(), torch.nn.LazyLinear(5))
    model = make().double()
    x = torch.randn(3, 2, 6, 7, dtype=torch.float64)
    y = torch.randint(0, 5, (3,))
    model(x)  # materialize the LazyLinear
    twin = make().double()
    twin[0] = _Padded(pads, "constant" if mode == "zeros" else mode,
                      torch.nn.Conv2d(2, 3, tuple(model[0].kernel_size)).double())
    twin(x)
    twin.load_state_dict({k.replace("0.", "0.conv.", 1) if k.startswith("0.") else k: v
                          for k, v in model.state_dict().items()})
    torch.testing.assert_close(twin(x), model(x), rtol=0, atol=1e-14)
    reference = _factors(_reference(twin, x, y))
    opt = _one_step(model, x, y, stat_decay=0.0, stat_every=1, inverse_every=1, lr=0.0)
    for name, (a_ref, s_ref) in reference.items():
        layer = model[0] if name == "0.conv" else model[3]
        assert _relative(opt.state[layer.weight]["kfac_A"], a_ref) <= 1e-6
        assert _relative(opt.state[layer.weight]["kfac_S"], s_ref) <= 1e-6


def test_an_unbatched_image_is_one_example():
    model = CNN().double()
    x, y = _data(n=1)
    reference = _factors(_reference(_twin(model, CNN), x, y))
    opt = _one_step(model, x[0], y[0], stat_decay=0.0, stat_every=1, inverse_every=1, lr=0.0)
    _assert_factors(model, opt, reference)


def _ema_from_identity(f, beta):
    return beta * torch.eye(len(f), dtype=f.dtype) + (1 - beta) * f


SPEC_DEFAULTS = dict(lr=1e-3, damping=1e-3, stat_decay=0.95)  # specs/kfac.curv's hyper line


@pytest.mark.parametrize("hypers", [
    dict(lr=0.5, damping=3e-2, stat_decay=0.0, momentum=0.7),
    dict(lr=0.5, damping=3e-2, stat_decay=0.95, momentum=0.7),
    {},
], ids=["batch-factors", "ema", "spec-defaults"])
@pytest.mark.parametrize("make", [CNN, SharedCNN], ids=["cnn", "shared"])
def test_first_step_is_curvlinops_kfac_inverse_times_the_gradient(make, hypers):
    """The spec's first step: A_1 = beta I + (1 - beta) A_t (the EMA from the identity),
    the same for S, and d = (S_1 + damping I)^-1 [gW gb] (A_1 + damping I)^-1, which
    is curvlinops' KFACInverseLinearOperator with that damping on both factors."""
    h = {**SPEC_DEFAULTS, **hypers}
    model = make().double()
    x, y = _data(n=4)
    twin = _twin(model, make)
    op = _reference(twin, x, y)
    state = op.state_dict()
    for key in ("input_covariances", "gradient_covariances"):
        state[key] = {k: _ema_from_identity(v, h["stat_decay"]) for k, v in state[key].items()}
    with warnings.catch_warnings():  # it reloads the twin's weights (the same ones)
        warnings.simplefilter("ignore")
        op.load_state_dict(state)
    inverse = curvlinops.KFACInverseLinearOperator(op, damping=h["damping"])
    twin.zero_grad()
    F.cross_entropy(twin(x), y).backward()
    expected = inverse @ [p.grad for p in twin.parameters()]
    before = [p.detach().clone() for p in model.parameters()]
    _one_step(model, x, y, **hypers)
    for name, p, p0, e in zip([n for n, _ in model.named_parameters()], model.parameters(),
                              before, expected):
        assert _relative((p0 - p.detach()) / h["lr"], e) <= 1e-6, name


def _inverse(f, damping):
    return torch.linalg.inv(f + damping * torch.eye(len(f), dtype=f.dtype))


def _reference_run(model, make, data, groups, *, beta, damping, stat_every, inverse_every):
    """K-FAC written out (Martens & Grosse, 2015, with the conv factors of Grosse & Martens,
    2016, from curvlinops): EMA factors from the identity every ``stat_every`` steps,
    damped inverses every ``inverse_every``, then weight decay and heavy-ball momentum
    with each group's lr, momentum and weight_decay. Returns the final parameters."""
    twin = _twin(model, make)
    layers = _tracked(twin)
    params = dict(twin.named_parameters())
    group_of = {name: g for g in groups for name in g["names"]}
    factors = {n: None for n in layers}
    inverses, buf = {}, {}
    for t, (x, y) in enumerate(data, start=1):
        batch = _factors(_reference(twin, x, y)) if (t - 1) % stat_every == 0 else None
        twin.zero_grad()
        F.cross_entropy(twin(x), y).backward()
        step = {}
        for name, m in layers.items():
            if batch is not None:
                old = factors[name] or tuple(torch.eye(len(f), dtype=f.dtype)
                                             for f in batch[name])
                factors[name] = tuple(beta * o + (1 - beta) * f
                                      for o, f in zip(old, batch[name]))
            if (t - 1) % inverse_every == 0:
                inverses[name] = tuple(_inverse(f, damping) for f in factors[name])
            a_inv, s_inv = inverses[name]
            g = torch.cat([m.weight.grad.reshape(len(m.weight), -1), m.bias.grad[:, None]], 1)
            v = s_inv @ g @ a_inv
            step[f"{name}.weight"] = v[:, :-1].reshape(m.weight.shape)
            step[f"{name}.bias"] = v[:, -1]
        with torch.no_grad():
            for name, p in params.items():
                h = group_of[name]
                d = step[name] + h["weight_decay"] * p
                buf[name] = d if name not in buf else h["momentum"] * buf[name] + d
                p -= h["lr"] * buf[name]
    return params


def test_fifty_steps_with_two_param_groups_match_kfac_written_out():
    make = SharedCNN
    model = make().double()
    g = torch.Generator().manual_seed(3)
    data = [(torch.randn(4, 1, 8, 8, dtype=torch.float64, generator=g),
             torch.randint(0, 10, (4,), generator=g)) for _ in range(50)]
    convs = ["stem", "conv"]
    groups = [dict(lr=0.03, momentum=0.8, weight_decay=1e-3),
              dict(lr=0.01, momentum=0.5, weight_decay=0.0)]
    names = [[n for n, _ in model.named_parameters() if n.split(".")[0] in convs],
             [n for n, _ in model.named_parameters() if n.split(".")[0] not in convs]]
    stats = dict(beta=0.9, damping=2e-2, stat_every=2, inverse_every=3)
    reference = _reference_run(model, make, data, [dict(g, names=n) for g, n in
                                                   zip(groups, names)], **stats)
    named = dict(model.named_parameters())
    opt = KFAC([dict(g, params=[named[k] for k in n]) for g, n in zip(groups, names)],
               stat_decay=stats["beta"], damping=stats["damping"],
               stat_every=stats["stat_every"], inverse_every=stats["inverse_every"])
    opt.track(model)
    for x, y in data:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    for name, p in named.items():
        assert _relative(p.detach(), reference[name].detach()) <= 1e-6, name


@pytest.mark.parametrize("layer, match", [
    (lambda: torch.nn.Conv2d(3, 6, 3, groups=3), r"'conv2'.*groups=3"),
    (lambda: torch.nn.ConvTranspose2d(3, 4, 3), r"'conv2'.*ConvTranspose2d"),
], ids=["grouped", "transposed"])
def test_convolutions_it_cannot_precondition_are_refused_by_name(layer, match):
    model = CNN(second=layer)
    with pytest.raises(ValueError, match=match):
        KFAC(model)
    for p in model.conv2.parameters():  # frozen: nothing to precondition, nothing refused
        p.requires_grad_(False)
    opt = KFAC([p for p in model.parameters() if p.requires_grad], lr=0.1)
    opt.track(model)
    x, y = _data(n=2)
    opt.zero_grad()
    F.cross_entropy(model(x.float()), y).backward()
    opt.step()
    # given to the optimizer later: refused at the step, before any state changes
    for p in model.conv2.parameters():
        p.requires_grad_(True)
    opt.add_param_group({"params": list(model.conv2.parameters())})
    before = {k: v.clone() for k, v in opt.state[model.fc.weight].items()
              if isinstance(v, torch.Tensor)}
    opt.zero_grad()
    F.cross_entropy(model(x.float()), y).backward()
    with pytest.raises(ValueError, match=match):
        opt.step()
    for k, v in before.items():
        assert torch.equal(opt.state[model.fc.weight][k], v), k


def test_a_refused_model_leaves_the_optimizer_tracking_its_old_one():
    good, conv1d, bad = CNN(), torch.nn.Conv1d(3, 4, 3), torch.nn.Sequential()
    bad.add_module("conv2", conv1d)
    opt = KFAC([*good.parameters(), *conv1d.parameters()], lr=0.1)
    opt.track(good)
    with pytest.raises(ValueError, match=r"'conv2'.*Conv1d"):
        opt.track(bad)
    x, y = _data(n=2)
    F.cross_entropy(good(x.float()), y).backward()
    opt.step()  # still hooked on ``good``
    assert "kfac_A" in opt.state[good.conv1.weight]


def test_the_spec_trains_a_small_cnn_on_digits(digits):
    x, y = digits[0].reshape(-1, 1, 8, 8), digits[1]
    model = CNN()
    opt = KFAC(model, lr=0.05, stat_every=1, inverse_every=5, damping=1e-2)
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(30):
        idx = torch.randint(0, len(x), (32,), generator=g)
        opt.zero_grad()
        loss = F.cross_entropy(model(x[idx]), y[idx])
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    with torch.no_grad():
        final = F.cross_entropy(model(x), y).item()
    assert final < losses[0]


def test_conv_checkpoint_resume_is_bitwise_the_uninterrupted_run(tmp_path):
    kw = dict(lr=0.05, stat_every=2, inverse_every=3, damping=1e-2)
    data = [_data(n=4, seed=s) for s in range(8)]
    data = [(x.float(), y) for x, y in data]

    def run(model, opt, batches):
        for x, y in batches:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    straight = SharedCNN()
    run(straight, KFAC(straight, **kw), data)
    resumed = SharedCNN()
    opt = KFAC(resumed, **kw)
    run(resumed, opt, data[:5])
    torch.save({"model": resumed.state_dict(), "opt": opt.state_dict()}, tmp_path / "ck.pt")
    ck = torch.load(tmp_path / "ck.pt")
    again = SharedCNN(seed=9)
    again.load_state_dict(ck["model"])
    opt2 = KFAC(again, **kw)
    opt2.load_state_dict(ck["opt"])  # the 4-D weights' factors fit (checked shapes)
    assert opt2.state[again.conv.weight]["kfac_A"].shape == (3 * 3 * 3 + 1,) * 2
    run(again, opt2, data[5:])
    for p, q in zip(again.parameters(), straight.parameters()):
        assert torch.equal(p, q)



AXES_SPEC = """# K-FAC with a length axis, on convolutions
optimizer ConvAxisKFAC
hyper lr = 1.0
curvature kfac
structure kronecker
iterate   instant
length    {length}
damping   inside(0.05)
"""


def _power(f, e):
    w, q = torch.linalg.eigh(f)
    return (q * w ** e) @ q.T


@pytest.mark.parametrize("length", ["gradient_norm(power = 1)", "eigen_sign"])
def test_the_length_axes_take_the_conv_gradient_as_a_matrix(length, tmp_path):
    """With curvlinops' factors F (damped: F + 0.05 I) and G the gradient as
    out x (in kh kw) with the bias column: gradient_norm(1) is S^-1/2 G A^-1/2;
    eigen_sign is Q_S [(l_S,i l_A,j)^-1/2 sign((Q_S^T G Q_A)_ij)] Q_A^T (an entry within
    rounding of 0 has sign 0)."""
    path = tmp_path / "conv_axis.curv"
    path.write_text(AXES_SPEC.format(length=length))
    model = CNN().double()
    x, y = _data(n=4)
    twin = _twin(model, CNN)
    reference = _factors(_reference(twin, x, y))
    twin.zero_grad()
    F.cross_entropy(twin(x), y).backward()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = curvc.load(path)(model)
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()
    for name, m in _tracked(twin).items():
        a, s = (f + 0.05 * torch.eye(len(f), dtype=f.dtype) for f in reference[name])
        g = torch.cat([m.weight.grad.reshape(len(m.weight), -1), m.bias.grad[:, None]], 1)
        if length == "eigen_sign":
            la, qa = torch.linalg.eigh(a)
            ls, qs = torch.linalg.eigh(s)
            c = qs.T @ g @ qa
            # G has no component along the null space of a a^T (4 examples, 37 inputs):
            # there c is rounding, |c_ij| <= (m + n) eps ||G||, and its sign counts as 0
            zero = c.abs() <= sum(g.shape) * torch.finfo(c.dtype).eps * torch.linalg.norm(g)
            d = qs @ (torch.outer(ls, la) ** -0.5 * torch.where(zero, 0.0, torch.sign(c))) @ qa.T
        else:
            d = _power(s, -0.5) @ g @ _power(a, -0.5)
        after = dict(model.named_parameters())
        dw, db = (before[f"{name}.{k}"] - after[f"{name}.{k}"].detach() for k in ("weight", "bias"))
        ours = torch.cat([dw.reshape(len(dw), -1), db[:, None]], 1)
        assert _relative(ours, d) <= 1e-6, name
