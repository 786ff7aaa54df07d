"""Several processes on one run: data parallelism (each rank a slice of every batch) and FSDP-sharded weights.

Masks are small and replicated; the model may be sharded with ``torch.distributed.fsdp.fully_shard``. A sharded
model's every forward is a collective (its blocks all-gather their weights), so every rank must run the same
forwards in the same order: ``all_ranks`` lets a rank that could skip a forward learn that another one cannot.
"""

from __future__ import annotations

from typing import Any

import torch

from .errors import EdgePruneError


def data_parallel() -> tuple[int, int]:
    """(rank, world size) when torch.distributed is initialised (e.g. under torchrun), else (0, 1)."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def rank_slice(n: int, rank: int, world: int) -> slice:
    """This rank's equal slice of a batch of n; the mean of the ranks' gradients is then the full batch's."""
    if n % world:
        raise EdgePruneError(f"data-parallel Edge Pruning needs batches divisible by the {world} ranks; got {n} "
                             "(choose batch_size and a dataset size that are multiples of the world size)")
    return slice(rank * n // world, (rank + 1) * n // world)


def is_sharded(model: Any) -> bool:
    """Whether any part of the model is sharded by FSDP2 (``fully_shard``): its forwards are then collectives."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a torch without FSDP2 cannot have sharded the model with it
        return False
    return any(isinstance(m, FSDPModule) for m in model.modules())


def all_ranks(flag: bool) -> bool:
    """True on every rank when ``flag`` is true on every rank (one all-reduce); the flag itself when alone."""
    rank, world = data_parallel()
    if world == 1:
        return flag
    value = torch.tensor([1 if flag else 0], dtype=torch.int64)
    torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MIN)
    return bool(value.item())


def shard_model(model: Any, mesh: Any = None, reshard_after_forward: bool = True) -> Any:
    """Shard a TransformerLens model's weights over the ranks with FSDP2: each block, then the rest (embeddings,
    final norm, unembedding). Call it on every rank after ``init_process_group``, before any method; weights stay
    frozen (masks are the only trained tensors). ``mesh``: a 1-D DeviceMesh, or 2-D (replicate, shard) for HSDP.

    Returns the model (sharded in place, as ``fully_shard`` does)."""
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError as exc:
        raise EdgePruneError(f"this torch ({torch.__version__}) has no FSDP2 (torch.distributed.fsdp.fully_shard, "
                             "torch >= 2.6); use data parallelism alone (every rank a whole model)") from exc
    blocks = getattr(model, "blocks", None)
    if blocks is None:
        raise EdgePruneError(f"shard_model expects a TransformerLens model with .blocks, got {type(model).__name__}")
    strided = [name for name, p in model.named_parameters() if not p.is_contiguous()]
    if strided:
        raise EdgePruneError(
            f"FSDP2 cannot shard non-contiguous parameters, and this model has {len(strided)} ({strided[0]}, ...): "
            "TransformerBridge splits GPT-2's fused c_attn into views. Load a model with separate q/k/v weights "
            "(Llama, Mistral, Qwen, NeoX ...), or use data parallelism alone.")
    if data_parallel()[1] == 1:
        raise EdgePruneError("shard_model needs torch.distributed initialised with several ranks "
                             "(torch.distributed.init_process_group, e.g. under torchrun)")
    kwargs = {"reshard_after_forward": reshard_after_forward}
    if mesh is not None:
        kwargs["mesh"] = mesh
    for block in blocks:
        fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)
    return model
