"""The example training script runs with each kind of optimizer and learns.

Each kind needs something different from the loop (nothing, logits, second
derivatives, the model, a closure); the script is what users copy, so it is
run here as they would run it.
"""
import os
import re
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


# One epoch (24 steps) learns well past chance for every kind; L-BFGS (several loss
# evaluations per step) and the dense Newton step (a 650 x 650 curvature) take 4 steps.
@pytest.mark.parametrize("spec, lr, steps", [
    ("adam", "3e-3", None), ("sophia", "3e-3", None), ("adahessian", "0.1", None),
    ("shampoo", "0.03", None), ("kfac", "0.05", None), ("lbfgs", "1", 4),
    ("damped_newton", "1", 4), ("fisher_adam", "1e-2", None),
])
def test_train_digits_learns(spec, lr, steps, tmp_path):
    args = ["--lr", lr, "--epochs", "1"] + (["--steps", str(steps)] if steps else [])
    # The timeout only guards against a hang: the run must not depend on an idle machine.
    out = subprocess.run([sys.executable, str(ROOT / "examples" / "train_digits.py"), spec, *args],
                         capture_output=True, text=True, cwd=tmp_path, timeout=3600,
                         env={**os.environ, "CURVC_CACHE_DIR": str(tmp_path)})
    assert out.returncode == 0, out.stderr
    accuracy = float(re.findall(r"test accuracy ([0-9.]+)", out.stdout)[-1])
    assert accuracy > 0.5, out.stdout


def test_train_digits_stops_after_the_given_steps(tmp_path, monkeypatch, capsys):
    """--steps caps the run across epochs: 30 steps of 24 per epoch end in epoch 2.
    (In-process: the option's arithmetic, not the interpreter, is under test.)"""
    monkeypatch.setenv("CURVC_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(sys, "argv", ["train_digits.py", "sgd", "--epochs", "5", "--steps", "30"])
    runpy.run_path(str(ROOT / "examples" / "train_digits.py"), run_name="__main__")
    epochs = [line.split()[1] for line in capsys.readouterr().out.splitlines()
              if line.startswith("epoch")]
    assert epochs == ["1", "2"]
