"""Tables and figures from sweep results: `python -m pbp_hpc.analyze results/X.h5 [...] [--plots DIR]`.

The command line: read the records, aggregate them into points, choose alpha and beta, then
print the tables (text or JSON) and optionally write CSVs and figures. The paragraph above is
the --help description, as it is the package docstring's first paragraph.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional

from pbp_hpc.analyze import batch_scaling, grid_projection, model_parallel, perfmodel, strategies
from pbp_hpc.analyze.models import choose_alpha_beta
from pbp_hpc.analyze.points import aggregate
from pbp_hpc.analyze.records import model_split, read_records
from pbp_hpc.analyze.tables import as_json, build_tables, write_csv
from pbp_hpc.errors import ConfigError, PbpError, ResultsError


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    """The command line's options; argparse exits with status 2 on a bad one."""
    p = argparse.ArgumentParser(prog="python -m pbp_hpc.analyze", description=__doc__.split("\n\n")[0])
    p.add_argument("files", nargs="+", help="results files (.h5 from sweeps; .json/.jsonl of `train --json` output also read)")
    p.add_argument("--plots", metavar="DIR", help="write the figures as PNG files into DIR")
    p.add_argument("--csv", metavar="DIR", help="write every table as DIR/<table>.csv")
    p.add_argument("--json", action="store_true", help="print the tables as one JSON object instead of text")
    p.add_argument("--alpha-beta", metavar="FILE", help="alpha and beta from benchmarks/allreduce.py --json FILE, instead of the fit")
    p.add_argument("--alpha", type=float, metavar="SECONDS", help="Allreduce latency per message round (overrides fit and file)")
    p.add_argument("--beta", type=float, metavar="S_PER_BYTE", help="Allreduce inverse bandwidth, seconds per byte")
    p.add_argument("--max-ranks", type=int, default=perfmodel.MAX_RANKS, help="extrapolate the model to this many ranks (default 1024)")
    p.add_argument("--grid", action="append", metavar="DxTxS[:M]",
                   help="a grid to project a model-parallel study to (data x tensor x pipeline ranks, M microbatches; "
                        "repeat for several; default: the best of every grid at P = 8 .. --max-ranks)")
    return p.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    """Run the analysis; 0 on success, 2 on an unusable input or option (the message on stderr)."""
    args = parse_args(argv)
    try:
        if args.max_ranks < 2:
            raise ConfigError("--max-ranks must be at least 2")
        for option, value in (("--plots", args.plots), ("--csv", args.csv)):
            if value and Path(value).exists() and not Path(value).is_dir():
                raise ConfigError(f"{option} {value}: a file of that name exists; {option} names a directory to write into")
        named = [grid_projection.parse_grid(g) for g in args.grid or []]
        records = read_records(args.files)
        if not records:
            raise ResultsError(f"no runs in {', '.join(args.files)}")
        points, problems = aggregate(records)
        ab = choose_alpha_beta(points, args.alpha_beta, args.alpha, args.beta, records)
        tables = build_tables(points, problems, ab, args.max_ranks, records=records)
        tables += strategies.tables(records)  # a strategy study's comparison (none for other runs)
        tables += batch_scaling.tables(records)  # steps/epochs to target vs batch (none without a batch series)
        tables += model_parallel.tables(records)  # data vs tensor vs pipeline per batch (none without a model split)
        given = args.alpha_beta or args.alpha is not None or args.beta is not None
        measured = choose_alpha_beta(points, records=records) if given else ab  # the runs' own network, for the check
        tables += grid_projection.tables(records, measured, ab, args.max_ranks, named)  # the grid model; none without a model split
        for line in [f"WARNING: alpha-beta: {f}" for f in ab.flags] + [n for t in tables for n in t.notes if n.startswith("WARNING")]:
            print(f"pbp_hpc.analyze: {line}", file=sys.stderr)  # also seen with --json, and where stdout goes to a file
        if args.csv:
            write_csv(tables, Path(args.csv))
        if args.plots:
            # Imported only here: matplotlib is slow to import, and the tables need none of it.
            from pbp_hpc.analyze import (accuracy_figures, figures, grid_projection_figures, model_parallel_figures, noise_figures,
                                         strategy_figures)

            written = figures.write_all(points, Path(args.plots), ab, args.max_ranks)
            written += accuracy_figures.write_all(records, Path(args.plots))
            written += strategy_figures.write_all(records, Path(args.plots))
            written += noise_figures.write_all(records, Path(args.plots))
            written += model_parallel_figures.write_all(records, Path(args.plots))
            written += grid_projection_figures.write_all(records, Path(args.plots), ab, args.max_ranks)
            print(f"wrote {len(written)} figure(s) to {args.plots}", file=sys.stderr)
    except PbpError as exc:
        print(f"pbp_hpc.analyze: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a directory that cannot be made or written: the user's to fix
        print(f"pbp_hpc.analyze: error: cannot write {exc.filename or args.plots or args.csv}: {exc.strerror or exc}",
              file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(as_json(tables, ab), indent=1))
    else:
        ok = sum(p.reps for p in points)
        split = sum(1 for r in records if r.get("status", "ok") == "ok" and model_split(r))  # model_parallel's
        early = len(records) - ok - split - len(problems)  # ok runs that stopped at their target before a timed epoch
        print(f"{len(records)} run(s): {ok} ok in {len(points)} point(s), {len(problems)} not ok"
              + (f", {split} splitting the model (tensor/pipeline: in the model-parallel table only)" if split else "")
              + (f", {early} in the time-to-accuracy table only (target reached before a timed epoch)" if early else "") + "\n")
        print("\n\n".join(t.render() for t in tables if t.rows))  # the summary line above counts the empty ones
    return 0

