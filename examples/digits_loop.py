"""What train_digits.py and compare.py share: the digits data, the models, and
one training step that gives each kind of optimizer what it needs.

Each kind of curvature source asks something different of the loop: nothing
for gradient-only specs (SGD, Adam, Shampoo, ...), the logits for
Gauss-Newton-Bartlett (Sophia-G) and the sampled-label Fisher (FisherAdam),
second derivatives for Hutchinson (AdaHessian, Sophia-H) on the steps where
the optimizer refreshes its curvature, the model itself for K-FAC (it hooks
the nn.Linear layers; other parameters, e.g. a conv's, take the plain
gradient), a closure for the secant method (L-BFGS evaluates the loss several
times per step), and the loss or the logits for the dense structure (Newton,
NGD), which keeps an n x n matrix and so needs a tiny model.
"""
from __future__ import annotations

import contextlib
import importlib.util
import inspect
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

import curvc

# torch warns that backward(create_graph=True) ties each parameter to its gradient in a
# cycle; the loop's zero_grad() sets .grad to None before every step, which breaks it.
warnings.filterwarnings("ignore", message=r"Using backward\(\) with create_graph=True",
                        category=UserWarning)

SPLIT_SEED = 0  # the train/test split is fixed, whatever --seed says
N_TRAIN = 1500


def add_threads_option(ap) -> None:
    """--threads: torch's intra-op threads for the run (default 1). The models here are
    tiny (a 650 x 650 dense curvature at most): a second thread saves little and costs
    its synchronisation on every op, many times over on a box shared with other work."""
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1: these models are too small to split)")


def use_threads(n: int) -> None:
    if n < 1:
        raise SystemExit(f"error: --threads must be at least 1, got {n}")
    torch.set_num_threads(n)


def optimizer_class(target: str):
    """A compiled module (build/adam.py) or a spec name or path -> the optimizer class."""
    if target.endswith(".py"):
        spec = importlib.util.spec_from_file_location(Path(target).stem, target)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        classes = [c for _, c in inspect.getmembers(module, inspect.isclass)
                   if issubclass(c, torch.optim.Optimizer) and c.__module__ == module.__name__]
        return classes[0]
    return curvc.load(target)


def digits_arrays():
    """scikit-learn's digits as numpy arrays (1797 x 64 pixels, 1797 labels), read from
    the CSV scikit-learn ships where it keeps it: importing sklearn.datasets (scipy,
    its validation machinery) takes seconds, longer than some specs train here. Any
    other layout goes through scikit-learn's loader."""
    import gzip
    import importlib.util

    import numpy as np
    spec = importlib.util.find_spec("sklearn")  # finds the package without importing it
    roots = list(spec.submodule_search_locations or []) if spec is not None else []
    for root in roots:
        path = Path(root) / "datasets" / "data" / "digits.csv.gz"
        if path.is_file():
            with gzip.open(path, "rt") as f:
                data = np.loadtxt(f, delimiter=",")
            return data[:, :-1], data[:, -1].astype(int)
    from sklearn.datasets import load_digits as sklearn_digits
    return sklearn_digits(return_X_y=True)


def load_digits():
    """scikit-learn's 8x8 digits (shipped with it, no download), scaled to [0, 1]:
    x (1797, 64), y (1797,), and fixed train/test index tensors."""
    x, y = digits_arrays()
    x = torch.tensor(x, dtype=torch.float32) / 16.0
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(SPLIT_SEED))
    return x, torch.tensor(y), perm[:N_TRAIN], perm[N_TRAIN:]


def is_dense(Opt) -> bool:
    source = Opt.curvature_source()
    return source is not None and source.is_matrix


def needs_closure(Opt) -> bool:
    source = Opt.curvature_source()
    return source is not None and source.needs_closure


def estimator_of(Opt):
    """The name of a per-tensor or per-layer curvature source (None: none, or the whole
    model's)."""
    source = Opt.curvature_source()
    return source.kind if source is not None and not source.whole_model else None


def make_model(arch: str, Opt) -> torch.nn.Module:
    """"mlp" or "cnn"; a dense spec gets a linear classifier (650 parameters): its
    curvature is n x n with an eigendecomposition per step. Call after seeding."""
    if is_dense(Opt):
        if arch != "mlp":
            raise ValueError(f"{Opt.__name__} keeps a dense n x n curvature: only the tiny "
                             f"linear model (arch 'mlp') fits it, not {arch!r}")
        return torch.nn.Linear(64, 10)
    if arch == "mlp":
        return torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Tanh(),
                                   torch.nn.Linear(64, 10))
    if arch == "cnn":  # 1 -> 8 channels, 3x3, then 2x2 pooling: 8 x 4 x 4 features
        return torch.nn.Sequential(torch.nn.Unflatten(1, (1, 8, 8)),
                                   torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.Tanh(),
                                   torch.nn.MaxPool2d(2), torch.nn.Flatten(),
                                   torch.nn.Linear(8 * 4 * 4, 10))
    raise ValueError(f"unknown model {arch!r}: use 'mlp' or 'cnn'")


def make_optimizer(Opt, model: torch.nn.Module, lr: float | None):
    # K-FAC takes the model, to hook its layers; every other optimizer its parameters.
    kw = {"lr": lr} if lr is not None else {}
    if needs_closure(Opt):
        kw["line_search_fn"] = "strong_wolfe"  # L-BFGS on minibatches needs a line search
    return Opt(model, **kw)  # every compiled optimizer takes the model; K-FAC hooks its layers


def describe(Opt) -> str:
    """What the loop gives this optimizer, in words."""
    return estimator_of(Opt) or ("secant, with a closure" if needs_closure(Opt) else
                                 "dense, over all parameters" if is_dense(Opt) else
                                 "gradient only")


def train_step(opt, model, xb, yb) -> tuple[float, int]:
    """One optimizer step on a batch: (the batch loss, loss evaluations it took)."""
    Opt = type(opt)
    if needs_closure(Opt):
        evals = 0

        def closure():
            nonlocal evals
            evals += 1
            opt.zero_grad()
            loss = F.cross_entropy(model(xb), yb)
            loss.backward()
            return loss
        return opt.step(closure).item(), evals
    estimator = estimator_of(Opt)
    opt.zero_grad()
    logits = model(xb)
    if estimator in ("gauss_newton_bartlett", "fisher") and opt.wants_curvature():
        opt.estimate_curvature(logits=logits)  # labels sampled from the model
    loss = F.cross_entropy(logits, yb)
    if is_dense(Opt) and opt.wants_curvature():
        # The Hessian from the loss, or the Fisher from the logits: it takes what it needs.
        opt.estimate_curvature(logits=logits, loss=loss)
    # Hutchinson needs second derivatives on the steps that refresh it.
    loss.backward(create_graph=estimator == "hutchinson" and opt.wants_curvature())
    opt.step()
    return loss.item(), 1


def epoch_batches(n_train_steps_left: int, train: torch.Tensor, batch: int,
                  gen: torch.Generator) -> list[torch.Tensor]:
    """This epoch's batches of train indices, in an order drawn from gen, at most
    n_train_steps_left of them."""
    return list(train[torch.randperm(len(train), generator=gen)].split(batch)[:n_train_steps_left])


@torch.no_grad()
def accuracy_on(model, x, y) -> float:
    return (model(x).argmax(-1) == y).float().mean().item()


@dataclass
class History:
    """Per-epoch curves of one run, and the time of each optimizer step."""
    loss: list[float] = field(default_factory=list)
    accuracy: list[float] = field(default_factory=list)
    step_seconds: list[float] = field(default_factory=list)

    def mean_step_seconds(self) -> float:
        # The first step pays one-time costs (the fused step's compile): leave it out.
        times = self.step_seconds[1:] or self.step_seconds
        return sum(times) / len(times)


def train(opt, model, data, *, epochs: int, batch: int, steps: int | None, seed: int,
          progress=None, on_epoch=None) -> History:
    """Train for `epochs` (or `steps` optimizer steps, across epochs), batches in an
    order drawn from `seed`. progress: None, or a function making a rich Progress for
    one epoch; on_epoch(epoch, loss, accuracy) is called after each epoch."""
    x, y, train_idx, test_idx = data
    gen = torch.Generator().manual_seed(seed)
    hist = History()
    steps_left = len(train_idx) * epochs if steps is None else steps
    for epoch in range(epochs):
        if steps_left <= 0:
            break
        batches = epoch_batches(steps_left, train_idx, batch, gen)
        steps_left -= len(batches)
        # One bar per epoch, gone before the epoch's line is printed: nothing is
        # written to stdout while it is live.
        bar = progress() if progress is not None else None
        with bar if bar is not None else contextlib.nullcontext():
            task = None if bar is None else bar.add_task(
                f"epoch {epoch + 1}", total=len(batches), loss=float("nan"), evals=0)
            total, seen, evals = 0.0, 0, 0
            for idx in batches:
                start = time.perf_counter()
                loss, n_evals = train_step(opt, model, x[idx], y[idx])
                hist.step_seconds.append(time.perf_counter() - start)
                total, seen, evals = total + loss * len(idx), seen + len(idx), evals + n_evals
                if bar is not None:
                    bar.update(task, advance=1, loss=total / seen, evals=evals)
        hist.loss.append(total / seen)
        hist.accuracy.append(accuracy_on(model, x[test_idx], y[test_idx]))
        if on_epoch is not None:
            on_epoch(epoch, hist.loss[-1], hist.accuracy[-1])
    return hist


def progress_bar(enabled: bool, show_evals: bool):
    """A function making a rich progress bar on stderr, or None where it is off or
    stderr is not a terminal (piped, under pytest): the stdout lines stay what
    scripts parse."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    console = Console(stderr=True)
    if not enabled or not console.is_terminal:
        return None
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("loss {task.fields[loss]:.4f}")]
    if show_evals:
        columns.append(TextColumn("{task.fields[evals]} loss evaluations"))
    return lambda: Progress(*columns, TimeElapsedColumn(), console=console, transient=True,
                            redirect_stdout=False, redirect_stderr=False)


def pyplot():
    """matplotlib's pyplot on the Agg backend: files only, no display needed."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def integer_epochs(ax) -> None:
    """Epoch ticks at whole numbers."""
    from matplotlib.ticker import MaxNLocator
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
