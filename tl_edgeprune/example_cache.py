"""Each example's ỹ and full-model logits, kept after its first use so later epochs skip both forwards.

Mask training freezes the weights, so an example's corrupted writer outputs and its unmasked logits are the
same every epoch; only the batch it lands in changes (batches are reshuffled). Computing them costs two plain
forwards per step, as much as the masked step's own backward on some models, so they are stored per example
and gathered into each new batch, within a memory budget.
"""

from __future__ import annotations

from typing import Callable

import torch
from jaxtyping import Float, Int

from .counterfactual import Counterfactual
from .data import PairedData, ShardedData
from .distributed import all_ranks, data_parallel, is_sharded
from .engine import MaskedModel

GIB = 2**30


class ExampleCache:
    """batch -> (ỹ, full-model logits), each example computed once while the cache fits ``budget_gib``.

    The first batch decides: if every example's ỹ (interchange only) and logits fit the budget, storage for the
    whole dataset is allocated on the model's device and filled as examples are first seen; otherwise nothing
    is kept and every batch is recomputed. Values equal a recomputation up to float rounding (the same row
    computed in another batch can round differently); the first epoch is bit-identical to no cache.

    ``scored_only``: unembed and keep each example's scored positions only (the built-in objectives read nothing
    else; with ``positions="last"`` that is 1/pos of the logits); the targets are those rows alone,
    ``logits[batch.positions]`` ([scored, vocab]), as the engine's ``gathered=True`` returns the circuit's.
    """

    def __init__(
        self,
        mm: MaskedModel,
        data: PairedData | ShardedData,
        source: Callable[[PairedData], Counterfactual],
        budget_gib: float,
        scored_only: bool = False,
    ):
        self.mm, self.data, self.source, self.budget_gib = mm, data, source, budget_gib
        self.scored_only = scored_only
        self.lockstep = is_sharded(mm.model) and data_parallel()[1] > 1  # every rank runs the same forwards
        self.decided = budget_gib <= 0
        self.enabled = False
        self.needed_gib: float | None = None
        self.fixed: Counterfactual | None = None  # a batch-independent ỹ (not interchange)
        self.values: dict[int, torch.Tensor] = {}  # shard -> [writer, n, pos, d_model]
        self.logits: dict[int, torch.Tensor] = {}  # shard -> [n, pos, vocab], or [n, most scored, vocab]
        self.slot_of: dict[int, torch.Tensor] = {}  # shard -> [n, pos]: a scored position's row in logits[shard][i]
        self.filled: dict[int, torch.Tensor] = {}  # shard -> [n] bool

    def describe(self) -> str:
        if self.budget_gib <= 0:
            return "off (cache_gib=0)"
        if self.needed_gib is None:
            return "undecided"
        verdict = "on" if self.enabled else f"off (needs more than cache_gib={self.budget_gib:g})"
        return f"{verdict}: {self.needed_gib:.3g} GiB for every example's ỹ and logits"

    def __call__(
        self, batch: PairedData, shard: int, rows: Int[torch.Tensor, " batch"]
    ) -> tuple[Counterfactual, Float[torch.Tensor, "batch pos vocab"]]:
        """ỹ and the unmasked logits of ``batch``, which holds rows ``rows`` of shard ``shard`` of the data."""
        if not self.decided:
            cf, full = self._compute(batch)
            self._decide(cf, full)
            if self.enabled:
                self._store(shard, rows, cf, full)
            return cf, full
        if not self.enabled:
            return self._compute(batch)
        seen = self.filled[shard][rows.to(self.filled[shard].device)]
        all_seen = bool(seen.all())
        # FSDP: forwards are collectives, so a rank whose rows are all seen may still have to run them
        if all_ranks(all_seen) if self.lockstep else all_seen:
            return self._gather(shard, rows)
        if all_seen:  # another rank computes: run the same two forwards on one row, and discard them
            self._compute(batch.select(slice(0, 1)))
            return self._gather(shard, rows)
        if not bool(seen.any()):  # the first epoch: compute as without a cache, keep a copy
            cf, full = self._compute(batch)
            self._store(shard, rows, cf, full)
            return cf, full
        new = ~seen  # a batch of seen and unseen rows (a resumed run, or a shard split across ranks)
        cf, full = self._compute(batch.select(new.to(batch.clean.device)))
        self._store(shard, rows[new.cpu()], cf, full)
        return self._gather(shard, rows)

    def _compute(self, batch: PairedData) -> tuple[Counterfactual, torch.Tensor]:
        cf = self.source(batch)
        with torch.no_grad():
            at = batch.positions if self.scored_only else None
            full = self.mm.full_logits(batch.clean, batch.attention_mask, at=at, gathered=self.scored_only)
        return cf, full

    def _decide(self, cf: Counterfactual, full: torch.Tensor) -> None:
        """Size the whole dataset from the first batch's bytes per position; allocate if it fits."""
        self.decided = True
        per_example = cf.kind == "interchange" and cf.values is not None
        self.fixed = None if per_example else cf
        logits_bytes = full.shape[-1] * full.element_size()  # per stored position
        values_bytes = cf.values[:, 0, 0].numel() * cf.values.element_size() if per_example else 0
        shards = self.data.shards
        kept = [self._kept_positions(s) for s in shards]
        self.needed_gib = sum(len(s) * (s.clean.shape[1] * values_bytes + k * logits_bytes)
                              for s, k in zip(shards, kept)) / GIB
        self.enabled = self.needed_gib <= self.budget_gib
        if not self.enabled:
            return
        for i, (s, k) in enumerate(zip(shards, kept)):
            n, pos = s.clean.shape
            if per_example:
                v = cf.values
                self.values[i] = torch.empty((v.shape[0], n, pos, v.shape[-1]), dtype=v.dtype, device=v.device)
            self.logits[i] = torch.empty((n, k, full.shape[-1]), dtype=full.dtype, device=full.device)
            if self.scored_only:
                self.slot_of[i] = (s.positions.long().cumsum(1) - 1).cpu()
            self.filled[i] = torch.zeros(n, dtype=torch.bool, device=full.device)

    def _kept_positions(self, shard: PairedData) -> int:
        """Logit rows kept per example: every position, or the most any example scores."""
        if not self.scored_only:
            return int(shard.clean.shape[1])
        return int(shard.positions.sum(1).max())

    def _scored(self, shard: int, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(batch row, slot in the store) of every scored position of ``rows``, on the model's device, in the
        order of ``logits[positions]`` (row-major)."""
        positions = self.data.shards[shard].positions[rows.to(self.data.shards[shard].positions.device)].cpu()
        at, pos = positions.nonzero(as_tuple=True)
        slot = self.slot_of[shard][rows.cpu()[at], pos]
        device = self.logits[shard].device
        return at.to(device), slot.to(device)

    def _store(self, shard: int, rows: torch.Tensor, cf: Counterfactual, full: torch.Tensor) -> None:
        """Copy a batch's values in before the masked forward overwrites a single-use ỹ with y − ỹ."""
        index = rows.to(full.device)
        if shard in self.values:
            self.values[shard].index_copy_(1, index, cf.values)
        if self.scored_only:  # full: the scored rows, in the order of _scored's (row-major, as logits[positions])
            at, slot = self._scored(shard, rows)
            self.logits[shard][index[at], slot] = full
        else:
            self.logits[shard].index_copy_(0, index, full)
        self.filled[shard][index] = True

    def _gather(self, shard: int, rows: torch.Tensor) -> tuple[Counterfactual, torch.Tensor]:
        store = self.logits[shard]
        index = rows.to(store.device)
        if self.scored_only:
            at, slot = self._scored(shard, rows)
            full = store[index[at], slot]
        else:
            full = store.index_select(0, index)
        if self.fixed is not None:  # mean/zero/user-given ablations: one ỹ for every batch
            return self.fixed, full
        values = self.values[shard].index_select(1, index)
        graph = self.mm.graph
        return Counterfactual("interchange", values, graph.n_writers, graph.spec.d_model, single_use=True), full
