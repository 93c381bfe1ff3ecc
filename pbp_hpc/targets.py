"""Where a run will write (checkpoint, model file, timeline), proven writable before it trains:
a failure at the end of hours of training loses them all."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def prove_writable(path: Path) -> None:
    """Make path's folder if missing and create and remove a file in it; OSError if either fails."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".probe", dir=path.parent)
    os.close(fd)
    os.unlink(tmp)
