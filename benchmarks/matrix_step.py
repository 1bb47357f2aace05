"""Step time of the compiled matrix-structured optimizers against their references.

* Shampoo vs ``pytorch_optimizer.Shampoo`` (optimizer step only: the same
  gradients are handed to both), roots every step and every 10 steps;
* L-BFGS vs ``torch.optim.LBFGS`` (a whole ``step(closure)``: forward and
  backward passes included, as users see it), with and without strong Wolfe;
* K-FAC (no installable reference): its step against ``torch.optim.SGD``'s
  with momentum, the price of the statistics and the inverses.

Median of interleaved rounds in one process; the ratio is curvc / reference
(below 1: curvc is faster).

    python benchmarks/matrix_step.py [--width 512] [--rounds 15] [--only shampoo]
"""
from __future__ import annotations

import argparse
import copy
import statistics

import torch
from curvature_step import timed_rounds  # benchmarks/ is on sys.path when run as a script

import curvc


def make_model(width: int, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(256, width), torch.nn.Tanh(),
                               torch.nn.Linear(width, width), torch.nn.Tanh(),
                               torch.nn.Linear(width, 10))


def interleaved(runs: dict, rounds: int) -> dict:
    """Median seconds of each run, rounds interleaved (curvature_step's timer)."""
    return {k: statistics.median(v) for k, v in timed_rounds(runs, rounds).items()}


def row(name: str, ours: float, ref: float, ref_name: str) -> None:
    print(f"{name:28} {ours * 1e3:9.2f} {ref * 1e3:9.2f}  {ours / ref:6.2f}x  vs {ref_name}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--only", choices=("shampoo", "lbfgs", "kfac"), default=None,
                    help="one optimizer's rows (all by default)")
    args = ap.parse_args()
    x = torch.randn(args.batch, 256)
    y = torch.randint(0, 10, (args.batch,))
    loss_of = lambda m: torch.nn.functional.cross_entropy(m(x), y)  # noqa: E731
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"MLP 256-{args.width}-{args.width}-10, batch {args.batch}")
    print(f"\n{'step':28} {'curvc ms':>9} {'ref ms':>9}  {'ratio':>7}")

    want = lambda name: args.only in (None, name)  # noqa: E731
    import pytorch_optimizer as po
    # fused=None: the elementwise head and tail around the matrix call are one compiled
    # pass each (the bucket is large); fused=False: the same kernels as eager foreach ops.
    for every in (1, 10) if want("shampoo") else ():
        models = [make_model(args.width) for _ in range(3)]
        loss_of(models[0]).backward()
        for m in models[1:]:
            for p, q in zip(m.parameters(), models[0].parameters()):
                p.grad = q.grad.clone()
        kw = dict(lr=1e-3, momentum=0.9, weight_decay=1e-4, update_freq=every)
        ours = curvc.load("shampoo")(models[0].parameters(), **kw)
        eager = curvc.load("shampoo")(models[2].parameters(), fused=False, **kw)
        ref = po.Shampoo(models[1].parameters(), lr=1e-3, momentum=0.9, weight_decay=1e-4,
                         preconditioning_compute_steps=every)
        ours.step(), eager.step()  # the fused pass compiles once, outside the timing
        t = interleaved({"ours": ours.step, "eager": eager.step, "ref": ref.step}, args.rounds)
        row(f"Shampoo, roots every {every}", t["ours"], t["ref"], "pytorch_optimizer.Shampoo")
        row("  the same, fused=False", t["eager"], t["ref"], "pytorch_optimizer.Shampoo")

    for ls in (None, "strong_wolfe") if want("lbfgs") else ():
        models = [make_model(args.width) for _ in range(2)]
        opts = [curvc.load("lbfgs")(models[0].parameters(), lr=0.1, max_iter=5,
                                    line_search_fn=ls),
                torch.optim.LBFGS(models[1].parameters(), lr=0.1, max_iter=5,
                                  line_search_fn=ls)]

        def runner(model, opt):
            def closure():
                opt.zero_grad()
                loss = loss_of(model)
                loss.backward()
                return loss
            return lambda: opt.step(closure)
        t = interleaved({"ours": runner(models[0], opts[0]), "ref": runner(models[1], opts[1])},
                        args.rounds)
        row(f"L-BFGS, {ls or 'fixed step'}", t["ours"], t["ref"], "torch.optim.LBFGS")

    for every in (1, 10) if want("kfac") else ():
        model = make_model(args.width)
        sgd_model = copy.deepcopy(model)
        kfac = curvc.load("kfac")(model, lr=1e-3, stat_every=1, inverse_every=every)
        sgd = torch.optim.SGD(sgd_model.parameters(), lr=1e-3, momentum=0.9)

        def train(m, opt):
            def run():
                opt.zero_grad()
                loss_of(m).backward()
                opt.step()
            return run
        t = interleaved({"ours": train(model, kfac), "ref": train(sgd_model, sgd)}, args.rounds)
        row(f"K-FAC (+fwd/bwd), inv every {every}", t["ours"], t["ref"], "torch.optim.SGD")


if __name__ == "__main__":
    main()
