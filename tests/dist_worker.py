"""One rank of the multi-process tests (spawned by tests/test_distributed.py)."""

import os

import torch
import torch.distributed as dist


def _start(rank: int, world: int, port: int) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)


def run(rank: int, world: int, port: int, out: str, settings: dict) -> None:
    """Data parallelism: every rank a whole model and a slice of each batch."""
    _start(rank, world, port)
    try:
        from tests.test_distributed import problem

        import tl_edgeprune as tep

        model, data = problem()
        result = tep.edge_pruning(model, data, **settings)
        if rank == 0:
            torch.save({"edge": result.edge_log_alpha, "node": result.node_log_alpha, "history": result.history}, out)
    finally:
        dist.destroy_process_group()


def run_sharded(rank: int, world: int, port: int, out: str, settings: dict, model_id: str, mesh_shape) -> None:
    """FSDP2: the model's blocks sharded over the ranks (a 2-D mesh: replicated × sharded, HSDP), each rank a slice
    of each batch. Records what the parent compares with one unsharded process: one masked forward (all masks 1,
    one edge off), the trained masks, and the model's weights, hooks and flags before and after."""
    _start(rank, world, port)
    try:
        from tests.test_distributed import sharded_problem

        import tl_edgeprune as tep
        from tl_edgeprune.adapter import ModelAdapter

        model, data, edge = sharded_problem(model_id)
        before = {name: p.detach().clone() for name, p in model.named_parameters()}
        grads_before = {name: p.requires_grad for name, p in model.named_parameters()}
        mesh = None
        if mesh_shape is not None:
            from torch.distributed.device_mesh import init_device_mesh

            mesh = init_device_mesh("cpu", tuple(mesh_shape), mesh_dim_names=("replicate", "shard"))
        tep.shard_model(model, mesh=mesh)
        sharded = sum(1 for p in model.parameters() if type(p).__name__ == "DTensor")
        adapter = ModelAdapter(model)  # FSDP's own module hooks are part of the model from here on
        hooks_before, flags_before = adapter.hook_counts(), adapter.flag_state()

        clean, corrupted = data.clean[:4], data.corrupted[:4]
        with torch.no_grad():
            plain = model(clean)
            with tep.masked(model) as mm:
                cf = mm.interchange(corrupted)
                ones = mm(clean, cf)
                z = mm.graph.ones()
                z[mm.graph.edge_index(edge)] = 0
                one_off = mm(clean, cf, z)
        result = tep.edge_pruning(model, data, **settings)

        after = {name: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach() for name, p in model.named_parameters()}
        record = {
            "sharded_params": sharded,
            "plain": plain, "ones": ones, "one_off": one_off,
            "edge": result.edge_log_alpha, "node": result.node_log_alpha, "history": result.history,
            "weights_equal": sorted(before) == sorted(after) and all(torch.equal(before[k], after[k]) for k in before),
            "requires_grad_restored": grads_before == {n: p.requires_grad for n, p in model.named_parameters()},
            "hooks_restored": adapter.hook_counts() == hooks_before,
            "flags_restored": adapter.flag_state() == flags_before,
        }
        if rank == 0:
            torch.save(record, out)
        dist.barrier()  # leave together: a rank tearing gloo down while another still talks to it can abort
    finally:
        dist.destroy_process_group()
