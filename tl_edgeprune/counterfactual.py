"""What a removed edge carries instead of the writer's real output: ỹ, the counterfactual.

Interchange (a corrupted batch), mean (over a reference set, per position or not) or zero ablation.
Values are computed once, without gradients, and broadcast over batch/position where they can.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from jaxtyping import Float

from .errors import EdgePruneError

AblationKind = Literal["interchange", "mean", "mean_per_position", "zero"]


@dataclass
class Counterfactual:
    """ỹ for every writer: [writer, batch or 1, pos or 1, d_model]; None means zero ablation.

    ``single_use``: the one masked forward that reads it overwrites ``values`` with y − ỹ in place, so a step
    keeps only the differences (one writer-sized tensor instead of two); ``spent`` is then True.
    """

    kind: AblationKind
    values: Float[torch.Tensor, "writer batch pos d_model"] | None
    n_writers: int
    d_model: int
    single_use: bool = False
    spent: bool = False

    def __post_init__(self) -> None:
        v = self.values
        if v is None:
            return
        if v.dim() != 4 or v.shape[0] != self.n_writers or v.shape[-1] != self.d_model:
            raise EdgePruneError(
                f"counterfactual values must have shape [n_writers={self.n_writers}, batch|1, pos|1, "
                f"d_model={self.d_model}], got {list(v.shape)}; were the mean activations computed on "
                "another model or graph?"
            )

    @property
    def batch_shape(self) -> tuple[int, int] | None:
        """(batch, pos) the values were computed for; 1 means 'broadcasts'."""
        return None if self.values is None else (int(self.values.shape[1]), int(self.values.shape[2]))

    def check_fits(self, batch: int, pos: int) -> None:
        """Raise before any forward if this counterfactual cannot be paired with a [batch, pos] input."""
        if self.values is None:
            return
        b, p = self.batch_shape
        if self.kind == "interchange" and (b, p) != (batch, pos):
            raise EdgePruneError(
                f"the clean batch is [{batch}, {pos}] tokens but the corrupted batch was [{b}, {p}]. Clean and "
                "corrupted inputs must pair up one to one with the same token length: pad both to the same "
                "length (with an attention mask) or choose corrupted prompts of equal token length."
            )
        if b not in (1, batch):
            raise EdgePruneError(f"counterfactual batch {b} does not match the input batch {batch}")
        if p not in (1, pos):
            raise EdgePruneError(
                f"the mean-ablation dataset has width {p} tokens but this batch has {pos}: per-position means "
                "need inputs of the same width. Use mean(..., per_position=False) or tokenise to equal width."
            )

    def check_unspent(self) -> None:
        if self.spent:
            raise EdgePruneError(
                "this single-use counterfactual was already consumed by a masked forward (its values now hold "
                "y − ỹ); compute a new one with mm.interchange(corrupted, single_use=True), or pass "
                "single_use=False to reuse it"
            )

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> "Counterfactual":
        self.check_unspent()
        if self.values is None:
            return self
        return Counterfactual(self.kind, self.values.to(device=device, dtype=dtype), self.n_writers, self.d_model)

    def select(self, index: torch.Tensor | slice) -> "Counterfactual":
        """The rows of a batch (for per-example interchange counterfactuals)."""
        self.check_unspent()
        if self.values is None or self.values.shape[1] == 1:
            return self
        return Counterfactual(self.kind, self.values[:, index], self.n_writers, self.d_model)
