"""Fuzzing the file formats pbp_hpc reads: checkpoints (train --resume), model files (evaluate)
and results files (analyze, results show and merge).

Each case starts from a valid file and applies 1-3 mutations drawn by hypothesis: an attribute
or dataset deleted, retyped (text, integer, NaN, infinity, a huge integer, an array), reshaped
(shorter, longer, 2-D, a scalar, a group instead), NaN/inf written into it, a huge declared size
with nothing stored, a JSON attribute with one of its values replaced or removed, a field
added. The readers are called in this process (no subprocess per file, so a few hundred cases
per format cost seconds); each must give a result or its format's error, never another
exception, and memory must stay bounded. A few subprocess cases check the commands end to end:
exit 2, one line, no traceback.

PBP_HPC_FUZZ_EXAMPLES sets the cases per format (default 200, a fixed seed: the same files on
every run); `make fuzz` runs 5000 per format. `python tests/test_file_fuzz.py --survey N` draws N
random cases per format and prints each distinct failure once (how the round-3 count was made).
"""

from __future__ import annotations

import atexit
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

import h5py
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mpi4py import MPI

sys.path.insert(0, str(Path(__file__).resolve().parent))
from helpers import MPIEXEC, ROOT  # noqa: E402
from pbp_hpc import checkpoint, config, evaluate, model_file, resume, results, train  # noqa: E402
from pbp_hpc.analyze import cli as analyze_cli  # noqa: E402
from pbp_hpc.errors import PbpError, ResultsError  # noqa: E402
from pbp_hpc.results import cli as results_cli  # noqa: E402

EXAMPLES = int(os.environ.get("PBP_HPC_FUZZ_EXAMPLES", "200"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                suppress_health_check=list(HealthCheck))
MEMORY_BOUND = 512 << 20  # bytes of peak resident memory a whole run of cases may add
HUGE = 4_000_000_000  # a declared length (16 GB of float32) that no file here stores


# --- the valid files the mutations start from (made once) ------------------------------------

def _run_cfg(directory: Path, **over: Any) -> config.Config:
    base = {"model.layers": "[16, 6, 3]", "data.name": "synthetic", "data.n_train": 60, "data.n_test": 20,
            "train.batch_size": 10, "train.epochs": 2, "train.progress": "false",
            "optimizer.name": "momentum", "checkpoint.path": str(directory / "ck.h5"),
            "train.save_model": str(directory / "model.h5")}
    base.update({k.replace("__", "."): str(v) for k, v in over.items()})
    return config.load(None, [f"{k}={v}" for k, v in base.items() if v is not None])


_SEEDS: dict[str, Any] = {}


def seeds() -> dict[str, Any]:
    """{checkpoint, model, results: a valid file; cfg, expect: what a resuming run checks against}."""
    if not _SEEDS:
        d = Path(tempfile.mkdtemp(prefix="pbp_hpc-fuzz-"))
        atexit.register(shutil.rmtree, d, True)
        full = d / "full"
        full.mkdir()
        record = train.run(_run_cfg(full), MPI.COMM_SELF, quiet=True)  # the model file
        cut = d / "cut"
        cut.mkdir()
        train.run(_run_cfg(cut, train__save_model=None, debug__signal_step=8), MPI.COMM_SELF, quiet=True)
        cfg = _run_cfg(cut, train__save_model=None, checkpoint__resume="true")
        ck = checkpoint.load(cut / "ck.h5")
        n, steps = ck["theta"].shape[0], -(-50 // 10)  # 60 examples, a sixth of them for validation
        expect = checkpoint.Expect(n, "float32", {k: (v.shape, str(v.dtype)) for k, v in ck["state"].items()}, 2, steps)
        resume._read(cut / "ck.h5", cfg, expect, 1)  # the seed itself is valid
        rec = {**record, "sweep": "fuzz", "point": 0, "repetition": 0, "implementation": "blas-threaded"}
        results.append_run(d / "results.h5", rec)
        _SEEDS.update(checkpoint=cut / "ck.h5", model=full / "model.h5", results=d / "results.h5", cfg=cfg,
                      expect=expect, dir=d)
    return _SEEDS


# --- the mutations ---------------------------------------------------------------------------

class Draw:
    """Choices, drawn by hypothesis (shrinkable) or by a numpy generator (--survey)."""

    def __init__(self, data: Any = None, rng: Any = None):
        self.data, self.rng = data, rng

    def index(self, n: int) -> int:
        if self.data is not None:
            return self.data.draw(st.integers(0, n - 1))
        return int(self.rng.integers(0, n))

    def pick(self, options: list) -> Any:
        return options[self.index(len(options))]


def _json_values() -> list:
    return [None, True, -1, 0, 2**70, 1.5, -1e308, "x", "", [], [1, "a"], {}, {"a": None}, [[[[]]]]]


def _mutate_json(text: str, draw: Draw) -> str:
    """One value somewhere in a JSON document replaced, removed or added; or the text damaged."""
    try:
        doc = json.loads(text)
    except ValueError:
        return text + "}"
    how = draw.pick(["replace", "remove", "add", "damage", "nan"])
    if how == "damage":
        return text[: draw.index(max(len(text), 1))]
    if how == "nan":
        return text.replace("0.", "NaN, \"x\": 0.", 1) if "0." in text else "NaN"
    # walk down to a container
    node, path = doc, []
    for _ in range(draw.index(5)):
        children = list(node.items()) if isinstance(node, dict) else list(enumerate(node)) if isinstance(node, list) else []
        children = [(k, v) for k, v in children if isinstance(v, (dict, list))]
        if not children:
            break
        k, node = draw.pick(children)
    if not isinstance(node, (dict, list)):
        return json.dumps(draw.pick(_json_values()))
    keys = list(node.keys()) if isinstance(node, dict) else list(range(len(node)))
    if how == "add" or not keys:
        if isinstance(node, dict):
            node[draw.pick(["extra", "best", "epoch", "step", "val_accuracy", "layers"])] = draw.pick(_json_values())
        else:
            node.append(draw.pick(_json_values()))
    elif how == "remove":
        del node[draw.pick(keys)]
    else:
        node[draw.pick(keys)] = draw.pick(_json_values())
    return json.dumps(doc)


def _attr_value(draw: Draw, old: Any) -> Any:
    options: list[Callable[[], Any]] = [
        lambda: "text", lambda: np.int64(-1), lambda: np.int64(2**62), lambda: np.float64(np.nan),
        lambda: np.float64(np.inf), lambda: np.float64(-np.inf), lambda: np.float64(2.5), lambda: np.array([1, 2, 3]),
        lambda: np.bool_(True), lambda: b"\xff\xfe", lambda: np.int64(0),
    ]
    if isinstance(old, (str, bytes)):
        text = old.decode("utf-8", "replace") if isinstance(old, bytes) else old
        options += [lambda: _mutate_json(text, draw)] * 6  # most string attributes are JSON: mutate inside
    return draw.pick(options)()


def _objects(f: h5py.File) -> tuple[list[str], list[str]]:
    """(every group's and dataset's path, every dataset's path), the root included in the first."""
    every, datasets = ["/"], []
    f.visititems(lambda name, obj: (every.append(name), isinstance(obj, h5py.Dataset) and datasets.append(name)) and None)
    return every, datasets


def _replace_dataset(f: h5py.File, name: str, draw: Draw) -> None:
    ds = f[name]
    value = ds[...] if ds.size < 1_000_000 else np.zeros(10)
    n = value.shape[0] if value.ndim else 1
    how = draw.pick(["strings", "compound", "int", "float16", "float64", "shorter", "longer", "2-D", "scalar",
                     "nan", "inf", "huge", "group", "empty", "bool"])
    del f[name]
    if how == "group":
        f.create_group(name)
        return
    if how == "huge":
        f.create_dataset(name, shape=(HUGE,), dtype=value.dtype)  # declared, nothing stored
        return
    data = {
        "strings": lambda: np.array([b"x"] * n),
        "compound": lambda: np.zeros(n, dtype=[("a", "f4"), ("b", "i4")]),
        "int": lambda: np.arange(n, dtype=np.int64),
        "float16": lambda: value.astype(np.float16) if value.dtype.kind in "fiu" else np.zeros(n, np.float16),
        "float64": lambda: value.astype(np.float64) if value.dtype.kind in "fiu" else np.zeros(n),
        "shorter": lambda: value[:-1] if value.ndim else value,
        "longer": lambda: np.concatenate([value, value[:1]]) if value.ndim else np.array([value, value]),
        "2-D": lambda: np.stack([value, value]) if value.ndim else np.zeros((2, 2)),
        "scalar": lambda: np.float64(1.0),
        "nan": lambda: _poison(value, np.nan, draw),
        "inf": lambda: _poison(value, np.inf, draw),
        "empty": lambda: np.zeros(0, dtype=value.dtype),
        "bool": lambda: np.ones(n, dtype=bool),
    }[how]()
    f.create_dataset(name, data=data)


def _poison(value: np.ndarray, bad: float, draw: Draw) -> np.ndarray:
    out = value.astype(np.float64) if value.dtype.kind in "fiub" else np.zeros(max(value.size, 1))
    if out.size:
        out.reshape(-1)[draw.index(out.size)] = bad
    return out


def mutate(path: Path, draw: Draw) -> list[str]:
    """1-3 mutations of the HDF5 file at path, in place; what was done, in words."""
    done = []
    with h5py.File(path, "r+") as f:
        for _ in range(1 + draw.index(3)):
            every, datasets = _objects(f)
            kind = draw.pick(["attr", "attr", "attr", "dataset", "dataset", "delete", "add"])
            if kind == "dataset" and datasets:
                name = draw.pick(datasets)
                _replace_dataset(f, name, draw)
            elif kind == "delete":
                name = draw.pick(every)
                attrs = list(f[name].attrs)
                if attrs and (name == "/" or draw.index(2)):
                    a = draw.pick(attrs)
                    del f[name].attrs[a]
                    name = f"{name}@{a}"
                elif name != "/":
                    del f[name]
            elif kind == "add":
                name = draw.pick(every)
                if isinstance(f[name], h5py.Group) and draw.index(2):
                    f[name].create_dataset(f"extra{len(done)}", data=np.arange(3.0))
                else:
                    f[name].attrs[f"extra{len(done)}"] = "1"
            else:
                name = draw.pick(every)
                attrs = list(f[name].attrs)
                if not attrs:
                    continue
                a = draw.pick(attrs)
                f[name].attrs[a] = _attr_value(draw, f[name].attrs[a])
                name = f"{name}@{a}"
            done.append(f"{kind} {name}")
    return done


# --- the readers, in process -------------------------------------------------------------------

def read_checkpoint(path: Path) -> None:
    s = seeds()
    resume._read(path, s["cfg"], s["expect"], 1)


def read_model(path: Path) -> None:
    evaluate.load_model(path)


def read_results(path: Path) -> None:
    """results show, results merge and analyze (tables, not figures), as the commands call them."""
    try:
        records = results.read_runs(path)
    except ResultsError:
        return
    results_cli.show_lines(records)
    out = path.with_name(path.name + ".merged.h5")
    results.merge([path], out, overwrite=True)
    assert analyze_cli.main([str(path)]) in (0, 2)


FORMATS: dict[str, tuple[str, Callable[[Path], None]]] = {
    "checkpoint": ("checkpoint", read_checkpoint), "model": ("model", read_model), "results": ("results", read_results)}


def one_case(fmt: str, draw: Draw, workdir: Path) -> list[str]:
    """Mutate a copy of the format's valid file and read it: a value or PbpError, nothing else."""
    key, reader = FORMATS[fmt]
    path = workdir / f"case-{fmt}.h5"
    shutil.copyfile(seeds()[key], path)
    done = mutate(path, draw)
    try:
        reader(path)
    except PbpError:
        pass
    return done


def _peak() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@pytest.fixture(scope="module")
def workdir():
    d = Path(tempfile.mkdtemp(prefix="pbp_hpc-fuzz-cases-"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.mark.parametrize("fmt", FORMATS)
def test_any_mutated_file_is_read_or_refused_with_its_format_error(fmt, workdir, capsys, monkeypatch):
    seeds()
    # merge's durability (fsync of the file and its directory) is not what is tested here, and on
    # a busy disk it was most of the wall time
    monkeypatch.setattr(os, "fsync", lambda fd: None)
    before = _peak()

    @FUZZ
    @given(st.data())
    def case(data):
        one_case(fmt, Draw(data=data), workdir)

    case()
    capsys.readouterr()  # analyze's tables and messages
    assert _peak() - before < MEMORY_BOUND


# --- end to end: the commands' exit code and message ---------------------------------------

def _damaged(kind: str, target: Path) -> Path:
    shutil.copyfile(seeds()[kind], target)
    with h5py.File(target, "r+") as f:
        if kind == "model":
            f.attrs["meta"] = json.dumps({"best": "a string"})
        elif kind == "checkpoint":
            del f["theta"]
            f.create_dataset("theta", shape=(HUGE,), dtype="f4")
        else:
            g = next(iter(f["runs"].values()))["evaluations"]
            short = g["step"][:-1]
            del g["step"]
            g.create_dataset("step", data=short)
    return target


@pytest.mark.parametrize("command", ["train --resume", "evaluate", "analyze", "results show", "results merge"])
def test_a_damaged_file_ends_the_command_with_exit_2_and_one_line(tmp_path, command):
    s = seeds()
    if command == "train --resume":
        ck = _damaged("checkpoint", tmp_path / "ck.h5")
        sets = [f"{k}={v}" for k, v in {"model.layers": "[16, 6, 3]", "data.name": "synthetic", "data.n_train": 60,
                                         "data.n_test": 20, "train.batch_size": 10,
                                         "train.epochs": 2, "optimizer.name": "momentum", "checkpoint.path": ck}.items()]
        cmd = [MPIEXEC, "-n", "1", sys.executable, "-m", "pbp_hpc.train", *[a for x in sets for a in ("--set", x)], "--resume"]
    elif command == "evaluate":
        cmd = [sys.executable, "-m", "pbp_hpc.evaluate", str(_damaged("model", tmp_path / "m.h5"))]
    else:
        path = str(_damaged("results", tmp_path / "r.h5"))
        cmd = [sys.executable, "-m", *{"analyze": ["pbp_hpc.analyze", path], "results show": ["pbp_hpc.results", "show", path],
                                       "results merge": ["pbp_hpc.results", "merge", path, "-o", str(tmp_path / "o.h5")]}[command]]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert p.returncode == 2, p.stderr
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "error" in lines[0] and "Traceback" not in p.stderr, p.stderr
    assert s  # (the seed files were made in this process)


# --- the survey: distinct failures, not stopping at the first ----------------------------------

def survey(n: int) -> dict[str, list[str]]:
    """N random cases per format; each distinct failure (format, exception type, where raised) once."""
    import traceback

    workdir = Path(tempfile.mkdtemp(prefix="pbp_hpc-fuzz-survey-"))
    rng = np.random.default_rng(0)
    found: dict[str, list[str]] = {}
    for fmt in FORMATS:
        for _ in range(n):
            try:
                done = one_case(fmt, Draw(rng=rng), workdir)
            except (Exception, MemoryError) as exc:  # noqa: BLE001 - a survey counts every kind
                frame = traceback.extract_tb(exc.__traceback__)[-1]
                where = f"{Path(frame.filename).name}:{frame.name}"
                found.setdefault(f"{fmt}: {type(exc).__name__} in {where}", [str(exc)[:100]])
    return found


if __name__ == "__main__" and "--survey" in sys.argv:
    cases = int(sys.argv[sys.argv.index("--survey") + 1])
    failures = survey(cases)
    for sig, example in sorted(failures.items()):
        print(f"{sig}: {example[0]}")
    print(f"{len(failures)} distinct failure(s) in {cases} cases per format")
