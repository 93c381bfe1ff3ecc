"""The analysis computes the report's quantities exactly from hand-made run records.

Records are plain dicts shaped as the results contract says (what `train --json` prints plus
the sweep's keys), with round numbers so every expected value can be checked by hand.
"""

import json
import re
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
    epochs = [{"epoch": i, "loss": 0.1, "val_accuracy": 0.9, "time_s": t, "compute_s": c, "comm_s": a, "gflops": 0.0,
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


def test_alpha_beta_without_any_allreduce_time_are_the_defaults_flagged_as_assumed():
    fit = perfmodel.fit_alpha_beta([1], [1000], [0.0])  # one rank: no communication to learn from
    assert (fit.alpha_s, fit.beta_s_per_byte) == (perfmodel.DEFAULT_ALPHA_S, perfmodel.DEFAULT_BETA_S_PER_BYTE)
    assert "assumed, not measured" in fit.describe() and not fit.uncertain


def test_one_p_and_one_size_cannot_separate_alpha_from_beta_and_print_no_value():
    fit = perfmodel.fit_alpha_beta([2, 2, 1], [1000, 1000, 5], [1e-5, 1.1e-5, 0.0])  # one (P, n): alpha and beta mix
    assert fit.undetermined == ("alpha", "beta") and "cannot separate" in fit.flags[0]
    # Each time alone bounds each parameter: 2 alpha <= 1e-5 s, 1000 beta <= 1e-5 s.
    assert fit.alpha_range == pytest.approx((0.0, 5e-6)) and fit.beta_range == pytest.approx((0.0, 1e-8))
    text = fit.describe()
    assert "alpha NOT DETERMINED" in text and "beta NOT DETERMINED" in text and "alpha =" not in text


def noisy(P, n, truth, noise=(0.04, -0.03, 0.05, -0.05, 0.02, -0.01)):
    exact = perfmodel.allreduce_time(P, n, truth)
    return exact * (1 + np.resize(noise, len(exact)))


def test_one_message_size_with_noise_flags_alpha_instead_of_fitting_it_to_zero():
    # The gradient of Net-1h on 2, 3, 4 ranks: the latency term is 1% of each time, the noise 5%.
    truth = perfmodel.AlphaBeta(1e-6, 1e-10, "truth")
    P, n = np.array([2, 3, 4]), np.full(3, 3_180_040)
    fit = perfmodel.fit_alpha_beta(P, n, noisy(P, n, truth))
    assert "alpha" in fit.undetermined and any(f.startswith("one message size") for f in fit.flags)
    assert fit.alpha_range[0] == 0.0 and fit.alpha_range[1] > truth.alpha_s
    assert "alpha NOT DETERMINED" in fit.describe()


def test_several_message_sizes_determine_both_with_ranges_that_hold_the_truth():
    truth = perfmodel.AlphaBeta(5e-6, 2e-10, "truth")
    n = np.array([8, 512, 32_768, 262_144, 2_097_152, 8_388_608])
    P = np.full(n.size, 2)
    fit = perfmodel.fit_alpha_beta(P, n, noisy(P, n, truth))
    assert fit.undetermined == () and fit.flags == ()
    assert fit.alpha_range[0] < truth.alpha_s < fit.alpha_range[1]
    assert fit.beta_range[0] < truth.beta_s_per_byte < fit.beta_range[1]
    assert fit.alpha_range[1] / fit.alpha_range[0] < 2  # 5% noise: a range, not a shrug


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


def test_the_projection_shows_its_range_and_no_value_for_an_undetermined_alpha(grid):
    series = analyze.model_series(analyze.aggregate(grid)[0])
    known = perfmodel.AlphaBeta(2e-6, 1e-10, "fit", (), (), (1e-6, 3e-6), (0.5e-10, 2e-10))
    for r in analyze.model_rows(series, known):
        assert r["speedup_lo_p64"] <= r["speedup_p64"] <= r["speedup_hi_p64"]
    vague = perfmodel.AlphaBeta(0.0, 1e-10, "fit", ("alpha not determined",), ("alpha",), (0.0, 5e-5), (0.5e-10, 2e-10))
    rows = analyze.model_rows(series, vague)
    assert all(r["speedup_p64"] is None and r["best_ranks"] is None for r in rows)
    assert all(r["speedup_lo_p64"] < r["speedup_hi_p64"] for r in rows)
    model = next(t for t in analyze.build_tables(analyze.aggregate(grid)[0], [], vague) if t.name == "model")
    text = model.render()
    assert "alpha NOT DETERMINED" in text and "only the range" in text
    lo, hi = rows[0]["speedup_lo_p64"], rows[0]["speedup_hi_p64"]
    assert f"{lo:.3g}-{hi:.3g}" in text


# --- oversubscription, spread, empty tables ------------------------------------------------


def on_cpus(r, cpus_per_rank):
    """The record as run with every rank seeing these CPUs (binding as train records it)."""
    r["provenance"] = {"cores": len(cpus_per_rank), "binding": {"cpus": [cpus_per_rank] * r["ranks"], "how": "not bound"}}
    return r


def test_points_with_more_threads_than_cores_are_marked_oversubscribed():
    recs = [on_cpus(tpe_rec("blas-serial", 8.0), [0, 1]), on_cpus(tpe_rec("hybrid", 5.0, ranks=2), [0, 1]),
            on_cpus(tpe_rec("hybrid", 4.0, ranks=4), [0, 1]), on_cpus(tpe_rec("hybrid", 4.0, ranks=2, threads=2), [0, 1]),
            tpe_rec("hybrid", 3.0, ranks=8)]  # no provenance: not known
    points, _ = analyze.aggregate(recs)
    over = {(p.ranks, p.threads): p.oversubscribed for p in points}
    assert over == {(1, 1): False, (2, 1): False, (4, 1): True, (2, 2): True, (8, 1): None}
    text = "\n".join(t.render() for t in analyze.build_tables(points, [], perfmodel.DEFAULT))
    assert " 4x1! " in text and " 2x2! " in text and " 2x1 " in text and "oversubscribed" in text


def test_repetitions_spreading_more_than_ten_percent_are_warned_about(capsys, tmp_path):
    recs = [tpe_rec("blas-serial", t, rep=i) for i, t in enumerate((4.0, 5.0, 6.0))]  # 40% of the median
    recs += [tpe_rec("blas-serial", t, rep=i, batch=200) for i, t in enumerate((5.0, 5.2, 5.1))]  # 4%
    points, _ = analyze.aggregate(recs)
    assert [round(p.spread, 2) for p in points] == [0.4, 0.04]
    assert [p.spread_warning for p in points] == [True, False]
    src = tmp_path / "runs.jsonl"
    src.write_text("\n".join(json.dumps(r) for r in recs))
    assert analyze.main([str(src)]) == 0
    out, err = capsys.readouterr()
    assert "40% <" in out and "4%" in out and "4% <" not in out
    assert "WARNING: 1 point(s) whose repetitions' TPEs spread more than 10%" in err and "B=100" in err


def test_a_table_without_rows_says_so_instead_of_a_bare_header():
    t = analyze.Table("x", "Nothing here", [analyze.Column("a", "a", analyze.text)], [])
    assert t.render() == "Nothing here\n  (none)"


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


def weak_records():
    """Ten weak series: five batches per rank, hybrid at 1 and 2 threads per rank, on 2 and 4 ranks
    of a 2-core machine, two repetitions 20% apart."""
    out = []
    for b in (16, 32, 64, 128, 256):
        out += [on_cpus(tpe_rec("blas-serial", 1.0 + 0.2 * rep, batch=b, rep=rep), [0, 1]) for rep in (0, 1)]
        for P in (2, 4):
            for T in (1, 2):
                out += [on_cpus(tpe_rec("hybrid", (0.6 + 0.1 * P * T) * (1 + 0.2 * rep), batch=b * P, ranks=P, threads=T,
                                        rep=rep), [0, 1]) for rep in (0, 1)]
    return out


def test_figures_keep_six_series_a_panel_legends_off_the_data_and_plain_ticks(tmp_path, monkeypatch):
    from pbp_hpc.analyze import figures

    drawn = {}
    monkeypatch.setattr(figures, "save", lambda fig, path, written: drawn.__setitem__(path.name, fig) or written.append(path))
    points, _ = analyze.aggregate(weak_records())
    figures.write_all(points, tmp_path, perfmodel.AlphaBeta(2e-6, 1e-10, "given", (), (), (1e-6, 4e-6), (5e-11, 2e-10)))
    assert {"weak_scaling_net1h_float32.png", "tpe_vs_batch_net1h.png", "model_speedup_net1h.png"} <= set(drawn)
    for name, fig in drawn.items():
        fig.figure.draw_without_rendering()  # the panels may be a subfigure above a caption
        assert "training examples" in fig._suptitle.get_text() and "float32" in fig._suptitle.get_text(), name
        assert fig.legends and all(ax.get_legend() is None for ax in fig.axes), name  # one legend, below the panels
        for ax in fig.axes:
            series = [ln for ln in ax.get_lines() if ln.get_marker() not in (None, "None", "") and len(ln.get_xdata()) > 1]
            colours = {ln.get_color() for ln in series}
            assert len(colours) <= 6, (name, len(colours))
            labels = [t.get_text() for t in ax.get_xticklabels() + ax.get_yticklabels() if t.get_text()]
            assert labels and not any("\\times" in t or "^" in t for t in labels), (name, labels)
    weak = drawn["weak_scaling_net1h_float32.png"]
    assert len(weak.axes) == 4  # a row per threads-per-rank, step time beside efficiency
    hollow = [ln for ax in weak.axes for ln in ax.get_lines() if ln.get_markerfacecolor() == "white"]
    assert hollow  # 4 ranks on 2 cores: oversubscribed, drawn hollow
    bars = [c for ax in weak.axes for c in ax.containers]
    assert bars  # repetitions 20% apart: min-max error bars


def test_json_output_holds_every_table(capsys, tmp_path):
    src = tmp_path / "runs.jsonl"
    src.write_text("\n".join(json.dumps(r) for r in scaling_records()))
    assert analyze.main([str(src), "--json", "--alpha", "2e-6", "--beta", "1e-10"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out["tables"]) == {"performance", "strong_scaling", "weak_scaling", "model", "model_check", "problems"}
    assert out["alpha_beta"]["alpha_s"] == 2e-6 and len(out["assumptions"]) == len(perfmodel.ASSUMPTIONS)
    assert out["tables"]["problems"][0]["error"] == "no CUDA device"


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
    # the fit is stated either way: a determined alpha, or its range where a loaded machine's timings leave it open
    assert "busbw GB/s" in proc.stdout and re.search(r"alpha (=|NOT DETERMINED)", proc.stdout), proc.stdout
    ab = analyze.choose_alpha_beta([], str(out))
    assert ab.alpha_s >= 0 and ab.beta_s_per_byte >= 0 and len(json.loads(out.read_text())["samples"]) == 3


# --- time to accuracy ----------------------------------------------------------------------

SGD = {"optimizer": {"name": "sgd", "momentum": 0.9, "weight_decay": 0.0},
       "schedule": {"name": "constant", "warmup_epochs": 0.0, "scale_with_batch": False, "base_batch": 256,
                    "step_epochs": 10.0, "gamma": 0.1, "min_lr": 0.0}}
NESTEROV = {"optimizer": {"name": "nesterov", "momentum": 0.9, "weight_decay": 0.0},
            "schedule": {**SGD["schedule"], "name": "cosine", "warmup_epochs": 1.0, "scale_with_batch": True}}


def tta_rec(batch, ranks=1, variant=SGD, epochs_to=2.0, tpe=1.0, reached=True, target=0.95, rep=0, point=0, lr=0.1,
            warmup=1, passes=10):
    """A run that trained to a target: `epochs_to` epochs at `tpe` s each (reached), or 4 epochs that fell short.

    Its curve climbs linearly from 0.5 to the target (or to 0.9 when it falls short) over `passes` passes."""
    spent = epochs_to if reached else 4.0
    n_full = int(spent)
    times = [tpe] * n_full + ([tpe * (spent - n_full)] if spent > n_full else [])
    r = rec("hybrid" if ranks > 1 else "blas-serial", ranks=ranks, batch=batch, times=tuple(times), warmup=warmup,
            rep=rep, point=point, partial=[False] * n_full + [True] * (len(times) - n_full))
    r["config"].update(variant)
    r["config"]["train"].update({"learning_rate": lr, "target_accuracy": target})
    top = target if reached else 0.9
    steps_per_epoch = math.ceil(N / batch)
    curve = [{"epoch": int(spent * k / passes), "step": round(spent * steps_per_epoch * k / passes),
              "epochs": spent * k / passes, "time_s": spent * tpe * k / passes, "wall_s": spent * tpe * k / passes * 1.1,
              "val_accuracy": 0.5 + (top - 0.5) * k / passes, "loss": 0.1} for k in range(1, passes + 1)]
    r.update({"evaluations": curve, "train_time_s": spent * tpe, "eval_time_s": 0.1 * passes,
              "best_val_accuracy": top, "ended_early": "target reached" if reached else None,
              "target": {"accuracy": target, "reached": reached, "val_accuracy": top if reached else None,
                         "time_s": spent * tpe if reached else None, "eval_time_s": 0.1 * passes,
                         "wall_s": spent * tpe * 1.1 if reached else None, "epochs": spent if reached else None,
                         "steps": curve[-1]["step"] if reached else None}})
    return r


def tta_records():
    """net1h, B = 16..4096, 1 and 2 ranks, two optimizers: more epochs but shorter epochs as B grows.

    sgd does not reach the target at B >= 2048; nesterov needs half sgd's epochs."""
    out = []
    for v, variant in enumerate((SGD, NESTEROV)):
        for i, B in enumerate((16, 32, 64, 128, 256, 512, 1024, 2048, 4096)):
            for P in (1, 2):
                epochs = (1 + B / 256) / (2 if variant is NESTEROV else 1)
                tpe = (0.5 + 16 / B) / (1.6 if P == 2 else 1)
                out.append(tta_rec(B, P, variant, epochs, tpe, reached=not (variant is SGD and B >= 2048),
                                   point=100 * v + 10 * i + P))
    return out


def test_time_to_target_rows_are_the_medians_of_the_runs_that_reached_it():
    recs = [tta_rec(64, epochs_to=2.5, tpe=2.0, rep=0), tta_rec(64, epochs_to=3.5, tpe=2.0, rep=1),
            tta_rec(64, epochs_to=4.5, tpe=2.0, rep=2), tta_rec(128, reached=False),
            tta_rec(256, epochs_to=1.0, tpe=1.0), tta_rec(256, epochs_to=2.0, tpe=1.0, reached=False, rep=1),
            rec("blas-serial", batch=64)]  # no target: not in these rows
    rows = analyze.time_to_target_rows(recs)
    assert [(r["batch_size"], r["reps"], r["reached"]) for r in rows] == [(64, 3, 3), (128, 1, 0), (256, 2, 1)]
    b64, b128, b256 = rows
    assert (b64["time_to_target_s"], b64["time_min_s"], b64["time_max_s"]) == (7.0, 5.0, 9.0)  # 3.5 epochs x 2 s
    assert (b64["epochs_to_target"], b64["eval_time_s"], b64["status"]) == (3.5, 1.0, "reached")
    assert b64["tpe_s"] == 2.0 and b64["tpe_from"] == "timed epochs"  # the full epoch after the warm-up
    assert b64["variant"] == "sgd, constant, lr 0.1" and b64["target"] == 0.95
    assert b128["time_to_target_s"] is None and b128["status"] == "not reached (best 90.00%)"
    assert b256["status"] == "1 of 2 reached" and b256["time_to_target_s"] == 1.0
    # B=256 reached in its first (warm-up) epoch: no timed epoch, so TPE = time / epochs to target
    assert analyze.effective_tpe(recs[4]) == (1.0, "target")
    assert [r["best"] for r in rows] == [True, False, False]  # the fastest where every run reached it
    assert analyze.best_line(rows).startswith("fastest to 95%: B=64, blas-serial 1x1, sgd, constant, lr 0.1: 7 s")


def test_the_variant_names_optimizer_schedule_and_rate_and_old_records_read_as_the_defaults():
    assert analyze.variant_of(tta_rec(64, variant=NESTEROV, lr=0.05)) == "nesterov 0.9, cosine +1ep warm-up, lr 0.05xB/256"
    step = {"optimizer": {"name": "momentum", "momentum": 0.8, "weight_decay": 1e-4},
            "schedule": {"name": "step", "step_epochs": 5, "gamma": 0.5}}
    assert analyze.variant_of(tta_rec(64, variant=step)) == "momentum 0.8 wd 0.0001, step x0.5 every 5ep, lr 0.1"
    assert analyze.variant_of(rec("blas-serial")) == "sgd, constant, lr ?"  # a record from before the sections


def test_the_table_says_when_no_run_reached_the_target_and_is_absent_without_targets():
    missed = [tta_rec(64, reached=False), tta_rec(256, reached=False, point=1)]
    [table] = [t for t in analyze.build_tables([], [], perfmodel.DEFAULT, records=missed) if t.name == "time_to_accuracy"]
    text = table.render()
    assert text.count("not reached") == 2 and "no run reached 95%; closest: B=64" in text
    plain = [rec("blas-serial")]
    assert all(t.name != "time_to_accuracy" for t in analyze.build_tables(*analyze.aggregate(plain), perfmodel.DEFAULT,
                                                                            records=plain))


def test_a_run_that_reached_its_target_in_the_warmup_is_not_a_problem_row():
    early = tta_rec(16, epochs_to=0.5, tpe=2.0)  # stopped mid-way through its warm-up epoch
    points, problems = analyze.aggregate([early])
    assert points == [] and problems == []
    [row] = analyze.time_to_target_rows([early])
    assert (row["time_to_target_s"], row["tpe_s"], row["tpe_from"]) == (1.0, 2.0, "time / epochs to target")


def test_cli_prints_time_to_accuracy_beside_performance_and_draws_its_figures(tmp_path, capsys):
    src = tmp_path / "tta.jsonl"
    src.write_text("\n".join(json.dumps(r) for r in tta_records()))
    fig = tmp_path / "fig"
    assert analyze.main([str(src), "--plots", str(fig), "--csv", str(tmp_path / "csv")]) == 0
    out = capsys.readouterr().out
    perf, tta = out.index("Performance: net1h"), out.index("Time to 95% validation accuracy: net1h (float32, 1000 training")
    assert perf < tta and "0 not ok" in out
    assert "Runs not in the tables above" not in out  # every run was ok: no empty table
    assert "fastest to 95%: B=" in out and "nesterov 0.9, cosine +1ep warm-up, lr 0.1xB/256" in out
    assert out.count("not reached") >= 4  # sgd at B = 2048 and 4096, on 1 and 2 ranks
    for stem in ("accuracy_vs_time", "time_to_target_vs_batch", "epochs_tpe_vs_batch"):
        png = fig / f"{stem}_net1h_to95.png"
        assert png.is_file() and png.stat().st_size > 10_000, png
    assert (tmp_path / "csv" / "time_to_accuracy.csv").stat().st_size > 0
    assert analyze.main([str(src), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["tables"]["time_to_accuracy"]
    assert len(rows) == 36 and sum(r["best"] for r in rows) == 1


def test_time_to_accuracy_from_an_hdf5_file_of_a_real_run(tmp_path):
    """End to end: train to a target on synthetic data, record it as a sweep would, analyze the file."""
    from mpi4py import MPI

    from pbp_hpc import config, results, train

    # the report's activation and loss (not the defaults', which reach the target in the first 10 steps)
    cfg = config.from_dict({"data": {"name": "synthetic", "n_train": 1200, "n_test": 200},
                            "model": {"layers": [784, 16, 10], "activation": "sigmoid", "loss": "mse", "init": "glorot_uniform"},
                            "schedule": {"name": "constant", "warmup_epochs": 0, "scale_with_batch": "none"},
                            "train": {"epochs": 3, "batch_size": 32, "learning_rate": 0.5, "eval_every_steps": 10,
                                      "target_accuracy": 0.5, "progress": False},
                            "optimizer": {"name": "nesterov"}, "parallel": {"threads_per_rank": 1}}, "test")
    run = train.run(cfg, MPI.COMM_SELF, quiet=True)
    assert run["target"]["reached"] and len(run["evaluations"]) >= 2
    path = tmp_path / "tta.h5"
    results.append_run(path, {**run, "sweep": "tta", "point": 0, "repetition": 0, "implementation": "blas-serial",
                              "network": "tiny", "batch_size": 32})
    [back] = results.read_runs(path)
    assert back["evaluations"] == run["evaluations"] and back["target"] == run["target"]
    proc = subprocess.run([sys.executable, "-m", "pbp_hpc.analyze", str(path), "--plots", str(tmp_path / "fig")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "Time to 50% validation accuracy: tiny (float32, 1000 training examples)" in proc.stdout
    assert "fastest to 50%: B=32, blas-serial 1x1, nesterov 0.9, constant, lr 0.5" in proc.stdout
    assert (tmp_path / "fig" / "accuracy_vs_time_tiny_to50.png").is_file()
