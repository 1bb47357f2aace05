"""Launching a test's worker on several gloo processes over 127.0.0.1 (bounded)."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path


def leave() -> None:
    """A worker's last call, once its results are saved: leave the process group and exit
    at once. gloo's threads can abort the process in interpreter teardown, after all the
    work is done ('terminate called without an active exception', SIGABRT), now and then;
    exiting here skips that teardown, and an error before this call still fails the run."""
    import torch.distributed as dist
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_ranks(worker: Path, out: Path, *args: str, world: int = 2) -> None:
    """``python WORKER RANK WORLD PORT OUT ARGS...`` on ``world`` processes at once; each
    must exit 0 (its stderr's tail is the failure message)."""
    port = free_port()
    env = {**os.environ, "CURVC_QUIET": "1", "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, str(worker), str(r), str(world), str(port),
                               str(out), *args], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r in range(world)]
    try:
        for p in procs:
            _, err = p.communicate(timeout=3600)  # a hang guard, not a speed requirement
            assert p.returncode == 0, err[-3000:]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
