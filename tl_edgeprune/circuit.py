"""A circuit: a set of edges of a graph, with scores, that can be evaluated, saved and loaded.

Every method returns one, so results compare on the same footing. JSON follows the EAP-IG / MIB
format ``{cfg, nodes: {name: {in_graph, score}}, edges: {name: {score, in_graph}}}``.
"""

from __future__ import annotations

import gzip
import json
import os
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import torch
from jaxtyping import Bool, Float

from .ablations import Ablation, counterfactual_source
from .data import PairedData
from .engine import MaskedModel
from . import validation
from .errors import EdgePruneError, first_line
from .fingerprint import describe_difference, model_fingerprint
from .files import atomic_write
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
    model: dict[str, str] | None = None  # fingerprint of the model it was found on (class, name, weights hash)

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
        absolute: bool = True, method: str = "", model: dict | None = None,
    ) -> "Circuit":
        """The k (or a fraction of all) edges with the largest scores (|score| if absolute)."""
        if (k is None) == (fraction is None):
            raise EdgePruneError("give exactly one of k (an edge count) or fraction (of all edges)")
        if fraction is not None:
            if not 0 <= fraction <= 1:
                raise EdgePruneError(f"fraction must lie in [0, 1], got {fraction}")
            k = int(round(fraction * graph.n_edges))
        k = validation.integer("k", k)
        if not 0 <= k <= graph.n_edges:
            raise EdgePruneError(f"k must lie in [0, {graph.n_edges}], got {k}")
        valid = graph.valid_mask()
        key = (scores.abs() if absolute else scores).detach().cpu().double().masked_fill(~valid, float("-inf"))
        edges = torch.zeros(graph.shape, dtype=torch.bool)
        if k:
            edges.view(-1)[torch.topk(key.view(-1), k).indices] = True
        return cls(graph, edges, scores=scores.detach().cpu().float(), method=method, model=model)

    @classmethod
    def from_soft_mask(
        cls, graph: Graph, soft: torch.Tensor, nodes: torch.Tensor | None = None, method: str = "edge_pruning",
        info: dict | None = None, model: dict | None = None,
    ) -> "Circuit":
        """Edge Pruning's read-out: threshold the soft mask, found by binary search so that the binary circuit's
        density matches the soft mask's mean over real edges (to the nearest edge)."""
        soft64 = soft.detach().cpu().double()  # compare in float64, as the search does
        edges = soft64 >= binary_search_threshold(soft64, graph.valid_mask())
        return cls(graph, edges, scores=soft.detach().cpu().float(), nodes=nodes, method=method, info=info or {},
                   model=model)

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
        return Circuit(g, edges, self.scores, self.nodes, self.method, {**self.info, "pruned_dangling": True}, self.model)

    # ------------------------------------------------------------------ evaluation
    def check_model(self, model: Any, allow_other_model: bool = False) -> None:
        """Refuse a model of another shape, and (unless ``allow_other_model``) one whose weights differ from the
        model the circuit was found on: a circuit of one model evaluates on any model of its shape, meaninglessly."""
        spec = GraphSpec.from_config(model.cfg)
        own = Graph.from_spec(spec, self.graph.input_nodes, self.graph.position_classes)
        if spec != self.graph.spec and not own.same_structure(self.graph):
            raise EdgePruneError(
                f"this circuit was found on a model with {self.graph.spec} but the model given is {spec}; "
                "a circuit only applies to a model of the same shape"
            )
        if self.model is None or allow_other_model:
            return
        now = model_fingerprint(model)
        if now["weights_sha256"] != self.model.get("weights_sha256"):  # the name is a path's basename: informative only
            raise EdgePruneError(
                f"this circuit was found on another model ({describe_difference(self.model, now)}). Evaluate it on "
                "the model it came from, or pass allow_other_model=True if applying it to this one is intended "
                "(e.g. a fine-tuned copy)."
            )

    def evaluate(
        self, model: Any, data: PairedData, ablation: Ablation = "interchange", batch_size: int = 32,
        mean_reference: torch.Tensor | None = None, allow_other_model: bool = False,
    ) -> dict[str, float]:
        """KL/MSE to the full model, answer metrics and exact match, via the engine with binary masks."""
        return evaluate_circuits(model, [self], data, ablation, batch_size, mean_reference, allow_other_model)[0]

    # ------------------------------------------------------------------ files
    def to_dict(self) -> dict:
        """The EAP-IG / MIB layout; EAP-IG's ``Graph.from_json`` reads it (merged input, one k/v reader per head).

        ``cfg`` starts with EAP-IG's four keys; node masks go under ``kept`` and the model's fingerprint under a
        top-level ``model``, which EAP-IG ignores."""
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
                nodes[name]["kept"] = bool(self.nodes[i])
        nodes["logits"] = {"in_graph": bool(eff[:, g.readers_of_node("logits")].any())}
        spec = asdict(g.spec)
        cfg = {k: spec.pop(k) for k in ("n_layers", "n_heads", "parallel_attn_mlp", "d_model")} | spec
        cfg["input_nodes"] = g.input_nodes
        if g.positional:  # not MIB: edges are named "writer->reader@class" (docs/api.md, positional circuits)
            cfg["position_classes"] = list(g.position_classes)
        return {"cfg": cfg, "nodes": nodes, "edges": edges, "method": self.method, "info": _jsonable(self.info),
                "model": self.model}

    def to_json(self, path: str | os.PathLike) -> None:
        """The MIB / EAP-IG JSON; a path ending in ``.json.gz`` is gzipped (a 70k-edge graph: ~4.5 MB plain)."""
        if str(path).endswith(".gz"):
            text = json.dumps(self.to_dict()).encode()
            atomic_write(path, lambda f: f.write(gzip.compress(text, mtime=0)))
            return
        atomic_write(path, lambda f: json.dump(self.to_dict(), f), text=True)

    @classmethod
    def from_dict(cls, data: Any) -> "Circuit":
        """Read our files and unmodified EAP-IG / MIB ones (whose ``cfg`` holds only n_layers, n_heads,
        parallel_attn_mlp and d_model: the rest is inferred from the node names). Anything else is refused."""
        if not isinstance(data, dict) or not isinstance(data.get("cfg"), dict) or not isinstance(data.get("edges"), dict):
            raise EdgePruneError("a circuit file is a JSON object {cfg: {...}, nodes: {...}, edges: {name: {score, "
                                 f"in_graph}}}} (EAP-IG / MIB format); got {_shape_of(data)}")
        nodes = data.get("nodes", {})
        if not isinstance(nodes, dict):
            raise EdgePruneError(f"the circuit file's 'nodes' must be an object {{name: {{in_graph}}}}, got {_shape_of(nodes)}")
        graph = Graph.from_spec(_spec_from_file(data["cfg"], nodes, data["edges"]), _input_nodes(data["cfg"], nodes, data["edges"]),
                                _position_classes(data["cfg"], data["edges"]))
        edges = torch.zeros(graph.shape, dtype=torch.bool)
        scores = torch.zeros(graph.shape)
        for name, entry in data["edges"].items():
            try:
                w, r = graph.edge_index(name)
            except (KeyError, ValueError) as exc:
                raise EdgePruneError(f"edge {name!r} of the file is not an edge of {graph}: {exc}") from None
            if not isinstance(entry, dict):
                raise EdgePruneError(f"edge {name!r}: expected {{score, in_graph}}, got {_shape_of(entry)}")
            edges[w, r] = _flag(entry.get("in_graph"), f"edge {name!r}")
            score = entry.get("score", 0.0)
            if isinstance(score, bool) or not isinstance(score, (int, float)):
                raise EdgePruneError(f"edge {name!r}: score must be a number, got {score!r}")
            scores[w, r] = float(score)
        kept = _node_masks(graph, nodes, edges, ours="method" in data)
        model = data.get("model")
        if model is not None and not isinstance(model, dict):
            raise EdgePruneError(f"the file's 'model' must be a fingerprint object, got {_shape_of(model)}")
        return cls(graph, edges, scores=scores, nodes=kept, method=str(data.get("method", "")),
                   info=data.get("info", {}) if isinstance(data.get("info"), dict) else {}, model=model)

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> "Circuit":
        try:
            with (gzip.open(path, "rt") if str(path).endswith(".gz") else open(path)) as f:
                data = json.load(f)
        except (OSError, EOFError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise EdgePruneError(f"cannot read {os.fspath(path)!r} as a circuit JSON file ({type(exc).__name__}: {exc})") from None
        return cls.from_dict(data)

    def save(self, path: str | os.PathLike) -> None:
        """``.json`` (MIB format) or ``.pt`` (tensors and plain types only, exact; loads with weights_only)."""
        if str(path).endswith((".json", ".json.gz")):
            return self.to_json(path)
        cfg = {**asdict(self.graph.spec), "input_nodes": self.graph.input_nodes}
        if self.graph.positional:
            cfg["position_classes"] = list(self.graph.position_classes)
        payload = {"format": CIRCUIT_FORMAT, "cfg": cfg,
                   "edges": self.edges, "scores": self.scores, "nodes": self.nodes, "method": self.method,
                   "info": _jsonable(self.info), "model": self.model}
        atomic_write(path, lambda f: torch.save(payload, f))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Circuit":
        """A circuit saved by ``save``; a ``.pt`` file is read with ``weights_only=True``, so it never runs code."""
        if str(path).endswith((".json", ".json.gz")):
            return cls.from_json(path)
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises many types for bad files; all mean "not a circuit we can read"
            raise EdgePruneError(
                f"cannot read {os.fspath(path)!r} as a saved circuit ({type(exc).__name__}: {first_line(exc)}). Files "
                "load with weights_only=True: one that would run code on load is refused."
            ) from None
        if not isinstance(payload, dict) or payload.get("format") != CIRCUIT_FORMAT:
            hint = " (it is an Edge Pruning checkpoint: resume it with edge_pruning(..., resume=True))" if (
                isinstance(payload, dict) and "edge_log_alpha" in payload) else ""
            raise EdgePruneError(f"{os.fspath(path)!r} is not a circuit saved by Circuit.save{hint}")
        cfg = dict(payload["cfg"])
        input_nodes = cfg.pop("input_nodes", "separate")
        classes = cfg.pop("position_classes", ())
        graph = Graph.from_spec(GraphSpec(**cfg), input_nodes, classes)
        return cls(graph, payload["edges"], payload["scores"], payload["nodes"], payload["method"], payload["info"],
                   payload.get("model"))


CIRCUIT_FORMAT = "tl_edgeprune/circuit"


def _shape_of(value: Any) -> str:
    return f"a {type(value).__name__}" + (f" ({str(value)[:60]})" if isinstance(value, (str, int, float)) else "")


def _flag(value: Any, where: str) -> bool:
    """JSON true/false only: the string "false" is truthy in Python, so it is refused rather than read as True."""
    if not isinstance(value, bool):
        raise EdgePruneError(f"{where}: in_graph must be true or false, got {value!r}")
    return value


def _spec_from_file(cfg: dict, nodes: dict, edges: dict) -> GraphSpec:
    """GraphSpec from a file's cfg; what EAP-IG does not write is inferred (one k/v reader per query head;
    no MLP nodes means attention-only; the position embedding matters only with a separate ``pos`` node)."""
    missing = [k for k in ("n_layers", "n_heads", "d_model") if k not in cfg]
    if missing:
        raise EdgePruneError(f"the circuit file's cfg lacks {missing}; it needs at least n_layers, n_heads, d_model")
    names = set(nodes) | {n.split("->")[0] for n in edges}
    has_pos = "pos" in names
    try:
        return GraphSpec(
            n_layers=int(cfg["n_layers"]), n_heads=int(cfg["n_heads"]),
            n_kv_heads=int(cfg.get("n_kv_heads", cfg["n_heads"])), d_model=int(cfg["d_model"]),
            attn_only=bool(cfg.get("attn_only", not any(n.startswith("m") for n in names))),
            parallel_attn_mlp=bool(cfg.get("parallel_attn_mlp", False)),
            positional_embedding_type=str(cfg.get("positional_embedding_type", "standard" if has_pos else "rotary")),
        )
    except (TypeError, ValueError) as exc:
        raise EdgePruneError(f"the circuit file's cfg is not readable: {exc}") from None


def _position_classes(cfg: dict, edges: dict) -> tuple[str, ...]:
    """A positional circuit's classes: in ``cfg`` (ours); a file whose edge names end in ``@class`` without them is
    refused rather than read as unknown edges one by one."""
    classes = cfg.get("position_classes")
    if classes is None:
        if any("@" in name for name in edges):
            raise EdgePruneError("the file's edges are positional ('...@class') but its cfg has no position_classes list")
        return ()
    if not isinstance(classes, list):
        raise EdgePruneError(f"the circuit file's cfg.position_classes must be a list of names, got {_shape_of(classes)}")
    return tuple(classes)


def _input_nodes(cfg: dict, nodes: dict, edges: dict) -> str:
    if "input_nodes" in cfg:
        return cfg["input_nodes"]
    names = set(nodes) | {n.split("->")[0] for n in edges}
    return "merged" if "input" in names else "separate"


def _node_masks(graph: Graph, nodes: dict, edges: torch.Tensor, ours: bool) -> torch.Tensor | None:
    """Node masks (``kept``; older files of ours: ``score``), checked against the nodes' in_graph flags."""
    kept = torch.ones(graph.n_writers, dtype=torch.bool)
    any_mask = False
    for name, entry in nodes.items():
        if name == "logits":
            continue
        if name not in graph._writer_index:
            raise EdgePruneError(f"node {name!r} of the file is not a node of {graph}")
        if not isinstance(entry, dict):
            raise EdgePruneError(f"node {name!r}: expected {{in_graph}}, got {_shape_of(entry)}")
        i = graph.writer_index(name)
        if "in_graph" in entry:
            in_graph = _flag(entry["in_graph"], f"node {name!r}")
            if not in_graph and bool(edges[i].any()):
                raise EdgePruneError(f"node {name!r} is marked out of the circuit but edges from it are in: the file "
                                     "contradicts itself (EAP-IG's prune() makes them agree)")
        mask = entry.get("kept", entry.get("score") if ours else None)
        if mask is not None:
            any_mask = True
            kept[i] = bool(mask >= 0.5) if isinstance(mask, (int, float)) else _flag(mask, f"node {name!r} kept")
    return kept if any_mask else None


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


def evaluate_masks(
    mm: MaskedModel, masks: list[torch.Tensor], data: PairedData, ablation: Ablation = "interchange",
    batch_size: int = 32, mean_reference: torch.Tensor | None = None, metric: Callable | None = None,
) -> list[dict[str, float]]:
    """Metrics of several masks over a dataset, averaged over examples. Per batch, ỹ, the full model's logits and
    their unembedding are computed once and shared by every mask; only the scored positions are unembedded (every
    metric reads those alone). ``metric(logits, batch)``: a scalar of the user's, reported as ``"metric"``."""
    validation.integer("batch_size", batch_size, minimum=1)
    mm.check_data(data)
    source = counterfactual_source(mm, ablation, data, mean_reference, single_use=len(masks) == 1)
    masks = [mask.to(mm.device) for mask in masks]
    totals: list[dict[str, float]] = [{} for _ in masks]
    with torch.no_grad():
        for batch in data.batches(batch_size):
            batch = batch.to(mm.device)
            cf = source(batch)
            at = batch.positions
            full = mm.full_logits(batch.clean, batch.attention_mask, at=at)
            full_answers = {f"full_{k}": v for k, v in answer_metrics(full, full, batch).items()}
            for mask, total in zip(masks, totals):
                circuit = mm(batch.clean, cf, mask, attention_mask=batch.attention_mask, logits_at=at,
                             position_classes=mm.position_classes_of(batch))
                values = {
                    "kl": float(kl_divergence(circuit, full, batch)),
                    "mse": float(mean_squared_error(circuit, full, batch)),
                    "exact_match": exact_match(circuit, full, batch),
                    **answer_metrics(circuit, full, batch),
                    **full_answers,
                }
                if metric is not None:
                    values["metric"] = float(metric(circuit, batch))
                for k, v in values.items():
                    total[k] = total.get(k, 0.0) + v * len(batch)
    return [{k: v / len(data) for k, v in total.items()} for total in totals]


def evaluate_circuits(
    model: Any, circuits: list[Circuit], data: PairedData, ablation: Ablation = "interchange", batch_size: int = 32,
    mean_reference: torch.Tensor | None = None, allow_other_model: bool = False,
) -> list[dict[str, float]]:
    """``Circuit.evaluate`` for many circuits of one graph at once: ỹ and the full model's logits are computed once
    per batch for all of them (on SmolLM2 IOI the full forward and ỹ are most of an evaluation)."""
    if not circuits:
        return []
    graph = circuits[0].graph
    for circuit in circuits:
        if not circuit.graph.same_structure(graph):
            raise EdgePruneError("evaluate_circuits needs circuits of one graph; evaluate the others separately")
        circuit.check_model(model, allow_other_model)
    with MaskedModel(model, graph) as mm:
        results = evaluate_masks(mm, [c.mask() for c in circuits], data, ablation, batch_size, mean_reference)
    return [r | {"edges": c.n_edges, "sparsity": c.sparsity} for r, c in zip(results, circuits)]


def _jsonable(info: dict) -> dict:
    out = {}
    for k, v in info.items():
        if isinstance(v, (int, float, str, bool)) or v is None:
            out[k] = v
        elif isinstance(v, (list, tuple)) and all(isinstance(x, (int, float, str, bool)) for x in v):
            out[k] = list(v)
    return out

