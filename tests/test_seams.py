"""The seams a new strategy, reducer or optimizer plugs into: one module and one registration
line each; which combinations are valid is checked in one place, before any work; every
reducer is closed when its run ends."""

import numpy as np
import pytest
from mpi4py import MPI

from pbp_hpc import config, train
from pbp_hpc.data import datasets
from pbp_hpc.errors import ConfigError
from pbp_hpc.parallel import reducers, strategies

from example_reducer import ReduceBcastReducer
from example_strategy import Gossip
from helpers import REPORT_SETUP

WORLD = MPI.COMM_WORLD


def small(**over):
    base = {**REPORT_SETUP, "model.layers": "[784, 16, 12, 10]", "model.dtype": "float64", "data.name": "synthetic",
            "data.n_train": 120, "data.n_test": 30, "train.epochs": 2, "train.learning_rate": 0.5,
            "train.eval_every": 0, "train.progress": "false", "train.batch_size": 10}
    base.update({k: str(v) for k, v in over.items()})
    return config.load(None, [f"{k}={v}" for k, v in base.items()])


@pytest.fixture
def reduce_bcast():
    reducers.register("reduce-bcast", ReduceBcastReducer)  # the one line that adds a reducer
    yield
    reducers.HOST._entries.pop("reduce-bcast")


@pytest.mark.mpi(min_size=2)
def test_a_reducer_registered_from_outside_trains_like_blocking(reduce_bcast):
    blocking = train.run(small(), WORLD, return_params=True)
    added = train.run(small(**{"parallel.reducer": "reduce-bcast"}), WORLD, return_params=True)
    # MPI_Reduce may add the ranks' sums in another order than MPI_Allreduce: rounding only
    np.testing.assert_allclose(added["params"], blocking["params"], rtol=1e-12, atol=1e-14)
    assert added["epochs"][-1]["loss"] == pytest.approx(blocking["epochs"][-1]["loss"], rel=1e-12)
    assert added["epochs"][-1]["comm_s"] > 0  # its time is counted as communication


@pytest.fixture
def gossip():
    strategies.register("gossip", Gossip)  # the one line that adds a strategy
    yield
    strategies.STRATEGIES._entries.pop("gossip")


class RecordingGossip(Gossip):
    """Gossip that also reports what it received last (its predecessor's parameters before the exchange)."""

    def describe(self):
        return {**super().describe(), "received": self.received.copy()}


@pytest.mark.mpi(min_size=2)
def test_a_strategy_registered_from_outside_with_two_ranks_and_k_1_is_local_sgd(gossip):
    # with 2 ranks the ring's neighbour is the other rank: every rank averages with all (a third waits)
    two = WORLD.Split(0 if WORLD.rank < 2 else MPI.UNDEFINED, WORLD.rank)
    if two == MPI.COMM_NULL:
        return
    over = {"train.batch_size": 8, "parallel.local_steps": 1}
    try:
        local = train.run(small(**over, **{"parallel.strategy": "local_sgd"}), two, return_params=True)
        added = train.run(small(**over, **{"parallel.strategy": "gossip"}), two, return_params=True)
    finally:
        two.Free()
    assert added["strategy"] == "gossip" and added["local_steps"] == 1
    np.testing.assert_array_equal(added["params"], local["params"])  # (a + b) / 2 either way: bit for bit
    assert added["epochs"][-1]["loss"] == pytest.approx(local["epochs"][-1]["loss"], rel=1e-12)
    assert added["epochs"][-1]["comm_s"] > 0  # its exchanges count as communication


@pytest.mark.mpi(min_size=2)
def test_gossip_averages_with_its_ring_predecessor_from_the_grid(gossip):
    strategies.register("recording_gossip", RecordingGossip)
    try:
        res = train.run(small(**{"parallel.strategy": "recording_gossip", "parallel.local_steps": 2,
                                 "train.batch_size": 4 * WORLD.size}), WORLD, return_params=True)
    finally:
        strategies.STRATEGIES._entries.pop("recording_gossip")
    received = WORLD.allgather(res["received"])  # rank r's: rank r-1's parameters before the last exchange
    mine = received[(WORLD.rank + 1) % WORLD.size]  # this rank's, as its successor received them
    np.testing.assert_array_equal(res["params"], (mine + received[WORLD.rank]) * 0.5)
    assert res["epochs"][-1]["loss"] < res["epochs"][0]["loss"]
    params = WORLD.allgather(res["params"])
    assert all(np.array_equal(p, params[0]) for p in params) == (WORLD.size == 2)  # from 3 ranks on, not yet agreed


def test_a_gossip_config_is_refused_with_the_reducers_of_gradient_sums(gossip):
    with pytest.raises(ConfigError, match="parallel.strategy=gossip does not go with parallel.reducer=shm"):
        small(**{"parallel.strategy": "gossip", "parallel.reducer": "shm"})


def test_an_unregistered_reducer_is_refused_naming_the_choices():
    with pytest.raises(ConfigError, match="unknown reducer 'reduce-bcast'; choose one of auto, blocking, overlap, shm"):
        small(**{"parallel.reducer": "reduce-bcast"})


def test_the_config_names_the_registered_strategy_and_optimizer():
    cfg = small(**{"optimizer.name": "momentum"})
    assert (cfg.parallel.strategy, cfg.optimizer.name) == ("allreduce", "momentum")
    with pytest.raises(ConfigError, match="unknown strategy 'gossip'; choose one of allreduce"):
        small(**{"parallel.strategy": "gossip"})
    with pytest.raises(ConfigError, match="unknown optimizer 'adam'; choose one of sgd"):
        small(**{"optimizer.name": "adam"})


@pytest.mark.parametrize("over,both", [
    ({"backend": "cupy", "algorithm": "per_example"}, ("algorithm=per_example", "backend=cupy")),
    ({"backend": "cupy", "parallel.reducer": "shm"}, ("parallel.reducer=shm", "backend=cupy")),
    ({"backend": "cupy", "parallel.reducer": "shared_batch"}, ("parallel.reducer=shared_batch", "backend=cupy")),
    ({"algorithm": "per_example", "parallel.reducer": "shared_batch"}, ("parallel.reducer=shared_batch", "algorithm=per_example")),
])
def test_an_invalid_combination_is_refused_naming_both_choices(over, both):
    with pytest.raises(ConfigError) as info:
        small(**over)
    assert all(choice in str(info.value) for choice in both)


@pytest.mark.mpi(min_size=2)
def test_a_run_closes_its_shared_memory_reducer():
    cfg = small(**{"parallel.reducer": "shm"})
    data = datasets.load(cfg, WORLD.size)
    with train.State(cfg, WORLD, np, data) as st:
        assert st.reducer.shared is not None
    assert st.reducer.shared is None  # windows and communicators freed, collectively
    for _ in range(20):  # as search_lr runs trial after trial: nothing piles up
        train.run(cfg, WORLD)


def test_what_a_strategy_class_declares_gives_its_resume_key_and_rules(gossip):
    from pbp_hpc import resume

    cfg = small(**{"parallel.strategy": "gossip", "parallel.local_steps": 3})
    assert resume.resume_key(cfg)["strategy"] == {"strategy": "gossip", "local_steps": 3}
    assert "strategy" not in resume.resume_key(small())  # allreduce: as checkpoints before strategies
    # a local_sgd checkpoint written before strategies declared their keys (all four) still resumes
    old = small(**{"parallel.strategy": "local_sgd"})
    legacy = {**resume.resume_key(old), "strategy": {"strategy": "local_sgd", "local_steps": 4, "staleness_bound": 2,
                                                      "meet_every_steps": 16}}
    resume._check_meta("ck.h5", {"resume_key": legacy, "ranks": 1, "records": []}, old, 1)


def test_strategy_classes_are_read_without_starting_mpi():
    import subprocess
    import sys

    code = ("import sys; from pbp_hpc.parallel import strategies, combinations; "
            "[strategies.facts(n) for n in strategies.names()]; import pbp_hpc.analyze.strategies; "
            "assert 'mpi4py.MPI' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
