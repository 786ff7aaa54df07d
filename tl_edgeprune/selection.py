"""From scores to circuits, and circuits to faithfulness curves (MIB normalisation, CPR and CMD areas)."""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from .ablations import Ablation
from .circuit import Circuit, evaluate_masks
from .data import PairedData
from .engine import MaskedModel
from .errors import EdgePruneError
from .graph import Graph


def greedy(graph: Graph, scores: torch.Tensor, k: int, absolute: bool = True, method: str = "") -> Circuit:
    """Grow a circuit from the logits backwards: repeatedly add the best-scoring edge into a node already
    in the circuit (EAP-IG's greedy selection), so every chosen edge is connected to the output."""
    if not 0 <= k <= graph.n_edges:
        raise EdgePruneError(f"k must lie in [0, {graph.n_edges}], got {k}")
    key = (scores.abs() if absolute else scores).detach().cpu().double()
    valid = graph.valid_mask()
    readers_of_writer: dict[int, list[int]] = {}
    for r in range(graph.n_readers):
        for w in graph.reader_targets(r):
            readers_of_writer.setdefault(w, []).append(r)
    edges = torch.zeros(graph.shape, dtype=torch.bool)
    heap: list[tuple[float, int, int]] = []
    opened: set[int] = set()

    def open_reader(r: int) -> None:
        if r in opened:
            return
        opened.add(r)
        for w in valid[:, r].nonzero().flatten().tolist():
            heapq.heappush(heap, (-float(key[w, r]), w, r))

    for r in graph.readers_of_node("logits"):  # one per position class in a positional graph
        open_reader(r)
    chosen = 0
    while chosen < k and heap:
        _, w, r = heapq.heappop(heap)
        if edges[w, r]:
            continue
        edges[w, r] = True
        chosen += 1
        for reader in readers_of_writer.get(w, []):
            open_reader(reader)
    return Circuit(graph, edges, scores=scores.detach().cpu().float(), method=method)


@dataclass
class Curve:
    """A faithfulness curve: the circuit metric at several sizes, normalised as in MIB."""

    method: str
    edges: list[int]
    fractions: list[float]
    values: list[float]  # m(C)
    full: float  # m(N)
    empty: float  # m(∅)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def kl(self) -> list[float]:
        """KL(full ‖ circuit) at each size, measured in the same pass as the metric."""
        return self.extra["kl"]

    @property
    def faithfulness(self) -> list[float]:
        """(m(C) − m(∅)) / (m(N) − m(∅))."""
        span = self.full - self.empty
        if span == 0:
            raise EdgePruneError("the full and empty circuits score the same: faithfulness is undefined for this metric")
        return [(v - self.empty) / span for v in self.values]

    @property
    def cpr(self) -> float:
        """Area under f over the fraction of edges (trapezoids between the measured sizes)."""
        return _area(self.fractions, self.faithfulness)

    @property
    def cmd(self) -> float:
        """Area under |1 − f|."""
        return _area(self.fractions, [abs(1 - f) for f in self.faithfulness])


def _area(xs: Sequence[float], ys: Sequence[float]) -> float:
    pts = sorted(zip(xs, ys))
    return sum((x1 - x0) * (y0 + y1) / 2 for (x0, y0), (x1, y1) in zip(pts, pts[1:]))


def faithfulness_curve(
    model: Any,
    data: PairedData,
    source: Any,
    sizes: Sequence[float] | None = None,
    *,
    method: str | None = None,
    selection: str = "top_n",
    metric: Callable | None = None,
    ablation: Ablation = "interchange",
    batch_size: int = 32,
    absolute: bool = True,
    graph: Graph | None = None,
) -> Curve:
    """Curve for scores (an EdgeScores or [writer, reader] tensor, cut at ``sizes``: edge counts if ints,
    fractions of all edges if floats ≤ 1) or for a list of circuits (e.g. Edge Pruning at several targets)."""
    from .eap import EdgeScores, default_metric

    metric = metric or default_metric
    circuits: list[Circuit]
    if isinstance(source, (list, tuple)) and source and isinstance(source[0], Circuit):
        circuits = sorted(source, key=lambda c: c.n_edges)
        graph = circuits[0].graph
        name = method or circuits[0].method
    else:
        if isinstance(source, EdgeScores):
            scores, graph, name = source.scores, source.graph, method or source.method
        elif isinstance(source, torch.Tensor) and graph is not None:
            scores, name = source, method or "scores"
        else:
            raise EdgePruneError("pass an EdgeScores (from eap()), a score tensor with graph=, or a list of Circuits")
        if not sizes:
            raise EdgePruneError("scores need sizes: edge counts (ints) or fractions of all edges (floats)")
        counts = [int(s) if isinstance(s, int) else int(round(float(s) * graph.n_edges)) for s in sizes]
        if selection == "top_n":
            circuits = [Circuit.top_k(graph, scores, k=c, absolute=absolute, method=name) for c in counts]
        elif selection == "greedy":
            circuits = [greedy(graph, scores, c, absolute=absolute, method=name) for c in counts]
        else:
            raise EdgePruneError(f"selection must be 'top_n' or 'greedy', got {selection!r}")
    for c in circuits:
        c.check_model(model)
    with MaskedModel(model, graph) as mm:
        masks = [graph.ones(), graph.zeros()] + [c.mask() for c in circuits]
        results = evaluate_masks(mm, masks, data, ablation, batch_size, metric=metric)
    values = [r["metric"] for r in results]
    return Curve(
        method=name,
        edges=[c.n_edges for c in circuits],
        fractions=[c.n_edges / graph.n_edges for c in circuits],
        values=values[2:],
        full=values[0],
        empty=values[1],
        extra={"kl": [r["kl"] for r in results[2:]], "metrics": results[2:], "empty_kl": results[1]["kl"],
               "methods": [c.method or "circuit" for c in circuits]},
    )
