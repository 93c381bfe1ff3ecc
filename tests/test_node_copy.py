"""One copy of the data per node (data.one_copy_per_node): the node's first rank loads it, the
node's ranks read it from one shared window. Run under `mpiexec -n 2 python -m pytest --with-mpi
-m mpi` (one node); tests/test_nodes.py covers several."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
from mpi4py import MPI

from pbp_hpc import config, train
from pbp_hpc.data import datasets
from pbp_hpc.data.idx import write_idx
from pbp_hpc.data.node_copy import once_per_node
from pbp_hpc.errors import DataError

WORLD = MPI.COMM_WORLD


@dataclasses.dataclass(frozen=True)
class Loaded:
    images: np.ndarray
    labels: np.ndarray
    note: str


def _load(calls: list) -> Loaded:
    calls.append(1)
    return Loaded(np.arange(6000, dtype=np.uint8).reshape(100, 60), np.arange(100, dtype=np.int64), "made here")


@pytest.mark.mpi(min_size=2)
def test_the_nodes_first_rank_loads_alone_and_every_rank_reads_the_same_memory():
    calls: list = []
    got, release = once_per_node(WORLD, lambda: _load(calls))
    try:
        assert WORLD.allreduce(len(calls)) == 1 and got.note == "made here"
        np.testing.assert_array_equal(got.images, np.arange(6000, dtype=np.uint8).reshape(100, 60))
        assert not got.images.flags.writeable  # a rank writing would change every rank's data
        WORLD.Barrier()
        if WORLD.rank == 0:  # ... as this shows, through the writable array the view was made from
            got.images.base[0] = 77
        WORLD.Barrier()  # (x86 orders the store before the barrier's messages)
        assert got.images[0, 0] == 77
    finally:
        WORLD.Barrier()
        release()


@pytest.mark.mpi(min_size=2)
def test_a_load_that_fails_on_the_first_rank_fails_on_every_rank_of_the_node():
    def load() -> Loaded:
        raise DataError("train-images: truncated")

    with pytest.raises(DataError, match="truncated"):
        once_per_node(WORLD, load)


def _tiny_idx(directory: Path) -> None:
    rng = np.random.default_rng(0)
    for part, n in (("train", 120), ("t10k", 30)):
        write_idx(directory / f"{part}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
        write_idx(directory / f"{part}-labels-idx1-ubyte", rng.integers(0, 10, n, dtype=np.uint8))


@pytest.mark.mpi(min_size=2)
def test_training_on_one_shared_copy_equals_training_on_a_copy_per_rank(tmp_path_factory):
    directory = Path(WORLD.bcast(str(tmp_path_factory.mktemp("idx")) if WORLD.rank == 0 else None))
    if WORLD.rank == 0:
        _tiny_idx(directory)
    WORLD.Barrier()
    base = [f"data.dir={directory}", "data.download=false", "model.layers=[784, 16, 10]", "model.dtype=float64",
            "train.epochs=2", "train.batch_size=20", "train.eval_every=0", "train.progress=false"]
    shared = train.run(config.load(None, [*base, "data.one_copy_per_node=true"]), WORLD, return_params=True)
    own = train.run(config.load(None, [*base, "data.one_copy_per_node=false"]), WORLD, return_params=True)
    np.testing.assert_array_equal(shared["params"], own["params"])
    assert shared["test_accuracy"] == own["test_accuracy"]


@pytest.mark.mpi(min_size=2)
def test_closed_data_frees_its_window_once(tmp_path_factory):
    directory = Path(WORLD.bcast(str(tmp_path_factory.mktemp("idx")) if WORLD.rank == 0 else None))
    if WORLD.rank == 0:
        _tiny_idx(directory)
    WORLD.Barrier()
    cfg = config.load(None, [f"data.dir={directory}", "data.download=false", "model.layers=[784, 16, 10]",
                             "data.one_copy_per_node=true"])
    data = datasets.load(cfg, WORLD.size, directory, WORLD)
    assert len(data.train) == 100 and data.n_features == 784
    data.close()
    data.close()  # a second close is a no-op, not a second collective


@pytest.mark.mpi(min_size=2)
def test_auto_shares_only_from_AUTO_MIN_RANKS_ranks_on_a_node():
    from pbp_hpc.data.node_copy import AUTO_MIN_RANKS

    calls: list = []
    got, release = once_per_node(WORLD, lambda: _load(calls), AUTO_MIN_RANKS)
    try:
        shared = WORLD.size >= AUTO_MIN_RANKS  # every rank of these tests is on one node
        assert WORLD.allreduce(len(calls)) == (1 if shared else WORLD.size)
        assert got.images.flags.writeable != shared
    finally:
        WORLD.Barrier()
        release()
