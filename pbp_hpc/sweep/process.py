"""One point's process: run its command under a timeout, pass the sweep's stop signals on to it,
and classify how it ended (Outcome). It imports nothing of the sweep: it runs a command line.
"""

from __future__ import annotations

import ctypes
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

STDERR_TAIL = 20  # lines of a failed point's stderr kept as its error

try:
    _LIBC: Any = ctypes.CDLL(None, use_errno=True)  # loaded now: after fork only async-signal-safe work is wise
except OSError:  # no C library handle (not POSIX)
    _LIBC = None
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the child, before exec: be SIGKILLed if the sweep dies, so no point runs on unwatched."""
    if _LIBC is not None and sys.platform.startswith("linux"):
        _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    # elsewhere an orphaned point finishes on its own and is simply not recorded


class Stop:
    """Signals received by the sweep: SIGUSR1 (Slurm: time limit near), SIGTERM, SIGINT."""

    def __init__(self) -> None:
        self.signals: list[int] = []
        self.child: Optional[subprocess.Popen] = None
        self.forwarded: Optional[subprocess.Popen] = None

    def install(self) -> None:
        for sig in (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        self.signals.append(signum)
        self.forward()

    def forward(self) -> None:
        """Pass the first signal on to the running point, once (mpiexec and srun pass it to every rank)."""
        child = self.child
        if not self.signals or child is None or child.poll() is not None or self.forwarded is child:
            return
        self.forwarded = child
        # SIGUSR1 as is; SIGTERM for SIGTERM and SIGINT: pbp_hpc.train checkpoints and stops on either.
        try:
            os.kill(child.pid, signal.SIGUSR1 if self.signals[0] == signal.SIGUSR1 else signal.SIGTERM)
        except ProcessLookupError:
            pass

    @property
    def requested(self) -> bool:
        return bool(self.signals)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _last_json(stdout: str) -> Optional[dict[str, Any]]:
    for line in reversed(stdout.splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                value = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(value, dict):
                return value
    return None


def _tail(text: str, n: int = STDERR_TAIL) -> str:
    return "\n".join(text.strip().splitlines()[-n:])


@dataclass
class Outcome:
    status: str  # ok | diverged | failed | timeout | interrupted
    result: Optional[dict[str, Any]]
    error: str
    seconds: float


def execute(cmd: list[str], env: dict[str, str], timeout: float, stop: Stop, log: Path, grace: float = 60.0) -> Outcome:
    """Run one point's command, its stderr appended to log; classify how it ended.

    After a stop signal the child gets `grace` seconds to checkpoint and exit, then is killed.
    """
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as err_file:
        err_file.write(f"# {time.strftime('%Y-%m-%d %H:%M:%S')} {shlex.join(cmd)}\n".encode())
        err_file.flush()
        start = err_file.tell()
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err_file, text=True, env=env,
                                start_new_session=True, preexec_fn=_die_with_parent)
    stop.child = proc
    stop.forward()  # a signal that came while the child was starting
    timed_out, stopped_at = False, None
    out = ""
    try:
        while True:
            elapsed = time.perf_counter() - t0
            if stop.requested and stopped_at is None:
                stopped_at = elapsed
            limit = timeout if stopped_at is None else min(timeout, stopped_at + grace)
            try:
                out, _ = proc.communicate(timeout=max(0.01, min(1.0, limit - elapsed)))
                break
            except subprocess.TimeoutExpired:
                if time.perf_counter() - t0 >= limit:
                    timed_out = stopped_at is None
                    _kill_group(proc)  # mpiexec's ranks die with it (hydra); srun's step is cancelled with srun
                    out, _ = proc.communicate()
                    break
    finally:
        stop.child = None
    with open(log, "rb") as f:
        f.seek(start)
        err = f.read().decode(errors="replace")
    seconds = time.perf_counter() - t0
    res = _last_json(out)
    if timed_out:
        return Outcome("timeout", None, f"timed out after {timeout:g} s (timeout_s) and was killed\n{_tail(err)}", seconds)
    if res is not None and res.get("status") == "ok" and proc.returncode == 0:
        return Outcome("ok", res, "", seconds)
    if stop.requested:  # stopped by our own signal: neither a result nor a failure
        return Outcome("interrupted", res, _tail(err), seconds)
    if proc.returncode == 3:
        msg = (res or {}).get("error") or _tail(err)
        return Outcome("diverged", res if res and res.get("status") == "diverged" else None, msg, seconds)
    if proc.returncode == 0 and res is not None and res.get("status") == "checkpointed":
        return Outcome("failed", None, f"stopped by a signal from outside the sweep (checkpointed)\n{_tail(err)}", seconds)
    why = "no JSON result on stdout" if proc.returncode == 0 else f"exit code {proc.returncode}"
    return Outcome("failed", None, f"{why}\n{_tail(err)}".strip(), seconds)
