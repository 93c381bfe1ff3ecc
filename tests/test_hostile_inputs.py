"""Hostile or unlucky inputs fail cleanly, at a cost bounded by their size and by stated limits.

Configs (aliases, duplicate keys, size, depth), IDX files (headers that lie, streams that end
early), checkpoints (every field), labels against the output layer, NaN in --json, and the
sweep/analyze/results corners. Where the cost itself is the bug, the input is refused in a child
process under resource.setrlimit (address space and CPU time) and the wall time is asserted.
"""

from __future__ import annotations

import gzip
import json
import math
import resource
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pbp_hpc import checkpoint, config
from pbp_hpc.checkpoint import CheckpointError
from pbp_hpc.data.idx import read_idx, write_idx
from pbp_hpc.errors import ConfigError, DataError

ROOT = Path(__file__).resolve().parents[1]
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                        HealthCheck.function_scoped_fixture])
MEM_LIMIT = 1 << 30  # bytes of address space for the child that refuses the input
CPU_LIMIT = 20  # seconds of CPU for that child
WALL_LIMIT = 15.0  # seconds, asserted


def bounded(code: str) -> tuple[subprocess.CompletedProcess, float]:
    """Run `code` in a child Python under MEM_LIMIT and CPU_LIMIT; (the process, its wall seconds)."""
    def limits() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (MEM_LIMIT, MEM_LIMIT))
        resource.setrlimit(resource.RLIMIT_CPU, (CPU_LIMIT, CPU_LIMIT))

    t = time.monotonic()
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT,
                       preexec_fn=limits, env={"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1",
                                               "PATH": "/usr/bin:/bin"})
    return p, time.monotonic() - t


# --- 1. configs ----------------------------------------------------------------------------------

LAUGHS = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 10)}]\n" for i in range(8)) + "train: {epochs: *i}\n"


def test_a_billion_laughs_config_is_refused_under_a_memory_and_time_limit(tmp_path):
    path = tmp_path / "laughs.yaml"
    path.write_text(LAUGHS)
    assert len(LAUGHS) < 1000  # a few hundred bytes standing for 10^9 strings
    p, seconds = bounded(f"from pbp_hpc import config\n"
                         f"try:\n    config.load({str(path)!r})\nexcept config.ConfigError as e:\n    print('REFUSED', e)")
    assert p.returncode == 0 and "REFUSED" in p.stdout and "not allowed in a configuration" in p.stdout, p.stdout + p.stderr
    assert seconds < WALL_LIMIT


def test_a_large_config_file_is_refused_before_it_is_parsed(tmp_path):
    path = tmp_path / "big.yaml"
    path.write_text("train:\n  epochs: 2\n" + "# padding\n" * 300_000)  # 3 MB
    t = time.monotonic()
    with pytest.raises(ConfigError, match="larger than"):
        config.load(path)
    assert time.monotonic() - t < 1.0


def test_deep_nesting_is_refused_with_the_limit_named(tmp_path):
    path = tmp_path / "deep.yaml"
    path.write_text("a: " + "[" * 5000 + "]" * 5000)
    with pytest.raises(ConfigError, match="nested"):
        config.load(path)


def test_a_duplicate_key_is_refused_naming_the_key_and_both_lines(tmp_path):
    path = tmp_path / "dup.yaml"
    path.write_text("train:\n  epochs: 2\n  batch_size: 8\n  epochs: 5\n")
    with pytest.raises(ConfigError, match=r"key 'epochs' is given twice in one mapping, on line 2 and on line 4"):
        config.load(path)


def test_a_duplicate_key_in_a_set_value_is_refused():
    with pytest.raises(ConfigError, match="given twice"):
        config.load(None, ["train={epochs: 1, epochs: 2}"])


names = st.text(alphabet="abcdefgh", min_size=1, max_size=4)
yaml_scalars = st.one_of(st.integers(-5, 5).map(str), st.sampled_from(["x", "1.5", "true", "null", "'q'"]))


@st.composite
def yaml_with_alias(draw):
    """A YAML mapping in which some value carries an anchor and some later value refers to it."""
    anchor = draw(names)
    keys = draw(st.lists(names, min_size=2, max_size=6, unique=True))
    lines = [f"{keys[0]}: &{anchor} " + draw(st.one_of(yaml_scalars, st.lists(yaml_scalars, max_size=3).map(
        lambda xs: "[" + ", ".join(xs) + "]")))]
    for k in keys[1:-1]:
        lines.append(f"{k}: {draw(yaml_scalars)}")
    lines.append(f"{keys[-1]}: *{anchor}")
    return "\n".join(lines) + "\n"


@FUZZ
@given(yaml_with_alias())
def test_property_any_document_with_an_anchor_or_alias_is_a_config_error(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match="not allowed in a configuration"):
        config.load(path)


@FUZZ
@given(st.lists(st.tuples(names, yaml_scalars), min_size=1, max_size=8))
def test_property_a_mapping_is_refused_exactly_when_a_key_repeats(tmp_path, items):
    path = tmp_path / "c.yaml"
    path.write_text("".join(f"{k}: {v}\n" for k, v in items))
    keys = [k for k, _ in items]
    if len(set(keys)) < len(keys):
        with pytest.raises(ConfigError, match="given twice"):
            config.read_yaml(path)
    else:
        assert list(config.read_yaml(path)) == keys


def test_the_error_message_of_a_huge_value_is_short_and_cheap():
    value = [list(range(1000))] * 1000  # a shared list, as an alias would make
    t = time.monotonic()
    with pytest.raises(ConfigError) as info:
        config.from_dict({"model": {"layers": value}})
    assert time.monotonic() - t < 1.0 and len(str(info.value)) < 2000


# --- 1. IDX files --------------------------------------------------------------------------------

def _gz_header_claiming(n_images: int, body: bytes = b"") -> bytes:
    header = bytes([0, 0, 8, 3]) + np.array([n_images, 28, 28], ">u4").tobytes()
    return gzip.compress(header + body)


def test_a_small_gzip_claiming_billions_of_images_is_refused_before_inflating(tmp_path):
    # 4e9 x 784 bytes claimed; the stream actually holds 100 MB of zeros (~100 KB compressed)
    path = tmp_path / "bomb-idx3-ubyte.gz"
    path.write_bytes(_gz_header_claiming(4_000_000_000, bytes(100_000_000)))
    p, seconds = bounded(f"from pbp_hpc.data.idx import read_idx, DataError\n"
                         f"try:\n    read_idx({str(path)!r})\nexcept DataError as e:\n    print('REFUSED', e)")
    assert p.returncode == 0 and "REFUSED" in p.stdout, p.stdout + p.stderr
    assert "limit" in p.stdout and seconds < WALL_LIMIT


def test_a_gzip_claiming_more_than_deflate_can_hold_is_refused_without_inflating(tmp_path):
    path = tmp_path / "liar-idx3-ubyte.gz"
    path.write_bytes(_gz_header_claiming(100_000))  # 78 MB claimed, header only
    with pytest.raises(DataError, match="more than .* compressed bytes can hold"):
        read_idx(path)


def test_a_gzip_stream_that_ends_early_is_truncated_and_costs_only_what_is_there(tmp_path):
    path = tmp_path / "short-idx3-ubyte.gz"
    path.write_bytes(_gz_header_claiming(1000, bytes(784 * 10)))
    with pytest.raises(DataError, match="truncated"):
        read_idx(path)


@FUZZ
@given(code=st.sampled_from([0x08, 0x09, 0x0B, 0x0C, 0x0D, 0x0E, 0x07, 0xFF]), ndim=st.integers(0, 6),
       dims=st.lists(st.integers(0, 2**32 - 1), min_size=6, max_size=6),
       body=st.binary(max_size=256), compress=st.booleans(), cut=st.integers(0, 300))
def test_property_any_header_and_stream_is_an_array_or_a_data_error(tmp_path, code, ndim, dims, body, compress, cut):
    raw = bytes([0, 0, code, ndim]) + np.array(dims[:ndim], ">u4").tobytes() + body
    raw = raw[: len(raw) - cut] if cut < len(raw) else raw
    data = gzip.compress(raw) if compress else raw
    path = tmp_path / "x-idx"
    path.write_bytes(data)
    try:
        a = read_idx(path, max_bytes=1 << 20)
    except DataError:
        return
    assert a.shape == tuple(dims[:ndim])


@FUZZ
@given(st.lists(st.integers(1, 5), min_size=1, max_size=3), st.booleans())
def test_property_written_arrays_read_back(tmp_path, shape, compress):
    a = np.arange(int(np.prod(shape)), dtype=np.int32).reshape(shape)
    path = tmp_path / ("a-idx.gz" if compress else "a-idx")
    write_idx(path, a)
    np.testing.assert_array_equal(read_idx(path), a)


# --- 2. checkpoints ------------------------------------------------------------------------------

def _mpi_self():
    from mpi4py import MPI
    return MPI.COMM_SELF


def _cfg(tmp_path, **sets):
    items = {"data.name": "synthetic", "data.n_train": "120", "data.n_test": "20", "model.layers": "[8, 4, 3]",
             "train.epochs": "2", "train.batch_size": "10", "train.progress": "false",
             "checkpoint.path": str(tmp_path / "ck.h5"), **sets}
    return config.load(None, [f"{k}={v}" for k, v in items.items()])


@pytest.fixture
def finished_checkpoint(tmp_path):
    from pbp_hpc import train
    train.run(_cfg(tmp_path), _mpi_self(), quiet=True)
    return tmp_path / "ck.h5"


def _damage(path: Path, field: str, value) -> None:
    with h5py.File(path, "a") as f:
        if field in ("theta",) or field.startswith("state/"):
            data = f[field][...]
            del f[field]
            f[field] = value(data)
        else:
            f.attrs[field] = value


DAMAGE = {
    "theta NaN": ("theta", lambda d: np.where(np.arange(d.size) == 3, np.nan, d).astype(d.dtype), "field theta: holds 1 NaN"),
    "theta inf": ("theta", lambda d: np.full_like(d, np.inf), "field theta: holds"),
    "theta float64": ("theta", lambda d: d.astype(np.float64), "field theta: dtype is float64, this run's model.dtype is float32"),
    "theta short": ("theta", lambda d: d[:-1], "field theta: shape is"),
    "theta int": ("theta", lambda d: d.astype(np.int32), "field theta: expected floating-point"),
    "state NaN": ("state/velocity", lambda d: np.full_like(d, np.nan), "field state/velocity: holds"),
    "epoch float": ("epoch", 1.5, "field epoch: expected a non-negative integer"),
    "epoch negative": ("epoch", -1, "field epoch: expected a non-negative integer"),
    "epoch text": ("epoch", "two", "field epoch: expected a non-negative integer"),
    "epoch beyond": ("epoch", 7, "field epoch: 7 is beyond this run's train.epochs"),
    "step beyond": ("step", 99, "field step: 99 is not a step"),
    "meta not JSON": ("meta", "{not json", "field meta: not valid JSON"),
    "meta a list": ("meta", "[1, 2]", "field meta: expected a JSON object"),
    "meta NaN": ("meta", '{"resume_key": NaN}', "field meta: not valid JSON"),
    "meta records": ("meta", None, "field meta.records"),
}


@pytest.mark.parametrize("kind", DAMAGE)
def test_a_damaged_field_is_refused_naming_file_and_field_and_the_file_is_kept(tmp_path, finished_checkpoint, kind):
    from pbp_hpc import train
    field, value, message = DAMAGE[kind]
    path = finished_checkpoint
    if state_field := field.startswith("state/"):
        with h5py.File(path, "r") as f:
            if field not in f:
                pytest.skip(f"this optimizer keeps no {field}")
    if kind == "meta records":
        with h5py.File(path, "r") as f:
            meta = json.loads(f.attrs["meta"])
        meta["records"] = [{"epoch": "zero"}]
        value = json.dumps(meta)
    _damage(path, field, value)
    before = path.read_bytes()
    with pytest.raises(CheckpointError) as info:
        train.run(_cfg(tmp_path, **{"checkpoint.resume": "true"}), _mpi_self(), quiet=True)
    assert str(path) in str(info.value) and message in str(info.value), str(info.value)
    assert path.read_bytes() == before  # refused before training: never overwritten
    del state_field


def test_a_finished_checkpoint_with_nan_parameters_is_not_reported_ok(tmp_path, finished_checkpoint):
    from pbp_hpc import train
    _damage(finished_checkpoint, "theta", lambda d: np.full_like(d, np.nan))
    with pytest.raises(CheckpointError, match="NaN"):
        train.run(_cfg(tmp_path, **{"checkpoint.resume": "true"}), _mpi_self(), quiet=True)


@FUZZ
@given(epoch=st.one_of(st.integers(-3, 5), st.floats(allow_nan=True), st.text(alphabet="ab1-", max_size=3), st.booleans()),
       step=st.one_of(st.integers(-3, 15), st.floats(allow_nan=True)))
def test_property_position_attributes_are_checked_on_load(tmp_path, epoch, step):
    path = tmp_path / "p.h5"
    checkpoint.save(path, np.zeros(4, np.float32), 0, 0, {})
    with h5py.File(path, "a") as f:
        f.attrs["epoch"], f.attrs["step"] = epoch, step
    expect = checkpoint.Expect(4, "float32", {}, max_epoch=2, steps=12)
    good = all(isinstance(v, int) and not isinstance(v, bool) for v in (epoch, step)) and \
        0 <= epoch <= 2 and 0 <= step < 12 and not (epoch == 2 and step != 0)
    if good:
        ck = checkpoint.load(path, expect)
        assert (ck["epoch"], ck["step"]) == (epoch, step)
    else:
        with pytest.raises(CheckpointError, match=f"checkpoint {path}: field (epoch|step)"):
            checkpoint.load(path, expect)


# --- 3. labels against the output layer ----------------------------------------------------------

def _idx_set(directory: Path, n_classes: int, n: int = 260) -> None:
    rng = np.random.default_rng(0)
    for part, count in (("train", n), ("t10k", n // 4)):
        write_idx(directory / f"{part}-images-idx3-ubyte", rng.integers(0, 255, (count, 4, 4), dtype=np.uint8))
        write_idx(directory / f"{part}-labels-idx1-ubyte", (np.arange(count) % n_classes).astype(np.uint8))


def _idx_cfg(directory: Path, out: int, **sets):
    items = {"data.name": "idx", "data.dir": str(directory), "model.layers": f"[16, 8, {out}]", "train.epochs": "1",
             "train.batch_size": "32", "train.progress": "false", **sets}
    return config.load(None, [f"{k}={v}" for k, v in items.items()])


def test_an_idx_set_with_26_classes_trains_with_26_outputs(tmp_path):
    from pbp_hpc import train
    _idx_set(tmp_path, 26)
    result = train.run(_idx_cfg(tmp_path, 26), _mpi_self(), quiet=True)
    assert result["status"] == "ok"


def test_too_few_output_units_for_the_labels_is_a_clear_error_before_training(tmp_path):
    from pbp_hpc import train
    _idx_set(tmp_path, 26)
    with pytest.raises(DataError, match=r"holds 26 classes .* but model.layers\[-1\] \(the output layer\) is 10"):
        train.run(_idx_cfg(tmp_path, 10), _mpi_self(), quiet=True)


def test_a_stated_class_count_must_match_the_output_layer_and_bound_the_labels(tmp_path):
    from pbp_hpc import train
    with pytest.raises(ConfigError, match="data.n_classes is 12 but model.layers"):
        _idx_cfg(tmp_path, 10, **{"data.n_classes": "12"})
    _idx_set(tmp_path, 26)
    with pytest.raises(DataError, match="outside 0..11"):
        train.run(_idx_cfg(tmp_path, 12, **{"data.n_classes": "12"}), _mpi_self(), quiet=True)
    _idx_set(tmp_path, 5)  # labels 0..4 of a set stated to have 8 classes
    assert train.run(_idx_cfg(tmp_path, 8, **{"data.n_classes": "8"}), _mpi_self(), quiet=True)["status"] == "ok"


# --- 6. --json never prints NaN ------------------------------------------------------------------

def _strict(text: str):
    return json.loads(text, parse_constant=lambda c: (_ for _ in ()).throw(ValueError(c)))


@FUZZ
@given(st.recursive(st.one_of(st.floats(), st.integers(), st.none(), st.text(max_size=3)),
                    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=3), inner, max_size=3)),
                    max_leaves=10))
def test_property_finite_json_makes_every_non_finite_float_null_and_says_where(value):
    from pbp_hpc.train import finite_json
    out = finite_json({"status": "ok", "x": value})
    text = json.dumps(out, allow_nan=False)
    back = _strict(text)
    bad = [v for v in _floats(value) if not math.isfinite(v)]
    assert len(back.get("notes", [])) == len(bad)


def _floats(v):
    if isinstance(v, float):
        yield v
    elif isinstance(v, dict):
        for x in v.values():
            yield from _floats(x)
    elif isinstance(v, list):
        for x in v:
            yield from _floats(x)


def test_main_prints_strict_json_when_a_timing_is_nan(monkeypatch, capsys):
    from pbp_hpc import train
    monkeypatch.setattr(train, "run", lambda *a, **k: {"status": "ok", "median_epoch_time_s": float("nan"),
                                                     "epochs": [{"gflops": float("inf"), "loss": 0.5}]})
    assert train.main(["--json", "--set", "data.name=synthetic"]) == 0
    out = _strict(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["median_epoch_time_s"] is None and out["epochs"][0]["gflops"] is None
    assert len(out["notes"]) == 2 and "median_epoch_time_s was nan" in out["notes"][0]


# --- 7. smaller ones -----------------------------------------------------------------------------

@pytest.mark.parametrize("template", ["mpiexec -n {rank}", "mpiexec {0}", "mpiexec -n {ranks", "mpiexec '-n"])
def test_a_malformed_mpiexec_template_is_a_config_error(monkeypatch, template):
    from pbp_hpc.sweep.launch import launcher_prefix
    monkeypatch.setenv("PBP_MPIEXEC", template)
    with pytest.raises(ConfigError, match="PBP_MPIEXEC=.* is not a usable launcher template"):
        launcher_prefix("mpiexec", 2, 1)


def test_a_results_file_with_a_non_integer_schema_version_is_a_results_error(tmp_path):
    from pbp_hpc import results
    from pbp_hpc.errors import ResultsError
    from pbp_hpc.results.schema import SCHEMA
    path = tmp_path / "r.h5"
    with h5py.File(path, "w") as f:
        f.attrs["schema"], f.attrs["schema_version"] = SCHEMA, "two"
        f.create_group("runs")
    with pytest.raises(ResultsError, match="schema_version is 'two', not an integer"):
        results.read_runs(path)


def test_analyze_plots_onto_an_existing_file_is_an_error_message(tmp_path, capsys):
    from pbp_hpc.analyze import cli
    (tmp_path / "plots").write_text("x")
    (tmp_path / "runs.jsonl").write_text("")
    assert cli.main([str(tmp_path / "runs.jsonl"), "--plots", str(tmp_path / "plots")]) == 2
    assert "--plots" in capsys.readouterr().err and (tmp_path / "plots").read_text() == "x"
