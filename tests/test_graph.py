"""The graph is pure: built from a config, with the edge counts of the reference implementations."""

import pytest
import torch

from tl_edgeprune import Graph, GraphSpec, edge_mask_from_names

GPT2_SMALL = GraphSpec(n_layers=12, n_heads=12, n_kv_heads=12, d_model=768)


def formula(L, H, E):
    """Edge Pruning's count: Σ_l [3H(E + l(H+1)) + (E + l(H+1) + H)] + (E + L(H+1))."""
    return sum(3 * H * (E + l * (H + 1)) + (E + l * (H + 1) + H) for l in range(L)) + (E + L * (H + 1))


def test_gpt2_small_edge_counts():
    separate, merged = Graph.from_spec(GPT2_SMALL, "separate"), Graph.from_spec(GPT2_SMALL, "merged")
    assert separate.n_edges == 32_936 == formula(12, 12, 2) == int(separate.valid_mask().sum())
    assert merged.n_edges == 32_491 == formula(12, 12, 1) == int(merged.valid_mask().sum())
    assert separate.n_readers == merged.n_readers == 445
    assert separate.writers[:3] == ("tok", "pos", "a0.h0") and merged.writers[:2] == ("input", "a0.h0")
    assert separate.readers[-1] == "logits" and len(separate.edge_names()) == 32_936


def test_parallel_attention_mlp_reads_resid_pre():
    g = Graph.from_spec(GraphSpec(2, 4, 4, 32, parallel_attn_mlp=True, positional_embedding_type="rotary"))
    assert g.writers[0] == "tok" and "pos" not in g.writers
    with pytest.raises(KeyError, match="not upstream"):
        g.edge_index("a0.h1->m0")
    assert g.edge_index("a0.h1->m1") == (2, g.reader_index("m1"))
    sequential = Graph.from_spec(GraphSpec(2, 4, 4, 32, positional_embedding_type="rotary"))
    assert sequential.n_edges - g.n_edges == 2 * 4  # the heads -> own-layer MLP edges


def test_attention_only_and_shortformer():
    g = Graph.from_spec(GraphSpec(2, 3, 3, 16, attn_only=True, positional_embedding_type="shortformer"))
    assert g.writers == ("tok", "a0.h0", "a0.h1", "a0.h2", "a1.h0", "a1.h1", "a1.h2")
    assert not any(r.startswith("m") for r in g.readers)
    assert g.n_edges == 9 * 1 + 9 * 4 + 7


def test_grouped_query_attention_has_kv_readers_per_group():
    g = Graph.from_spec(GraphSpec(1, 4, 2, 16))
    assert g.readers[:8] == ("a0.h0<q>", "a0.h1<q>", "a0.h2<q>", "a0.h3<q>",
                             "a0.kv0<k>", "a0.kv1<k>", "a0.kv0<v>", "a0.kv1<v>")
    assert [g.readers[i] for i in g.readers_of_node("a0.h3")] == ["a0.h3<q>", "a0.kv1<k>", "a0.kv1<v>"]
    with pytest.raises(ValueError, match="multiple"):
        Graph.from_spec(GraphSpec(1, 4, 3, 16))


def test_names_and_masks_round_trip():
    g = Graph.from_spec(GraphSpec(2, 2, 2, 8))
    names = ["tok->a0.h1<q>", "a0.h0->m1", "m1->logits"]
    mask = edge_mask_from_names(g, names)
    assert sorted(g.edge_name(w, r) for w, r in mask.nonzero().tolist()) == sorted(names)
    with pytest.raises(KeyError, match="no writer"):
        g.edge_index("a9.h0->logits")
    with pytest.raises(ValueError, match="look like"):
        g.edge_index("tok")
    assert g.valid_mask().dtype == torch.bool and g.ones().shape == g.shape
