"""ACDC (Conmy et al. 2023) on the engine: visit readers from the output backwards and drop each incoming
edge whose removal changes the metric (KL to the full model by default) by less than τ.

Done once per run rather than per candidate: counterfactual activations and the full model's logits for
every batch (the data is held in memory as a few batches). Each candidate then costs one masked forward
without gradients, unembedding only the scored positions for the built-in metrics, and from the reader's
layer on: the layers before it still see the whole model, so they are not rerun (layer_start.py). Decisions are sequential, as in ACDC: a removal is judged against the circuit that the
earlier removals left.
"""

from __future__ import annotations

import time
from typing import Any, NamedTuple, Union

import torch
from tqdm.auto import tqdm

from .ablations import Ablation, counterfactual_source
from .circuit import Circuit
from .data import PairedData, as_data, position_names_for
from .edge_pruning import frozen_parameters
from .engine import MaskedModel
from . import validation
from .fingerprint import model_fingerprint
from .graph import InputNodes
from .layer_start import CleanStarts
from .metrics import ON_SCORED_ROWS, Objective, resolve_objective
from .options import checked_options
from .threads import torch_threads


class _Batch(NamedTuple):
    """What every candidate reuses of one batch: ỹ, the full model's logits (at ``logits_at`` only, as rows, when
    set), and the clean run per layer."""

    data: PairedData
    counterfactual: Any
    full: torch.Tensor
    logits_at: torch.Tensor | None
    position_classes: torch.Tensor | None
    starts: CleanStarts | None


@checked_options()
def acdc(
    model: Any,
    data: PairedData,
    threshold: float,
    *,
    metric: Union[str, Objective] = "kl",
    ablation: Ablation = "interchange",
    batch_size: int = 256,
    input_nodes: InputNodes = "separate",
    mean_reference: torch.Tensor | None = None,
    progress: bool = True,
    threads: int | None = None,
    positional: bool = False,
    start_at_layer: bool = True,
) -> Circuit:
    """The ACDC circuit at threshold τ; ``circuit.scores`` holds each edge's metric change when tried.

    ``threads``: torch threads for the run (default: 1 for a small CPU model, else torch's setting; threads.py).
    ``positional=True``: candidates are the edges of each position class of the data (a class's readers are
    visited together, from the logits backwards).
    ``start_at_layer``: while judging the edges into a reader of layer l, run layers l.. only (the layers before it
    see the whole model, so their clean run is kept once per batch: one residual stream per layer and every
    writer's output, about as much memory again as the counterfactual). Same decisions either way; False saves
    that memory. A TransformerBridge always runs whole (TransformerLens cannot start it at a layer).
    """
    validation.real("threshold", threshold, low=0.0, hint=" (τ: an edge is dropped when removing it changes the metric "
                    "by less than τ; NaN would keep every edge)")
    validation.integer("batch_size", batch_size, minimum=1)
    data = as_data(data)
    classes = position_names_for(data, positional)
    objective = resolve_objective(metric)
    # The built-in metrics read the scored positions alone: only those are unembedded, and kept as rows (the full
    # model's logits too: [scored, vocab] per batch, not [batch, pos, vocab] of mostly zeros)
    on_rows = ON_SCORED_ROWS.get(objective)
    if on_rows is not None:
        objective = on_rows
    t0 = time.perf_counter()
    with torch.no_grad(), torch_threads(model, threads), frozen_parameters(model), \
            MaskedModel(model, input_nodes=input_nodes, position_classes=classes) as mm:
        mm.check_data(data)
        graph = mm.graph
        source = counterfactual_source(mm, ablation, data, mean_reference)
        batches = []
        for batch in data.batches(batch_size):
            batch = batch.to(mm.device)
            at = batch.positions if on_rows is not None else None
            starts = None
            if start_at_layer and mm.starts_at_layer(batch.attention_mask):
                starts = mm.clean_starts(batch.clean, batch.attention_mask)
            cf = source(batch)
            full = mm.full_logits(batch.clean, batch.attention_mask, at=at, gathered=at is not None)
            batches.append(_Batch(batch, cf, full, at, mm.position_classes_of(batch), starts))
        last_layer = graph.spec.n_layers - 1

        def score(mask: torch.Tensor, layer: int = 0) -> float:
            """The metric of the circuit ``mask``, which removes nothing into readers before ``layer``."""
            total = 0.0
            for b in batches:
                start = b.starts.at(min(layer, last_layer)) if b.starts is not None and layer > 0 else None
                logits = mm(b.data.clean, b.counterfactual, mask, attention_mask=b.data.attention_mask,
                            logits_at=b.logits_at, position_classes=b.position_classes, start=start,
                            gathered=b.logits_at is not None)
                total += float(objective(logits, b.full, b.data)) * len(b.data)
            return total / len(data)

        valid = graph.valid_mask()
        mask = valid.to(device=mm.device, dtype=torch.float32)
        tried = torch.zeros(graph.shape)
        current = score(mask)
        order = [(r, group.layer) for group in reversed(graph.reader_groups) for r in graph.reader_columns(group)]
        bar = tqdm(total=graph.n_edges, disable=not progress, desc=f"ACDC τ={threshold:g}")
        for r, layer in order:
            for w in reversed(valid[:, r].nonzero().flatten().tolist()):
                mask[w, r] = 0.0
                new = score(mask, layer)
                tried[w, r] = new - current
                if new - current < threshold:
                    current = new
                else:
                    mask[w, r] = 1.0
                bar.update(1)
        bar.close()
    info = {"threshold": threshold, "metric": metric if isinstance(metric, str) else "custom",
            "seconds": time.perf_counter() - t0, "final_metric": current,
            "started_at_layer": all(b.starts is not None for b in batches)}
    return Circuit(graph, mask.bool().cpu(), scores=tried, method="acdc", info=info, model=model_fingerprint(model))
