"""Train several optimizers side by side on scikit-learn's digits and compare them.

    python examples/compare.py adam=3e-3 sophia=3e-3 kfac=0.05 --plot compare.png

Each SPEC is a spec name or path, or a compiled module (build/adam.py),
optionally with its learning rate after "=" (default: the spec's). Every spec
trains each model (an MLP, and a small CNN: conv 1->8 3x3, 2x2 max-pool,
linear) from the same initialisation and on the same batches (--seed), with
what its kind needs from the loop (examples/digits_loop.py). A dense spec
(Newton, NGD) keeps an n x n curvature, so it trains the tiny linear model in
the MLP's column and is skipped on the CNN. K-FAC hooks only nn.Linear layers:
the CNN's conv takes the plain gradient.

The plot has one column per model: training loss per epoch above, test
accuracy below, a line per spec. The table gives each run's final test
accuracy and mean step time (the first step, which pays one-time compiles,
left out), and that time's ratio to the first spec's on the same model, all
measured in this one run.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # digits_loop, beside this file
import digits_loop as loop  # noqa: E402

MODELS = ("mlp", "cnn")


@dataclass
class Run:
    spec: str          # as the user wrote it, without the learning rate
    name: str          # the optimizer class's name
    model: str
    lr: float
    hist: loop.History


def parse_spec(arg: str) -> tuple[str, float | None]:
    """"adam=3e-3" -> ("adam", 0.003); "adam" -> ("adam", None)."""
    target, sep, lr = arg.rpartition("=")
    if not sep:
        return arg, None
    try:
        return target, float(lr)
    except ValueError:
        raise SystemExit(f"error: {arg!r}: the learning rate after '=' must be a number")


def train_one(target: str, lr: float | None, arch: str, data, args, progress) -> Run | None:
    Opt = loop.optimizer_class(target)
    if loop.is_dense(Opt) and arch != "mlp":
        print(f"note: {Opt.__name__} skipped on the {arch}: its dense n x n curvature "
              f"only fits the tiny linear model")
        return None
    torch.manual_seed(args.seed)  # the same initialisation, and sampling, for every spec
    model = loop.make_model(arch, Opt)
    opt = loop.make_optimizer(Opt, model, lr)
    print(f"{Opt.__name__} on the {arch} ({loop.describe(Opt)}), "
          f"lr={opt.param_groups[0]['lr']:g}", flush=True)
    hist = loop.train(opt, model, data, epochs=args.epochs, batch=args.batch,
                      steps=args.steps, seed=args.seed, progress=progress)
    return Run(target, Opt.__name__, arch, opt.param_groups[0]["lr"], hist)


def print_table(runs: list[Run]) -> None:
    print(f"{'model':<6} {'optimizer':<16} {'lr':>8} {'test accuracy':>14} "
          f"{'ms/step':>9} {'x first':>8}")
    for arch in dict.fromkeys(r.model for r in runs):
        on_model = [r for r in runs if r.model == arch]
        base = on_model[0].hist.mean_step_seconds()
        for r in on_model:
            ms = r.hist.mean_step_seconds() * 1e3
            print(f"{arch:<6} {r.name:<16} {r.lr:>8.3g} {r.hist.accuracy[-1]:>14.3f} "
                  f"{ms:>9.2f} {ms / (base * 1e3):>8.2f}")


def plot_runs(runs: list[Run], models: list[str], path: str) -> None:
    """One column per model (loss above, accuracy below): 500 x 700 pixels a column."""
    plt = loop.pyplot()
    fig, axes = plt.subplots(2, len(models), figsize=(5 * len(models), 7), squeeze=False)
    for col, arch in enumerate(models):
        ax_loss, ax_acc = axes[0][col], axes[1][col]
        for r in (r for r in runs if r.model == arch):
            epochs = range(1, len(r.hist.loss) + 1)
            ax_loss.plot(epochs, r.hist.loss, marker="o", label=r.name)
            ax_acc.plot(epochs, r.hist.accuracy, marker="o", label=r.name)
        ax_loss.set(title=arch.upper(), ylabel="training loss", yscale="log")
        ax_acc.set(xlabel="epoch", ylabel="test accuracy", ylim=(0, 1))
        for ax in (ax_loss, ax_acc):
            loop.integer_epochs(ax)
        if ax_loss.lines:
            ax_acc.legend(loc="lower right", fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("specs", nargs="+", metavar="SPEC[=LR]",
                    help="a spec name or path, or a compiled module; '=LR' sets its lr")
    ap.add_argument("--models", default=",".join(MODELS),
                    help="comma-separated, from: " + ", ".join(MODELS) + " (default: both)")
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=None,
                    help="stop each run after this many optimizer steps; default: all")
    ap.add_argument("--seed", type=int, default=0,
                    help="model initialisation, batch order and the optimizers' sampling")
    ap.add_argument("--plot", metavar="PATH", default="compare.png",
                    help="the comparison plot (PNG; default: compare.png)")
    ap.add_argument("--no-progress", action="store_true",
                    help="no progress bar (it is off anyway when stderr is not a terminal)")
    loop.add_threads_option(ap)
    args = ap.parse_args()
    loop.use_threads(args.threads)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in models if m not in MODELS]
    if unknown or not models:
        ap.error(f"--models: unknown {', '.join(unknown) or '(none given)'}; "
                 f"choose from {', '.join(MODELS)}")

    data = loop.load_digits()
    specs = [parse_spec(s) for s in args.specs]
    progress = loop.progress_bar(not args.no_progress, show_evals=True)
    runs = []
    for arch in models:
        for target, lr in specs:
            run = train_one(target, lr, arch, data, args, progress)
            if run is not None:
                runs.append(run)
    print_table(runs)
    plot_runs(runs, models, args.plot)
    print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
