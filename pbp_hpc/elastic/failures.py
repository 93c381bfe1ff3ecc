"""How an attempt of an elastic run ended, read from its exit code and what the launcher and the
ranks printed: finished, lost a rank or a host (restart on what is left), or failed in a way a
restart would only repeat (a bad config, divergence, an exception, a stop signal: not retried).

What identifies a loss (MPICH's Hydra and Slurm's srun, as they print it):
  * Hydra, a rank killed by a signal: mpiexec exits with the signal's number (9 for SIGKILL) after
    "BAD TERMINATION ... PID <pid> RUNNING AT <host> ... EXIT CODE: <signal>"; the pid names the rank
    through the line train prints for this launcher (PBP_HPC_ELASTIC: each rank's host and pid).
  * srun: "srun: error: <node>: task <r>: Killed" (or another signal's name), "srun: error: Node
    failure on <node>", "srun: error: ... task(s) <list> ... lost".
  * A rank that stopped answering: the stall check aborts with exit 4 (parallel.stall_timeout_s),
    naming the late rank. A rank that is merely slow never reaches that: it is not a failure.
"""

from __future__ import annotations

import json
import re
import signal
from dataclasses import dataclass, field
from typing import Any, Optional

from pbp_hpc.elastic import ranks
from pbp_hpc.parallel.runtime import (EXIT_DIVERGED, EXIT_FAILED, EXIT_INTERRUPTED, EXIT_SETUP, EXIT_STALLED,
                                      EXIT_STOPPED)

WHERE_TAG = ranks.TAG  # the line train prints for this launcher

_HYDRA = re.compile(r"PID (\d+) RUNNING AT (\S+)\s*\n=+\s*EXIT CODE: (\d+)")
_SRUN_TASK = re.compile(r"srun: error: (\S+): tasks? ([\d,\- ]+): (.+)")
_SRUN_NODE = re.compile(r"srun: error: Node failure on (\S+)")
_STALL = re.compile(r"more than parallel\.stall_timeout_s \S+, for ranks? ([\d, ]+); aborting")


@dataclass
class Ending:
    """How one attempt ended."""

    code: int
    kind: str  # "finished", "lost" (restart on what is left) or "final" (do not retry)
    cause: str  # in words
    ranks: list[int] = field(default_factory=list)  # ranks lost
    hosts: list[str] = field(default_factory=list)  # hosts (nodes) lost as a whole


def reported(text: str) -> dict[str, Any]:
    """The last PBP_HPC_ELASTIC line train printed: {"ranks": [{"host", "node", "pid"}...], "epoch", "step"}."""
    found: dict[str, Any] = {}
    for line in text.splitlines():
        if line.startswith(WHERE_TAG):
            try:
                found = json.loads(line[len(WHERE_TAG):])
            except ValueError:
                pass
    return found


def _signame(n: int) -> str:
    try:
        return signal.Signals(n).name
    except ValueError:
        return f"signal {n}"


def _ranks(spec: str) -> list[int]:
    out: list[int] = []
    for part in spec.replace(" ", "").split(","):
        if "-" in part:
            a, b = part.split("-", 1)
            out += range(int(a), int(b) + 1)
        elif part.isdigit():
            out.append(int(part))
    return out


def classify(code: int, stderr: str, where: list[dict[str, Any]], signalled: bool = False,
             first_dead: Optional[list[int]] = None) -> Ending:
    """What an attempt's exit code and output say. where: the ranks as train reported them;
    first_dead: the rank(s) the launcher saw end first on its host (it watches their pids)."""
    if code == 0:
        return Ending(0, "finished", "finished")
    if signalled:
        return Ending(code, "final", "the elastic launcher itself was asked to stop (a signal): not restarted")
    if code < 0:  # mpiexec or srun itself was killed: nothing says a rank or node was lost
        return Ending(code, "final", f"the launcher process itself was killed ({_signame(-code)}); not restarted")
    by_pid = {int(w["pid"]): r for r, w in enumerate(where) if "pid" in w}
    ranks: list[int] = []
    hosts: list[str] = []
    causes: list[str] = []
    for pid, host, sig in _HYDRA.findall(stderr)[:1]:
        n = int(sig)
        if n in (EXIT_FAILED, EXIT_SETUP, EXIT_DIVERGED, EXIT_STALLED):  # one of ours: said below
            continue
        # Hydra names the first process it reaped, which after its clean-up may be another than
        # the one that died: the launcher's own watch says which ended first, where it could see
        r = first_dead[0] if first_dead and len(first_dead) == 1 else by_pid.get(int(pid)) if not first_dead else None
        if r is not None:
            ranks.append(r)
            w = where[r] if r < len(where) else {}
            causes.append(f"rank {r} (pid {w.get('pid', pid)} on {w.get('host', host)}) died: {_signame(n)}")
        else:
            causes.append(f"one of ranks {', '.join(map(str, first_dead or [])) or '?'} died: {_signame(n)}")
    for node, tasks, what in _SRUN_TASK.findall(stderr):
        if "Exited with exit code" in what:  # a rank that exited on its own (one of ours)
            continue
        for r in _ranks(tasks):
            if r not in ranks:
                ranks.append(r)
        causes.append(f"task(s) {tasks.strip()} on {node}: {what.strip()}")
    for node in _SRUN_NODE.findall(stderr):
        if node not in hosts:
            hosts.append(node)
        causes.append(f"node failure on {node}")
    if code == EXIT_STALLED:
        m = _STALL.findall(stderr)
        late = _ranks(m[-1]) if m else []
        ranks += [r for r in late if r not in ranks]
        causes.append(f"rank(s) {', '.join(map(str, late)) or '?'} stopped answering (parallel.stall_timeout_s)")
    if hosts:  # a node failure ends the step: the tasks killed elsewhere with it were not lost
        on = {r for r, w in enumerate(where) if (w.get("node") or w.get("host")) in hosts}
        ranks = [r for r in ranks if r in on] or sorted(on)
        causes = [c for c in causes if not c.startswith("task(s)")] + [f"rank(s) {', '.join(map(str, ranks))} with it"] * bool(ranks)
    if ranks or hosts or code == EXIT_STALLED:
        return Ending(code, "lost", "; ".join(causes), ranks, hosts)
    if code in (EXIT_SETUP, EXIT_DIVERGED, EXIT_FAILED, EXIT_INTERRUPTED) or code >= EXIT_STOPPED:
        what = {EXIT_SETUP: "a bad config, data or checkpoint", EXIT_DIVERGED: "the training diverged",
                EXIT_FAILED: "a rank raised an error (a restart would repeat it)",
                EXIT_INTERRUPTED: "interrupted (SIGINT)"}.get(code, "stopped by a signal")
        return Ending(code, "final", f"exit {code}: {what}; not restarted")
    # an exit code that is a signal's number and nothing printed that says which rank: one rank lost
    return Ending(code, "lost", f"exit {code} ({_signame(code)}): a rank died; which one is not known")


def none_left(ranks: int, minimum: int) -> Optional[str]:
    return f"{ranks} rank(s) left, fewer than --min-ranks {minimum}" if ranks < minimum else None
