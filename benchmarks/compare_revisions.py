"""Time per epoch of two source trees side by side: is a refactor slower anywhere?

    git worktree add /tmp/before HEAD~1
    python benchmarks/compare_revisions.py /tmp/before . --reps 3 -- --quick --no-torch --data-dir DIR

Runs `python -m pbp_hpc.bench ARGS` from each tree in turn (before, after, before, after, ...,
so slow drifts of a noisy machine hit both alike), with PYTHONPATH pointing at that tree, and
prints the median TPE of every (net, batch, split) row of each, their ratio, and the rows
where the second tree is more than --limit slower. Exit 1 if any is.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
from pathlib import Path


def bench_rows(tree: Path, bench_args: list[str]) -> dict[tuple[str, str, str], float]:
    """(net, batch, split) -> TPE s, from the table that one benchmark run prints."""
    env = {**os.environ, "PYTHONPATH": str(tree.resolve())}
    out = subprocess.run([sys.executable, "-m", "pbp_hpc.bench", *bench_args], cwd=tree, env=env,
                         capture_output=True, text=True, check=True).stdout
    rows = {}
    for line in out.splitlines():
        cols = line.split()
        if len(cols) > 3 and cols[0].startswith("Net-"):
            rows[(cols[0], cols[1], cols[2])] = float(cols[3])
    if not rows:
        raise SystemExit(f"no table rows in the output of the benchmark in {tree}:\n{out}")
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("before", type=Path)
    p.add_argument("after", type=Path)
    p.add_argument("--reps", type=int, default=3, help="benchmark runs per tree, interleaved")
    p.add_argument("--limit", type=float, default=0.05, help="flag rows this much slower (fraction)")
    argv = sys.argv[1:]
    cut = argv.index("--") if "--" in argv else len(argv)
    args = p.parse_args(argv[:cut])
    args.bench_args = argv[cut + 1 :]  # python -m pbp_hpc.bench's own arguments, after --
    runs: dict[str, list[dict]] = {"before": [], "after": []}
    for rep in range(args.reps):
        for which in ("before", "after"):
            runs[which].append(bench_rows(getattr(args, which), args.bench_args))
            print(f"repetition {rep + 1}/{args.reps}: {which} done", file=sys.stderr, flush=True)
    keys = [k for k in runs["before"][0] if all(k in r for rs in runs.values() for r in rs)]
    print(f"{'net':8s} {'batch':>6s} {'split':14s} {'before s':>9s} {'after s':>9s} {'after/before':>12s}")
    slower = []
    for k in keys:
        b = statistics.median(r[k] for r in runs["before"])
        a = statistics.median(r[k] for r in runs["after"])
        flag = " *" if a > (1 + args.limit) * b else ""
        slower += [k] if flag else []
        print(f"{k[0]:8s} {k[1]:>6s} {k[2]:14s} {b:9.3f} {a:9.3f} {a / b:12.3f}{flag}")
    print(f"median of {args.reps} interleaved runs each; * = more than {100 * args.limit:.0f}% slower")
    return 1 if slower else 0


if __name__ == "__main__":
    sys.exit(main())
