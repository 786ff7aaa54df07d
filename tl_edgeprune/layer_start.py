"""A clean forward kept layer by layer, so that a masked forward which changes nothing before layer l can begin there.

ACDC visits readers from the logits backwards: while it judges the edges into a reader of layer l, every reader
before l still sees the whole model, so the residual stream before l and every writer's output there are the
clean run's. ``MaskedModel.clean_starts`` records them once per batch; ``mm(..., start=starts.at(l))`` then runs
layers l.. only, the writers before l replayed from the record.
"""

from __future__ import annotations

import weakref
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


class ReplayedRows:
    """What the last forward from a layer left in its pooled delta buffer: rows [0, n_rows) hold the clean
    writers' y − ỹ of one start record and counterfactual (the forward wrote only the rows after them). The next
    forward on the same storage, record and counterfactual (ACDC's next candidate) reuses them instead of writing
    them again; the engine drops this as soon as any other forward takes the buffer."""

    def __init__(self, values: torch.Tensor, writer_outputs: torch.Tensor, counterfactual: torch.Tensor | None,
                 n_rows: int, prefix_sums: dict[int, torch.Tensor]):
        self.values = values
        self._sources = [None if t is None else (weakref.ref(t), t._version) for t in (writer_outputs, counterfactual)]
        self.n_rows = n_rows
        # The sparse products' Σ of rows [0, k), as that forward formed them: those with k <= n_rows hold for the next
        self.prefix_sums = prefix_sums

    def rows_for(self, values: torch.Tensor, writer_outputs: torch.Tensor, counterfactual: torch.Tensor | None) -> int:
        """Leading rows of ``values`` that hold these sources' clean deltas already (0: none can be trusted).
        Identity and version counters of both sources: a tensor changed in place, or a new one, matches nothing."""
        if values is not self.values:
            return 0
        for t, kept in zip((writer_outputs, counterfactual), self._sources):
            if (t is None) != (kept is None) or (t is not None and (kept[0]() is not t or t._version != kept[1])):
                return 0
        return self.n_rows
