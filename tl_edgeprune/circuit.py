"""A circuit: a set of edges of a graph, with scores, that can be evaluated, saved and loaded.

Every method returns one, so results compare on the same footing. JSON follows the EAP-IG / MIB
format ``{cfg, nodes: {name: {in_graph, score}}, edges: {name: {score, in_graph}}}``.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from jaxtyping import Bool, Float

from .ablations import Ablation, counterfactual_source
from .data import PairedData
from .engine import MaskedModel
from .errors import EdgePruneError
from .graph import Graph, GraphSpec
from .metrics import answer_metrics, exact_match, kl_divergence, mean_squared_error


@dataclass
class Circuit:
    graph: Graph
    edges: Bool[torch.Tensor, "writer reader"]
    scores: Float[torch.Tensor, "writer reader"] | None = None
    nodes: Bool[torch.Tensor, " writer"] | None = None  # kept writers (node masks); None keeps all
    method: str = ""
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if tuple(self.edges.shape) != self.graph.shape:
            raise EdgePruneError(f"circuit edges {list(self.edges.shape)} do not match the graph {list(self.graph.shape)}")
        self.edges = self.edges.bool().cpu() & self.graph.valid_mask()

    # ------------------------------------------------------------------ contents
    def effective_edges(self) -> Bool[torch.Tensor, "writer reader"]:
        """Edges whose source node is kept (how Edge Pruning reports sparsity)."""
        return self.edges if self.nodes is None else self.edges & self.nodes.cpu()[:, None]

    @property
    def n_edges(self) -> int:
        return int(self.effective_edges().sum())

    @property
    def sparsity(self) -> float:
        return 1.0 - self.n_edges / self.graph.n_edges

    def edge_names(self) -> list[str]:
        return [self.graph.edge_name(w, r) for w, r in self.effective_edges().nonzero().tolist()]

    def mask(self, dtype=torch.float32, device=None) -> Float[torch.Tensor, "writer reader"]:
        """The binary edge mask for the engine."""
        return self.effective_edges().to(dtype=dtype, device=device)

    def __contains__(self, edge: str) -> bool:
        w, r = self.graph.edge_index(edge)
        return bool(self.effective_edges()[w, r])

    def __repr__(self) -> str:
        return f"Circuit({self.method or 'edges'}: {self.n_edges} of {self.graph.n_edges} edges, sparsity {self.sparsity:.4f})"

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_names(cls, graph: Graph, names: list[str], method: str = "") -> "Circuit":
        edges = torch.zeros(graph.shape, dtype=torch.bool)
        for name in names:
            edges[graph.edge_index(name)] = True
        return cls(graph, edges, method=method)

    @classmethod
    def top_k(
        cls, graph: Graph, scores: torch.Tensor, k: int | None = None, fraction: float | None = None,
        absolute: bool = True, method: str = "",
    ) -> "Circuit":
        """The k (or a fraction of all) edges with the largest scores (|score| if absolute)."""
        if (k is None) == (fraction is None):
            raise EdgePruneError("give exactly one of k (an edge count) or fraction (of all edges)")
        if fraction is not None:
            if not 0 <= fraction <= 1:
                raise EdgePruneError(f"fraction must lie in [0, 1], got {fraction}")
            k = int(round(fraction * graph.n_edges))
        if not 0 <= k <= graph.n_edges:
            raise EdgePruneError(f"k must lie in [0, {graph.n_edges}], got {k}")
        valid = graph.valid_mask()
        key = (scores.abs() if absolute else scores).detach().cpu().double().masked_fill(~valid, float("-inf"))
        edges = torch.zeros(graph.shape, dtype=torch.bool)
        if k:
            edges.view(-1)[torch.topk(key.view(-1), k).indices] = True
        return cls(graph, edges, scores=scores.detach().cpu().float(), method=method)

    @classmethod
    def from_soft_mask(
        cls, graph: Graph, soft: torch.Tensor, nodes: torch.Tensor | None = None, method: str = "edge_pruning",
        info: dict | None = None,
    ) -> "Circuit":
        """Edge Pruning's read-out: threshold the soft mask, found by binary search so that the binary circuit's
        density matches the soft mask's mean over real edges (to the nearest edge)."""
        soft64 = soft.detach().cpu().double()  # compare in float64, as the search does
        edges = soft64 >= binary_search_threshold(soft64, graph.valid_mask())
        return cls(graph, edges, scores=soft.detach().cpu().float(), nodes=nodes, method=method, info=info or {})

    # ------------------------------------------------------------------ pruning
    def prune_dangling(self) -> "Circuit":
        """Drop edges into nodes that reach no output through the circuit (they cannot matter)."""
        g, edges = self.graph, self.effective_edges().clone()
        reaches = torch.zeros(g.n_writers, dtype=torch.bool)
        targets = [g.reader_targets(r) for r in range(g.n_readers)]
        for w in reversed(range(g.n_writers)):
            for r in edges[w].nonzero().flatten().tolist():
                if not targets[r] or reaches[targets[r]].any():
                    reaches[w] = True
                    break
        for r in range(g.n_readers):
            if targets[r] and not bool(reaches[targets[r]].any()):
                edges[:, r] = False
        edges &= reaches[:, None]  # edges out of nodes that reach nothing are dangling too
        return Circuit(g, edges, self.scores, self.nodes, self.method, {**self.info, "pruned_dangling": True})

    # ------------------------------------------------------------------ evaluation
    def check_model(self, model: Any) -> None:
        spec = GraphSpec.from_config(model.cfg)
        if spec != self.graph.spec:
            raise EdgePruneError(
                f"this circuit was found on a model with {self.graph.spec} but the model given is {spec}; "
                "a circuit only applies to a model of the same shape"
            )

    def evaluate(
        self, model: Any, data: PairedData, ablation: Ablation = "interchange", batch_size: int = 32,
        mean_reference: torch.Tensor | None = None,
    ) -> dict[str, float]:
        """KL/MSE to the full model, answer metrics and exact match, via the engine with binary masks."""
        self.check_model(model)
        with MaskedModel(model, self.graph) as mm:
            return evaluate_mask(mm, self.mask(), data, ablation, batch_size, mean_reference) | {
                "edges": self.n_edges,
                "sparsity": self.sparsity,
            }

    # ------------------------------------------------------------------ files
    def to_dict(self) -> dict:
        g = self.graph
        eff = self.effective_edges()
        scores = self.scores if self.scores is not None else eff.float()
        valid = g.valid_mask()
        edges = {
            g.edge_name(w, r): {"score": float(scores[w, r]), "in_graph": bool(eff[w, r])}
            for w, r in valid.nonzero().tolist()
        }
        used = eff.any(1)
        node_in = {name: bool(used[i] or eff[:, [r for r in range(g.n_readers) if i in g.reader_targets(r)]].any())
                   for i, name in enumerate(g.writers)}
        nodes = {name: {"in_graph": node_in[name]} for name in g.writers}
        if self.nodes is not None:
            for i, name in enumerate(g.writers):
                nodes[name]["score"] = float(self.nodes[i])
        nodes["logits"] = {"in_graph": bool(eff[:, g.reader_index("logits")].any())}
        cfg = {**asdict(g.spec), "input_nodes": g.input_nodes}
        return {"cfg": cfg, "nodes": nodes, "edges": edges, "method": self.method, "info": _jsonable(self.info)}

    def to_json(self, path: str | os.PathLike) -> None:
        _atomic_write(path, lambda f: json.dump(self.to_dict(), f), text=True)

    @classmethod
    def from_dict(cls, data: dict) -> "Circuit":
        cfg = dict(data["cfg"])
        input_nodes = cfg.pop("input_nodes", "separate")
        graph = Graph.from_spec(GraphSpec(**cfg), input_nodes)
        edges = torch.zeros(graph.shape, dtype=torch.bool)
        scores = torch.zeros(graph.shape)
        for name, entry in data["edges"].items():
            w, r = graph.edge_index(name)
            edges[w, r] = bool(entry["in_graph"])
            scores[w, r] = float(entry.get("score", 0.0))
        return cls(graph, edges, scores=scores, method=data.get("method", ""), info=data.get("info", {}))

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> "Circuit":
        with open(path) as f:
            return cls.from_dict(json.load(f))

    def save(self, path: str | os.PathLike) -> None:
        """``.json`` (MIB format) or ``.pt`` (tensors, exact)."""
        if str(path).endswith(".json"):
            return self.to_json(path)
        payload = {"cfg": {**asdict(self.graph.spec), "input_nodes": self.graph.input_nodes}, "edges": self.edges,
                   "scores": self.scores, "nodes": self.nodes, "method": self.method, "info": self.info}
        _atomic_write(path, lambda f: torch.save(payload, f))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Circuit":
        if str(path).endswith(".json"):
            return cls.from_json(path)
        payload = torch.load(path, weights_only=False)
        cfg = dict(payload["cfg"])
        input_nodes = cfg.pop("input_nodes", "separate")
        graph = Graph.from_spec(GraphSpec(**cfg), input_nodes)
        return cls(graph, payload["edges"], payload["scores"], payload["nodes"], payload["method"], payload["info"])


def binary_search_threshold(soft: torch.Tensor, valid: torch.Tensor, iterations: int = 60) -> float:
    """Threshold τ so that the binary circuit (soft ≥ τ) has round(Σ soft) edges, i.e. binary sparsity is
    as close as possible to 1 − mean(soft) over real edges; found by binary search, as the reference does."""
    values = soft[valid].double()
    target = int(round(float(values.sum())))
    lo, hi = 0.0, float(values.max()) + 1e-12
    for _ in range(iterations):
        mid = (lo + hi) / 2
        if int((values >= mid).sum()) > target:
            lo = mid
        else:
            hi = mid
    return hi


def evaluate_mask(
    mm: MaskedModel, mask: torch.Tensor, data: PairedData, ablation: Ablation = "interchange", batch_size: int = 32,
    mean_reference: torch.Tensor | None = None,
) -> dict[str, float]:
    """Metrics of one mask over a dataset, averaged over examples."""
    source = counterfactual_source(mm, ablation, data, mean_reference, single_use=True)
    mask = mask.to(mm.device)
    totals: dict[str, float] = {}
    n = 0
    with torch.no_grad():
        for batch in data.batches(batch_size):
            cf = source(batch)
            full = mm.full_logits(batch.clean, batch.attention_mask)
            circuit = mm(batch.clean, cf, mask, attention_mask=batch.attention_mask)
            batch = batch.to(circuit.device)
            values = {
                "kl": float(kl_divergence(circuit, full, batch)),
                "mse": float(mean_squared_error(circuit, full, batch)),
                "exact_match": exact_match(circuit, full, batch),
                **answer_metrics(circuit, full, batch),
            }
            full_answers = answer_metrics(full, full, batch)
            values.update({f"full_{k}": v for k, v in full_answers.items()})
            for k, v in values.items():
                totals[k] = totals.get(k, 0.0) + v * len(batch)
            n += len(batch)
    return {k: v / n for k, v in totals.items()}


def _atomic_write(path, write, text: bool = False) -> None:
    """Write to a temporary file beside ``path`` and rename: nothing half-written on disk."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.basename(path))
    try:
        with os.fdopen(fd, "w" if text else "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _jsonable(info: dict) -> dict:
    out = {}
    for k, v in info.items():
        if isinstance(v, (int, float, str, bool)) or v is None:
            out[k] = v
        elif isinstance(v, (list, tuple)) and all(isinstance(x, (int, float, str, bool)) for x in v):
            out[k] = list(v)
    return out
