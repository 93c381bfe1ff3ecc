"""The network measured by the study (pbp_hpc.parallel.netprobe via pbp_hpc.sweep.network): a
sweep with multi-rank points stores Allreduce times at several sizes with every record, analyze
fits alpha and beta from them alone, and `trace: true` leaves a timeline per point."""

from __future__ import annotations

import json

from test_sweep import sweep_cli, write

from pbp_hpc import results
from pbp_hpc.analyze.models import choose_alpha_beta, probe_samples


def test_a_sweep_measures_the_network_and_analyze_fits_it(tmp_path):
    path = write(tmp_path, axes={"implementation": ["hybrid"], "ranks": [2]}, trace=True, warmup_epochs=0, set={"train.epochs": 1})
    res = tmp_path / "r.h5"
    p = sweep_cli(path, "--results", res)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "network: measured on 2 ranks, 1 node(s)" in p.stdout
    [run] = results.read_runs(res)
    m = run["interconnect"]
    assert m["ranks"] == 2 and len({s["bytes"] for s in m["samples"]}) >= 8 and m["latency"]["same_node_s"] > 0
    samples, level, over = probe_samples([run, run])  # the same measurement twice counts once
    assert len(samples) == len(m["samples"]) and level == "inside one node" and over == 0
    ab = choose_alpha_beta([], records=[run])
    assert ab.source.startswith("measured by the sweep") and ab.alpha_s > 0 and ab.beta_s_per_byte > 0
    trace = json.loads((tmp_path / "r.traces" / f"{run['key']}.json").read_text())
    assert {e["pid"] for e in trace["traceEvents"]} == {0, 1} and run["trace_path"].endswith(f"{run['key']}.json")


def test_no_measurement_when_off_or_without_multi_rank_points(tmp_path):
    from types import SimpleNamespace

    from pbp_hpc.sweep import runner

    said = []
    multi = [(SimpleNamespace(index=0, ranks=2, threads=1), 0)]
    off = SimpleNamespace(spec=SimpleNamespace(measure_network=False, name="s"))
    assert runner._measure_network(off, None, 2, multi, {}, said.append) is None  # noqa: SLF001
    single = sweep_expand(tmp_path)
    assert runner._measure_network(single, None, 2, [(p, 0) for p in single.points], {}, said.append) is None  # noqa: SLF001
    assert said == []


def sweep_expand(tmp_path):
    from pbp_hpc import sweep

    return sweep.expand(write(tmp_path, axes={"implementation": ["blas-serial"], "ranks": [1]}))
