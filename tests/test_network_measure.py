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


def test_no_measurement_when_off(tmp_path):
    path = write(tmp_path, axes={"implementation": ["hybrid"], "ranks": [2]}, measure_network=False,
                 warmup_epochs=0, set={"train.epochs": 1})
    p = sweep_cli(path, "--results", tmp_path / "r.h5")
    assert p.returncode == 0 and "network:" not in p.stdout, p.stdout + p.stderr
    assert all(r["interconnect"] is None for r in results.read_runs(tmp_path / "r.h5"))
