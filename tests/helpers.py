"""Running the package's commands as a user would: real processes, real mpiexec."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
MPIEXEC = str(Path(sys.executable).with_name("mpiexec"))
# The report's setup, which the mechanics tests (equivalence, resume, reducers, faults) were
# tuned on: the built-in defaults are another (relu, cross-entropy, Nesterov, cosine) and may change.
# They test data parallelism (every rank holds the whole model), so they pin the grid: the default,
# parallel.grid auto, may split a small network's units over the ranks (tests/test_tensor.py tests that).
REPORT_SETUP = {"parallel.grid": "manual", "model.activation": "sigmoid", "model.loss": "mse", "model.init": "glorot_uniform",
                "optimizer.name": "sgd", "schedule.name": "constant", "schedule.warmup_epochs": "0",
                "schedule.scale_with_batch": "none"}
TINY = ["--set", "model.layers=[784, 16, 10]", "--set", "train.progress=false",
        *[a for k, v in REPORT_SETUP.items() for a in ("--set", f"{k}={v}")]]


def run_cmd(args: list[str], ranks: int = 1, timeout: float = 120, env: dict[str, str] | None = None,
            cwd: Path = ROOT, launcher: list[str] | None = None) -> subprocess.CompletedProcess:
    """Run `mpiexec -n ranks python -m ...args` (or `launcher python -m ...args`) and return the finished process."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    cmd = [*(launcher or [MPIEXEC, "-n", str(ranks)]), sys.executable, "-m", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env, cwd=cwd)


def last_json(stdout: str) -> dict[str, Any]:
    lines = [l for l in stdout.splitlines() if l.startswith("{")]
    assert lines, f"no JSON object in stdout:\n{stdout}"
    return json.loads(lines[-1])
