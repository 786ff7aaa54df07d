"""Several processes: 2 gloo ranks on CPU end with the masks of one process on the full batch, whether every rank
holds the whole model (data parallelism) or its blocks are sharded by FSDP2 (``tep.shard_model``)."""

import socket

import pytest
import torch
import torch.multiprocessing as mp

import tl_edgeprune as tep

from .conftest import make_model, model_ids, small_problem
from .dist_worker import run, run_sharded

SETTINGS = dict(target_sparsity=0.5, steps=12, sparsity_warmup=6, lr_warmup=2, batch_size=8, progress=False, seed=1)
needs_dist = pytest.mark.skipif(not torch.distributed.is_available(), reason="this torch build has no torch.distributed")


def problem():
    return small_problem(n=16, seq=6, seed=11)


def sharded_problem(model_id: str):
    """A model of the suite, 16 random pairs scored at the last position, and one edge to switch off."""
    model = make_model(model_id)
    gen = torch.Generator().manual_seed(11)
    clean = torch.randint(0, 39, (16, 6), generator=gen)
    corrupted = torch.randint(0, 39, (16, 6), generator=gen)
    return model, tep.paired_data(clean, corrupted, positions="last"), "m0->logits"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@needs_dist
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


# FSDP2 refuses non-contiguous parameters, and TL's GPT-2 bridge splits the fused c_attn into views: under TL 4 the
# GPT-2 twin cannot be sharded (shard_model says so, tested below); the Llama twin (separate q/k/v) can.
# Each case: (model, ranks, mesh). 2 ranks shard every block over both, each rank half of each batch; 4 ranks on a
# (replicate 2, shard 2) mesh are HSDP: two data-parallel replicas, each sharded over two ranks.
SHARDED_CASES = [(i, 2, None) for i in model_ids(["gpt2", "llama"]) if i != "bridge-gpt2"] + \
    [(model_ids(["llama"])[0], 4, (2, 2))]


@needs_dist
@pytest.mark.parametrize("model_id,world,mesh", SHARDED_CASES, ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else str(v))
def test_fsdp_sharded_blocks_match_one_unsharded_process(tmp_path, model_id, world, mesh):
    """Gloo ranks, blocks and root sharded by FSDP2, each rank a slice of each batch: the masked forward equals the
    unsharded model's (float32, 1e-5), the trained masks equal one process's on the full batch (1e-4, float error
    of the gradient all-reduce), the engine's hook-firing check passed on every forward of the run (it raises
    otherwise), and the model's weights, hooks and flags are as before."""
    out = str(tmp_path / "rank0.pt")
    mp.spawn(run_sharded, args=(world, free_port(), out, SETTINGS, model_id, mesh), nprocs=world, join=True)
    sharded = torch.load(out, weights_only=False)
    assert sharded["sharded_params"] > 0  # the weights really were DTensors
    assert sharded["weights_equal"] and sharded["requires_grad_restored"]
    assert sharded["hooks_restored"] and sharded["flags_restored"]

    model, data, edge = sharded_problem(model_id)
    clean, corrupted = data.clean[:4], data.corrupted[:4]
    with torch.no_grad():
        plain = model(clean)
        with tep.masked(model) as mm:
            cf = mm.interchange(corrupted)
            z = mm.graph.ones()
            z[mm.graph.edge_index(edge)] = 0
            one_off = mm(clean, cf, z)
    torch.testing.assert_close(sharded["plain"], plain, atol=1e-5, rtol=0)
    torch.testing.assert_close(sharded["ones"], plain, atol=1e-5, rtol=0)
    torch.testing.assert_close(sharded["one_off"], one_off, atol=1e-5, rtol=0)
    assert (one_off - plain).abs().max() > 1e-3  # the edge matters, so the comparison can fail

    single = tep.edge_pruning(model, data, **SETTINGS)
    assert (single.edge_log_alpha - 10).abs().max() > 0.1
    torch.testing.assert_close(sharded["edge"], single.edge_log_alpha, atol=1e-4, rtol=0)
    torch.testing.assert_close(sharded["node"], single.node_log_alpha, atol=1e-4, rtol=0)
    torch.testing.assert_close(torch.tensor(sharded["history"]["objective"]), torch.tensor(single.history["objective"]),
                               atol=1e-5, rtol=0)


def test_uneven_shards_are_refused():
    from tl_edgeprune.distributed import rank_slice

    with pytest.raises(tep.EdgePruneError, match="divisible by the 3 ranks"):
        rank_slice(8, 0, 3)


def test_shard_model_needs_several_ranks():
    model = make_model(model_ids(["llama"])[0])
    with pytest.raises(tep.EdgePruneError, match="init_process_group"):
        tep.shard_model(model)


def test_shard_model_refuses_non_contiguous_weights():
    """TL's GPT-2 bridge holds q/k/v as views of c_attn: FSDP2 would fail deep inside; shard_model says why first."""
    from .models import bridge_model

    with pytest.raises(tep.EdgePruneError, match="non-contiguous"):
        tep.shard_model(bridge_model("gpt2"))
