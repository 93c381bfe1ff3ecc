"""train.trace (pbp_hpc/trace.py): a Chrome trace-event file that follows the format, holds every
rank, nests its spans, accounts for each step's time, and shows a straggler's effect as waiting.

MPI tests: `mpiexec -n 2|3 python -m pytest --with-mpi -m mpi tests/test_trace.py`.
"""

from __future__ import annotations

import json
import statistics
import tempfile
from pathlib import Path

import pytest
from mpi4py import MPI

from pbp_hpc import trace

WORLD = MPI.COMM_WORLD
PHASES = {"X", "C", "M"}


def check_format(doc: dict, ranks: int) -> list[dict]:
    """The trace-event format's rules as Perfetto and chrome://tracing read them; the spans."""
    assert isinstance(doc, dict) and isinstance(doc["traceEvents"], list)
    named = set()
    for e in doc["traceEvents"]:
        assert e["ph"] in PHASES and isinstance(e["name"], str) and isinstance(e["pid"], int), e
        if e["ph"] == "M":
            assert isinstance(e["args"], dict), e
            if e["name"] == "process_name":
                named.add(e["pid"])
                assert e["args"]["name"].startswith(f"rank {e['pid']} ("), e
            continue
        assert isinstance(e["ts"], (int, float)) and e["ts"] >= 0, e
        if e["ph"] == "X":
            assert isinstance(e["tid"], int) and isinstance(e["dur"], (int, float)) and e["dur"] >= 0, e
        else:
            assert e["args"] and all(isinstance(v, (int, float)) for v in e["args"].values()), e
    spans = [e for e in doc["traceEvents"] if e["ph"] == "X"]
    assert named == set(range(ranks)) == {e["pid"] for e in spans}, "every rank, named, with spans"
    for pid in range(ranks):  # spans nest per thread: each inside the open one, or after it
        stack: list[dict] = []
        for e in sorted((e for e in spans if e["pid"] == pid), key=lambda e: (e["ts"], -e["dur"])):
            while stack and e["ts"] >= stack[-1]["ts"] + stack[-1]["dur"] - 0.5:
                stack.pop()
            if stack:
                assert e["ts"] + e["dur"] <= stack[-1]["ts"] + stack[-1]["dur"] + 1.0, (e, stack[-1])
            stack.append(e)
    return spans


def children(spans: list[dict], parent: dict) -> list[dict]:
    inside = [e for e in spans if e is not parent and e["pid"] == parent["pid"] and e["ts"] >= parent["ts"] - 0.5
              and e["ts"] + e["dur"] <= parent["ts"] + parent["dur"] + 1.0]
    return [e for e in inside if not any(o is not e and o["ts"] <= e["ts"] and o["ts"] + o["dur"] >= e["ts"] + e["dur"]
                                         and o["dur"] > e["dur"] for o in inside)]


def shared_path() -> str:
    return WORLD.bcast(str(Path(tempfile.mkdtemp()) / "trace.json") if WORLD.rank == 0 else None, root=0)


def traced_run(**over):
    from test_accounting import small

    from pbp_hpc import train

    path = shared_path()
    base = {"model.layers": "[784, 256, 10]", "train.batch_size": 64, "data.n_train": 640, "train.eval_every": 1,
            "parallel.reducer": "blocking", "train.trace": path, "train.trace_steps": 4}
    res = train.run(small(**{**base, **over}), WORLD, quiet=True)
    doc = json.loads(Path(path).read_text()) if WORLD.rank == 0 else None
    return res, doc, path


@pytest.mark.mpi
def test_the_trace_follows_the_format_and_each_step_adds_up():
    res, doc, path = traced_run()
    assert res["trace_path"] == path and not list(Path(path).parent.glob("*.part"))
    if WORLD.rank != 0:
        return
    spans = check_format(doc, WORLD.size)
    names = {e["name"] for e in spans}
    assert {"forward", "backward", "reduce (blocking)", "update", "evaluation", "wait"} <= names, names
    assert {e["name"] for e in doc["traceEvents"] if e["ph"] == "C"} == {"loss", "learning rate", "bytes sent"}
    steps = [e for e in spans if e["name"].startswith("step ")]
    assert len(steps) == WORLD.size * 2 * 4  # 2 epochs x trace_steps, every rank
    # the spans inside a step cover it (the gaps: the loop's own bookkeeping); the median step,
    # so that one preemption on a loaded machine does not decide it
    covered = [sum(c["dur"] for c in children(spans, s)) / s["dur"] for s in steps]
    assert 0.95 <= statistics.median(covered) <= 1.0 + 1e-6, covered


@pytest.mark.mpi
def test_a_straggler_shows_as_the_other_ranks_waiting():
    if WORLD.size < 2:
        pytest.skip("needs 2 ranks")
    _, doc, _ = traced_run(**{"study.straggler_factor": 4, "study.straggler_rank": 0})
    if WORLD.rank != 0:
        return
    spans = check_format(doc, WORLD.size)
    in_steps = lambda pid, name: sum(e["dur"] for e in spans if e["pid"] == pid and e["name"] == name  # noqa: E731
                                     and any(s["pid"] == pid and s["name"].startswith("step ") and s["ts"] <= e["ts"]
                                             <= s["ts"] + s["dur"] for s in spans))
    assert in_steps(0, "straggler delay (study.straggler_*)") > 0
    for pid in range(1, WORLD.size):  # the slow rank sleeps 3x its compute; the others wait for it
        assert in_steps(pid, "wait") > in_steps(pid, "forward") + in_steps(pid, "backward"), pid


def test_merge_joins_the_parts_a_dead_job_left(tmp_path):
    path = tmp_path / "t.json"
    for r in (0, 1):
        meta = [{"name": "process_name", "ph": "M", "pid": r, "args": {"name": f"rank {r} (h)"}}]
        span = [{"name": "step 0", "cat": "step", "ph": "X", "ts": 1.0, "dur": 2.0, "pid": r, "tid": 0}]
        Path(f"{path}.rank{r}.part").write_text(json.dumps(meta + span))
    assert trace.main(["merge", str(path)]) == 0
    check_format(json.loads(path.read_text()), 2)
    assert not list(tmp_path.glob("*.part"))
    assert trace.main(["merge", str(tmp_path / "none.json")]) == 2


def test_a_trace_path_that_cannot_be_written_is_a_config_error_before_training(tmp_path):
    from pbp_hpc.errors import ConfigError

    with pytest.raises(ConfigError, match="is a directory; give a file name"):
        trace.check_target(str(tmp_path))
    (tmp_path / "afile").write_text("")
    with pytest.raises(ConfigError, match="afile is a file, not a directory"):
        trace.check_target(str(tmp_path / "afile" / "t.json"))
    trace.check_target(str(tmp_path / "new" / "dir" / "t.json"))  # its folder is made, as --plots makes its own
    assert (tmp_path / "new" / "dir").is_dir() and not list((tmp_path / "new" / "dir").iterdir())

