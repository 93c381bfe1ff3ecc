"""Faults injected on purpose (debug.fail_phase, test-only): a failure on some ranks in one phase.

Training's own faults (debug.fail_step, per step) are train._inject_fault's; this module fails a
rank outside the training loop, where an error raised on one rank alone must still end the
whole job (tests/test_fault_matrix.py proves it per phase): setup, an evaluation pass, the
end-of-run writes (checkpoint and model).
"""

from __future__ import annotations

import errno
import time
from typing import Any

from pbp_hpc.errors import InjectedFault


def inject(cfg: Any, rank: int, phase: str, error: type[Exception] = InjectedFault) -> None:
    """Fail here if debug.fail_phase names this phase and debug.fail_rank this rank (None: every
    rank). fail_kind oserror: an OSError (not one of ours); stall: sleep debug.stall_s; otherwise
    `error`, the error class this phase raises for real (a write's own error, say)."""
    dbg = cfg.debug
    if dbg.fail_phase != phase or dbg.fail_rank not in (None, rank):
        return
    if dbg.fail_kind == "stall":
        time.sleep(dbg.stall_s)
        return
    if dbg.fail_kind == "oserror":
        raise OSError(errno.EIO, f"injected I/O error on rank {rank} in {phase} (debug.fail_phase)")
    raise error(f"injected fault on rank {rank} in {phase} (debug.fail_phase)")
