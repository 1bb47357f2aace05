"""The example training script runs with each kind of optimizer and learns.

Each kind needs something different from the loop (nothing, logits, second
derivatives, the model, a closure); the script is what users copy, so it is
run here as they would run it.
"""
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("spec, lr", [
    ("adam", "3e-3"), ("sophia", "3e-3"), ("adahessian", "0.1"), ("shampoo", "0.03"),
    ("kfac", "0.05"), ("lbfgs", "1"), ("damped_newton", "1"), ("fisher_adam", "1e-2"),
])
def test_train_digits_learns(spec, lr, tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "examples" / "train_digits.py"), spec,
                          "--lr", lr, "--epochs", "2"], capture_output=True, text=True,
                         cwd=tmp_path, timeout=300,
                         env={**__import__("os").environ, "CURVC_CACHE_DIR": str(tmp_path)})
    assert out.returncode == 0, out.stderr
    accuracy = float(re.findall(r"test accuracy ([0-9.]+)", out.stdout)[-1])
    assert accuracy > 0.5, out.stdout
