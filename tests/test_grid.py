"""The process grid (parallel/grid.py) and parameters a rank holds only part of
(engine/layout.py, parallel/shards.py)."""

import numpy as np
import pytest
from mpi4py import MPI

from pbp_hpc.engine import model
from pbp_hpc.engine.layout import Layout, Part, put, take, tensor_parts
from pbp_hpc.errors import ConfigError
from pbp_hpc.parallel.grid import make_grid
from pbp_hpc.parallel.shards import gather_whole, scatter_whole

WORLD = MPI.COMM_WORLD
SIZES = [7, 5, 4, 3]  # unit counts that do not divide by 2 or 3


def test_a_layout_from_sizes_alone_is_the_whole_model():
    lay = Layout([784, 100, 10])
    assert lay.is_whole and lay.n_params == 784 * 100 + 100 + 100 * 10 + 10
    assert lay.layer_slice(1) == slice(78500, 79510) and lay.w_shapes == [(784, 100), (100, 10)]


@pytest.mark.parametrize("T", [2, 3])
def test_parts_of_a_tensor_group_cover_the_model_once_and_put_take_round_trip(T):
    whole = model.init_params(Layout(SIZES), 3, "float64")
    back, count = np.zeros_like(whole), np.zeros_like(whole)
    for t in range(T):
        lay = Layout(SIZES, tensor_parts(SIZES, ["cols", "rows", "whole"], T, t))
        mine = np.zeros(lay.n_params)
        take(lay, whole, mine)
        put(lay, mine, back)
        held = np.zeros_like(whole)
        put(lay, np.ones(lay.n_params), held)
        count += held  # by how many ranks: 1, or T for the whole layer
        np.testing.assert_array_equal(model.init_params(lay, 3, "float64"), mine)  # drawn whole, then cut
    np.testing.assert_array_equal(back, whole)
    last = Layout(SIZES).layer_slice(2)
    assert (count[: last.start] == 1).all() and (count[last] == T).all()


def test_a_rows_split_bias_is_one_ranks_unless_replicated():
    assert [p.bias for p in tensor_parts(SIZES, ["whole", "rows", "whole"], 2, 1)] == [True, False, True]
    assert tensor_parts(SIZES, ["whole", "rows", "whole"], 2, 1, replicate_bias=True)[1] == Part("rows", 2, 5, True)
    ws, bs = model.views(np.zeros(Layout(SIZES, tensor_parts(SIZES, ["whole", "rows", "whole"], 2, 1)).n_params),
                         Layout(SIZES, tensor_parts(SIZES, ["whole", "rows", "whole"], 2, 1)), np)
    assert ws[1].shape == (3, 4) and bs[1] is None


def test_a_layer_held_by_no_rank_cannot_be_gathered_alone():
    lay = Layout(SIZES, [Part("none"), Part(), Part()])
    with pytest.raises(ValueError, match="only part of the model"):
        gather_whole(lay, np.zeros(lay.n_params), MPI.COMM_SELF)


def test_grid_dims_that_do_not_fit_the_world_are_refused():
    with pytest.raises(ConfigError, match=r"parallel.tensor=2 x parallel.pipeline=1 does not divide the 1 ranks"):
        make_grid(MPI.COMM_SELF, (None, 2, 1))
    with pytest.raises(ConfigError, match=r"grid 2 x 1 x 1 .* is 2 ranks, but the world has 1"):
        make_grid(MPI.COMM_SELF, (2, 1, 1))


@pytest.mark.mpi(min_size=2)
def test_the_default_grid_is_todays_world():
    grid = make_grid(WORLD)
    try:
        assert grid.data is WORLD and (grid.D, grid.T, grid.S) == (WORLD.size, 1, 1)
        assert grid.tensor is MPI.COMM_SELF and grid.model is MPI.COMM_SELF and grid.pipeline is MPI.COMM_SELF
        assert grid.node is WORLD and grid.nodes == 1  # one node here
        assert grid.ring() == ((WORLD.rank - 1) % WORLD.size, (WORLD.rank + 1) % WORLD.size)
        assert grid.stages() == (MPI.PROC_NULL, MPI.PROC_NULL)
        lay = Layout(SIZES)
        theta = np.arange(lay.n_params, dtype=float)
        assert gather_whole(lay, theta, grid.model) is theta  # no communication, no copy
    finally:
        grid.close()


@pytest.mark.mpi(min_size=2)
def test_a_tensor_group_over_the_world_gathers_and_scatters_the_whole_model():
    P = WORLD.size
    grid = make_grid(WORLD, (1, P, 1))
    try:
        assert (grid.t, grid.d, grid.s) == (WORLD.rank, 0, 0) and grid.tensor.size == P and grid.data.size == 1
        assert grid.model.size == P
        whole = model.init_params(Layout(SIZES), 5, "float64")
        lay = Layout(SIZES, tensor_parts(SIZES, ["cols", "rows", "cols"], P, grid.t))
        mine = model.init_params(lay, 5, "float64")
        np.testing.assert_array_equal(gather_whole(lay, mine, grid.model), whole)
        on_root = gather_whole(lay, mine, grid.model, root=0)
        if grid.model.rank == 0:
            np.testing.assert_array_equal(on_root, whole)
        else:
            assert on_root is None
        again = np.zeros_like(mine)
        scatter_whole(lay, whole, again)
        np.testing.assert_array_equal(again, mine)
    finally:
        grid.close()


@pytest.mark.mpi(min_size=2)
def test_grid_coordinates_follow_the_rank_order():
    P = WORLD.size
    for D, T, S in {(1, 1, P), (P, 1, 1)} | ({(2, P // 2, 1), (1, 2, P // 2)} if P % 2 == 0 and P > 2 else set()):
        grid = make_grid(WORLD, (D, T, S))
        try:
            assert WORLD.rank == (grid.d * S + grid.s) * T + grid.t
            assert (grid.data.size, grid.tensor.size, grid.pipeline.size) == (D, T, S)
            assert (grid.data.rank, grid.tensor.rank, grid.pipeline.rank) == (grid.d, grid.t, grid.s)
            before, after = grid.stages()
            assert before == (grid.s - 1 if grid.s else MPI.PROC_NULL)
            assert after == (grid.s + 1 if grid.s < S - 1 else MPI.PROC_NULL)
        finally:
            grid.close()


# --- a model split over a tensor group: gathered, it is the 1-rank model; checkpointed, it resumes ---

def _one_rank_cfg(path, epochs, resume=False):
    from pbp_hpc import config
    from helpers import REPORT_SETUP

    over = {**REPORT_SETUP, "model.layers": "[784, 12, 10]", "model.dtype": "float64", "data.name": "synthetic",
            "data.n_train": 120, "data.n_test": 30, "train.epochs": epochs, "train.learning_rate": 0.3,
            "train.eval_every": 0, "train.progress": "false", "train.batch_size": 10, "optimizer.name": "momentum",
            "checkpoint.path": path, "checkpoint.resume": str(resume).lower()}
    return config.load(None, [f"{k}={v}" for k, v in over.items()])


@pytest.mark.mpi(min_size=2)
def test_a_first_layer_split_over_two_ranks_gathers_to_the_one_rank_model_and_its_checkpoint_resumes_it(tmp_path):
    import types

    from pbp_hpc import checkpoint, resume, train

    pair = WORLD.Split(0 if WORLD.rank < 2 else MPI.UNDEFINED, WORLD.rank)
    if pair == MPI.COMM_NULL:
        return
    where = pair.bcast(str(tmp_path), root=0)
    whole_ck, split_ck = f"{where}/whole.h5", f"{where}/split.h5"
    try:
        if pair.rank == 0:  # the 1-rank run: one epoch, checkpointed at its end; and two epochs uninterrupted
            train.run(_one_rank_cfg(whole_ck, 1), MPI.COMM_SELF)
            full = train.run(_one_rank_cfg(f"{where}/full.h5", 2), MPI.COMM_SELF, return_params=True)
        pair.Barrier()
        ck = checkpoint.load(whole_ck)
        grid = make_grid(pair, (1, 2, 1))  # one tensor group of 2: the first layer in two halves of its units
        sizes = [784, 12, 10]
        layout = Layout(sizes, tensor_parts(sizes, ["cols", "whole"], 2, grid.t))
        theta, velocity = np.zeros(layout.n_params), np.zeros(layout.n_params)
        scatter_whole(layout, ck["theta"], theta)
        scatter_whole(layout, ck["state"]["velocity"], velocity)
        assert theta.shape[0] < ck["theta"].shape[0]  # each rank holds part of the model only
        np.testing.assert_array_equal(gather_whole(layout, theta, grid.model), ck["theta"])
        st = types.SimpleNamespace(cfg=_one_rank_cfg(split_ck, 2), comm=pair, grid=grid, layout=layout, theta=theta,
                                   strategy=types.SimpleNamespace(state=lambda: {"velocity": velocity}))
        st.whole = lambda buf, root=None: train.State.whole(st, buf, root)
        resume.save(st, ck["epoch"], ck["step"], ck["meta"]["records"], ck["meta"]["extra"])  # from the parts
        grid.close()
        if pair.rank == 0:
            written = checkpoint.load(split_ck)
            assert written["meta"]["grid"] == [1, 2, 1] and written["meta"]["ranks"] == 1
            np.testing.assert_array_equal(written["theta"], ck["theta"])
            np.testing.assert_array_equal(written["state"]["velocity"], ck["state"]["velocity"])
            resumed = train.run(_one_rank_cfg(split_ck, 2, resume=True), MPI.COMM_SELF, return_params=True)
            assert resumed["status"] == "ok" and [e["epoch"] for e in resumed["epochs"]] == [0, 1]
            assert resumed["params"].tobytes() == full["params"].tobytes()  # bit for bit
    finally:
        pair.Free()
