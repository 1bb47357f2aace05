"""Step time of compiled second-order optimizers against pytorch-optimizer's, on one model.

For AdaHessian and Sophia-H (Hutchinson) and Sophia-G (Gauss-Newton-Bartlett
vs a step written from the published algorithm, since pytorch-optimizer has
no Sophia-G), prints the median step time of each side and the ratio, with
the curvature estimate included (the Hessian-vector product or the sampled
backward) and excluded (the same curvature handed to both sides). Methods'
rounds are interleaved in one process.

    python benchmarks/curvature_step.py [--width 1024] [--rounds 20]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import curvc


def make_model(width: int, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(256, width), torch.nn.GELU(),
                               torch.nn.Linear(width, width), torch.nn.GELU(),
                               torch.nn.Linear(width, 10))


def timed_rounds(runs: dict, rounds: int, warmup: int = 2) -> dict:
    times = {k: [] for k in runs}
    for r in range(warmup + rounds):
        for name, fn in runs.items():
            t = time.perf_counter()
            fn()
            if r >= warmup:
                times[name].append(time.perf_counter() - t)
    return times


def main():
    import pytorch_optimizer as po

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=15)
    args = ap.parse_args()
    x = torch.randn(args.batch, 256)
    y = torch.randint(0, 10, (args.batch,))
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"MLP 256-{args.width}-{args.width}-10, batch {args.batch}")

    pairs = {
        "AdaHessian": (curvc.load("adahessian", backend="torch"), po.AdaHessian,
                       dict(lr=0.01, eps=1e-4)),
        "Sophia-H": (curvc.load("sophia_h", backend="torch"), po.SophiaH,
                     dict(lr=0.01, update_period=1)),
    }
    print(f"\n{'optimizer':12} {'estimate':10} {'curvc ms':>9} {'reference ms':>13} {'ratio':>7}")
    for name, (Ours, Ref, kw) in pairs.items():
        models = {"curvc": make_model(args.width), "ref": make_model(args.width)}
        opts = {"curvc": Ours(models["curvc"].parameters(), **kw),
                "ref": Ref(models["ref"].parameters(), **kw)}

        def with_hvp(side):
            def run():
                m, o = models[side], opts[side]
                o.zero_grad()
                torch.nn.functional.cross_entropy(m(x), y).backward(create_graph=True)
                o.step()
            return run

        hess = {s: [torch.rand_like(p) for p in models[s].parameters()] for s in models}

        def given(side):
            def run():
                m, o = models[side], opts[side]
                o.zero_grad()
                torch.nn.functional.cross_entropy(m(x), y).backward()
                if side == "curvc":
                    o.step(curvature=hess[side])
                else:
                    o.step(hessian=hess[side])
            return run

        for label, make in (("included", with_hvp), ("excluded", given)):
            t = timed_rounds({s: make(s) for s in models}, args.rounds)
            ours, ref = statistics.median(t["curvc"]), statistics.median(t["ref"])
            ratio = statistics.median(a / b for a, b in zip(t["curvc"], t["ref"]))
            print(f"{name:12} {label:10} {ours * 1e3:9.2f} {ref * 1e3:13.2f} {ratio:7.3f}")

    # Sophia-G: the released algorithm written out with torch ops, as the reference.
    Sophia = curvc.load("sophia", backend="torch")
    models = {"curvc": make_model(args.width), "ref": make_model(args.width)}
    opt = Sophia(models["curvc"].parameters(), lr=1e-3, k=1)
    ref_params = list(models["ref"].parameters())
    m = [torch.zeros_like(p) for p in ref_params]
    h = [torch.zeros_like(p) for p in ref_params]

    def sophia_curvc(estimate):
        def run():
            logits = models["curvc"](x)
            if estimate and opt.wants_curvature():
                opt.estimate_curvature(logits=logits)
            opt.zero_grad()
            torch.nn.functional.cross_entropy(logits, y).backward()
            if not estimate and opt.wants_curvature():
                opt.set_curvature([hi for hi in h])
            opt.step()
        return run

    def sophia_ref(estimate):
        def run():
            model = models["ref"]
            model.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            with torch.no_grad():
                for p, mi, hi in zip(ref_params, m, h):
                    p.mul_(1 - 1e-3 * 0.1)
                    mi.mul_(0.965).add_(p.grad, alpha=0.035)
                    ratio = (mi.abs() / (0.04 * len(x) * hi + 1e-15)).clamp(max=1)
                    p.addcmul_(mi.sign(), ratio, value=-1e-3)
            if estimate:
                logits = model(x)
                with torch.no_grad():
                    labels = torch.multinomial(torch.softmax(logits, -1), 1).squeeze(-1)
                model.zero_grad()
                torch.nn.functional.cross_entropy(logits, labels).backward()
                with torch.no_grad():
                    for p, hi in zip(ref_params, h):
                        hi.mul_(0.99).addcmul_(p.grad, p.grad, value=0.01)
        return run

    for label, estimate in (("included", True), ("excluded", False)):
        t = timed_rounds({"curvc": sophia_curvc(estimate), "ref": sophia_ref(estimate)},
                         args.rounds)
        ours, ref = statistics.median(t["curvc"]), statistics.median(t["ref"])
        ratio = statistics.median(a / b for a, b in zip(t["curvc"], t["ref"]))
        print(f"{'Sophia-G':12} {label:10} {ours * 1e3:9.2f} {ref * 1e3:13.2f} {ratio:7.3f}")


if __name__ == "__main__":
    main()
