"""parallel.fusion_bytes (the overlap reducer's tensor fusion): consecutive layers share a
message until it holds that many bytes; each message starts when its lowest layer is final.
Across ranks and nodes the fused sums equal one rank's (test_nodes.py)."""

import numpy as np
from mpi4py import MPI

from pbp_hpc.engine.model import Layout
from pbp_hpc.parallel.reducers import EXTRAS
from pbp_hpc.parallel.reducers.overlap import OverlapReducer

LAYERS = [784, 16, 12, 10]  # float64 gradients of 100480, 1632 and 1040 bytes


def plan(fusion_bytes: int, compressed: bool = False) -> tuple[list[tuple[int, int]], dict[int, int]]:
    r = OverlapReducer(MPI.COMM_SELF, Layout(LAYERS), np.float64, np)
    r.fuse(fusion_bytes)
    if compressed:  # as on several ranks (one rank sends nothing, so compression is left off)
        r.kind = "bf16"
        r._plan()
    spans = [(b.__array_interface__["data"][0] - r.grad.__array_interface__["data"][0]) // 8 for b in r.buckets]
    return [(s, s + b.shape[0]) for s, b in zip(spans, r.buckets)], r.starts


def test_without_fusion_each_layer_is_a_message_and_the_top_one_carries_the_extras():
    spans, starts = plan(0)
    n = Layout(LAYERS).n_params
    assert spans == [(12764, n + EXTRAS), (12560, 12764), (0, 12560)]
    assert starts == {2: 0, 1: 1, 0: 2}


def test_small_layers_are_combined_until_a_message_holds_fusion_bytes():
    spans, starts = plan(2000)
    n = Layout(LAYERS).n_params
    assert spans == [(12560, n + EXTRAS), (0, 12560)]  # layers 2 and 1 together, then layer 0
    assert starts == {1: 0, 0: 1}  # sent when layer 1's gradient, the lower of the two, is final
    assert plan(10**9)[0] == [(0, n + EXTRAS)]  # everything: one message, as the blocking reducer


def test_compressed_messages_leave_the_extras_to_their_own():
    spans, _ = plan(2000, compressed=True)
    assert spans[0][1] == Layout(LAYERS).n_params
