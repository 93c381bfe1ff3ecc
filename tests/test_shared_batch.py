"""parallel.reducer=shared_batch computes what one rank computes, to rounding.

The node's ranks compute each batch together (engine/shared_batch.py): their own rows' forward
pass and deltas, then each rank its slice of every layer's gradient over all the node's rows.
Run under `mpiexec -n P python -m pytest --with-mpi -m mpi`; the reference is the same training
on MPI_COMM_SELF in the same process. Across nodes: tests/test_nodes.py.
"""

import numpy as np
import pytest
from mpi4py import MPI

from pbp_hpc import train
from pbp_hpc.engine import model
from pbp_hpc.engine.shared_batch import flat_span, spans
from test_parallel import small as parallel_problem

WORLD = MPI.COMM_WORLD


def small(**over):
    """test_parallel's small problem, with two hidden layers (a layer with both neighbours hidden)."""
    return parallel_problem(**{"model.layers": "[784, 16, 12, 10]", **over})


def against_one_rank(**over):
    cfg = small(**over)
    shared = train.run(small(**over, **{"parallel.reducer": "shared_batch"}), WORLD, return_params=True)
    ref = train.run(cfg, MPI.COMM_SELF, return_params=True)
    return shared, ref


def test_every_parameter_lies_in_exactly_one_ranks_slices():
    layout = model.Layout([784, 16, 12, 10])
    for parts in (1, 2, 3, 5, 16, 20):  # 20 > 16 and 12 and 10: some ranks own no rows of a layer
        owner = np.zeros(layout.n_params, dtype=int)
        for part in range(parts):
            for l, rows, cols in spans(layout, parts, part):
                for s in flat_span(layout, l, rows, cols):
                    owner[s] += 1
        assert (owner == 1).all(), parts


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("batch", [1, 2, 7, 12, 16, 100])  # 100: the whole training set (120 minus validation)
def test_p_ranks_sharing_a_batch_equal_one_rank_for_batches_that_do_and_do_not_divide(batch):
    shared, ref = against_one_rank(**{"train.batch_size": batch})
    np.testing.assert_allclose(shared["params"], ref["params"], rtol=1e-10, atol=1e-12)
    assert shared["epochs"][-1]["loss"] == pytest.approx(ref["epochs"][-1]["loss"], rel=1e-10)
    assert shared["test_accuracy"] == ref["test_accuracy"]
    gathered = WORLD.allgather(shared["params"])
    for p in gathered[1:]:
        np.testing.assert_array_equal(p, gathered[0])  # one node-shared copy, read by every rank


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("over", [
    # tanh with momentum at lr 0.5 amplifies rounding to ~1e-10 with any reducer (shm too): a gentler lr
    {"model.activation": "tanh", "optimizer.name": "momentum", "train.learning_rate": 0.05},
    {"model.activation": "relu", "model.init": "he_uniform", "model.loss": "cross_entropy", "optimizer.name": "momentum",
     "train.learning_rate": 0.01, "optimizer.weight_decay": 0.001},
    {"optimizer.name": "nesterov", "train.batch_size": 13},
], ids=["tanh-momentum", "relu-ce-momentum-decay", "nesterov-13"])
def test_activations_losses_and_optimizers_keep_the_one_rank_result(over):
    shared, ref = against_one_rank(**{"train.batch_size": 10, **over})
    np.testing.assert_allclose(shared["params"], ref["params"], rtol=1e-10, atol=1e-12)


@pytest.mark.mpi(min_size=2)
def test_float32_agrees_with_one_rank_to_single_precision():
    shared, ref = against_one_rank(**{"train.batch_size": 10, "model.dtype": "float32"})
    np.testing.assert_allclose(shared["params"], ref["params"], rtol=0, atol=1e-4 * np.abs(ref["params"]).max())


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("batch", [16, 120])
def test_on_mnist_the_first_layer_on_active_inputs_only_keeps_the_one_rank_result(mnist_dir, batch):
    # real images: border pixels are zero in a whole batch, so the first layer's gradient is
    # computed on the active columns only (and must still equal the dense 1-rank result)
    over = {"data.name": "mnist", "data.dir": str(mnist_dir), "data.n_train": 600, "train.batch_size": batch,
            "train.epochs": 1, "model.layers": "[784, 16, 10]"}
    shared, ref = against_one_rank(**over, **{"train.skip_zero_inputs": "false"})
    skipping, _ = against_one_rank(**over)
    np.testing.assert_allclose(shared["params"], ref["params"], rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(skipping["params"], ref["params"], rtol=1e-10, atol=1e-12)


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("over, fused", [
    ({}, True),  # plain SGD on one node: the update happens inside phase 2's GEMMs
    ({"optimizer.weight_decay": 0.01}, False),  # decay: a gradient buffer and the optimizer's update
    ({"optimizer.name": "momentum"}, False),
])
def test_plain_sgd_is_applied_inside_the_gemms_and_other_updates_through_the_optimizer(over, fused):
    from pbp_hpc.data import datasets

    cfg = small(**{"train.batch_size": 10, "parallel.reducer": "shared_batch", **over})
    with train.State(cfg, WORLD, np, datasets.load(cfg, WORLD.size, None)) as st:
        assert st.local.fused is fused
    shared, ref = against_one_rank(**{"train.batch_size": 10, **over})
    np.testing.assert_allclose(shared["params"], ref["params"], rtol=1e-10, atol=1e-12)


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("algorithm, reducer", [("batched", "shared_batch"), ("per_example", "shm")])
def test_auto_shares_small_batches_but_never_for_the_per_example_baseline(algorithm, reducer):
    from pbp_hpc.data import datasets

    cfg = small(**{"train.batch_size": 10, "algorithm": algorithm})  # a few rows per rank
    with train.State(cfg, WORLD, np, datasets.load(cfg, WORLD.size, None)) as st:
        assert st.reducer.name == reducer
        assert type(st.local).__name__ == ("SharedBatchStep" if reducer == "shared_batch" else "PerExampleStep")
