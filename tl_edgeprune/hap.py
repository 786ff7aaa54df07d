"""HAP: EAP preselects a generous set of edges, then Edge Pruning learns masks only inside it."""

from __future__ import annotations

import time
from typing import Any

import torch

from .data import PairedData
from .eap import EdgeScores, eap
from .edge_pruning import EdgePruningResult, edge_pruning
from .errors import EdgePruneError
from .options import checked_options


def attribution_init(scores: EdgeScores, keep: float = 0.05, high: float = 3.0, low: float = -3.0) -> torch.Tensor:
    """A per-edge start for Edge Pruning's log α: ``high`` on the top ``keep`` fraction of edges by |score|, ``low``
    on the rest, so training starts near the attribution's circuit but may still add or drop any edge."""
    if not 0 < keep <= 1:
        raise EdgePruneError(f"keep must lie in (0, 1], got {keep}")
    top = scores.circuit(fraction=keep).edges
    return torch.where(top, torch.tensor(high), torch.tensor(low)).float()


@checked_options(edge_pruning)
def hap(
    model: Any,
    data: PairedData,
    target_sparsity: float,
    *,
    keep: int | float,
    eap_options: dict | None = None,
    **edge_pruning_options: Any,
) -> EdgePruningResult:
    """``keep``: edges EAP keeps (an int) or a fraction of all edges (a float ≤ 1); the rest stay at 0.

    The result's ``info`` holds the EAP and Edge Pruning times separately.
    """
    eap_options = dict(eap_options or {})
    for shared in ("ablation", "input_nodes", "batch_size", "threads", "positional"):
        if shared in edge_pruning_options and shared not in eap_options:
            eap_options[shared] = edge_pruning_options[shared]
    eap_options.setdefault("progress", edge_pruning_options.get("progress", True))
    t0 = time.perf_counter()
    scores = eap(model, data, **eap_options)
    if isinstance(keep, float) and not 0 < keep <= 1:
        raise EdgePruneError(f"keep as a fraction must lie in (0, 1], got {keep}")
    preselected = scores.circuit(k=keep) if isinstance(keep, int) else scores.circuit(fraction=keep)
    t_eap = time.perf_counter() - t0
    # The preselection already removes the other edges: ramp the target from there, not from 0.
    edge_pruning_options.setdefault("start_sparsity", min(preselected.sparsity, target_sparsity))
    result = edge_pruning(model, data, target_sparsity, trainable_edges=preselected.edges, **edge_pruning_options)
    result.info.update({"method": "hap", "eap_seconds": t_eap, "edge_pruning_seconds": result.seconds,
                        "preselected_edges": preselected.n_edges})
    result.seconds += t_eap
    return result
