"""pbp_hpc: parallel minibatch backpropagation for multilayer perceptrons over MPI."""

from pbp_hpc import blas_kernels as _blas_kernels

_blas_kernels.choose()  # before anything loads numpy (and with it OpenBLAS)

__version__ = "0.1.0"
