"""Data-parallel Edge Pruning: 2 gloo ranks on CPU end with the masks of one process on the full batch."""

import socket

import pytest
import torch
import torch.multiprocessing as mp

import tl_edgeprune as tep

from .conftest import small_problem
from .dist_worker import run

SETTINGS = dict(target_sparsity=0.5, steps=12, sparsity_warmup=6, lr_warmup=2, batch_size=8, progress=False, seed=1)


def problem():
    return small_problem(n=16, seq=6, seed=11)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not torch.distributed.is_available(), reason="this torch build has no torch.distributed")
def test_two_gloo_ranks_match_one_process_on_the_full_batch(tmp_path):
    out = str(tmp_path / "rank0.pt")
    mp.spawn(run, args=(2, free_port(), out, SETTINGS), nprocs=2, join=True)
    parallel = torch.load(out, weights_only=False)
    model, data = problem()
    single = tep.edge_pruning(model, data, **SETTINGS)
    torch.testing.assert_close(parallel["edge"], single.edge_log_alpha, atol=1e-4, rtol=0)
    torch.testing.assert_close(parallel["node"], single.node_log_alpha, atol=1e-4, rtol=0)
    # Each rank scored half of each batch; the mean of their objectives is the full batch's.
    assert (single.edge_log_alpha - 10).abs().max() > 0.1  # the masks did move
    torch.testing.assert_close(torch.tensor(parallel["history"]["sparsity"]), torch.tensor(single.history["sparsity"]),
                               atol=1e-4, rtol=0)


def test_uneven_shards_are_refused():
    from tl_edgeprune.edge_pruning import _rank_slice

    with pytest.raises(tep.EdgePruneError, match="divisible by the 3 ranks"):
        _rank_slice(8, 0, 3)
