"""One rank of tests/test_distributed.py: DDP training with a compiled optimizer.

    python tests/_ddp_worker.py RANK WORLD PORT OUT SPEC...

Each rank trains the same model (same seed) on its own slice of digits, under
DistributedDataParallel on a gloo group over 127.0.0.1, and saves its parameters
and optimizer state per spec to OUT/<spec>_<rank>.pt. The specs of NEWER take their
non-default hyperparameters there and two param groups (``groups``).
"""
import sys

import torch
import torch.distributed as dist

import _gloo
import curvc

STEPS, BATCH = 20, 32
# Non-default hyperparameters (the biases' group at NEWER_BIAS_LR): the gradient-only specs
# test_distributed compares with one process on the same averaged gradients.
NEWER = {
    "lion": dict(lr=3e-4, betas=(0.85, 0.97), weight_decay=0.05),
    "lamb": dict(lr=5e-3, betas=(0.85, 0.99), weight_decay=0.01, eps=1e-7),
    "lars": dict(lr=0.05, weight_decay=1e-3, momentum=0.8, trust_coefficient=0.02,
                 nesterov=True),
    "adafactor": dict(lr=5e-3, beta2_decay=-0.7, weight_decay=0.01),
    "muon": dict(lr=0.02, momentum=0.9, weight_decay=0.05, ns_steps=4, nesterov=False),
    "soap": dict(lr=3e-3, betas=(0.9, 0.97), shampoo_beta=0.9, weight_decay=0.01,
                 precondition_frequency=3),
    "distributed_shampoo": dict(lr=5e-3, betas=(0.85, 0.98), epsilon=1e-8,
                                weight_decay=0.01, max_preconditioner_dim=8,
                                precondition_frequency=3, start_preconditioning_step=2,
                                grafting_beta2=0.99, grafting_epsilon=1e-8),
    "adan": dict(lr=3e-3, betas=(0.9, 0.9, 0.98), weight_decay=0.02, weight_decouple=True),
    "adabelief": dict(lr=3e-3, betas=(0.85, 0.99), weight_decay=0.01, rectify=True),
}
NEWER_BIAS_LR = 2e-3
# Runs of a shipped spec with attributes set on the optimizer: K-FAC with every rank
# computing every layer's inverses, to compare with the default split of them.
VARIANTS = {"kfac_unsplit": ("kfac", {"matrix_split": False}),
            "kfac_step_split": ("kfac", {"matrix_split": "step"})}


def groups(net):
    """Two param groups: weights, and biases at NEWER_BIAS_LR."""
    ps = list(net.named_parameters())
    return [{"params": [p for n, p in ps if n.endswith("weight")]},
            {"params": [p for n, p in ps if n.endswith("bias")], "lr": NEWER_BIAS_LR}]


def data(rank: int):
    from sklearn.datasets import load_digits
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float64) / 16.0  # float64: Shampoo's roots amplify rounding
    y = torch.tensor(y)
    g = torch.Generator().manual_seed(100 + rank)  # a different stream of batches per rank
    return [(x[i], y[i]) for i in (torch.randint(0, len(x), (BATCH,), generator=g)
                                   for _ in range(STEPS))]


def model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 16), torch.nn.Tanh(),
                               torch.nn.Linear(16, 10)).double()


def train(spec: str, rank: int):
    from curvc.runtime import kfac
    net = torch.nn.parallel.DistributedDataParallel(model())
    spec, attrs = VARIANTS.get(spec, (spec, {}))
    cls = curvc.load(spec)
    if spec in NEWER:
        opt = cls(groups(net.module), **NEWER[spec])
    else:
        opt = cls(net, lr=0.01)  # the model: K-FAC hooks its layers
    for k, v in attrs.items():
        setattr(opt, k, v)
    computed = []  # the factors this rank inverted (K-FAC), by shape
    stepped = []  # the layers' steps f(S) G f(A) this rank computed, by the gradient's shape
    operator, step = kfac.factor_operator, kfac.preconditioned
    kfac.factor_operator = lambda f, st: computed.append(tuple(f.shape)) or operator(f, st)
    kfac.preconditioned = lambda g, *a: stepped.append(tuple(g.shape)) or step(g, *a)
    try:
        _steps(net, opt, rank)
    finally:
        kfac.factor_operator, kfac.preconditioned = operator, step
    return {"params": [p.detach().clone() for p in net.module.parameters()],
            "state": opt.state_dict()["state"], "inverted": computed, "stepped": stepped}


def _steps(net, opt, rank: int) -> None:
    for xb, yb in data(rank):
        opt.zero_grad()
        logits = net(xb)
        loss = torch.nn.functional.cross_entropy(logits, yb)
        if opt.wants_curvature():  # Sophia-G takes the logits, Hutchinson the loss
            opt.estimate_curvature(logits=logits, loss=loss)
        loss.backward()
        opt.step()


def main():
    rank, world, port, out, *specs = sys.argv[1:]
    rank, world = int(rank), int(world)
    dist.init_process_group("gloo", rank=rank, world_size=world,
                            init_method=f"tcp://127.0.0.1:{port}")
    try:
        for spec in specs:
            torch.save(train(spec, rank), f"{out}/{spec}_{rank}.pt")
    except BaseException:
        dist.destroy_process_group()
        raise
    _gloo.leave()


if __name__ == "__main__":
    main()
