"""Stop signals in the benchmark's parent: SIGTERM or SIGUSR1 ends it at once, with the job it waits on.

The parent imports no MPI (pbp_hpc.parallel.runtime does), so it has its own handler: it raises
errors.Stopped wherever the parent is. A child job (the worker's mpiexec, an `as typed`
mpiexec) run through run() is passed the same signal, which Hydra forwards to its ranks (they
end through runtime.report_stopped), and is killed if it is not gone within GRACE_S: a stopped
benchmark leaves no job behind to run on for up to an hour.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from typing import Any, Optional

from pbp_hpc.errors import Stopped

GRACE_S = 10.0  # how long a signalled child job may take to end before it is killed
EXIT_STOPPED = 128  # + the signal's number, as runtime.EXIT_STOPPED


def _on_signal(signum: int, frame: Any) -> None:
    raise Stopped(signum)


def install() -> None:
    for sig in (signal.SIGUSR1, signal.SIGTERM):
        signal.signal(sig, _on_signal)


def run(cmd: list[str], timeout: Optional[float] = None, **popen: Any) -> subprocess.CompletedProcess:
    """subprocess.run(cmd, timeout=...) with stdout/stderr as popen says; on a stop signal the
    child gets the same signal, then SIGKILL after GRACE_S, and Stopped goes on up."""
    with subprocess.Popen(cmd, **popen) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            raise
        except Stopped as exc:
            _end(proc, exc.signum)
            raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _end(proc: subprocess.Popen, signum: int) -> None:
    for sig in (signal.SIGUSR1, signal.SIGTERM):  # a second signal must not cut this short
        signal.signal(sig, signal.SIG_IGN)
    try:
        proc.send_signal(signum)
        proc.communicate(timeout=GRACE_S)  # drained, so that a child writing to a full pipe can end
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
    finally:
        install()


def report(exc: Stopped, what: str = "pbp_hpc.bench") -> int:
    """The parent's one line for a stop signal, and its exit code (128 + the signal's number)."""
    name = signal.Signals(exc.signum).name if exc.signum in signal.Signals._value2member_map_ else str(exc.signum)
    print(f"{what}: stopped by {name}: the running job was ended and nothing more was written; "
          "run the same command again", file=sys.stderr, flush=True)
    return EXIT_STOPPED + exc.signum
