"""What every run decides before training: BLAS threads per rank (the config, then the
variables HPC users set, then a share of the node) and binding ranks to disjoint cores
(only where the launcher did not, and never oversubscribed); and what a stop signal does in
and outside the training loop."""

import os

import pytest

from pbp_hpc import config
from pbp_hpc.errors import ConfigError
from pbp_hpc.parallel import runtime

from helpers import last_json, run_cmd

TINY = ["--set", "data.name=synthetic", "--set", "data.n_train=120", "--set", "train.epochs=1",
        "--set", "model.layers=[784, 8, 10]", "--set", "train.progress=false", "--json"]


def cfg(*items):
    return config.load(None, list(items))


def test_the_config_decides_first_then_the_environment_then_a_share_of_the_node():
    env = {"OMP_NUM_THREADS": "3", "OPENBLAS_NUM_THREADS": "5"}
    assert runtime.threads_for(cfg("parallel.threads_per_rank=1"), 2, 4, env) == (1, "parallel.threads_per_rank")
    assert runtime.threads_for(cfg(), 2, 4, env) == (3, "OMP_NUM_THREADS=3")
    assert runtime.threads_for(cfg(), 2, 4, {"OPENBLAS_NUM_THREADS": "5"}) == (5, "OPENBLAS_NUM_THREADS=5")
    assert runtime.threads_for(cfg(), 2, 4, {"SLURM_CPUS_PER_TASK": "2"}) == (2, "SLURM_CPUS_PER_TASK=2")
    assert runtime.threads_for(cfg(), 2, 8, {})[0] == 4


def test_an_omp_list_gives_its_first_level_and_nonsense_is_passed_over():
    assert runtime.threads_for(cfg(), 1, 4, {"OMP_NUM_THREADS": "2,1"})[0] == 2
    assert runtime.threads_for(cfg(), 1, 4, {"OMP_NUM_THREADS": "many", "MKL_NUM_THREADS": "0"})[0] == 4


def test_a_configured_thread_count_beyond_the_cores_is_refused_unless_oversubscribing():
    with pytest.raises(ConfigError, match="needs 8 cores, but only 4"):
        runtime.threads_for(cfg("parallel.threads_per_rank=4"), 2, 4, {})
    assert runtime.threads_for(cfg("parallel.threads_per_rank=4", "parallel.oversubscribe=true"), 2, 4, {})[0] == 4


def test_omp_num_threads_set_by_the_user_is_what_a_run_uses():
    env = {k: v for k, v in os.environ.items() if k not in runtime.THREAD_VARS}
    res = run_cmd(["pbp_hpc.train", *TINY], env={**env, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr
    assert last_json(res.stdout)["threads_per_rank"] == 1 and "(OMP_NUM_THREADS=1)" in res.stderr
    res = run_cmd(["pbp_hpc.train", *TINY, "--set", "parallel.threads_per_rank=1"], env={**env, "OMP_NUM_THREADS": "2"})
    assert "(parallel.threads_per_rank)" in res.stderr


two_cores = pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 CPUs to bind 2 ranks apart")


@two_cores
def test_unbound_ranks_bind_themselves_to_disjoint_cores():
    res = run_cmd(["pbp_hpc.train", *TINY, "--set", "parallel.threads_per_rank=1"], ranks=2)
    assert res.returncode == 0, res.stderr
    binding = last_json(res.stdout)["provenance"]["binding"]
    assert binding["how"].startswith("bound by pbp_hpc")
    a, b = binding["cpus"]
    assert len(a) == len(b) == 1 and a != b


@two_cores
def test_ranks_the_launcher_bound_are_left_as_they_are():
    from helpers import MPIEXEC

    res = run_cmd(["pbp_hpc.train", *TINY, "--set", "parallel.threads_per_rank=1"], ranks=2,
                  launcher=[MPIEXEC, "-n", "2", "-bind-to", "core"])
    assert res.returncode == 0, res.stderr
    assert last_json(res.stdout)["provenance"]["binding"]["how"] == "bound by the launcher"


def test_oversubscribed_ranks_and_parallel_bind_false_are_never_bound():
    n = len(os.sched_getaffinity(0)) + 1
    res = run_cmd(["pbp_hpc.train", *TINY, "--set", "parallel.threads_per_rank=1"], ranks=n)
    assert res.returncode == 0, res.stderr
    binding = last_json(res.stdout)["provenance"]["binding"]
    assert "oversubscribed" in binding["how"] and all(c == binding["cpus"][0] for c in binding["cpus"])
    res = run_cmd(["pbp_hpc.train", *TINY, "--set", "parallel.bind=false"], ranks=2)
    assert last_json(res.stdout)["provenance"]["binding"]["how"] == "not bound (parallel.bind: false)"


def _reducer_line(res):
    assert res.returncode == 0, res.stderr
    return next(line for line in res.stderr.splitlines() if "rank(s) x" in line)


def test_auto_reducer_shares_memory_among_a_nodes_ranks_and_says_so():
    from helpers import MPIEXEC

    line = _reducer_line(run_cmd(["pbp_hpc.train", *TINY], ranks=2))
    assert "reducer shm (auto: 2 ranks share each node's memory)" in line  # batch 1024: 512 rows per rank
    line = _reducer_line(run_cmd(["pbp_hpc.train", *TINY, "--set", "train.batch_size=128", "--set", "data.n_train=240"], ranks=2))
    assert ("reducer shared_batch (auto: 2 ranks share each node's memory and, at 64 rows of the batch per rank "
            "(<= 64), compute each batch together)") in line
    two_nodes = [MPIEXEC, "-n", "4", "-ppn", "2", "-hosts", "localhost,127.0.0.1", "-launcher", "fork"]
    line = _reducer_line(run_cmd(["pbp_hpc.train", *TINY], launcher=two_nodes))
    assert "reducer shm (auto: 2 ranks share each node's memory, then an Allreduce across 2 nodes)" in line
    one_each = [MPIEXEC, "-n", "2", "-ppn", "1", "-hosts", "localhost,127.0.0.1", "-launcher", "fork"]
    line = _reducer_line(run_cmd(["pbp_hpc.train", *TINY], launcher=one_each))
    assert "reducer blocking (auto: one rank per node, no memory to share)" in line
    line = _reducer_line(run_cmd(["pbp_hpc.train", *TINY, "--set", "parallel.reducer=overlap"], ranks=2))
    assert "reducer overlap (parallel.reducer)" in line


@pytest.fixture
def own_handlers():
    """Signal handlers and the stop flag as they were, given back after the test."""
    import signal

    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGUSR1, signal.SIGTERM)}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)
    runtime._stop_signal.clear()
    runtime._mode[:] = [False, False, False]


def _signalled_in_loop() -> None:
    import signal
    import time

    with runtime.training_loop():
        os.kill(os.getpid(), signal.SIGUSR1)
        time.sleep(0.5)  # the handler runs here


def test_in_the_training_loop_a_stop_signal_only_sets_the_flag_where_a_checkpoint_can_be_written(own_handlers):
    runtime.install_signal_handlers(stop_outside_loop=True)
    _signalled_in_loop()  # train: the loop checkpoints at its next step
    assert runtime.stop_signalled()


def test_a_command_without_checkpoints_is_stopped_inside_the_training_loop_too(own_handlers):
    from pbp_hpc.errors import Stopped

    runtime.install_signal_handlers(stop_in_loop=True)  # search_lr, bench
    with pytest.raises(Stopped):
        _signalled_in_loop()
