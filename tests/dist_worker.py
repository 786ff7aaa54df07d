"""One rank of the data-parallel test (spawned by tests/test_distributed.py)."""

import os

import torch
import torch.distributed as dist


def run(rank: int, world: int, port: int, out: str, settings: dict) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        from tests.test_distributed import problem

        import tl_edgeprune as tep

        model, data = problem()
        result = tep.edge_pruning(model, data, **settings)
        if rank == 0:
            torch.save({"edge": result.edge_log_alpha, "node": result.node_log_alpha, "history": result.history}, out)
    finally:
        dist.destroy_process_group()
