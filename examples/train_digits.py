"""Train a small MLP on scikit-learn's digits with a curvc-compiled optimizer.

    curvc compile specs/sophia.curv -o build
    python examples/train_digits.py build/sophia.py          # a compiled module
    python examples/train_digits.py adam --lr 3e-3           # or a spec, by name or path

The loop shows what each kind of curvature source needs: nothing for
gradient-only specs (SGD, Adam, Shampoo, ...), the logits for
Gauss-Newton-Bartlett (Sophia-G) and the sampled-label Fisher (FisherAdam),
second derivatives for Hutchinson (AdaHessian, Sophia-H), on the steps where
the optimizer refreshes its curvature; the model itself for K-FAC (it hooks the layers); a closure
for the secant method (L-BFGS evaluates the loss several times per step);
and the loss or the logits for the dense structure (Newton, NGD), which
keeps an n x n matrix and so trains a linear classifier (650 parameters).

    python examples/train_digits.py damped_newton    # specs/hybrids/damped_newton.curv
"""
from __future__ import annotations

import argparse
import importlib.util
import inspect
from pathlib import Path

import torch

import curvc


def optimizer_class(target: str):
    if target.endswith(".py"):
        spec = importlib.util.spec_from_file_location(Path(target).stem, target)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        classes = [c for _, c in inspect.getmembers(module, inspect.isclass)
                   if issubclass(c, torch.optim.Optimizer) and c.__module__ == module.__name__]
        return classes[0]
    return curvc.load(target)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("optimizer", help="a compiled module (build/adam.py), or a spec name or path")
    ap.add_argument("--lr", type=float, default=None, help="default: the spec's")
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=None,
                    help="stop after this many optimizer steps (a quick smoke run); default: all")
    args = ap.parse_args()

    from sklearn.datasets import load_digits
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32) / 16.0
    y = torch.tensor(y)
    torch.manual_seed(0)
    perm = torch.randperm(len(x))
    train, test = perm[:1500], perm[1500:]

    Opt = optimizer_class(args.optimizer)
    dense = Opt.dense is not None
    if dense:  # n x n curvature and an eigendecomposition per step: a small model
        model = torch.nn.Linear(64, 10)
    else:
        model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Tanh(),
                                    torch.nn.Linear(64, 10))
    estimator = Opt.ESTIMATOR[0] if Opt.ESTIMATOR else None
    # K-FAC takes the model, to hook its layers; every other optimizer its parameters.
    kw = {"lr": args.lr} if args.lr is not None else {}
    if Opt.secant is not None:
        kw["line_search_fn"] = "strong_wolfe"  # L-BFGS on minibatches needs a line search
    opt = Opt(model if estimator == "kfac" else model.parameters(), **kw)
    kind = estimator or ("secant, with a closure" if Opt.secant else
                         "dense, over all parameters" if dense else "gradient only")
    print(f"{Opt.__name__} ({kind}), lr={opt.param_groups[0]['lr']:g}")

    steps_left = len(train) * args.epochs if args.steps is None else args.steps
    for epoch in range(args.epochs):
        if steps_left <= 0:
            break
        batches = train[torch.randperm(len(train))].split(args.batch)[:steps_left]
        steps_left -= len(batches)
        total, seen = 0.0, sum(len(idx) for idx in batches)
        for idx in batches:
            if Opt.secant is not None:
                def closure(idx=idx):
                    opt.zero_grad()
                    loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
                    loss.backward()
                    return loss
                total += opt.step(closure).item() * len(idx)
                continue
            opt.zero_grad()
            logits = model(x[idx])
            if estimator in ("gauss_newton_bartlett", "fisher") and opt.wants_curvature():
                opt.estimate_curvature(logits=logits)  # labels sampled from the model
            loss = torch.nn.functional.cross_entropy(logits, y[idx])
            if dense and opt.wants_curvature():
                # The Hessian from the loss, or the Fisher from the logits: it takes what it needs.
                opt.estimate_curvature(logits=logits, loss=loss)
            # Hutchinson needs second derivatives on the steps that refresh it.
            loss.backward(create_graph=estimator == "hutchinson" and opt.wants_curvature())
            opt.step()
            total += loss.item() * len(idx)
        with torch.no_grad():
            acc = (model(x[test]).argmax(-1) == y[test]).float().mean().item()
        print(f"epoch {epoch + 1:2d}  train loss {total / seen:.4f}  test accuracy {acc:.3f}")


if __name__ == "__main__":
    main()
