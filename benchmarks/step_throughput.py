"""Optimizer step throughput: curvc-compiled optimizers against torch.optim, side by side.

Prints, for Adam, Adagrad, SignGD, Lion, Adafactor and Muon (its 2-D tensors only), on (a) GPT-2-small's parameter shapes
(124M parameters in 148 tensors), (b) one large tensor and (c) a small MLP
(784-256-256-10, 269K parameters in 6 tensors, where per-call overhead
rather than memory bandwidth sets the pace): parameters
updated per second, and the ratio of each method's step time to
``torch.optim.Adam(fused=True)`` (the anchor) and to the same optimizer's
``foreach`` implementation (``vs ref``; torch.optim.Muon for Muon; the matrix calls of
Adafactor and Muon also once per tensor, ``opt.batch_externs = False``), all measured
in one process with the methods' rounds interleaved (so background load hits them alike). On CUDA it also
prints the achieved bandwidth as a fraction of a device-to-device copy
measured in the same run.

    python benchmarks/step_throughput.py                 # CPU: the fused torch rendering
    python benchmarks/step_throughput.py --device cuda   # CUDA: the Triton kernels
    python benchmarks/step_throughput.py --big 16777216 --rounds 5   # a quicker run
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import curvc


def gpt2_small_shapes() -> list[tuple[int, ...]]:
    d, vocab, ctx, layers = 768, 50257, 1024, 12
    shapes = [(vocab, d), (ctx, d)]
    for _ in range(layers):
        shapes += [(d,), (d,), (d, 3 * d), (3 * d,), (d, d), (d,),
                   (d,), (d,), (d, 4 * d), (4 * d,), (4 * d, d), (d,)]
    return shapes + [(d,), (d,)]


def small_mlp_shapes() -> list[tuple[int, ...]]:
    return [(256, 784), (256,), (256, 256), (256,), (10, 256), (10,)]


def make_params(shapes, device, dtype, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    params = []
    for s in shapes:
        p = torch.nn.Parameter(torch.randn(s, generator=g).to(device, dtype) * 0.02)
        p.grad = torch.randn(s, generator=g).to(device, dtype) * 1e-3
        params.append(p)
    return params


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def methods(name: str, device: str, eager: bool = False):
    """(label, factory(params) -> optimizer) for one optimizer family; with ``eager``
    also torch's and curvc's unfused defaults (a small model's default path)."""
    po = None
    try:
        import pytorch_optimizer as po
    except ImportError:
        pass
    backend = "triton" if device == "cuda" else "torch"
    ours = curvc.load({"Adam": "adam", "Adagrad": "adagrad", "SignGD": "sign_gd",
                       "Lion": "lion", "Adafactor": "adafactor", "Muon": "muon"}[name],
                      backend=backend)
    out = [("torch Adam fused (anchor)", lambda ps: torch.optim.Adam(ps, lr=1e-3, fused=True))]
    if name == "Adam":
        out.append(("torch Adam foreach", lambda ps: torch.optim.Adam(ps, lr=1e-3, foreach=True)))
        out.append(("curvc Adam", lambda ps: ours(ps, lr=1e-3, fused=True)))
        if eager:
            out.append(("torch Adam default (foreach)", lambda ps: torch.optim.Adam(ps, lr=1e-3)))
            out.append(("curvc Adam fused=False", lambda ps: ours(ps, lr=1e-3, fused=False)))
    elif name == "Adagrad":
        out.append(("torch Adagrad fused", lambda ps: torch.optim.Adagrad(ps, lr=1e-2, fused=True)))
        out.append(("torch Adagrad foreach",
                    lambda ps: torch.optim.Adagrad(ps, lr=1e-2, foreach=True)))
        out.append(("curvc Adagrad", lambda ps: ours(ps, lr=1e-2, fused=True)))
    elif name == "Lion":
        try:
            from lion_pytorch import Lion
            out.append(("lion_pytorch Lion", lambda ps: Lion(ps, lr=1e-4, weight_decay=0.1)))
        except ImportError:
            pass
        out.append(("curvc Lion", lambda ps: ours(ps, lr=1e-4, weight_decay=0.1, fused=True)))
    elif name == "Adafactor":
        out.append(("torch Adafactor foreach",
                    lambda ps: torch.optim.Adafactor(ps, lr=1e-2, foreach=True)))
        out.append(("torch Adafactor for-loop",
                    lambda ps: torch.optim.Adafactor(ps, lr=1e-2, foreach=False)))
        out.append(("curvc Adafactor", lambda ps: ours(ps, lr=1e-2, fused=True)))
        out.append(("curvc Adafactor, per-tensor extern",
                    lambda ps: _per_tensor(ours(ps, lr=1e-2, fused=True))))
    elif name == "Muon":
        out.append(("torch Muon", lambda ps: torch.optim.Muon(ps, lr=1e-3)))
        out.append(("curvc Muon", lambda ps: ours(ps, lr=1e-3, fused=True)))
        out.append(("curvc Muon, per-tensor extern",
                    lambda ps: _per_tensor(ours(ps, lr=1e-3, fused=True))))
    else:
        if po is not None:
            out.append(("pytorch_optimizer SignSGD foreach",
                        lambda ps: po.SignSGD(ps, lr=1e-3, momentum=0.9, foreach=True)))
        out.append(("curvc SignGD", lambda ps: ours(ps, lr=1e-3, momentum=0.9, fused=True)))
    return out


def _per_tensor(opt):
    """The optimizer with its matrix call once per tensor (no batched extern)."""
    opt.batch_externs = False
    return opt


def bench(name, shapes, device, dtype, rounds, warmup, eager=False):
    if name == "Muon":  # Muon orthogonalizes matrices; the rest go to another optimizer
        shapes = [s for s in shapes if len(s) == 2]
        if not shapes:
            return []
    numel = sum(torch.Size(s).numel() for s in shapes)
    entries = []
    for label, factory in methods(name, device, eager):
        params = make_params(shapes, device, dtype)
        t0 = time.perf_counter()
        opt = factory(params)
        opt.step()  # lazy state, and the one-time compile for curvc
        sync(device)
        first = time.perf_counter() - t0
        entries.append({"label": label, "opt": opt, "times": [], "first": first})
    for r in range(warmup + rounds):
        for e in entries:  # interleaved: fused, foreach, ours, fused, ...
            sync(device)
            t = time.perf_counter()
            e["opt"].step()
            sync(device)
            if r >= warmup:
                e["times"].append(time.perf_counter() - t)
    anchor = entries[0]["times"]
    # the same optimizer's foreach implementation, else its reference (torch Muon)
    foreach = next((e["times"] for e in entries if "foreach" in e["label"]),
                   entries[1]["times"] if len(entries) > 1 else None)
    print(f"\n{name} on {len(shapes)} tensors, {numel / 1e6:.1f}M parameters ({device}, {dtype})")
    print(f"  {'method':36} {'median ms':>10} {'Mparam/s':>10} {'vs fused Adam':>14} "
          f"{'vs ref':>11} {'first step s':>13}")
    for e in entries:
        med = statistics.median(e["times"])
        per_round = statistics.median(t / a for t, a in zip(e["times"], anchor))
        vs_foreach = (statistics.median(t / f for t, f in zip(e["times"], foreach))
                      if foreach else float("nan"))
        print(f"  {e['label']:36} {med * 1e3:10.2f} {numel / med / 1e6:10.0f} {per_round:14.3f} "
              f"{vs_foreach:11.3f} {e['first']:13.2f}")
    return entries


def copy_bandwidth(numel, device, dtype, rounds=20):
    src = torch.empty(numel, device=device, dtype=dtype).normal_()
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    sync(device)
    t = time.perf_counter()
    for _ in range(rounds):
        dst.copy_(src)
    sync(device)
    secs = (time.perf_counter() - t) / rounds
    return 2 * numel * src.element_size() / secs  # bytes read + written per second


# Bytes each step moves per parameter element (fp32): reads p, g and state,
# writes p and state.
BYTES_PER_ELEMENT = {"Adam": 7 * 4, "Adagrad": 5 * 4, "SignGD": 5 * 4, "Lion": 5 * 4}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--big", type=int, default=256 * 2 ** 20, help="elements of the large tensor")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--only", default="Adam,Adagrad,SignGD,Lion,Adafactor,Muon")
    ap.add_argument("--skip-gpt2", action="store_true")
    ap.add_argument("--skip-big", action="store_true")
    ap.add_argument("--skip-small", action="store_true")
    args = ap.parse_args()
    dtype = torch.float32
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, device {args.device}"
          + (f" ({torch.cuda.get_device_name()})" if args.device == "cuda" else ""))
    copy_bw = copy_bandwidth(args.big, args.device, dtype) if args.device == "cuda" else None
    if copy_bw:
        print(f"device-to-device copy: {copy_bw / 1e9:.0f} GB/s")
    # (title, shapes, rounds): a small model's step takes microseconds, so many rounds
    suites = [] if args.skip_gpt2 else [("GPT-2-small shapes", gpt2_small_shapes(), args.rounds,
                                         False)]
    if not args.skip_big:
        suites.append((f"one tensor of {args.big} elements", [(args.big,)], args.rounds, False))
    if not args.skip_small:
        suites.append(("a small MLP", small_mlp_shapes(), args.rounds * 100, True))
    for title, shapes, rounds, eager in suites:
        print(f"\n=== {title}")
        for name in args.only.split(","):
            entries = bench(name, shapes, args.device, dtype, rounds, args.warmup, eager)
            if copy_bw and entries and name in BYTES_PER_ELEMENT:
                numel = sum(torch.Size(s).numel() for s in shapes)
                ours = next(e for e in entries if e["label"].startswith("curvc"))
                bw = BYTES_PER_ELEMENT[name] * numel / statistics.median(ours["times"])
                print(f"  {ours['label']}: {bw / 1e9:.0f} GB/s = {bw / copy_bw:.0%} of copy bandwidth")
            del entries
            if args.device == "cuda":
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
