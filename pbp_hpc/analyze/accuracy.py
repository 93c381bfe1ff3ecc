"""Time to accuracy: how long each configuration trained to reach the target validation accuracy.

A run with `train.target_accuracy` set stops at the first validation pass that reaches it and
records the training time to it (evaluation passes excluded), the time spent in those passes,
and the epochs and steps it took (`record["target"]`), besides its evaluation curve
(`record["evaluations"]`). Here the runs of one configuration -- network, precision, training-set
size, target, optimizer and learning-rate schedule as recorded in the config, batch size,
implementation, ranks and threads -- are grouped, their repetitions summarised by the median,
and the fastest configuration to the target named. A configuration whose runs did not reach the
target gets a row that says so, never a gap. Runs without a target are not in these rows.

Plain rows (dicts), as pbp_hpc.analyze.scaling gives them: the tables (pbp_hpc.analyze.tables)
and figures (pbp_hpc.analyze.accuracy_figures) show the same numbers.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from typing import Any, Iterable, Optional

from pbp_hpc.analyze.points import Case, case_of
from pbp_hpc.analyze.records import IMPLEMENTATIONS, Record, _cfg, batch_of, implementation_of, run_tpe
from pbp_hpc.analyze.spread import spread_fields

# The defaults of pbp_hpc.config: what a record without an optimizer or schedule section ran with.
_OPTIMIZER = {"name": "sgd", "momentum": 0.9, "weight_decay": 0.0}
_SCHEDULE = {"name": "constant", "warmup_epochs": 0.0, "scale_with_batch": False, "base_batch": 256, "step_epochs": 10.0,
             "gamma": 0.1, "min_lr": 0.0}


def target_of(rec: Record) -> Optional[dict[str, Any]]:
    """The run's target record (accuracy, reached, time_s, ...), or None if it had no target."""
    t = rec.get("target")
    return t if isinstance(t, dict) and t.get("accuracy") is not None else None


def reached(rec: Record) -> bool:
    t = target_of(rec)
    return bool(t and t.get("reached") and t.get("time_s") is not None)


def variant_of(rec: Record) -> str:
    """Optimizer, learning-rate schedule and rate of a run, in words, e.g.
    `nesterov 0.9, cosine +1ep warm-up, lr 0.05xB/256` (defaults where the config has no section)."""
    opt = {**_OPTIMIZER, **(_cfg(rec, "optimizer") or {})}
    sch = {**_SCHEDULE, **(_cfg(rec, "schedule") or {})}
    words = str(opt["name"]) if opt["name"] == "sgd" else f"{opt['name']} {opt['momentum']:g}"
    if opt["name"] == "lamb":
        words = f"lamb {'/'.join(f'{b:g}' for b in opt.get('betas') or [0.9, 0.999])}"
    elif opt["name"] == "lars":
        words += f" trust {opt.get('trust_coefficient', 0.001):g}"
    if opt.get("weight_decay"):
        words += f" wd {opt['weight_decay']:g}"
    if _cfg(rec, "model", "label_smoothing"):
        words += f", label smoothing {_cfg(rec, 'model', 'label_smoothing'):g}"
    if _cfg(rec, "train", "ema_decay"):
        words += f", EMA {_cfg(rec, 'train', 'ema_decay'):g}"
    schedule = str(sch["name"])
    if sch["name"] == "step":
        schedule += f" x{sch['gamma']:g} every {sch['step_epochs']:g}ep"
    elif sch["name"] == "cosine" and sch.get("min_lr"):
        schedule += f" to {sch['min_lr']:g}"
    if sch.get("warmup_epochs"):
        schedule += f" +{sch['warmup_epochs']:g}ep warm-up"
    lr = _cfg(rec, "train", "learning_rate")
    rate = "lr ?" if lr is None else f"lr {lr:g}"
    rule = sch.get("scale_with_batch")  # a bool in records before the sqrt rule: true was linear
    if rule in (True, "linear"):
        rate += f"xB/{sch['base_batch']}"
    elif rule == "sqrt":
        rate += f"xsqrt(B/{sch['base_batch']})"
    return f"{words}, {schedule}, {rate}" + study_of(rec)


def strategy_of(rec: Record) -> str:
    """parallel.strategy of a run (allreduce where the config predates strategies)."""
    return str(_cfg(rec, "parallel", "strategy") or rec.get("strategy") or "allreduce")


def straggler_of(rec: Record) -> float:
    """study.straggler_factor of a run (1: none)."""
    return float(_cfg(rec, "study", "straggler_factor") or 1.0)


def study_of(rec: Record) -> str:
    """The strategy and straggler of a run in words, where not the default: `, async_ps, straggler x4`."""
    words = "" if strategy_of(rec) == "allreduce" else f", {strategy_of(rec)}"
    factor = straggler_of(rec)
    if factor != 1.0:
        words += f", straggler x{factor:g}" + (" random" if _cfg(rec, "study", "straggler") == "random" else "")
    return words


def effective_tpe(rec: Record) -> tuple[Optional[float], str]:
    """TPE of a run and where it came from: its timed epochs (as the performance table), else
    -- no full epoch after the warm-up, as when the target came early -- time / epochs to target."""
    tpe = run_tpe(rec)
    if tpe is not None:
        return tpe, "epochs"
    t = target_of(rec)
    if t and t.get("time_s") is not None and t.get("epochs"):
        return t["time_s"] / t["epochs"], "target"
    return None, ""


def _median(values: Iterable[Optional[float]]) -> Optional[float]:
    vs = [float(v) for v in values if v is not None]
    return float(statistics.median(vs)) if vs else None


def config_key(rec: Record) -> tuple[Any, ...]:
    """What a time-to-accuracy row is: case, target, variant, batch, implementation, ranks, threads."""
    t = target_of(rec) or {}
    return (case_of(rec), float(t.get("accuracy") or 0.0), variant_of(rec), batch_of(rec) or 0, implementation_of(rec),
            int(rec.get("ranks") or 1), int(rec.get("threads_per_rank") or 1))


def row_key(row: dict[str, Any]) -> tuple[Any, ...]:
    """The config_key a row was made from (to find its runs' curves)."""
    return (Case(row["network"], row["dtype"], row["n_train"]), row["target"], row["variant"], row["batch_size"],
            row["implementation"], row["ranks"], row["threads"])


def _row(key: tuple[Any, ...], runs: list[Record]) -> dict[str, Any]:
    case, target, variant, batch, impl, ranks, threads = key
    hit = [r for r in runs if reached(r)]
    tgt = [target_of(r) or {} for r in hit]
    times = [t["time_s"] for t in tgt]
    tpes = [effective_tpe(r) for r in runs]
    tpe_from = {src for v, src in tpes if v is not None}
    best = _median(r.get("best_val_accuracy") for r in runs)
    status = ("reached" if len(hit) == len(runs) else f"{len(hit)} of {len(runs)} reached" if hit
              else "not reached" + (f" (best {100 * best:.2f}%)" if best is not None else ""))
    return {
        "network": case.network, "dtype": case.dtype, "n_train": case.n_train, "target": target, "variant": variant,
        "batch_size": batch, "implementation": impl, "ranks": ranks, "threads": threads,
        "reps": len(runs), "reached": len(hit), "status": status,
        "time_to_target_s": _median(times), "time_min_s": min(times) if times else None,
        "time_max_s": max(times) if times else None,
        "eval_time_s": _median(t.get("eval_time_s") for t in tgt),
        "wall_to_target_s": _median(t.get("wall_s") for t in tgt),
        "epochs_to_target": _median(t.get("epochs") for t in tgt),
        "steps_to_target": _median(t.get("steps") for t in tgt),
        "val_accuracy_at_target": _median(t.get("val_accuracy") for t in tgt),
        "best_val_accuracy": best,
        "tpe_s": _median(v for v, _ in tpes),
        "tpe_from": "time / epochs to target" if tpe_from == {"target"} else "mixed" if len(tpe_from) > 1
        else "timed epochs" if tpe_from else None,
        "test_accuracy": _median(r.get("test_accuracy") for r in runs),
        "b_noise": _median(noise_scale_of(r) for r in runs),
        "best": False,
        # over seeds (and repetitions): mean, standard deviation, min and max, the fraction reached
        **spread_fields(runs, tgt),
    }


def noise_scale_of(rec: Record) -> Optional[float]:
    """The gradient noise scale B_noise of a run (pbp_hpc/parallel/noise_scale.py): at the pass
    that reached the target where it did, else at the end; None where it was not estimated."""
    steps = (target_of(rec) or {}).get("steps") if reached(rec) else None
    at = [p.get("b_noise") for p in rec.get("evaluations") or [] if steps is not None and p.get("step") == steps]
    value = at[0] if at and at[0] is not None else rec.get("b_noise")
    return float(value) if value is not None else None


def time_to_target_rows(records: Iterable[Record]) -> list[dict[str, Any]]:
    """One row per configuration of the ok runs that had a target; the fastest of each
    (case, target) marked `best: True` (only among configurations where every run reached it)."""
    groups: dict[tuple[Any, ...], list[Record]] = defaultdict(list)
    for rec in records:
        if rec.get("status", "ok") == "ok" and target_of(rec) is not None:
            groups[config_key(rec)].append(rec)
    order = {name: i for i, name in enumerate(IMPLEMENTATIONS)}
    keys = sorted(groups, key=lambda k: (k[0], k[1], k[2], k[3], order.get(k[4], 99), k[4], k[5], k[6]))
    rows = [_row(k, groups[k]) for k in keys]
    for group in by_target(rows).values():
        fastest = best_row(group)
        if fastest is not None:
            fastest["best"] = True
    return rows


def by_target(rows: list[dict[str, Any]]) -> dict[tuple[Case, float], list[dict[str, Any]]]:
    """Rows of one case and target together (one table, one figure each), in row order."""
    out: dict[tuple[Case, float], list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        out[(Case(r["network"], r["dtype"], r["n_train"]), r["target"])].append(r)
    return dict(out)


def best_row(rows: list[dict[str, Any]]) -> Optional[dict[str, Any]]:
    """The configuration with the least median training time to the target, among those whose
    every run reached it; None if none did."""
    full = [r for r in rows if r["reps"] == r["reached"] and r["time_to_target_s"] is not None]
    return min(full, key=lambda r: r["time_to_target_s"]) if full else None


def describe(r: dict[str, Any]) -> str:
    """A configuration in words: `B=256, hybrid 2x1, nesterov 0.9, cosine, lr 0.1`."""
    return f"B={r['batch_size']}, {r['implementation']} {r['ranks']}x{r['threads']}, {r['variant']}"


def best_line(rows: list[dict[str, Any]]) -> str:
    """The sentence under a table: the fastest configuration to the target, or that none reached it."""
    target = f"{100 * rows[0]['target']:g}%"
    best = best_row(rows)
    if best is not None:
        tail = f", {best['epochs_to_target']:.3g} epochs" if best["epochs_to_target"] is not None else ""
        # at the target: a run that never reached it has only its last value, not comparable
        noise = [r["b_noise"] for r in rows if r.get("b_noise") is not None and r["reached"]]
        beside = (f"; gradient noise scale B_noise ≈ {statistics.median(noise):.0f} (median over the configurations that "
                  f"reached the target, at that pass): batches much above it buy few fewer steps" if noise else "")
        return (f"fastest to {target}: {describe(best)}: {best['time_to_target_s']:.4g} s of training{tail}"
                f" (+{best['eval_time_s'] or 0:.3g} s evaluating){beside}")
    some = [r for r in rows if r["reached"]]
    if some:
        r = min(some, key=lambda r: r["time_to_target_s"])
        return (f"no configuration reached {target} in every run; fastest where some did: {describe(r)} "
                f"({r['reached']} of {r['reps']}, {r['time_to_target_s']:.4g} s)")
    closest = max(rows, key=lambda r: r["best_val_accuracy"] or 0.0)
    shown = "-" if closest["best_val_accuracy"] is None else f"{100 * closest['best_val_accuracy']:.2f}%"
    return f"no run reached {target}; closest: {describe(closest)} (best validation accuracy {shown})"


def curves(records: Iterable[Record]) -> dict[tuple[Any, ...], list[list[dict[str, Any]]]]:
    """config_key -> the evaluation curves of its ok runs with a target (one list of passes per run)."""
    out: dict[tuple[Any, ...], list[list[dict[str, Any]]]] = defaultdict(list)
    for rec in records:
        if rec.get("status", "ok") == "ok" and target_of(rec) is not None and rec.get("evaluations"):
            out[config_key(rec)].append(rec["evaluations"])
    return dict(out)
