"""The HDF5 results store: one group per run, written crash-safely, merged across Slurm array tasks.

schema: the version, the fields of a run record and one record <-> one HDF5 group (how to add a
field is in its docstring); store: appending, reading and merging files; cli: `python -m
pbp_hpc.results merge|show`. The names below are the package's interface; docs/results-schema.md
documents the file format. Private helpers live in their module (patch them there: e.g. the
store's `_read_run`, which read_runs calls).
"""

from pbp_hpc.results.schema import (BOOL_ATTRS, CURVE_GROUP, EPOCH_FIELDS, EVAL_FIELDS, FLOAT_ATTRS,
                                    IDENTITY_INT_ATTRS, IDENTITY_STR_ATTRS, IMPLEMENTATIONS, INT_ATTRS, JSON_ATTRS, PROVENANCE_ATTRS, READABLE_VERSIONS,
                                    RUN_FIELDS, SCHEMA, SCHEMA_VERSION, STATUSES, STR_ATTRS, Column, Field,
                                    record_key, run_key)
from pbp_hpc.results.store import append_run, identities, merge, read_runs, statuses
from pbp_hpc.results.cli import headline, main, show_lines, tpe

__all__ = ["SCHEMA", "SCHEMA_VERSION", "READABLE_VERSIONS", "STATUSES", "IMPLEMENTATIONS", "RUN_FIELDS", "EPOCH_FIELDS",
           "EVAL_FIELDS", "CURVE_GROUP", "BOOL_ATTRS", "Field", "Column", "INT_ATTRS", "FLOAT_ATTRS", "STR_ATTRS",
           "JSON_ATTRS", "PROVENANCE_ATTRS",
           "IDENTITY_INT_ATTRS", "IDENTITY_STR_ATTRS", "run_key", "record_key", "append_run", "read_runs", "statuses",
           "identities", "merge", "tpe", "headline", "show_lines", "main"]
