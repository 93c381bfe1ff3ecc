"""The analysis computes the report's quantities exactly from hand-made run records.

Records are plain dicts shaped as the results contract says (what `train --json` prints plus
the sweep's keys), with round numbers so every expected value can be checked by hand.
"""

import importlib.util
import json
import math
import subprocess
import sys

import numpy as np
import pytest

from pbp_hpc import analyze
from pbp_hpc.analyze import perfmodel

FLOPS = 1_000_000  # flops per example: GFLOP/s = 1e6 * examples / TPE / 1e9
N = 1000  # examples per epoch
NPARAMS = {"net1h": 795010, "net2h": 1863690}
LAYERS = {"net1h": [784, 1024, 10], "net2h": [784, 1024, 1024, 10]}


def rec(impl, ranks=1, threads=1, batch=100, times=(9.0, 2.0, 2.0), allreduce=None, compute=None, network="net1h",
        rep=0, status="ok", warmup=1, examples=N, partial=None, point=0, error=""):
    """One run record; times are per-epoch seconds (the first is the warm-up)."""
    allreduce = allreduce or [0.0] * len(times)
    compute = compute or [t - a for t, a in zip(times, allreduce)]
    partial = partial or [False] * len(times)
    epochs = [{"epoch": i, "loss": 0.1, "val_accuracy": 0.9, "time_s": t, "compute_s": c, "allreduce_s": a, "gflops": 0.0,
               "examples": examples, "partial": p} for i, (t, a, c, p) in enumerate(zip(times, allreduce, compute, partial))]
    return {"status": status, "error": error, "sweep": "t", "point": point, "repetition": rep, "implementation": impl,
            "network": network, "batch_size": batch, "ranks": ranks, "threads_per_rank": threads,
            "config": {"model": {"layers": LAYERS[network], "dtype": "float32"}, "train": {"batch_size": batch},
                       "parallel": {"reducer": "blocking"}},
            "test_accuracy": 0.9, "total_time_s": sum(times), "n_train": N, "n_params": NPARAMS[network],
            "flops_per_example": FLOPS, "warmup_epochs": warmup, "median_epoch_time_s": None,
            "epochs": epochs if status == "ok" else [], "provenance": {}}


def tpe_rec(impl, tpe, **kw):
    return rec(impl, times=(99.0, tpe, tpe), **kw)


def rows_by(rows, **match):
    found = [r for r in rows if all(r[k] == v for k, v in match.items())]
    assert len(found) == 1, (match, rows)
    return found[0]


# --- time per epoch -------------------------------------------------------------------------


def test_tpe_drops_warmup_and_partial_epochs():
    r = rec("blas-serial", times=(10.0, 3.0, 5.0, 4.0, 100.0), partial=[False, False, False, False, True])
    assert analyze.run_tpe(r) == 4.0  # median of 3, 5, 4: the 10 s warm-up and the 100 s partial epoch are out
    assert analyze.run_tpe({**r, "warmup_epochs": 0}) == 4.5  # median of 10, 3, 5, 4


def test_tpe_over_repetitions_is_the_median_with_min_and_max():
    points, problems = analyze.aggregate([tpe_rec("blas-serial", t, rep=i) for i, t in enumerate((4.0, 6.0, 5.0))])
    assert problems == [] and len(points) == 1
    p = points[0]
    assert (p.reps, p.tpe_s, p.tpe_min_s, p.tpe_max_s) == (3, 5.0, 4.0, 6.0)


# --- the performance table -----------------------------------------------------------------


@pytest.fixture
def grid():
    return [
        tpe_rec("naive-serial", 80.0), tpe_rec("example-parallel", 50.0, ranks=2),
        tpe_rec("blas-serial", 8.0), tpe_rec("blas-threaded", 4.0, threads=2),
        rec("hybrid", ranks=2, times=(99.0, 5.0, 5.0), allreduce=[1.0, 1.0, 1.0]),
        tpe_rec("gpu", 0.5), tpe_rec("framework", 10.0), tpe_rec("framework", 6.0, threads=2),
        tpe_rec("blas-serial", 1.0, batch=1000),  # another batch: must never serve as a baseline for batch 100
    ]


def test_speedup_efficiency_gflops_and_comm_fraction_are_exact(grid):
    points, _ = analyze.aggregate(grid)
    rows = analyze.performance_rows(points)
    expect = {  # implementation, P, T: speedup over own serial, vs fastest serial (blas-serial 8 s), efficiency
        ("naive-serial", 1, 1): (1.0, 8 / 80, 1.0),
        ("example-parallel", 2, 1): (80 / 50, 8 / 50, 0.8),
        ("blas-serial", 1, 1): (1.0, 1.0, 1.0),
        ("blas-threaded", 1, 2): (2.0, 2.0, 1.0),
        ("hybrid", 2, 1): (1.6, 1.6, 0.8),
        ("gpu", 1, 1): (16.0, 16.0, None),  # GPU: no parallel efficiency
        ("framework", 1, 1): (1.0, 0.8, 1.0),
        ("framework", 1, 2): (10 / 6, 8 / 6, 10 / 6 / 2),
    }
    for (impl, P, T), (s, sf, eff) in expect.items():
        r = rows_by(rows, implementation=impl, ranks=P, threads=T, batch_size=100)
        assert r["speedup"] == pytest.approx(s, rel=1e-12), impl
        assert r["speedup_vs_fastest_serial"] == pytest.approx(sf, rel=1e-12), impl
        assert (r["efficiency"] is None) if eff is None else r["efficiency"] == pytest.approx(eff, rel=1e-12)
        assert r["fastest_serial"] == "blas-serial 1x1"
    hybrid = rows_by(rows, implementation="hybrid", batch_size=100)
    assert hybrid["comm_fraction"] == pytest.approx(0.2)  # 1 s of Allreduce in a 5 s epoch
    assert hybrid["gflops"] == pytest.approx(FLOPS * N / 5.0 / 1e9)  # 0.2 GFLOP/s
    assert rows_by(rows, implementation="blas-serial", batch_size=100)["comm_fraction"] == 0.0


def test_serial_counterparts_follow_the_report():
    assert analyze.SERIAL_COUNTERPART == {
        "naive-serial": "naive-serial", "example-parallel": "naive-serial", "blas-serial": "blas-serial",
        "blas-threaded": "blas-serial", "hybrid": "blas-serial", "gpu": "blas-serial", "framework": "framework"}


def test_counterpart_is_the_one_core_run_of_the_same_network_and_batch(grid):
    extra = [tpe_rec("blas-serial", 3.0, network="net2h"), tpe_rec("hybrid", 2.0, ranks=2, network="net2h", batch=1000)]
    points, _ = analyze.aggregate(grid + extra)
    label = {(p.implementation, p.case.network, p.batch_size, p.ranks, p.threads): p for p in points}
    base = analyze.counterpart(points, label[("hybrid", "net1h", 100, 2, 1)])
    assert (base.implementation, base.case.network, base.batch_size, base.cores, base.tpe_s) == ("blas-serial", "net1h", 100, 1, 8.0)
    assert analyze.counterpart(points, label[("hybrid", "net2h", 1000, 2, 1)]) is None  # no net2h blas-serial at B=1000
    fw2 = analyze.counterpart(points, label[("framework", "net1h", 100, 1, 2)])
    assert (fw2.implementation, fw2.threads) == ("framework", 1)


def test_missing_counterpart_leaves_speedup_empty_not_wrong():
    points, _ = analyze.aggregate([tpe_rec("hybrid", 2.0, ranks=2)])
    r = analyze.performance_rows(points)[0]
    assert r["speedup"] is None and r["efficiency"] is None and r["speedup_vs_fastest_serial"] is None


# --- scaling tables ------------------------------------------------------------------------


def test_strong_scaling_starts_from_the_serial_counterpart():
    recs = [tpe_rec("blas-serial", 8.0), tpe_rec("hybrid", 5.0, ranks=2), tpe_rec("hybrid", 4.0, ranks=4)]
    rows = analyze.strong_scaling_rows(analyze.aggregate(recs)[0])
    got = [(r["ranks"], r["run"], r["speedup"], r["efficiency"]) for r in rows]
    assert got == [(1, "blas-serial 1x1", 1.0, 1.0), (2, "hybrid 2x1", 1.6, 0.8), (4, "hybrid 4x1", 2.0, 0.5)]


def test_weak_scaling_efficiency_is_the_ratio_of_step_times():
    # Fixed batch per rank (32): B=32 on 1 rank, B=64 on 2, B=128 on 4; N=1024 examples.
    recs = [rec("blas-serial", batch=32, times=(9.0, 3.2, 3.2), examples=1024),  # 32 steps: 0.1 s per step
            rec("hybrid", ranks=2, batch=64, times=(9.0, 2.0, 2.0), examples=1024),  # 16 steps: 0.125 s
            rec("hybrid", ranks=4, batch=128, times=(9.0, 1.6, 1.6), examples=1024)]  # 8 steps: 0.2 s
    rows = analyze.weak_scaling_rows(analyze.aggregate(recs)[0])
    assert [(r["ranks"], r["batch_per_rank"]) for r in rows] == [(1, 32), (2, 32), (4, 32)]
    assert [r["step_s"] for r in rows] == pytest.approx([0.1, 0.125, 0.2])
    assert [r["efficiency"] for r in rows] == pytest.approx([1.0, 0.8, 0.5])


# --- failures ------------------------------------------------------------------------------


def test_failed_diverged_timed_out_and_untimed_runs_are_listed_not_dropped(grid):
    bad = [rec("hybrid", ranks=2, status="failed", error="Traceback...\nMPI_ABORT on rank 1", point=7),
           rec("blas-serial", status="diverged", error="loss is nan", point=8),
           rec("framework", status="timeout", error="killed after 600 s", point=9),
           rec("blas-serial", times=(1.0,), warmup=1, point=10)]  # ok, but its only epoch is the warm-up
    points, problems = analyze.aggregate(grid + bad)
    assert [(p["point"], p["status"]) for p in problems] == [(7, "failed"), (8, "diverged"), (9, "timeout"), (10, "ok")]
    assert problems[0]["error"] == "MPI_ABORT on rank 1"  # the last line: what went wrong
    assert "no timed epoch" in problems[3]["error"]
    text = "\n".join(t.render() for t in analyze.build_tables(points, problems, perfmodel.DEFAULT))
    assert "Runs not in the tables above (4:" in text
    for word in ("MPI_ABORT on rank 1", "diverged", "timeout", "no timed epoch"):
        assert word in text


# --- the alpha-beta model ------------------------------------------------------------------


def test_alpha_beta_fit_recovers_known_values_exactly():
    truth = perfmodel.AlphaBeta(3e-6, 2.5e-10, "truth")
    P = np.repeat([2, 4, 8, 16], 4)
    n = np.tile([8, 4096, 3_180_040, 7_454_760], 4)
    fit = perfmodel.fit_alpha_beta(P, n, perfmodel.allreduce_time(P, n, truth))
    assert fit.alpha_s == pytest.approx(3e-6, rel=1e-9)
    assert fit.beta_s_per_byte == pytest.approx(2.5e-10, rel=1e-9)
    assert fit.source.startswith("fitted")


def test_alpha_beta_fit_from_run_records_uses_per_step_allreduce_time():
    truth = perfmodel.AlphaBeta(5e-6, 4e-10, "truth")
    recs = []
    for net in ("net1h", "net2h"):
        for P in (2, 4):
            t_step = perfmodel.allreduce_time(P, NPARAMS[net] * 4, truth)[0]
            steps = math.ceil(N / 100)
            recs.append(rec("hybrid", ranks=P, network=net, times=(9.0, 2.0, 2.0), allreduce=[steps * t_step] * 3))
    ab = analyze.choose_alpha_beta(analyze.aggregate(recs)[0])
    assert (ab.alpha_s, ab.beta_s_per_byte) == (pytest.approx(5e-6, rel=1e-9), pytest.approx(4e-10, rel=1e-9))
    flags = analyze.choose_alpha_beta(analyze.aggregate(recs)[0], alpha=1e-5)
    assert (flags.alpha_s, flags.beta_s_per_byte) == (1e-5, pytest.approx(4e-10, rel=1e-9))


def test_alpha_beta_falls_back_to_defaults_when_underdetermined():
    fit = perfmodel.fit_alpha_beta([2, 2, 1], [1000, 1000, 5], [1e-5, 1.1e-5, 0.0])  # one (P, n): alpha and beta mix
    assert (fit.alpha_s, fit.beta_s_per_byte) == (perfmodel.DEFAULT_ALPHA_S, perfmodel.DEFAULT_BETA_S_PER_BYTE)
    assert "cannot separate" in fit.source


def test_alpha_beta_file_from_the_benchmark_is_read(tmp_path):
    path = tmp_path / "ab.json"
    path.write_text(json.dumps({"alpha_s": 1.5e-6, "beta_s_per_byte": 3e-10, "ranks": 2}))
    ab = analyze.choose_alpha_beta([], str(path))
    assert (ab.alpha_s, ab.beta_s_per_byte) == (1.5e-6, 3e-10) and "measured" in ab.source


def test_predicted_speedup_by_hand():
    # B=4, N=8 (2 steps), 1 s per example, alpha=0.5 s, beta=0: T(1) = 2*4 = 8; T(2) = 2*(2 + 2*1*0.5) = 6.
    ab = perfmodel.AlphaBeta(0.5, 0.0, "hand")
    assert perfmodel.epoch_time([1, 2], 4, 8, 1.0, 1e6, ab) == pytest.approx([8.0, 6.0])
    assert perfmodel.speedup(2, 4, 8, 1.0, 1e6, ab)[0] == pytest.approx(8 / 6)
    # Beyond B ranks each still computes one example: T(8) = 2*(1 + 2*3*0.5) = 8.
    assert perfmodel.epoch_time(8, 4, 8, 1.0, 1e6, ab)[0] == pytest.approx(8.0)


def test_model_table_and_check_use_the_series_serial_base(grid):
    ab = perfmodel.AlphaBeta(1e-6, 1e-10, "given")
    series = analyze.model_series(analyze.aggregate(grid)[0])
    by = {(s.implementation, s.batch_size): s for s in series}
    assert by[("hybrid", 100)].base.label == "blas-serial 1x1"
    assert by[("example-parallel", 100)].base.label == "naive-serial 1x1"
    assert ("hybrid", 1000) in by  # no MPI run at B=1000: pbp_hpc's hybrid modelled from blas-serial
    check = rows_by(analyze.model_check_rows(series, ab), implementation="hybrid")
    assert check["measured_speedup"] == pytest.approx(1.6)
    rows = analyze.model_rows(series, ab)
    assert all(r["speedup_p1"] == pytest.approx(1.0) and "speedup_p1024" in r for r in rows)


# --- the command line and the figures ------------------------------------------------------


def scaling_records():
    """Both networks, three batch sizes, a strong and a weak series, one failure."""
    out = []
    for net, c in (("net1h", 1.0), ("net2h", 2.0)):
        for B in (32, 64, 128):
            out += [tpe_rec("naive-serial", 20 * c, batch=B, network=net), tpe_rec("blas-serial", c * (1 + 32 / B), batch=B, network=net),
                    tpe_rec("blas-threaded", c * 0.6, threads=2, batch=B, network=net),
                    rec("hybrid", ranks=2, batch=B, network=net, times=(9.0, c, c), allreduce=[0.3 * c] * 3),
                    rec("hybrid", ranks=4, batch=B, network=net, times=(9.0, 0.7 * c, 0.7 * c), allreduce=[0.3 * c] * 3),
                    tpe_rec("framework", c * 1.2, batch=B, network=net)]
    return out + [rec("gpu", status="failed", error="no CUDA device")]


def test_plots_writes_the_report_figures(tmp_path):
    src = tmp_path / "runs.jsonl"
    src.write_text("\n".join(json.dumps(r) for r in scaling_records()))
    assert analyze.main([str(src), "--plots", str(tmp_path / "fig"), "--csv", str(tmp_path / "csv")]) == 0
    for net in ("net1h", "net2h"):
        for stem in ("tpe_vs_batch", "gflops_vs_batch", "speedup_vs_batch", "strong_scaling", "model_speedup"):
            png = tmp_path / "fig" / f"{stem}_{net}.png"
            assert png.is_file() and png.stat().st_size > 10_000, png
            assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert (tmp_path / "fig" / f"weak_scaling_{net}_float32.png").stat().st_size > 10_000
    for name in ("performance", "strong_scaling", "weak_scaling", "model", "model_check", "problems"):
        assert (tmp_path / "csv" / f"{name}.csv").stat().st_size > 0


def test_json_output_holds_every_table(capsys, tmp_path):
    src = tmp_path / "runs.jsonl"
    src.write_text("\n".join(json.dumps(r) for r in scaling_records()))
    assert analyze.main([str(src), "--json", "--alpha", "2e-6", "--beta", "1e-10"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out["tables"]) == {"performance", "strong_scaling", "weak_scaling", "model", "model_check", "problems"}
    assert out["alpha_beta"]["alpha_s"] == 2e-6 and len(out["assumptions"]) == len(perfmodel.ASSUMPTIONS)
    assert out["tables"]["problems"][0]["error"] == "no CUDA device"


@pytest.mark.skipif(importlib.util.find_spec("pbp_hpc.results") is None, reason="pbp_hpc.results (the HDF5 store) is not written yet")
def test_cli_prints_the_tables_for_an_hdf5_results_file(tmp_path):
    from pbp_hpc import results
    path = tmp_path / "small.h5"
    for i, r in enumerate(scaling_records()[:6] + scaling_records()[-1:]):
        results.append_run(path, {**r, "point": i})
    proc = subprocess.run([sys.executable, "-m", "pbp_hpc.analyze", str(path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "Performance: net1h (float32, 1000 training examples)" in out
    for word in ("naive-serial", "blas-threaded", "hybrid", "framework", "Alpha-beta model", "assumptions:", "no CUDA device"):
        assert word in out, word


def test_cli_reports_an_unreadable_file_and_exits_2(tmp_path, capsys):
    bad = tmp_path / "nothing.json"
    bad.write_text("not json at all")
    assert analyze.main([str(bad)]) == 2
    assert "pbp_hpc.analyze: error" in capsys.readouterr().err


def test_allreduce_benchmark_writes_alpha_beta_that_analyze_reads(tmp_path):
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    mpiexec = str(Path(sys.executable).with_name("mpiexec"))
    out = tmp_path / "ab.json"
    cmd = [mpiexec, "-n", "2", sys.executable, str(root / "benchmarks" / "allreduce.py"), "--sizes", "8", "4096", "262144",
           "--seconds", "0.01", "--min-reps", "3", "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=root)
    assert proc.returncode == 0, proc.stderr
    assert "busbw GB/s" in proc.stdout and "alpha =" in proc.stdout
    ab = analyze.choose_alpha_beta([], str(out))
    assert ab.alpha_s >= 0 and ab.beta_s_per_byte >= 0 and len(json.loads(out.read_text())["samples"]) == 3
