"""ACDC against a brute-force reference: the same greedy pass, each candidate judged by plain TransformerLens hooks
(tests/reference.py's patch_edges), the model in float64 so no decision sits within rounding of τ (the KL is
taken in float32 by both, over batches of different sizes: ~1e-9 apart)."""

import pytest
import torch

import tl_edgeprune as tep
from tl_edgeprune.metrics import kl_divergence

from .conftest import DEFAULT_ID, make_model, model_ids
from .reference import patch_edges
from .test_engine_exact import counterfactual_outputs

ATOL = 1e-10  # float64 throughout: engine and plain hooks agree far below any margin to τ


def reference_acdc(model, data, graph, threshold, ref_cf):
    """ACDC by hand: readers from the logits backwards (the graph's order), each incoming edge dropped when the
    KL to the full model rises by less than τ; every candidate one plain forward with the removed set patched."""
    with torch.no_grad():
        full = model(data.clean)

    @torch.no_grad()
    def kl(removed):
        return float(kl_divergence(patch_edges(model, data.clean, ref_cf, removed), full, data))

    removed: list[str] = []
    current = kl(removed)
    scores = torch.zeros(graph.shape, dtype=torch.float64)
    valid = graph.valid_mask()
    order = [r for group in reversed(graph.reader_groups) for r in graph.reader_columns(group)]
    for r in order:
        for w in reversed(valid[:, r].nonzero().flatten().tolist()):
            edge = f"{graph.writers[w]}->{graph.readers[r]}"
            new = kl(removed + [edge])
            scores[w, r] = new - current
            if new - current < threshold:
                removed.append(edge)
                current = new
    kept = valid.clone()
    for edge in removed:
        kept[graph.edge_index(edge)] = False
    return kept, scores, current


@pytest.mark.parametrize("model_id", model_ids(["gpt2", "llama"]))
def test_patch_edges_matches_the_engine_for_a_set_of_removed_edges(model_id, tokens):
    """The reference itself: several removed edges at once (upstream removals change downstream writers)."""
    model = make_model(model_id, dtype=torch.float64)
    clean, corrupted = tokens
    ref_cf = counterfactual_outputs(model, "interchange", corrupted)
    with tep.masked(model) as mm:
        graph = mm.graph
        names = graph.edge_names()
        chosen = names[:: max(1, len(names) // 12)]
        z = graph.ones(dtype=torch.float64)
        for name in chosen:
            z[graph.edge_index(name)] = 0
        ours = mm(clean, mm.interchange(corrupted), z)
    torch.testing.assert_close(ours, patch_edges(model, clean, ref_cf, chosen), atol=ATOL, rtol=0)


@pytest.mark.parametrize("threshold", [1e-5, 1e-4, 1e-3, 1e-2])
def test_acdc_equals_a_brute_force_reference(threshold):
    model = make_model(DEFAULT_ID, dtype=torch.float64)
    gen = torch.Generator().manual_seed(5)
    clean, corrupted = torch.randint(0, 39, (6, 5), generator=gen), torch.randint(0, 39, (6, 5), generator=gen)
    data = tep.paired_data(clean, corrupted, positions="last")
    circuit = tep.acdc(model, data, threshold, batch_size=4, progress=False)
    kept, scores, final = reference_acdc(model, data, circuit.graph, threshold, counterfactual_outputs(model, "interchange", corrupted))
    assert 0 < circuit.n_edges < circuit.graph.n_edges  # the threshold decides something
    assert torch.equal(circuit.edges, kept)
    torch.testing.assert_close(circuit.scores.double(), scores, atol=1e-6, rtol=0)  # scores are stored in float32
    assert circuit.info["final_metric"] == pytest.approx(final, abs=1e-7)  # the KL itself is taken in float32


@pytest.mark.parametrize("threshold", [0.001, 0.01, 0.1])
def test_acdc_from_the_readers_layer_decides_as_the_whole_model_on_tracr(threshold):
    """Starting each candidate at its reader's layer changes no decision: the same circuit, exactly, and the same
    metric changes (Tracr reverse, zero ablation, as in test_methods)."""
    from tl_edgeprune.tracr_models import load_tracr

    task = load_tracr("reverse")
    fast = tep.acdc(task.model, task.data(), threshold, ablation="zero", progress=False)
    whole = tep.acdc(task.model, task.data(), threshold, ablation="zero", progress=False, start_at_layer=False)
    assert fast.info["started_at_layer"] and not whole.info["started_at_layer"]
    assert torch.equal(fast.edges, whole.edges)
    torch.testing.assert_close(fast.scores, whole.scores, atol=1e-6, rtol=0)


@pytest.mark.parametrize("model_id", model_ids(["gpt2"], ["gpt2"]))
def test_acdc_says_whether_it_started_at_layers(model_id):
    model = make_model(model_id)
    gen = torch.Generator().manual_seed(0)
    data = tep.paired_data(torch.randint(0, 39, (4, 5), generator=gen), torch.randint(0, 39, (4, 5), generator=gen))
    fast = tep.acdc(model, data, 1e-3, progress=False)
    whole = tep.acdc(model, data, 1e-3, progress=False, start_at_layer=False)
    assert fast.info["started_at_layer"] == model_id.startswith("hooked")  # a bridge always runs whole
    assert torch.equal(fast.edges, whole.edges)
