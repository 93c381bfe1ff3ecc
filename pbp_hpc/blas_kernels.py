"""Which of OpenBLAS's kernel sets runs the GEMMs: chosen before numpy loads OpenBLAS.

numpy's and scipy's wheels carry an OpenBLAS built for every x86 core (DYNAMIC_ARCH). It picks
its kernels for the CPU when it is loaded, OPENBLAS_CORETYPE overrides the pick, and once it is
loaded nothing changes it. On AMD Zen 4 (family 25 with AVX-512) it picks the AVX-512 kernels
(SkylakeX), which run this package's float32 GEMMs slower than its AVX2 kernels (Haswell) do:
Zen 4 executes AVX-512 on 256-bit units, so the wider instructions gain nothing, and the
blocking tuned for Intel's cores costs. Measured on the project's EPYC VM (2026-12-06, OpenBLAS
0.3.31, one thread, interleaved runs), SkylakeX against Haswell:
    128 x 1024 @ 1024 x 1024      84-94 against 101-107 GFLOP/s
    1024 x 1024 @ 1024 x 1024     98 against 106 GFLOP/s
    a Net-2h batch-128 step       13.8-14.1 against 12.2-12.5 ms (benchmarks/profile_step.py)
    a Net-1h batch-1024 step      30.6 against 28.5 ms
float64 GEMMs ran alike (46-49 GFLOP/s either way).

So, where OPENBLAS_CORETYPE is not set and numpy is not loaded yet, choose() sets it to Haswell
on Zen 4 (the package's __init__ calls it, so `python -m pbp_hpc.train` and every process
it starts get it; a script that imports numpy first keeps OpenBLAS's pick). Elsewhere (Intel,
Zen 5's full-width AVX-512, other vendors and systems: not measured here) OpenBLAS keeps its
own pick. A user who wants the AVX-512 kernels sets OPENBLAS_CORETYPE=SkylakeX; a run's
results record the kernel set that ran (provenance: threadpoolctl's "architecture").
"""

from __future__ import annotations

import os
import sys
from typing import Optional

VAR = "OPENBLAS_CORETYPE"
ZEN4_CHOICE = "Haswell"

# Why this process's OPENBLAS_CORETYPE is what it is, for the run's header (None: not set here)
reason: Optional[str] = None


def cpu_fields(path: str = "/proc/cpuinfo") -> dict[str, str]:
    """The first processor's fields ("vendor_id", "cpu family", "flags", ...); {} where unreadable."""
    fields: dict[str, str] = {}
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            for line in f:
                if not line.strip():
                    break  # the end of the first processor's block: every core of a node is alike
                key, _, value = line.partition(":")
                fields[key.strip()] = value.strip()
    except OSError:
        pass
    return fields


def is_zen4(cpu: dict[str, str]) -> bool:
    """AMD family 25 (Zen 3 and Zen 4) with AVX-512, which only Zen 4 has."""
    return (cpu.get("vendor_id") == "AuthenticAMD" and cpu.get("cpu family") == "25"
            and "avx512f" in cpu.get("flags", "").split())


def choice(environ: "os._Environ[str] | dict[str, str]", numpy_loaded: bool,
           cpu: dict[str, str]) -> Optional[str]:
    """The kernel set to ask for, or None to leave OpenBLAS (or the user's setting) alone."""
    if VAR in environ or numpy_loaded or not is_zen4(cpu):
        return None
    return ZEN4_CHOICE


def choose() -> None:
    """Set OPENBLAS_CORETYPE where choice() says so (see the module docstring)."""
    global reason
    if not sys.platform.startswith("linux"):
        return
    pick = choice(os.environ, "numpy" in sys.modules, cpu_fields())
    if pick is not None:
        os.environ[VAR] = pick
        reason = "set by pbp_hpc on AMD Zen 4 (its AVX2 kernels ran GEMMs faster there: pbp_hpc.blas_kernels)"
