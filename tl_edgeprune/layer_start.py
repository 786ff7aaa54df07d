"""A clean forward kept layer by layer, so that a masked forward which changes nothing before layer l can begin there.

ACDC visits readers from the logits backwards: while it judges the edges into a reader of layer l, every reader
before l still sees the whole model, so the residual stream before l and every writer's output there are the
clean run's. ``MaskedModel.clean_starts`` records them once per batch; ``mm(..., start=starts.at(l))`` then runs
layers l.. only, the writers before l replayed from the record.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Float, Int

from .errors import EdgePruneError


@dataclass(frozen=True)
class LayerStart:
    """The clean run at the start of ``layer``: the residual stream there and every writer's output (the rows of
    writers before ``layer`` are the ones used)."""

    layer: int
    resid: Float[torch.Tensor, "batch pos d_model"]
    writer_outputs: Float[torch.Tensor, "writer batch pos d_model"]
    tokens: Int[torch.Tensor, "batch pos"]


@dataclass(frozen=True)
class CleanStarts:
    """One clean forward of ``tokens``: the residual stream before every layer, and every writer's output."""

    tokens: Int[torch.Tensor, "batch pos"]
    resid_pre: tuple[Float[torch.Tensor, "batch pos d_model"], ...]
    writer_outputs: Float[torch.Tensor, "writer batch pos d_model"]

    @property
    def n_layers(self) -> int:
        return len(self.resid_pre)

    def at(self, layer: int) -> LayerStart:
        if not 0 <= layer < self.n_layers:
            raise EdgePruneError(f"layer must be in [0, {self.n_layers}), got {layer}")
        return LayerStart(layer, self.resid_pre[layer], self.writer_outputs, self.tokens)
