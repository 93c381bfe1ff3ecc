"""A result record as strict JSON: what `python -m pbp_hpc.train --json` prints."""

from __future__ import annotations

from typing import Any

import numpy as np


def finite_json(record: dict[str, Any]) -> dict[str, Any]:
    """The record with every NaN or infinite float made null, each listed in record["notes"].

    JSON has no NaN: Python's json writes a bare NaN that strict readers refuse. A timing or a
    rate can be undefined (an epoch of zero duration, a median of nothing): null says so."""
    notes: list[str] = list(record.get("notes") or [])

    def clean(value: Any, where: str) -> Any:
        if isinstance(value, dict):
            return {k: clean(v, f"{where}.{k}" if where else str(k)) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [clean(v, f"{where}[{i}]") for i, v in enumerate(value)]
        if isinstance(value, (float, np.floating)) and not np.isfinite(value):
            notes.append(f"{where} was {float(value)} (undefined), written as null")
            return None
        if isinstance(value, np.generic):
            return value.item()
        return value

    out = clean({k: v for k, v in record.items() if k != "notes"}, "")
    if notes:
        out["notes"] = notes
    return out
