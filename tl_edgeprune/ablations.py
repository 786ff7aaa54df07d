"""Choosing the counterfactual for each batch: one name for users, one function for the methods."""

from __future__ import annotations

from typing import Callable, Union

import torch

from .counterfactual import Counterfactual
from .data import PairedData, ShardedData
from .engine import MaskedModel
from .errors import EdgePruneError

ABLATIONS = ("interchange", "mean", "mean_per_position", "zero")
Ablation = Union[str, Counterfactual]


def counterfactual_source(
    mm: MaskedModel, ablation: Ablation, data: PairedData, mean_reference: torch.Tensor | None = None,
    single_use: bool = False,
) -> Callable[[PairedData], Counterfactual]:
    """batch -> ỹ. Means are computed once (over ``mean_reference``, default the corrupted inputs).

    ``single_use``: each interchange ỹ feeds exactly one masked forward, which overwrites it with y − ỹ.
    """
    if isinstance(ablation, Counterfactual):
        if ablation.kind == "interchange":
            raise EdgePruneError(
                "an interchange Counterfactual holds one corrupted batch's activations; passed as ablation= it would "
                "be paired with every batch of the data. Pass ablation='interchange' (each batch then gets its own "
                "corrupted run), or a mean/zero Counterfactual (mm.mean(...), mm.zero())."
            )
        return lambda batch: ablation
    if ablation == "interchange":
        return lambda batch: mm.interchange(batch.corrupted, batch.attention_mask, single_use=single_use)
    if ablation == "zero":
        fixed = mm.zero()
        return lambda batch: fixed
    if ablation in ("mean", "mean_per_position"):
        per_position = ablation == "mean_per_position"
        if mean_reference is not None:
            reference, mask = mean_reference, None
        elif isinstance(data, ShardedData):
            if per_position:
                raise EdgePruneError("per-position means need one input width; this dataset has several (use 'mean')")
            reference, mask = data.corrupted_batches, None
        else:
            reference, mask = data.corrupted, data.attention_mask
        fixed = mm.mean(reference, per_position=per_position, attention_mask=mask)
        return lambda batch: fixed
    raise EdgePruneError(f"ablation must be one of {ABLATIONS} or a Counterfactual, got {ablation!r}")
