"""The report's learning-rate grid search: `mpiexec -n P python -m pbp_hpc.search_lr --config ...`.

Trains once per rate on the 5:1 train/validation split, picks the rate with the best
validation accuracy (ties go to the smaller rate: the safer one), and reports the test
accuracy reached with it. All ranks take part in every training, as in a normal run.

Setup errors are collective, as in pbp_hpc.train: a bad configuration or --grid on any rank
(an MPMD launch can give ranks different arguments) ends every rank with exit 2 and one message.
SIGTERM or SIGUSR1 ends the search at once, in any phase, with exit 128 + the signal's number.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Optional

from mpi4py import MPI

from pbp_hpc import config as configmod
from pbp_hpc.errors import ConfigError, DivergenceError, Stopped
from pbp_hpc.parallel.runtime import (add_config_arguments, install_signal_handlers, load_config, report_failure,
                                      report_interrupt, report_stopped, together)
from pbp_hpc.train import run

REPORT_GRID = [0.001, 0.002, 0.01, 0.1, 0.5, 1.0]


def search(cfg: configmod.Config, grid: list[float], comm: MPI.Comm = MPI.COMM_WORLD, log: Any = None) -> dict[str, Any]:
    """Train with each rate in grid; return every trial and the best one."""
    say = log if (log is not None and comm.rank == 0) else (lambda s: None)
    trials = []
    for lr in grid:
        trial_cfg = cfg.model_copy(deep=True)
        trial_cfg.train.learning_rate = lr
        try:
            res = run(trial_cfg, comm, quiet=True)
            val = res["epochs"][-1]["val_accuracy"]
            trials.append({"learning_rate": lr, "status": "ok", "val_accuracy": val, "test_accuracy": res["test_accuracy"],
                           "final_loss": res["epochs"][-1]["loss"], "median_epoch_time_s": res["median_epoch_time_s"]})
            say(f"lr {lr:<7g} val_acc {100 * val:6.2f}%  loss {res['epochs'][-1]['loss']:.5f}")
        except DivergenceError as exc:
            trials.append({"learning_rate": lr, "status": "diverged", "val_accuracy": None, "test_accuracy": None, "error": str(exc)})
            say(f"lr {lr:<7g} diverged ({exc})")
    ok = [t for t in trials if t["status"] == "ok"]
    if not ok:
        raise DivergenceError("every learning rate in the grid diverged", -1, -1)
    best = max(ok, key=lambda t: (t["val_accuracy"], -t["learning_rate"]))
    say(f"best learning rate {best['learning_rate']:g}: validation {100 * best['val_accuracy']:.2f}%, "
        f"test {100 * best['test_accuracy']:.2f}%")
    return {"grid": grid, "trials": trials, "best_learning_rate": best["learning_rate"],
            "val_accuracy": best["val_accuracy"], "test_accuracy": best["test_accuracy"],
            "ranks": comm.size, "config": cfg.to_dict()}


def load_search(args: argparse.Namespace) -> configmod.Config:
    """This rank's configuration and a check of its --grid; raises ConfigError (run under `together`)."""
    if any(lr <= 0 for lr in args.grid):
        raise ConfigError(f"--grid rates must be positive, got {args.grid}")
    return load_config(args)


def check_same_grid(grid: list[float], comm: MPI.Comm) -> None:
    """Every rank must try the same rates, or a rank with fewer trials leaves the others waiting.

    Every rank compares the same gathered list, so they all raise or none does (collective).
    """
    grids = comm.allgather(list(grid))
    bad = [r for r, g in enumerate(grids) if g != grids[0]]
    if bad:
        raise ConfigError(f"ranks {bad} were given a different --grid from rank 0 ({grids[0]}); "
                          "every rank must try the same learning rates")


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pbp_hpc.search_lr", description=__doc__.split("\n\n")[0])
    add_config_arguments(p)
    p.add_argument("--grid", type=float, nargs="+", default=REPORT_GRID, help=f"rates to try (default: the report's {REPORT_GRID})")
    p.add_argument("--json", action="store_true", help="print one JSON object with every trial to stdout")
    p.set_defaults(resume=False)  # runtime.load_config's namespace; a search always starts from scratch
    args = p.parse_args(argv)
    comm = MPI.COMM_WORLD
    out = sys.stderr if args.json else sys.stdout
    # A search writes no checkpoint (it always starts from scratch): SIGTERM/SIGUSR1 end it at
    # once in every phase, its trainings included, rather than checkpoint one trial and go on.
    install_signal_handlers(stop_in_loop=True)
    try:
        cfg = together(comm, lambda: load_search(args))  # an MPMD launch may give ranks other arguments
        check_same_grid(args.grid, comm)
        result = search(cfg, args.grid, comm, log=lambda s: print(s, file=out, flush=True))
    except KeyboardInterrupt:
        return report_interrupt(comm)
    except Stopped as exc:
        return report_stopped(exc, comm, "(a search writes no checkpoint)")
    except Exception as exc:  # noqa: BLE001 - every failure must end the world, not hang it
        return report_failure(exc, comm)
    if args.json and comm.rank == 0:
        print(json.dumps(result), flush=True)
    return 0

if __name__ == "__main__":
    sys.exit(main())
