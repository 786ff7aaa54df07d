"""Interop with TransformerLens 4.3's own attribution tool (``transformer_lens.tools.analysis.attribution_patching``).

TL scores one copy of the graph per position, with its own node names (``embed``, ``attn_head_out``, ``q_input``,
...). These helpers map its edges to ours and back, so its scores and circuits can be compared with ours: its
per-position scores summed over positions are our (non-positional) edge scores, and a circuit of ours is TL's
circuit of the same edges at every position. Imports TL lazily: only callers of these functions need TL ≥ 4.3.
"""

from __future__ import annotations

from typing import Any

import torch

from .circuit import Circuit
from .errors import EdgePruneError
from .graph import Graph


def _tl_module():
    try:
        from transformer_lens.tools.analysis import attribution_patching
    except ImportError:  # pragma: no cover - depends on the installed transformer-lens
        attribution_patching = None
    if attribution_patching is None or not hasattr(attribution_patching, "faithfulness"):
        raise EdgePruneError("TransformerLens's edge attribution tool needs transformer-lens >= 4.3 (3.9's is node-only)")
    return attribution_patching


def writer_name(node: Any) -> str:
    """Our writer name of a TL writer node (position dropped)."""
    if node.kind == "embed":
        return "tok"
    if node.kind == "attn_head_out":
        return f"a{node.layer}.h{node.head}"
    if node.kind == "mlp_out":
        return f"m{node.layer}"
    raise EdgePruneError(f"{node.kind} is not a writer kind of TransformerLens's graph")


def reader_name(node: Any) -> str:
    """Our reader name of a TL reader node (position dropped)."""
    if node.kind in ("q_input", "k_input", "v_input"):
        return f"a{node.layer}.h{node.head}<{node.kind[0]}>"
    if node.kind == "mlp_in":
        return f"m{node.layer}"
    if node.kind == "logits":
        return "logits"
    raise EdgePruneError(f"{node.kind} is not a reader kind of TransformerLens's graph")


def edge_name(writer: Any, reader: Any) -> str:
    return f"{writer_name(writer)}->{reader_name(reader)}"


def scores_from_tl(result: Any, graph: Graph) -> torch.Tensor:
    """TL's per-position edge scores (``attribution_patch(..., granularity="edge")``) summed over positions, as
    a dense [n_writers, n_readers] tensor on our graph (built with input_nodes="separate": TL's embed is tok)."""
    scores = torch.zeros(graph.shape, dtype=torch.float64)
    for (writer, reader), score in result.edge_scores.items():
        scores[graph.edge_index(edge_name(writer, reader))] += float(score)
    return scores


def _node(kind: str, position: int, layer: int | None = None, head: int | None = None):
    return _tl_module().Node(kind, position, layer, head)


def to_tl_edges(circuit: Circuit, n_positions: int) -> list[tuple[Any, Any]]:
    """The circuit as TL's edge list: each of its edges at every position (TL's edges stay within a position).
    Edges from ``pos`` have no TL counterpart (TL's graph has no position writer) and are left out; interchange
    ablation leaves them unchanged anyway, since clean and corrupted share positions."""
    graph, n_layers = circuit.graph, circuit.graph.spec.n_layers
    edges = []
    for w, r in circuit.effective_edges().nonzero().tolist():
        writer, reader = graph.writers[w], graph.readers[r]
        if writer == "pos":
            continue
        for p in range(n_positions):
            edges.append((_writer_node(writer, p), _reader_node(reader, p, n_layers)))
    return edges


def from_tl_edges(graph: Graph, edges: list, method: str = "transformer-lens") -> Circuit:
    """Our circuit of the edges in a TL edge list (at any position), e.g. ``result.top_edges(k)``."""
    names = sorted({edge_name(e[0], e[1]) for e in edges})
    return Circuit.from_names(graph, names, method=method)


def _writer_node(name: str, position: int):
    if name in ("tok", "input"):
        return _node("embed", position)
    if name.startswith("a"):
        layer, head = name[1:].split(".h")
        return _node("attn_head_out", position, int(layer), int(head))
    return _node("mlp_out", position, int(name[1:]))


def _reader_node(name: str, position: int, n_layers: int):
    if name == "logits":
        return _node("logits", position, n_layers - 1)
    if name.endswith(">"):
        head_name, kind = name[:-3], name[-2]
        layer, head = head_name[1:].split(".h")
        return _node(f"{kind}_input", position, int(layer), int(head))
    return _node("mlp_in", position, int(name[1:]))
