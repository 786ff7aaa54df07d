"""The per-example cache of ỹ and target logits: later epochs gather what a recomputation gives, without forwards.

Tolerance: 1e-5 absolute in float32 (a row computed inside another batch may round differently); masks after
training with and without the cache agree to 1e-4, as the data-parallel test (rounding passes through AdamW).
"""

import pytest
import torch

import tl_edgeprune as tep
from tl_edgeprune.ablations import counterfactual_source
from tl_edgeprune.data import ShardedData
from tl_edgeprune.example_cache import ExampleCache

from .conftest import small_problem

ATOL = 1e-5


def problem():
    return small_problem(n=12, seq=5)


class ForwardCounter:
    """Counts the model's forwards (embedding hook calls) while attached."""

    def __init__(self, model):
        self.calls = 0
        self.handle = model.embed.register_forward_hook(self._count)

    def _count(self, *_):
        self.calls += 1


def recomputed(mm, batch):
    cf = mm.interchange(batch.corrupted, batch.attention_mask)
    with torch.no_grad():
        return cf.values, mm.full_logits(batch.clean, batch.attention_mask)


def assert_target_close(full, expected, batch, scored_only):
    """All positions, or (when only those are kept) the scored ones as rows, in ``logits[positions]``'s order."""
    if scored_only:
        pos = batch.positions
        assert tuple(full.shape) == (int(pos.sum()), expected.shape[-1])
        torch.testing.assert_close(full, expected[pos], atol=ATOL, rtol=0)
    else:
        torch.testing.assert_close(full, expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("scored_only", [False, True])
@pytest.mark.parametrize("ablation", ["interchange", "mean"])
def test_later_epochs_gather_what_a_recomputation_gives_without_a_forward(ablation, scored_only):
    model, data = problem()
    gen = torch.Generator().manual_seed(3)  # 0 to 5 scored positions per example
    data.positions = torch.rand(data.positions.shape, generator=gen) < torch.linspace(0, 1, len(data))[:, None]
    with tep.masked(model) as mm:
        source = counterfactual_source(mm, ablation, data, single_use=True)
        cache = ExampleCache(mm, data, source, budget_gib=1.0, scored_only=scored_only)
        counter = ForwardCounter(model)
        try:
            for shard, rows in data.batch_rows(4, shuffle_seed=0):  # epoch 1: 3 batches, 2 forwards each
                cache(data.shards[shard].select(rows), shard, rows)
            first_epoch = counter.calls
            for shard, rows in data.batch_rows(4, shuffle_seed=1):  # epoch 2: other batches of the same rows
                batch = data.shards[shard].select(rows)
                before = counter.calls
                cf, full = cache(batch, shard, rows)
                assert counter.calls == before  # no forward at all
                values, expected_full = recomputed(mm, batch)
                assert_target_close(full, expected_full, batch, scored_only)
                if ablation == "interchange":
                    assert cf.single_use and tuple(cf.values.shape) == tuple(values.shape)
                    torch.testing.assert_close(cf.values, values, atol=ATOL, rtol=0)
                else:
                    assert cf.kind == "mean"
        finally:
            counter.handle.remove()
    assert first_epoch == (6 if ablation == "interchange" else 3)  # ỹ (interchange only) and target per batch
    assert cache.enabled and cache.describe().startswith("on")
    kept = int(data.positions.sum(1).max()) if scored_only else data.clean.shape[1]
    assert cache.logits[0].shape[:2] == (len(data), kept) and 0 < kept


def test_a_batch_of_seen_and_unseen_rows_computes_only_the_unseen():
    model, data = problem()
    with tep.masked(model) as mm:
        cache = ExampleCache(mm, data, counterfactual_source(mm, "interchange", data, single_use=True), 1.0)
        first = torch.tensor([0, 1, 2, 3])
        cache(data.select(first), 0, first)
        mixed = torch.tensor([2, 7, 0, 9, 5])
        batch = data.select(mixed)
        seen_batches = []
        handle = model.embed.register_forward_hook(lambda m, i, o: seen_batches.append(o.shape[0]))
        try:
            cf, full = cache(batch, 0, mixed)
        finally:
            handle.remove()
        assert seen_batches == [3, 3]  # ỹ and target of rows 7, 9, 5 only
        values, expected_full = recomputed(mm, batch)
        torch.testing.assert_close(cf.values, values, atol=ATOL, rtol=0)
        torch.testing.assert_close(full, expected_full, atol=ATOL, rtol=0)


def test_shards_of_several_widths_are_cached_apart():
    model, _ = problem()
    gen = torch.Generator().manual_seed(5)
    shards = [tep.paired_data(torch.randint(0, 39, (n, w), generator=gen), torch.randint(0, 39, (n, w), generator=gen),
                              positions="last") for n, w in ((6, 4), (4, 7))]
    data = ShardedData(shards)
    with tep.masked(model) as mm:
        cache = ExampleCache(mm, data, counterfactual_source(mm, "interchange", data, single_use=True), 1.0)
        for epoch in range(2):
            for shard, rows in data.batch_rows(3, shuffle_seed=epoch):
                batch = data.shards[shard].select(rows)
                cf, full = cache(batch, shard, rows)
                values, expected_full = recomputed(mm, batch)
                torch.testing.assert_close(cf.values, values, atol=ATOL, rtol=0)
                torch.testing.assert_close(full, expected_full, atol=ATOL, rtol=0)
        assert [tuple(v.shape[1:3]) for v in cache.values.values()] == [(6, 4), (4, 7)]


def test_a_dataset_over_the_budget_is_recomputed_every_batch():
    model, data = problem()
    with tep.masked(model) as mm:
        cache = ExampleCache(mm, data, counterfactual_source(mm, "interchange", data, single_use=True), budget_gib=1e-6)
        counter = ForwardCounter(model)
        try:
            for epoch in range(2):
                for shard, rows in data.batch_rows(4, shuffle_seed=epoch):
                    cache(data.select(rows), shard, rows)
        finally:
            counter.handle.remove()
    assert counter.calls == 12 and not cache.enabled and not cache.values
    assert "off" in cache.describe() and "cache_gib=1e-06" in cache.describe()


def test_edge_pruning_with_the_cache_learns_the_masks_of_recomputing_every_step():
    model, data = problem()
    opts = dict(steps=15, sparsity_warmup=8, lr_warmup=2, batch_size=4, progress=False, seed=2)
    counter = ForwardCounter(model)
    try:
        cached = tep.edge_pruning(model, data, 0.5, **opts)
        cached_calls, counter.calls = counter.calls, 0
        recomputing = tep.edge_pruning(model, data, 0.5, cache_gib=0, **opts)
    finally:
        counter.handle.remove()
    # The same masked forwards (and set-up checks) in both; with the cache, the corrupted and target forwards run
    # in the first epoch (3 steps) only, so the 12 later steps save two forwards each.
    assert counter.calls - cached_calls == 2 * 12
    assert cached.info["example_cache"].startswith("on") and recomputing.info["example_cache"] == "off (cache_gib=0)"
    assert (recomputing.edge_log_alpha - 10).abs().max() > 0.1  # it trained (log α starts at N(10, 0.01))
    torch.testing.assert_close(cached.edge_log_alpha, recomputing.edge_log_alpha, atol=1e-4, rtol=0)
    torch.testing.assert_close(cached.node_log_alpha, recomputing.node_log_alpha, atol=1e-4, rtol=0)


def test_a_custom_objective_gets_the_target_at_every_position():
    """Only the built-in objectives are known to read scored positions alone; this one reads position 0."""
    model, data = problem()

    def first_position_kl(circuit, full, batch):  # positions="last": position 0 is not scored
        log_q, log_p = circuit[:, 0].log_softmax(-1), full[:, 0].log_softmax(-1)
        return (log_p.exp() * (log_p - log_q)).sum(-1).mean()

    opts = dict(steps=9, sparsity_warmup=4, lr_warmup=1, batch_size=4, progress=False, seed=4,
                objective=first_position_kl)
    cached = tep.edge_pruning(model, data, 0.5, **opts)
    recomputing = tep.edge_pruning(model, data, 0.5, cache_gib=0, **opts)
    assert cached.info["example_cache"].startswith("on")
    torch.testing.assert_close(torch.tensor(cached.history["objective"]), torch.tensor(recomputing.history["objective"]),
                               atol=1e-6, rtol=0)
    # (Zeros at position 0, as a scored-only cache would give, make this KL(uniform ‖ circuit) > 0 in later epochs.)


def test_a_negative_budget_is_refused():
    model, data = problem()
    with pytest.raises(tep.EdgePruneError, match="cache_gib"):
        tep.edge_pruning(model, data, 0.5, steps=2, cache_gib=-1, progress=False)
