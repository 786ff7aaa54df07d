"""Agreement with TransformerLens 4.3's own attribution tool, where the two overlap (a GPT-2 TransformerBridge).

TL's attribution_patch takes the gradient on the corrupted run ("denoising") and scores one graph copy per
position; ``eap(..., gradient_at="corrupted")`` is that form, and TL's scores summed over positions are ours.
Its ``faithfulness`` of a circuit (kept at every position) is ours. Both to float32 rounding of the scores.
"""

import importlib.util

import pytest
import torch

import tl_edgeprune as tep
from tl_edgeprune import tl_attribution
from tl_edgeprune.selection import faithfulness_curve

from .conftest import HAS_BRIDGE
from .models import bridge_model

def _tool_scores_edges() -> bool:
    """transformer-lens 3.9 ships an older, node-only attribution_patching; edges and faithfulness came in 4.3."""
    if not HAS_BRIDGE or importlib.util.find_spec("transformer_lens.tools.analysis.attribution_patching") is None:
        return False
    from transformer_lens.tools.analysis import attribution_patching as ap

    return hasattr(ap, "faithfulness") and hasattr(ap, "enumerate_edges")


HAS_TL_TOOL = _tool_scores_edges()
needs_tool = pytest.mark.skipif(not HAS_TL_TOOL, reason="needs transformer-lens >= 4.3, whose attribution_patching "
                                "scores edges (3.9's is node-only)")
ANSWER, DISTRACTOR = 7, 8


def tl_metric(logits):  # TL's metric reads one example's logits [1, pos, vocab]
    return logits[0, -1, ANSWER] - logits[0, -1, DISTRACTOR]


def our_metric(logits, batch):
    return (logits[:, -1, ANSWER] - logits[:, -1, DISTRACTOR]).mean()


@pytest.fixture(scope="module")
def problem():
    model = bridge_model("gpt2")
    gen = torch.Generator().manual_seed(0)
    clean = torch.randint(0, 39, (4, 6), generator=gen)
    corrupted = torch.randint(0, 39, (4, 6), generator=gen)
    return model, clean, corrupted, tep.paired_data(clean, corrupted, positions="last")


@needs_tool
def test_eap_with_the_gradient_at_the_corrupted_run_is_tls_attribution_patch(problem):
    from transformer_lens.tools.analysis import attribution_patching as ap

    model, clean, corrupted, data = problem
    result = ap.attribution_patch(model, clean, corrupted, tl_metric, ap.EdgeAttributionConfig(granularity="edge"))
    graph = tep.Graph.from_model(model)
    theirs = tl_attribution.scores_from_tl(result, graph)
    ours = tep.eap(model, data, metric=our_metric, gradient_at="corrupted", progress=False).scores.double()
    valid = graph.valid_mask()
    top = float(theirs.abs().max())
    assert top > 1e-3
    assert float((ours - theirs)[valid].abs().max()) <= 1e-5 * top  # measured: 8.5e-9 against 0.021
    # the default (gradient at the clean run) is a different estimate: the test can tell them apart
    clean_form = tep.eap(model, data, metric=our_metric, progress=False).scores.double()
    assert float((clean_form - theirs)[valid].abs().max()) > 100 * float((ours - theirs)[valid].abs().max())
    # and TL's top edges are ours (pos edges carry nothing: TL has no position writer)
    k = 20
    tl_top = tl_attribution.from_tl_edges(graph, [(w, r) for w, r, _ in result.top_edges(k * clean.shape[1])])
    assert set(tep.Circuit.top_k(graph, ours.float(), k=k).edge_names()) <= set(tl_top.edge_names())


@needs_tool
def test_a_circuit_has_the_same_faithfulness_in_transformer_lens(problem):
    from transformer_lens.tools.analysis import attribution_patching as ap

    model, clean, corrupted, data = problem
    scores = tep.eap(model, data, metric=our_metric, progress=False)
    circuit = scores.circuit(k=30)
    for i in range(2):  # TL's faithfulness reads one pair at a time
        one = data.select(slice(i, i + 1))
        theirs = ap.faithfulness(model, clean[i : i + 1], corrupted[i : i + 1], tl_metric,
                                 tl_attribution.to_tl_edges(circuit, clean.shape[1])).recovered
        ours = faithfulness_curve(model, one, [circuit], metric=our_metric).faithfulness[0]
        assert ours == pytest.approx(theirs, abs=1e-5)


@needs_tool
def test_circuits_convert_to_tls_edge_lists_and_back(problem):
    model = problem[0]
    graph = tep.Graph.from_model(model)
    circuit = tep.Circuit.top_k(graph, torch.rand(graph.shape, generator=torch.Generator().manual_seed(1)), k=25)
    kept = [n for n in circuit.edge_names() if not n.startswith("pos->")]
    edges = tl_attribution.to_tl_edges(circuit, n_positions=3)
    assert len(edges) == 3 * len(kept) and {e[0].position for e in edges} == {0, 1, 2}
    assert sorted(tl_attribution.from_tl_edges(graph, edges).edge_names()) == sorted(kept)


def test_the_ig_grids_are_the_two_ends_of_the_path(problem):
    """One step on the right grid is α = 1 (plain EAP on the clean run); on the left grid it is α = 0 (the
    gradient at the corrupted run); m steps on the left grid are those at α = 0..(m−1)/m."""
    model, clean, corrupted, data = problem
    eap = tep.eap(model, data, metric=our_metric, progress=False).scores
    right1 = tep.eap(model, data, metric=our_metric, ig_steps=1, progress=False).scores
    left1 = tep.eap(model, data, metric=our_metric, ig_steps=1, ig_grid="left", progress=False).scores
    at_corrupted = tep.eap(model, data, metric=our_metric, gradient_at="corrupted", progress=False).scores
    torch.testing.assert_close(right1, eap, atol=1e-7, rtol=1e-5)
    torch.testing.assert_close(left1, at_corrupted, atol=0, rtol=0)
    right2 = tep.eap(model, data, metric=our_metric, ig_steps=2, progress=False).scores
    left2 = tep.eap(model, data, metric=our_metric, ig_steps=2, ig_grid="left", progress=False).scores
    half = (left2 * 2 - left1)  # the α = 1/2 gradient, from the left grid
    torch.testing.assert_close(right2 * 2 - right1, half, atol=1e-6, rtol=1e-4)  # ... and from the right grid
    with pytest.raises(tep.EdgePruneError, match="gradient_at='corrupted' is plain EAP"):
        tep.eap(model, data, gradient_at="corrupted", ig_steps=3)
