"""The benchmark runs end to end and reports every column; the hybrid-split lookup. Correctness only:
no test here asserts a time (the machine may be shared)."""

import importlib.util
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from mpi4py import MPI

from pbp_hpc import bench
from pbp_hpc import config
from pbp_hpc.data import datasets
from pbp_hpc.parallel import hybrid
from pbp_hpc import train
from pbp_hpc.parallel.provenance import cores_available

HAS_JAX = importlib.util.find_spec("jax") is not None
HAS_TORCH = importlib.util.find_spec("torch") is not None


def _run_smoke(out, *args, env=None):
    proc = subprocess.run([sys.executable, "-m", "pbp_hpc.bench", "--smoke", "--json", str(out), *args],
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout, json.loads(out.read_text())


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    return _run_smoke(tmp_path_factory.mktemp("bench") / "smoke.json")


def _table(stdout):
    """The table's header and its rows, split into cells (`as typed` as one cell)."""
    lines = stdout.splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("net "))
    rows = [line.replace(bench.TYPED, bench.TYPED.replace(" ", "_")).split()
            for line in lines[head + 2 :] if line.startswith("tiny")]
    return lines[head], rows


def test_smoke_table_has_every_column_and_every_split(smoke):
    stdout, _ = smoke
    head, rows = _table(stdout)
    assert head.split() == " ".join(bench.COLUMNS).split()
    assert "jax s" in bench.COLUMNS and "/jax" in bench.COLUMNS and "torch s" in bench.COLUMNS
    splits = [f"{r}x{t}" for r, t in bench.splits_of(cores_available())]
    cores = cores_available()
    shared = [f"{cores}x1/shared_batch"] if cores > 1 else []  # every rank on the batch together
    grids = ["2x1/tensor2", "2x1/pipeline2(M8)"] if cores > 1 else []  # the model in parts beside data 2
    # then the rows of `mpiexec ... pbp_hpc.train`: as typed, and right after it tuned by hand
    assert [row[2] for row in rows] == splits + shared + grids + ["as_typed", "tuned"]
    for row in rows:  # every measured column has a value; best is '*' or empty
        assert len(row) in (len(bench.COLUMNS) - 1, len(bench.COLUMNS))
        for column in ("TPE s", "GFLOP/s", "peak%", "in%", "speedup") + (() if row[2] in grids else ("GEMM s",)):
            assert row[bench.COLUMNS.index(column)] != "n/a", column
        if row[2] in grids:  # the bytes a rank sends per step, as train counts them
            assert float(row[bench.COLUMNS.index("KB/step")]) > 0
        assert (row[bench.COLUMNS.index("jax s")] != "n/a") == HAS_JAX, "the JAX peer runs where JAX imports"
        assert (row[bench.COLUMNS.index("/jax")] != "n/a") == HAS_JAX
        assert (row[bench.COLUMNS.index("torch s")] != "n/a") == HAS_TORCH
    for row in rows[:-2]:  # memory is measured with the table's reducer: a reducer's own row (x/name) has none
        assert (row[bench.COLUMNS.index("RSS MB")] != "n/a") == ("/" not in row[2])
    for typed in rows[-2:]:  # no memory columns, never the best split
        assert typed[bench.COLUMNS.index("RSS MB")] == "n/a" and typed[-1] != "*"
    assert sum(row[-1] == "*" for row in rows) == (cores_available() > 1)


def test_smoke_header_shows_the_peers_and_the_typed_command(smoke):
    stdout, _ = smoke
    jax_line = re.search(r"JAX: (.*)$", stdout, re.M)
    assert jax_line, "the header names the JAX peer"
    if HAS_JAX:
        assert re.match(r"\d+\.\d+", jax_line.group(1)) and "1 thread on cores" in jax_line.group(1)
    else:
        assert "not importable" in jax_line.group(1)
    typed = re.search(r"^as typed, tiny batch 64: (.*)$", stdout, re.M)
    assert typed, stdout
    cmd = typed.group(1)
    assert cmd.startswith(f"mpiexec -n {cores_available()} python -m pbp_hpc.train --set")
    assert "--json" in cmd and "train.epochs=2" in cmd  # reps + 1: the first epoch is not timed
    for tuning in ("-bind-to", "parallel.", "threads", "skip_zero_inputs"):
        assert tuning not in cmd, tuning


def test_jax_not_importable_is_n_a_with_the_reason_in_the_header(tmp_path):
    """A `jax` that fails to import (as where it is not installed): the run ends normally, every
    jax cell is n/a and the header says why."""
    fake = tmp_path / "site" / "jax"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('no jax here (test)')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path / "site"), os.environ.get("PYTHONPATH", "")])}
    stdout, doc = _run_smoke(tmp_path / "nojax.json", "--no-torch", "--no-typed", env=env)
    assert re.search(r"JAX: n/a, JAX is not importable: no jax here \(test\)", stdout), stdout
    _, rows = _table(stdout)
    assert rows and all(row[bench.COLUMNS.index(c)] == "n/a" for row in rows for c in ("jax s", "/jax"))
    assert all(row[bench.COLUMNS.index("TPE s")] != "n/a" for row in rows)
    assert all(r["jax"] is None and r["jax_ratio"] is None for r in doc["rows"])


@pytest.mark.parametrize("dtype, tol", [("float64", 1e-12), ("float32", 1e-5)])
def test_the_jax_peer_trains_what_train_trains(dtype, tol):
    """The JAX peer's network, loss, update and data order are pbp_hpc's: after an epoch and a few
    steps of the next (a short last batch included) its parameters are train's to rounding."""
    jax = pytest.importorskip("jax")
    from pbp_hpc.bench.jax_peer import JaxRun

    spec = bench.make_spec(bench.parse_args(["--smoke"]), 1)
    overrides = spec.overrides([784, 16, 10], 64, "blocking") + [f"model.dtype={dtype}", "data.n_train=300"]
    run = JaxRun(jax, overrides)
    run.epoch(0, None, time.perf_counter)
    run.epoch(1, 2, time.perf_counter)
    cfg = config.load(None, overrides)
    st = train.State(cfg, MPI.COMM_SELF, np, datasets.load(cfg, 1, None))
    ours, n = bench.OurRun(st), len(st.data.train)
    assert n % 64, "the epoch ends with a short batch"
    for epoch, steps in ((0, -(-n // 64)), (1, 2)):
        order = train.epoch_order(bench.SEED, epoch, n, True)
        for s in range(steps):
            ours.step(order[s * 64 : (s + 1) * 64])
    assert run.flat_params().dtype == st.theta.dtype
    np.testing.assert_allclose(run.flat_params(), st.theta, rtol=0, atol=tol)
    st.close()


@pytest.mark.parametrize("optimizer", ["nesterov", "momentum"])
def test_the_jax_peer_trains_the_defaults_as_train_does(optimizer):
    """The race's "default" mode (relu, cross-entropy, Nesterov or heavy ball, the cosine schedule
    with warm-up), with weight decay and label smoothing on: the JAX peer's parameters after an epoch
    and two steps are train's to rounding in float64, the rate per step from the same schedule."""
    jax = pytest.importorskip("jax")
    from pbp_hpc.bench.jax_peer import JaxRun
    from pbp_hpc.engine.schedules import Schedule

    overrides = ["model.layers=[784, 16, 10]", "train.batch_size=64", "model.dtype=float64", "data.name=synthetic",
                 "data.n_train=300", "data.n_test=10", f"optimizer.name={optimizer}", "optimizer.weight_decay=0.001",
                 "model.label_smoothing=0.1", "train.progress=false", "train.noise_scale_every=0"]
    run = JaxRun(jax, overrides)
    run.epoch(0, None, time.perf_counter)
    run.epoch(1, 2, time.perf_counter)
    cfg = config.load(None, overrides)
    assert (cfg.model.activation, cfg.model.loss, cfg.schedule.name) == ("relu", "cross_entropy", "cosine")
    st = train.State(cfg, MPI.COMM_SELF, np, datasets.load(cfg, 1, None))
    n = len(st.data.train)
    per_epoch = -(-n // 64)
    schedule = Schedule(cfg, per_epoch)
    for epoch, steps in ((0, per_epoch), (1, 2)):
        order = train.epoch_order(bench.SEED, epoch, n, True)
        for s in range(steps):
            st.strategy.step(order[s * 64 : (s + 1) * 64], schedule(epoch * per_epoch + s), False, (0, 0, -1))
    np.testing.assert_allclose(run.flat_params(), st.theta, rtol=0, atol=1e-12)
    st.close()


def test_smoke_header_reports_load_blas_and_threads(smoke):
    stdout, _ = smoke
    assert "load average at start:" in stdout
    assert re.search(r"^BLAS: \w+", stdout, re.M), "the header names the BLAS library in use"
    assert "OPENBLAS_CORETYPE" in stdout
    assert "SGEMM" in stdout and "goals:" in stdout


def test_smoke_json_has_the_numbers_behind_the_table(smoke):
    _, doc = smoke
    rows = [r for r in doc["rows"] if r["kind"] == "ours"]
    assert rows and all(r["tpe"] > 0 and (r["grid"] or r["gemm"] > 0) for r in rows)
    if cores_available() > 1:  # tensor 2 sends the B x 10 partial output sums, not the gradient (issue 27)
        tensor = next(r for r in rows if r["grid"] == "tensor2")
        assert 0 < tensor["bytes_per_step"]["activations"] <= 64 * 10 * 4 and not tensor["bytes_per_step"]["gradients"]
    main = [r for r in rows if "/" not in r["split"]]  # the table's reducer: memory measured
    assert main and all(r["budget_mb"] > 0 and r["heap"] is not None for r in main)
    assert all(("jax" in r and "jax_ratio" in r and "torch" in r) for r in doc["rows"])
    typed = [r for r in doc["rows"] if r["kind"] == "typed"]
    assert [(r["net"], r["batch"], r["split"]) for r in typed] == [("tiny", 64, bench.TYPED), ("tiny", 64, bench.TUNED)]
    assert all(r["tpe"] > 0 and r["ranks"] == cores_available() and r["error"] is None for r in typed)
    tuned = next(r for r in doc["records"] if r["type"] == "tuned")
    assert "-bind-to core:1" in tuned["command"] and "parallel.reducer=shm" in tuned["command"]

    rec = next(r for r in doc["records"] if r["type"] == "typed")
    assert len(rec["times"]) == doc["spec"]["reps"]  # the epochs after the first
    if cores_available() > 1:
        multi = [r for r in rows if r["ranks"] > 1]
        assert multi and all(r["comm_frac"] is not None and r["speedup"] is not None for r in multi)


def _state(layers, batch, comm):
    cfg = config.load(None, [f"model.layers={layers}", f"train.batch_size={batch}", "data.name=synthetic",
                             "data.n_train=90", "data.n_test=10", "train.progress=false"])
    return train.State(cfg, comm, np, datasets.load(cfg, comm.size, None))


@pytest.mark.parametrize("layers", [[784, 12, 10], [784, 12, 8, 10]])
def test_gemm_replay_records_every_matmul_of_a_step(layers):
    """Forward: one GEMM per layer; backward: weights and bias per layer, input gradient but the first."""
    st = _state(layers, 32, MPI.COMM_SELF)
    replay = bench.GemmReplay(bench.OurRun(st), 32, len(st.data.train))
    L = len(layers) - 1
    assert len(replay.full) == L + 2 * L + (L - 1)
    assert replay.n_full == len(st.data.train) // 32 and len(replay.last) == len(replay.full)
    theta = st.theta.copy()
    replay.epoch(replay.n_full + 1, time.perf_counter)
    np.testing.assert_array_equal(st.theta, theta)  # the fused update's GEMMs leave the parameters as they were


def test_dataset_bytes_counts_each_array_once():
    cfg = config.load(None, ["data.name=synthetic", "data.n_train=60", "data.n_test=10"])
    data = datasets.load(cfg, 1, None)
    assert bench.dataset_bytes(data) == sum(a.nbytes for s in (data.train, data.val, data.test) for a in (s.protos, s.noise))


def _splits_file(tmp_path, entries, cores=2):
    doc = {"machines": {f"{cores} cores": {"cores": cores, "networks": {
        "784-1024-10": {"name": "Net-1h", "batches": {str(b): {"ranks": r, "threads": t} for b, (r, t) in entries.items()}}}}}}
    path = tmp_path / "splits.json"
    path.write_text(json.dumps(doc))
    return path


def test_best_split_reads_the_measured_split(tmp_path):
    path = _splits_file(tmp_path, {128: (2, 1), 1024: (1, 2)})
    assert hybrid.best_split("Net-1h", 128, 2, path) == (2, 1)
    assert hybrid.best_split([784, 1024, 10], 1024, 2, path) == (1, 2)
    assert hybrid.best_split("784-1024-10", 1024, 2, path) == (1, 2)


def test_best_split_borrows_the_nearest_batch_within_a_factor_of_two(tmp_path):
    path = _splits_file(tmp_path, {128: (2, 1), 1024: (1, 2)})
    assert hybrid.best_split("Net-1h", 200, 2, path) == (2, 1)
    assert hybrid.best_split("Net-1h", 2048, 2, path) == (1, 2)
    assert hybrid.best_split("Net-1h", 4096, 2, path) == (2, 1)  # 4x away: unmeasured, so the fallback


def test_best_split_falls_back_to_one_rank_per_core(tmp_path):
    path = _splits_file(tmp_path, {128: (1, 2)})
    assert hybrid.best_split("Net-2h", 128, 2, path) == (2, 1)  # network not measured
    assert hybrid.best_split("Net-1h", 128, 4, path) == (4, 1)  # another core count
    assert hybrid.best_split("Net-1h", 128, 2, tmp_path / "missing.json") == (2, 1)
    (tmp_path / "bad.json").write_text("{not json")
    assert hybrid.best_split("Net-1h", 128, 2, tmp_path / "bad.json") == (2, 1)


def test_write_splits_merges_into_the_file_hybrid_reads(tmp_path):
    path = _splits_file(tmp_path, {128: (1, 2)})
    rows = [{"net": "Net-1h", "layers": [784, 1024, 10], "batch": 1024, "split": s, "ranks": r, "threads": t,
             "tpe": tpe, "best": best} for s, r, t, tpe, best in (("1x2", 1, 2, 2.0, False), ("2x1", 2, 1, 1.0, True))]
    bench.write_splits(path, rows, 2, "host")
    assert hybrid.best_split("Net-1h", 1024, 2, path) == (2, 1)
    assert hybrid.best_split("Net-1h", 128, 2, path) == (1, 2)  # kept


def _timed_splits_file(tmp_path, cores, batches, layers="784-1024-10"):
    """batches: {B: (best ranks, best threads, {"RxT": seconds, ...})}, as bench.write_splits writes them."""
    doc = {"machines": {f"{cores} cores": {"cores": cores, "networks": {layers: {"batches": {
        str(b): {"ranks": r, "threads": t, "tpe_s": tpe} for b, (r, t, tpe) in batches.items()}}}}}}
    path = tmp_path / f"splits{cores}.json"
    path.write_text(json.dumps(doc))
    return path


def test_best_split_with_min_ranks_takes_the_fastest_timed_split_with_that_many_ranks(tmp_path):
    two = _timed_splits_file(tmp_path, 2, {128: (1, 2, {"1x2": 1.0, "2x1": 1.5})})
    assert hybrid.best_split("Net-1h", 128, 2, two) == (1, 2)  # min_ranks=1: the measured best, as before
    assert hybrid.best_split("Net-1h", 128, 2, two, min_ranks=2) == (2, 1)
    four = _timed_splits_file(tmp_path, 4, {1024: (1, 4, {"1x4": 1.0, "2x2": 1.2, "4x1": 1.1}),
                                            128: (2, 2, {"1x4": 3.0, "2x2": 2.0, "4x1": 2.5})})
    assert hybrid.best_split("Net-1h", 1024, 4, four, min_ranks=2) == (4, 1)  # 4x1 beats 2x2
    assert hybrid.best_split("Net-1h", 1024, 4, four, min_ranks=3) == (4, 1)
    assert hybrid.best_split("Net-1h", 128, 4, four, min_ranks=2) == (2, 2)  # the best already has 2 ranks
    assert hybrid.best_split("Net-1h", 128, 4, four, min_ranks=4) == (4, 1)


def test_best_split_with_min_ranks_falls_back_to_one_rank_per_core(tmp_path):
    untimed = _splits_file(tmp_path, {128: (1, 2)})  # no tpe_s: nothing else to choose from
    assert hybrid.best_split("Net-1h", 128, 2, untimed, min_ranks=2) == (2, 1)
    only_one_rank = _timed_splits_file(tmp_path, 2, {128: (1, 2, {"1x2": 1.0})})
    assert hybrid.best_split("Net-1h", 128, 2, only_one_rank, min_ranks=2) == (2, 1)
    assert hybrid.best_split("Net-1h", 128, 8, only_one_rank, min_ranks=2) == (8, 1)  # core count not measured
    assert hybrid.best_split("Net-1h", 128, 1, only_one_rank, min_ranks=2) == (2, 1)  # 1 core: 2 ranks, oversubscribed


def test_choose_split_says_where_the_split_came_from(tmp_path, monkeypatch):
    path = _timed_splits_file(tmp_path, 2, {128: (1, 2, {"1x2": 1.0, "2x1": 1.5}), 1024: (2, 1, {"1x2": 2.0, "2x1": 1.0})})
    monkeypatch.setenv("PBP_HPC_HYBRID_SPLITS", str(path))  # what the sweep's child processes see too
    assert str(hybrid.choose_split("Net-1h", 1024, 2, min_ranks=2)) == f"2x1 (best measured split, {path})"
    assert str(hybrid.choose_split("Net-1h", 2048, 2, min_ranks=2)) == f"2x1 (best measured split for B=1024, {path})"
    s = hybrid.choose_split("Net-1h", 128, 2, min_ranks=2)
    assert (s.ranks, s.threads) == (2, 1)
    assert s.origin == f"fastest measured split with at least 2 ranks, {path}; 1x2 was faster"
    assert str(hybrid.choose_split("Net-1h", 128, 4, min_ranks=2)) == \
        f"4x1 (no measurement for 4 cores in {path}: one rank per core)"
    assert hybrid.choose_split("Net-2h", 128, 2).origin.endswith("one rank per core")
    missing = hybrid.choose_split("Net-1h", 128, 2, path=tmp_path / "none.json")
    assert (missing.ranks, missing.threads) == (2, 1) and "no readable splits file" in missing.origin
    monkeypatch.delenv("PBP_HPC_HYBRID_SPLITS")
    assert hybrid.shown_path(hybrid.splits_path()) == "pbp_hpc/parallel/hybrid_splits.json"  # the repository's, by default


@pytest.mark.parametrize("version, flavour", [
    ("HYDRA build details:\n    Version:                                 4.2.0\n", hybrid.MPICH),
    ("mpiexec (OpenRTE) 4.1.2\n\nReport bugs to http://www.open-mpi.org/community/help/\n", hybrid.OPENMPI),
    ("mpiexec (Open MPI) 5.0.3\n\nReport bugs to https://www.open-mpi.org/community/help/\n", hybrid.OPENMPI),
    ("prterun (PRRTE) 3.0.5\n", hybrid.OPENMPI),
    ("Intel(R) MPI Library for Linux* OS, Version 2021.10 Build 20230619\n", None),
    ("srun: unrecognized option\n", None),
    ("", None),
])
def test_the_mpi_flavour_is_read_from_mpiexec_version(version, flavour):
    assert hybrid.flavour_of(version) == flavour


def test_mpiexec_args_bind_each_rank_to_its_own_threads_cores():
    assert hybrid.mpiexec_args(2, 1) == ["-n", "2", "-bind-to", "core:1"]  # MPICH's Hydra, the default
    assert hybrid.mpiexec_args(4, 2, hybrid.MPICH) == ["-n", "4", "-bind-to", "core:2"]
    assert hybrid.mpiexec_args(4, 2, hybrid.OPENMPI) == ["-n", "4", "--bind-to", "core", "--map-by", "slot:PE=2"]
    assert hybrid.mpiexec_args(4, 2, None) == ["-n", "4"]  # unknown launcher: no binding flags
    with pytest.raises(ValueError):
        hybrid.mpiexec_args(2, 1, "lam")


def test_the_mpiexec_beside_python_is_recognised_as_the_mpi_that_mpi4py_uses():
    mpiexec = Path(sys.executable).with_name("mpiexec")
    lib = MPI.Get_library_version()
    expected = hybrid.MPICH if "MPICH" in lib else hybrid.OPENMPI if "Open MPI" in lib else "other"
    if not mpiexec.exists() or expected == "other":
        pytest.skip(f"no mpiexec beside {sys.executable}, or an MPI other than MPICH/Open MPI: {lib.splitlines()[0]}")
    assert hybrid.mpi_flavour(str(mpiexec)) == expected
    assert hybrid.mpi_flavour("/nonexistent/mpiexec") is None


def test_smoke_goal_compares_as_typed_with_its_tuned_twin_side_by_side(smoke):
    stdout, _ = smoke
    assert re.search(r"^  (ok  |MISS) tiny b64 as typed / tuned = \d+\.\d{3} \(<= 1\.100\)$", stdout, re.M), stdout
