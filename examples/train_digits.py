"""Train a small MLP on scikit-learn's digits with a curvc-compiled optimizer.

    curvc compile specs/sophia.curv -o build
    python examples/train_digits.py build/sophia.py          # a compiled module
    python examples/train_digits.py adam --lr 3e-3           # or a spec, by name or path
    python examples/train_digits.py adam --seed 1 --plot adam.png

The loop (examples/digits_loop.py) shows what each kind of curvature source
needs: nothing for gradient-only specs (SGD, Adam, Shampoo, ...), the logits
for Gauss-Newton-Bartlett (Sophia-G) and the sampled-label Fisher
(FisherAdam), second derivatives for Hutchinson (AdaHessian, Sophia-H), the
model itself for K-FAC, a closure for the secant method (L-BFGS), and the
loss or the logits for the dense structure (Newton, NGD), which keeps an
n x n matrix and so trains a linear classifier (650 parameters).

    python examples/train_digits.py damped_newton    # specs/hybrids/damped_newton.curv

--seed fixes the model's initialisation, the batch order and any sampling
the optimizer does (Hutchinson probes, sampled labels): two runs with the same
seed print the same losses. --threads sets torch's threads (default 1: these
models are too small for a second). A progress bar shows each epoch's steps on a
terminal; it stays off when output is piped, or with --no-progress.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # digits_loop, beside this file
import digits_loop as loop  # noqa: E402


def plot_history(hist: loop.History, title: str, path: str) -> None:
    """Training loss and test accuracy per epoch, side by side: 1000 x 400 pixels."""
    plt = loop.pyplot()
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    epochs = range(1, len(hist.loss) + 1)
    ax_loss.plot(epochs, hist.loss, marker="o")
    ax_loss.set(xlabel="epoch", ylabel="training loss", yscale="log", title=title)
    ax_acc.plot(epochs, hist.accuracy, marker="o", color="tab:green")
    ax_acc.set(xlabel="epoch", ylabel="test accuracy", ylim=(0, 1), title=title)
    for ax in (ax_loss, ax_acc):
        loop.integer_epochs(ax)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("optimizer", help="a compiled module (build/adam.py), or a spec name or path")
    ap.add_argument("--lr", type=float, default=None, help="default: the spec's")
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=None,
                    help="stop after this many optimizer steps (a quick smoke run); default: all")
    ap.add_argument("--seed", type=int, default=0,
                    help="model initialisation, batch order and the optimizer's sampling")
    ap.add_argument("--plot", metavar="PATH", default=None,
                    help="write the per-epoch training loss and test accuracy curves (PNG)")
    ap.add_argument("--no-progress", action="store_true",
                    help="no progress bar (it is off anyway when stderr is not a terminal)")
    loop.add_threads_option(ap)
    args = ap.parse_args()
    loop.use_threads(args.threads)

    data = loop.load_digits()
    Opt = loop.optimizer_class(args.optimizer)
    torch.manual_seed(args.seed)  # the model's init, and what the optimizer samples
    model = loop.make_model("mlp", Opt)
    opt = loop.make_optimizer(Opt, model, args.lr)
    print(f"{Opt.__name__} ({loop.describe(Opt)}), lr={opt.param_groups[0]['lr']:g}")

    def report(epoch, loss, acc):
        print(f"epoch {epoch + 1:2d}  train loss {loss:.4f}  test accuracy {acc:.3f}")

    progress = loop.progress_bar(not args.no_progress, show_evals=loop.needs_closure(Opt))
    hist = loop.train(opt, model, data, epochs=args.epochs, batch=args.batch,
                      steps=args.steps, seed=args.seed, progress=progress, on_epoch=report)
    if args.plot:
        plot_history(hist, Opt.__name__, args.plot)
        print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
