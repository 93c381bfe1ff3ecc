"""pbp_hpc: parallel minibatch backpropagation for multilayer perceptrons over MPI."""

__version__ = "0.1.0"
