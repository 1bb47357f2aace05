"""Step time of the compiled matrix-structured optimizers against their references.

* Shampoo vs ``pytorch_optimizer.Shampoo`` (optimizer step only: the same
  gradients are handed to both), roots every step and every 10 steps, and against
  the floor of a Shampoo step (``shampoo_matmuls``: its statistics, float32
  eigendecompositions and products in raw torch);
* L-BFGS vs ``torch.optim.LBFGS`` (a whole ``step(closure)``: forward and
  backward passes included, as users see it), with and without strong Wolfe;
* K-FAC (no installable reference): its step against ``torch.optim.SGD``'s
  with momentum, the price of the statistics and the inverses, and against the
  floor of that price (``kfac_matmuls``: the same statistics and products in raw
  torch, which no K-FAC that gathers statistics every step can go below);
* on a small transformer's 2-D weights (``--layers`` blocks of width ``--dim``: four
  d x d attention matrices and the 4d x d, d x 4d MLP pair each, so many tensors of
  one shape), the batched externs (``curvc.runtime.batched``) against the per-tensor
  loop (``opt.batch_externs = False``) and the references: Muon vs ``torch.optim.Muon``,
  Adafactor (with the blocks' norm vectors) vs ``torch.optim.Adafactor`` (foreach and
  for-loop), Shampoo with roots every step vs ``pytorch_optimizer.Shampoo``.

Median of interleaved rounds in one process, per step; a row refreshing every k
steps times rounds of k steps, each holding one refresh. The ratio is curvc /
reference (below 1: curvc is faster).

    python benchmarks/matrix_step.py [--width 512] [--rounds 15] [--only shampoo]
    python benchmarks/matrix_step.py --only blocks [--dim 128] [--layers 4]
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from curvature_step import timed_rounds  # benchmarks/ is on sys.path when run as a script

import curvc


def make_model(width: int, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(256, width), torch.nn.Tanh(),
                               torch.nn.Linear(width, width), torch.nn.Tanh(),
                               torch.nn.Linear(width, 10))


def interleaved(runs: dict, rounds: int, steps: int = 1) -> dict:
    """Median seconds per step of each run, rounds interleaved (curvature_step's timer).
    ``steps``: each round runs that many steps, so that a round of a method refreshing
    every ``steps`` steps holds exactly one refresh (a median of single steps would
    leave the refreshes out)."""
    def many(fn):
        def run():
            for _ in range(steps):
                fn()
        return run
    times = timed_rounds({k: many(fn) for k, fn in runs.items()}, rounds)
    return {k: statistics.median(v) / steps for k, v in times.items()}


def fresh_rounds(makers: dict, rounds: int, steps: int) -> dict:
    """Median seconds per step: each round, each method's ``setup()`` (untimed) gives a
    fresh step function, run ``steps`` times (one refresh of a method that refreshes
    every ``steps`` steps, wherever its period starts), methods interleaved. From a fresh
    start each round, as pytorch_optimizer.Shampoo's factors break down (non-finite SVD
    input) within 20 steps on one repeated gradient."""
    times: dict = {k: [] for k in makers}
    for r in range(rounds + 1):  # one warm-up round
        for name, setup in makers.items():
            run = setup()
            t = time.perf_counter()
            for _ in range(steps):
                run()
            if r:
                times[name].append((time.perf_counter() - t) / steps)
    return {k: statistics.median(v) for k, v in times.items()}


def row(name: str, ours: float, ref: float, ref_name: str) -> None:
    print(f"{name:36} {ours * 1e3:9.2f} {ref * 1e3:9.2f}  {ours / ref:6.2f}x  vs {ref_name}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--only", choices=("shampoo", "lbfgs", "kfac", "blocks"), default=None,
                    help="one optimizer's rows (all by default)")
    ap.add_argument("--dim", type=int, default=64, help="the transformer blocks' width")
    ap.add_argument("--layers", type=int, default=4, help="the transformer blocks")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch's intra-op threads (a shared box: 1 keeps small ops off "
                         "a busy second core)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    x = torch.randn(args.batch, 256)
    y = torch.randint(0, 10, (args.batch,))
    loss_of = lambda m: torch.nn.functional.cross_entropy(m(x), y)  # noqa: E731
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"MLP 256-{args.width}-{args.width}-10, batch {args.batch}")
    print(f"\n{'step':36} {'curvc ms':>9} {'ref ms':>9}  {'ratio':>7}")

    want = lambda name: args.only in (None, name)  # noqa: E731
    import pytorch_optimizer as po
    # fused=None: the elementwise head and tail around the matrix call are one compiled
    # pass each (the bucket is large); fused=False: the same kernels as eager foreach ops.
    for every in (1, 10) if want("shampoo") else ():
        model = make_model(args.width)
        loss_of(model).backward()
        grads = [p.grad.clone() for p in model.parameters()]
        kw = dict(lr=1e-3, momentum=0.9, weight_decay=1e-4, update_freq=every)

        def fresh(make):
            """A new model (from the same start) and optimizer, its gradients ``grads``
            again before each step (the reference adds its weight decay into .grad)."""
            def setup():
                m = copy.deepcopy(model)
                params = list(m.parameters())
                opt = make(params)

                for p, g in zip(params, grads):
                    p.grad = g.clone()

                def run():
                    for p, g in zip(params, grads):
                        p.grad.copy_(g)
                    opt.step()
                return run
            return setup
        makers = {"ours": fresh(lambda ps: curvc.load("shampoo")(ps, **kw)),
                  "eager": fresh(lambda ps: curvc.load("shampoo")(ps, fused=False, **kw)),
                  "ref": fresh(lambda ps: po.Shampoo(ps, lr=1e-3, momentum=0.9,
                                                     weight_decay=1e-4,
                                                     preconditioning_compute_steps=every)),
                  "floor": lambda: shampoo_matmuls(grads, every)}
        fresh(lambda ps: curvc.load("shampoo")(ps, **kw))()()  # the fused pass compiles once
        t = fresh_rounds(makers, args.rounds, every)
        row(f"Shampoo, roots every {every}", t["ours"], t["ref"], "pytorch_optimizer.Shampoo")
        row("  the same, fused=False", t["eager"], t["ref"], "pytorch_optimizer.Shampoo")
        row("  its matmuls and eighs alone", t["floor"], t["ref"], "pytorch_optimizer.Shampoo")
        row(f"Shampoo, roots every {every}", t["ours"], t["floor"], "its matmuls and eighs")

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
        sgd_model, floor_model = copy.deepcopy(model), copy.deepcopy(model)
        kfac = curvc.load("kfac")(model, lr=1e-3, stat_every=1, inverse_every=every)
        sgd = torch.optim.SGD(sgd_model.parameters(), lr=1e-3, momentum=0.9)

        def train(m, opt):
            def run():
                opt.zero_grad()
                loss_of(m).backward()
                opt.step()
            return run
        runs = {"ours": train(model, kfac), "ref": train(sgd_model, sgd)}
        if every == 10:
            runs["floor"] = kfac_matmuls(floor_model, loss_of)
        t = interleaved(runs, args.rounds, steps=every)
        row(f"K-FAC (+fwd/bwd), inv every {every}", t["ours"], t["ref"], "torch.optim.SGD")
        if every == 10:
            row("  its matmuls alone, no inverse", t["floor"], t["ref"], "torch.optim.SGD")
            row(f"K-FAC (+fwd/bwd), inv every {every}", t["ours"], t["floor"],
                "its matmuls alone")

    if want("blocks"):
        blocks(args.dim, args.layers, args.rounds)


def shampoo_matmuls(grads: list, every: int):
    """The arithmetic a Shampoo step cannot skip, in raw torch: per tensor (a vector as
    one mode) each mode's Gram matrix added into its factor, every ``every`` steps each
    factor's float32 eigendecomposition and its root Q diag(w^-1/4) Q^T (^-1/2 for a
    vector), and the step G multiplied along each mode by its root. No momentum, decay,
    checks or state bookkeeping: the floor of any Shampoo step."""
    mats = [g if g.dim() == 2 else g.reshape(1, -1) for g in grads]
    shapes = [[m.shape[0], m.shape[1]] if g.dim() == 2 else [m.shape[1]]
              for g, m in zip(grads, mats)]
    factors = [[torch.eye(d) * 1e-6 for d in dims] for dims in shapes]
    roots = [[torch.eye(d) for d in dims] for dims in shapes]
    count = [0]

    def run():
        due = count[0] % every == 0
        count[0] += 1
        for g, m, fs, rs in zip(grads, mats, factors, roots):
            if g.dim() == 2:
                fs[0].addmm_(m, m.T)
                fs[1].addmm_(m.T, m)
            else:
                fs[0].addmm_(m.T, m)
            if due:
                for i, f in enumerate(fs):
                    w, q = torch.linalg.eigh(f)
                    rs[i] = (q * w.clamp(min=1e-30).pow(-1 / (2 * len(fs)))) @ q.T
            _ = rs[0] @ m @ rs[1] if g.dim() == 2 else m @ rs[0]
    return run


def kfac_matmuls(model: torch.nn.Module, loss_of):
    """A train step of SGD with momentum plus the matrix products K-FAC cannot skip, in
    raw torch: per Linear layer the statistics a^T a and ds^T ds of this batch, and the
    step S' G A' by two fixed (identity) operators. No EMA, no inverse, no bookkeeping:
    the floor of a K-FAC step that gathers statistics every step."""
    layers = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    rows: dict = {}

    def hook(module, args, output):
        x = args[0].detach()
        output.register_hook(lambda ds: rows.__setitem__(module, (x, ds)))
    for m in layers:
        m.register_forward_hook(hook)
    ops = {m: (torch.eye(m.out_features), torch.eye(m.in_features + 1)) for m in layers}

    def run():
        opt.zero_grad()
        loss_of(model).backward()
        for m in layers:
            x, ds = rows[m]
            a = torch.cat([x, x.new_ones(x.shape[0], 1)], dim=1)
            a.T @ a, ds.T @ ds  # noqa: B018 (the statistics' cost)
            g = torch.cat([m.weight.grad, m.bias.grad[:, None]], dim=1)
            d = ops[m][0] @ g @ ops[m][1]
            m.weight.grad.copy_(d[:, :-1])
            m.bias.grad.copy_(d[:, -1])
        opt.step()
    return run


def block_shapes(d: int, layers: int, vectors: bool = False) -> list[tuple[int, ...]]:
    """A transformer's weights: per block q, k, v, o (d x d), the MLP's 4d x d and d x 4d,
    and with ``vectors`` its two norms' weights (d)."""
    one = [(d, d)] * 4 + [(4 * d, d), (d, 4 * d)] + ([(d,), (d,)] if vectors else [])
    return one * layers


def _with_grads(shapes, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ps = [torch.nn.Parameter(torch.randn(s, generator=gen) * 0.02) for s in shapes]
    for p in ps:
        p.grad = torch.randn(p.shape, generator=gen) * 1e-3
    return ps


def _muon_in_float32():
    """specs/muon.curv with its Newton-Schulz iteration in float32 (torch's is bf16 only)."""
    import pathlib
    import tempfile
    spec = pathlib.Path(__file__).resolve().parent.parent / "specs" / "muon.curv"
    text = spec.read_text().replace("eps = eps)", "eps = eps, precision = float32)")
    assert "float32" in text, "specs/muon.curv's structure clause changed"
    path = pathlib.Path(tempfile.mkdtemp()) / "muon32.curv"
    path.write_text(text)
    Muon32 = curvc.load(str(path))
    return lambda ps: Muon32(ps, lr=0.02, fused=False)


def _per_tensor(opt):
    opt.batch_externs = False  # the extern once per tensor
    return opt


def blocks(d: int, layers: int, rounds: int) -> None:
    """The batched externs on a transformer's weights (the module docstring)."""
    import pytorch_optimizer as po
    print(f"\n{layers} transformer blocks of width {d}, fused=False (eager kernels around the "
          "extern)")
    print(f"{'step':36} {'curvc ms':>9} {'ref ms':>9}  {'ratio':>7}")
    cases = [
        ("Muon", block_shapes(d, layers), lambda ps: curvc.load("muon")(ps, lr=0.02, fused=False),
         [("torch.optim.Muon", lambda ps: torch.optim.Muon(ps, lr=0.02))]),
        ("Muon, float32 iteration", block_shapes(d, layers), _muon_in_float32(), []),
        ("Adafactor", block_shapes(d, layers, vectors=True),
         lambda ps: curvc.load("adafactor")(ps, lr=0.01, fused=False),
         [("torch.optim.Adafactor foreach",
           lambda ps: torch.optim.Adafactor(ps, lr=0.01, foreach=True)),
          ("torch.optim.Adafactor for-loop",
           lambda ps: torch.optim.Adafactor(ps, lr=0.01, foreach=False))]),
        ("Shampoo, roots every step", block_shapes(d, layers),
         lambda ps: curvc.load("shampoo")(ps, lr=1e-3, update_freq=1, fused=False),
         [("pytorch_optimizer.Shampoo",
           lambda ps: po.Shampoo(ps, lr=1e-3, preconditioning_compute_steps=1))]),
    ]
    for name, shapes, ours, refs in cases:
        opts = {"batched": ours(_with_grads(shapes)),
                "per tensor": _per_tensor(ours(_with_grads(shapes)))}
        opts.update({label: make(_with_grads(shapes)) for label, make in refs})
        t = interleaved({k: o.step for k, o in opts.items()}, rounds)
        row(f"{name}, batched", t["batched"], t["per tensor"], "curvc per tensor")
        for label, _ in refs:
            row(f"{name}, batched", t["batched"], t[label], label)
            row("  the same, per tensor", t["per tensor"], t[label], label)


if __name__ == "__main__":
    main()
