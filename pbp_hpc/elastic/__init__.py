"""Elastic runs: `python -m pbp_hpc.elastic [--min-ranks K] [--max-restarts R] -- mpiexec -n P python -m pbp_hpc.train ...`.

A job that loses a rank or a node is restarted from its last checkpoint on the ranks and hosts
that are left (docs/elastic.md): cli.py the launcher's loop, command.py the launch rewritten for
what is left, failures.py how an attempt ended, ranks.py the line train prints for it.
"""
