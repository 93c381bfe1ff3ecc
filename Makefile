# Set-up and entry points. `make run` and `make test` are all a fresh machine needs.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
MPIEXEC := $(VENV)/bin/mpiexec
# Real MNIST beside the project when present (as on CI); else the package's own lookup
# (PBP_HPC_DATA, then the per-user cache, downloading into it).
SHARED_MNIST := $(wildcard ../shared/data/mnist/train-images-idx3-ubyte.gz)
DATA_ARG := $(if $(SHARED_MNIST),--data-dir ../shared/data/mnist,)
RANKS  ?= 2
# The MPICH wheel's default UCX netmod fails MPI_Init now and then when several jobs start at
# once ("UCX ERROR failed to unpack address", pmodels/mpich#7417); OFI has not, and on one node
# both use shared memory for the data, so Allreduce times are the same (measured).
export MPIR_CVAR_CH4_NETMOD ?= ofi
CONFIG ?= configs/mnist_net1h.yaml

.PHONY: setup setup-test setup-peers run test test-serial test-mpi test-slurm bench clean soak fuzz

# What each target installs (sizes: README, "Install"):
#   make run   -> .venv with pbp_hpc and what training needs: numpy, scipy, mpi4py, MPICH (the
#                 mpich extra: an MPI from PyPI; mpiexec runs as root and oversubscribes without flags),
#                 h5py, pyyaml, pydantic, threadpoolctl, tqdm, matplotlib, psutil
#   make test  -> also the test tools (the test extra) and the peers below, so that every test runs
#   make bench -> also the peers: PyTorch (CPU; the `framework` implementation and the benchmark's
#                 torch column) and JAX (the jax column); each optional: a failed install only
#                 leaves those rows out, and the tests that need them skip
# --no-compile: no .pyc for all of numpy, scipy and matplotlib at install (~70 MB); Python compiles
# the modules a run imports, when it first imports them.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --no-compile --upgrade pip
	$(PY) -m pip install -q --no-compile -e '.[mpich]'
	@touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(PY) -m pip install -q -e '.[mpich,test]'
	@touch $@

$(VENV)/.installed-peers: $(VENV)/.installed
	-@$(PY) -m pip install -q 'torch==2.13.0' || echo "torch not installed: framework rows will be skipped"
	-@$(PY) -m pip install -q 'jax[cpu]==0.10.2' || echo "jax not installed (optional, the jax extra): the benchmark's jax columns will say n/a"
	@touch $@

setup: $(VENV)/.installed
setup-test: $(VENV)/.installed-test $(VENV)/.installed-peers
setup-peers: $(VENV)/.installed-peers

run: setup
	$(MPIEXEC) -n $(RANKS) $(PY) -m pbp_hpc.train --config $(CONFIG) $(DATA_ARG)
	@echo "(one seed; configs/mnist_net1h.yaml over seeds 0-4 gives 97.89 +- 0.05% test: docs/large_batch.md)"

# The whole suite: serially, then the in-process MPI tests under 2 and 3 ranks
# (pytest-mpi skips @pytest.mark.mpi tests unless --with-mpi is given). Every test runs under a
# time limit (pytest-timeout, pyproject.toml). Under mpiexec, tests/mpi_harness.py makes a failure
# or a timeout on any rank end the whole job at once (so the MPI runs stop at the first failure,
# printed to stderr with its rank), and only rank 0 prints the report; -rs: the skip reasons.
test: setup-test
	PBP_HPC_TEST_DATA=$(abspath ../shared/data/mnist) $(PY) -m pytest -q -rs -p no:cacheprovider
	$(MPIEXEC) -n 2 $(PY) -m pytest -q -rs -p no:cacheprovider --with-mpi -m mpi
	$(MPIEXEC) -n 3 $(PY) -m pytest -q -rs -p no:cacheprovider --with-mpi -m mpi

# The soak test: a 100-point sweep (jobs/soak_tiny.yaml) run while processes are killed at random
# (ranks, mpiexec, the sweep itself; SIGKILL and SIGTERM), until every point is recorded; it fails
# if any point is lost, recorded twice or not ok, or a temporary file or checkpoint is left.
SOAK_SEED ?= 0
soak: setup
	$(PY) benchmarks/soak.py --seed $(SOAK_SEED)

# The file-format fuzzer at length: 5000 mutated checkpoints, model files and results files each
# (CI runs 200 of each with the same fixed seed; tests/test_file_fuzz.py). FUZZ_EXAMPLES=N to change.
FUZZ_EXAMPLES ?= 5000
fuzz: setup-test
	PBP_HPC_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(PY) -m pytest -q -p no:cacheprovider --timeout 0 tests/test_file_fuzz.py -k mutated

bench: setup-peers
	$(PY) -m pbp_hpc.bench

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
