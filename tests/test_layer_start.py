"""Masked forwards that start at a layer (ACDC's candidates): the same logits as the whole masked forward and as
plain TransformerLens patching, on every architecture; bridges run whole (TransformerLens cannot start them at a
layer) and must give the same answer too. 1e-5 in float32."""

import pytest
import torch

import tl_edgeprune as tep
from tl_edgeprune.errors import EdgePruneError
from tl_edgeprune.layer_start import LayerStart
from tl_edgeprune.tracr_models import load_tracr

from .conftest import DEFAULT_ID, DEVICE, HAS_HOOKED, MODEL_IDS, make_model
from .models import HOOKED_ARCHS, hooked_model
from .reference import patch_one_edge
from .test_engine_exact import counterfactual_outputs, engine_counterfactual

ATOL = 1e-5


def mask_after(graph, layer, seed=0, keep=0.5):
    """A random mask that keeps every edge into the readers before ``layer``."""
    gen = torch.Generator().manual_seed(seed + layer)
    mask = (torch.rand(graph.shape, generator=gen) < keep).float()
    mask[:, graph.reader_columns_before(layer)] = 1.0
    return mask


@pytest.mark.parametrize("model_id", MODEL_IDS)
@pytest.mark.parametrize("kind", ["interchange", "mean", "zero"])
def test_start_at_every_layer_equals_the_whole_masked_forward(model_id, kind, tokens):
    model = make_model(model_id)
    clean, corrupted = tokens
    with torch.no_grad(), tep.masked(model) as mm:
        graph, cf = mm.graph, engine_counterfactual(mm, kind, corrupted)
        starts = mm.clean_starts(clean)
        assert starts.n_layers == graph.spec.n_layers
        assert mm.starts_at_layer() == (model_id.startswith("hooked") and "shortformer" not in model_id)
        for layer in range(graph.spec.n_layers):
            mask = mask_after(graph, layer)
            torch.testing.assert_close(mm(clean, cf, mask, start=starts.at(layer)), mm(clean, cf, mask),
                                       atol=ATOL, rtol=0, msg=f"start at layer {layer}")


@pytest.mark.parametrize("model_id", MODEL_IDS)
def test_one_edge_off_from_its_readers_layer_matches_manual_patching(model_id, tokens):
    model = make_model(model_id)
    clean, corrupted = tokens
    ref_cf = counterfactual_outputs(model, "interchange", corrupted)
    with torch.no_grad(), tep.masked(model) as mm:
        graph, cf = mm.graph, mm.interchange(corrupted)
        starts = mm.clean_starts(clean)
        checked = 0
        for group in graph.reader_groups:
            layer = min(group.layer, graph.spec.n_layers - 1)
            w = group.n_writers - 1  # the reader's nearest writer
            name = f"{graph.writers[w]}->{graph.readers[group.start]}"
            z = graph.ones()
            z[w, group.start] = 0
            ours = mm(clean, cf, z, start=starts.at(layer))
            torch.testing.assert_close(ours, patch_one_edge(model, clean, ref_cf, name), atol=ATOL, rtol=0, msg=name)
            checked += 1
    assert checked == len(graph.reader_groups)


@pytest.mark.skipif(not HAS_HOOKED, reason="a padded batch started at a layer needs a HookedTransformer")
def test_start_with_padding_and_scored_positions_only():
    model = make_model(DEFAULT_ID)
    gen = torch.Generator().manual_seed(3)
    clean, corrupted = torch.randint(1, 39, (4, 6), generator=gen), torch.randint(1, 39, (4, 6), generator=gen)
    attention_mask = torch.ones(4, 6, dtype=torch.long)
    attention_mask[1, 4:] = attention_mask[3, 3:] = 0
    at = torch.zeros(4, 6, dtype=torch.bool)
    at[torch.arange(4), attention_mask.sum(1) - 1] = True
    with torch.no_grad(), tep.masked(model) as mm:
        assert mm.starts_at_layer(attention_mask)
        cf = mm.interchange(corrupted, attention_mask)
        starts = mm.clean_starts(clean, attention_mask)
        mask = mask_after(mm.graph, 1)
        full = mm(clean, cf, mask, attention_mask=attention_mask, logits_at=at)
        fast = mm(clean, cf, mask, attention_mask=attention_mask, logits_at=at, start=starts.at(1))
        rows = mm(clean, cf, mask, attention_mask=attention_mask, logits_at=at, start=starts.at(1), gathered=True)
    torch.testing.assert_close(fast, full, atol=ATOL, rtol=0)
    torch.testing.assert_close(rows, fast[at], atol=0, rtol=0)  # the same rows, without the zeros around them
    assert bool(fast[at].abs().sum(-1).gt(0).all()) and float(fast[~at].abs().max()) == 0.0


def test_start_on_a_positional_graph():
    model = make_model(DEFAULT_ID)
    gen = torch.Generator().manual_seed(4)
    clean, corrupted = torch.randint(0, 39, (5, 6), generator=gen), torch.randint(0, 39, (5, 6), generator=gen)
    classes = torch.randint(0, 3, (5, 6), generator=gen)
    with torch.no_grad(), tep.masked(model, position_classes=("A", "B", "C")) as mm:
        cf = mm.interchange(corrupted)
        starts = mm.clean_starts(clean)
        for layer in range(mm.graph.spec.n_layers):
            mask = mask_after(mm.graph, layer, keep=0.3)
            torch.testing.assert_close(mm(clean, cf, mask, position_classes=classes, start=starts.at(layer)),
                                       mm(clean, cf, mask, position_classes=classes), atol=ATOL, rtol=0)


def test_start_on_the_tracr_twin():
    """The ToyTransformer (Tracr's twin under transformer-lens 4) takes start_at_layer too."""
    task = load_tracr("reverse", "toy")
    model, clean = task.model, task.encode(task.inputs())[:6]
    with torch.no_grad(), tep.masked(model) as mm:
        assert mm.starts_at_layer()
        cf, starts = mm.zero(), mm.clean_starts(clean)
        for layer in range(mm.graph.spec.n_layers):
            mask = mask_after(mm.graph, layer)
            torch.testing.assert_close(mm(clean, cf, mask, start=starts.at(layer)), mm(clean, cf, mask),
                                       atol=ATOL, rtol=0)


def test_start_refuses_what_it_cannot_do(tokens):
    model = make_model(DEFAULT_ID)
    clean, corrupted = tokens
    with tep.masked(model) as mm:
        graph, cf = mm.graph, mm.interchange(corrupted)
        starts = mm.clean_starts(clean)
        with torch.no_grad():
            with pytest.raises(EdgePruneError, match="removes some"):
                mm(clean, cf, graph.zeros(), start=starts.at(1))
            with pytest.raises(EdgePruneError, match="other tokens"):
                mm(corrupted, cf, mask_after(graph, 1), start=starts.at(1))
            with pytest.raises(EdgePruneError, match="clean_starts"):
                mm(clean, cf, start=starts.resid_pre[1])
            with pytest.raises(EdgePruneError, match="layer must be in"):
                starts.at(graph.spec.n_layers)
            single = mm.interchange(corrupted, single_use=True)  # a refused call leaves it unspent
            with pytest.raises(EdgePruneError, match="removes some"):
                mm(clean, single, graph.zeros(), start=starts.at(1))
            assert not single.spent
            torch.testing.assert_close(mm(clean, single, mask_after(graph, 1), start=starts.at(1)),
                                       mm(clean, cf, mask_after(graph, 1)), atol=ATOL, rtol=0)
            assert single.spent
        with pytest.raises(EdgePruneError, match="no_grad"):
            mm(clean, cf, mask_after(graph, 1).requires_grad_(), start=starts.at(1))
    assert isinstance(starts.at(0), LayerStart)


@pytest.mark.skipif(not HAS_HOOKED, reason="only a HookedTransformer starts at a layer (transformer-lens 3 leg)")
@pytest.mark.parametrize("arch", [a for a in HOOKED_ARCHS if a != "shortformer"])
@pytest.mark.parametrize("sparse", [True, False], ids=["sparse", "dense"])
def test_consecutive_starts_reuse_the_clean_rows_exactly(arch, sparse, tokens, monkeypatch):
    """ACDC's candidates start at non-increasing layers with one record and counterfactual: a forward from a layer
    keeps the clean rows the previous one left (layer_start.ReplayedRows) and writes only its own layers' writers.
    Every forward of the sequence (back up a layer, a whole-model forward between, another counterfactual, another
    record of the same shape) equals the whole masked forward, 1e-5 in float32; masks keep 5 % or 95 % of the edges
    after the start, so the sparse products take both the complement (prefix sums reused) and the sparse form."""
    import tl_edgeprune.engine as engine

    model = hooked_model(arch, n_layers=4).to(DEVICE)
    clean, corrupted = tokens
    writes = []
    for name in ("write", "write_heads"):  # the writers' two ways into the buffer
        real = getattr(engine, name)
        monkeypatch.setattr(engine, name, lambda *args, real=real: writes.append(args[-2]) or real(*args))
    with torch.no_grad(), tep.masked(model, sparse_mixing=sparse) as mm:
        assert mm.starts_at_layer()
        graph, chunks = mm.graph, mm.graph.writer_chunks
        interchange, mean = mm.interchange(corrupted), mm.mean(corrupted)
        starts, other_starts = mm.clean_starts(clean), mm.clean_starts(corrupted)
        last = graph.spec.n_layers - 1
        sequence = [(last, 0.05, interchange, starts, False), (last, 0.95, interchange, starts, True),
                    (last - 1, 0.05, interchange, starts, True), (last, 0.95, interchange, starts, "partly"),
                    (None, 0.5, interchange, starts, False), (last, 0.05, interchange, starts, False),
                    (last, 0.05, mean, starts, False), (last, 0.05, mean, starts, True),
                    (last, 0.05, mean, other_starts, False), (last - 1, 0.95, mean, other_starts, True)]
        for i, (layer, keep, cf, record, reused) in enumerate(sequence):
            tokens_ = clean if record is starts else corrupted
            mask = mask_after(graph, layer or 0, seed=i, keep=keep)
            writes.clear()
            if layer is None:
                mm(tokens_, cf, mask)
                continue
            ours = mm(tokens_, cf, mask, start=record.at(layer))
            own = [c.start for c in chunks if c.layer >= layer]
            if reused is True:
                assert writes == own, f"step {i}: wrote {writes}, expected only layer {layer}'s writers {own}"
            elif reused is False:
                assert writes == [c.start for c in chunks], f"step {i}: expected every writer written"
            else:  # back up from a later layer: the rows between the two starts are replayed again
                assert writes == [c.start for c in chunks if c.layer >= last - 1]
            whole = mm(tokens_, cf, mask)
            torch.testing.assert_close(ours, whole, atol=ATOL, rtol=0, msg=f"step {i}: layer {layer}")
            mm(tokens_, cf, mask, start=record.at(layer))  # the whole forward dropped the record: written again
