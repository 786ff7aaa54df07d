"""Plotly figures: circuits as layered DAGs, faithfulness curves, training history, circuit overlap.

Every function returns a ``go.Figure``; ``save(fig, path)`` writes HTML (always) or PNG (with kaleido).
Edges are drawn as one trace per kind (q, k, v, MLP, logits) with None-separated segments, so a figure stays
responsive with thousands of edges; an invisible marker at each edge's midpoint carries its hover text.
"""

from __future__ import annotations

import re
from typing import Sequence

import plotly.graph_objects as go
from .circuit import Circuit
from .errors import EdgePruneError
from .graph import Graph

KIND_COLORS = {"q": "#1f77b4", "k": "#2ca02c", "v": "#9467bd", "mlp": "#ff7f0e", "logits": "#d62728"}


def node_positions(graph: Graph) -> dict[str, tuple[float, float]]:
    """x: stage (inputs 0, attention of layer l at 2l+1, its MLP at 2l+2, logits last); y: head index."""
    pos: dict[str, tuple[float, float]] = {}
    H = graph.spec.n_heads
    inputs = [w for w in graph.writers if w in ("tok", "pos", "input")]
    for i, name in enumerate(inputs):
        pos[name] = (0.0, (H - 1) / 2 + (i - (len(inputs) - 1) / 2))
    for name in graph.writers:
        m = re.fullmatch(r"a(\d+)\.h(\d+)", name)
        if m:
            pos[name] = (2 * int(m.group(1)) + 1.0, float(int(m.group(2))))
        m = re.fullmatch(r"m(\d+)", name)
        if m:
            pos[name] = (2 * int(m.group(1)) + 2.0, (H - 1) / 2)
    pos["logits"] = (2 * graph.spec.n_layers + 1.0, (H - 1) / 2)
    return pos


def _reader_kind(reader: str) -> str:
    if reader == "logits":
        return "logits"
    m = re.search(r"<([qkv])>$", reader)
    return m.group(1) if m else "mlp"


KIND_OFFSET = {"q": 0.22, "k": 0.0, "v": -0.22, "mlp": 0.0, "logits": 0.0}


def _reader_point(graph: Graph, r: int, pos: dict) -> tuple[float, float]:
    """Where an edge into reader r ends: its node, nudged up (q) or down (v) so q/k/v stay distinguishable."""
    x, y = pos[_reader_node(graph, r)]
    return x - 0.08 * (_reader_kind(graph.readers[r]) in "qkv"), y + KIND_OFFSET[_reader_kind(graph.readers[r])]


def _reader_node(graph: Graph, r: int) -> str:
    targets = graph.reader_targets(r)
    return "logits" if not targets else graph.writers[targets[0]]


def plot_circuit(
    circuit: Circuit, title: str | None = None, prune_dangling: bool = True, show_dangling: bool = True,
    max_width: float = 6.0,
) -> go.Figure:
    """The circuit as a DAG (x = layer). Edge width follows |score| (or the mask); edges into nodes that reach
    no output are drawn dimmed (or dropped with show_dangling=False)."""
    graph = circuit.graph
    pos = node_positions(graph)
    edges = circuit.effective_edges()
    live = circuit.prune_dangling().effective_edges() if prune_dangling else edges
    scores = circuit.scores.abs() if circuit.scores is not None else edges.float()
    kept_scores = scores[edges]
    top = float(kept_scores.max()) if kept_scores.numel() and float(kept_scores.max()) > 0 else 1.0
    fig = go.Figure()
    by_kind: dict[tuple[str, bool], dict[str, list]] = {}
    for w, r in edges.nonzero().tolist():
        alive = bool(live[w, r])
        if not alive and not show_dangling:
            continue
        kind = _reader_kind(graph.readers[r])
        (x0, y0), (x1, y1) = pos[graph.writers[w]], _reader_point(graph, r, pos)
        entry = by_kind.setdefault((kind, alive), {"x": [], "y": [], "mx": [], "my": [], "text": [], "w": []})
        entry["x"] += [x0, x1, None]
        entry["y"] += [y0, y1, None]
        entry["mx"].append((x0 + x1) / 2)
        entry["my"].append((y0 + y1) / 2)
        entry["text"].append(f"{graph.edge_name(w, r)}<br>score {float(scores[w, r]):.4g}")
        entry["w"].append(float(scores[w, r]) / top)
    for (kind, alive), e in sorted(by_kind.items(), key=lambda kv: (not kv[0][1], kv[0][0])):
        width = 0.5 + (max_width - 0.5) * (sum(e["w"]) / len(e["w"]))  # one width per trace keeps it fast
        label = kind if alive else f"{kind} (dangling)"
        fig.add_trace(go.Scattergl(
            x=e["x"], y=e["y"], mode="lines", name=label, hoverinfo="skip",
            line=dict(color=KIND_COLORS[kind], width=width), opacity=0.8 if alive else 0.15,
        ))
        fig.add_trace(go.Scatter(
            x=e["mx"], y=e["my"], mode="markers", marker=dict(size=6, color=KIND_COLORS[kind], opacity=0.01),
            text=e["text"], hoverinfo="text", showlegend=False, name=f"{label} hover",
        ))
    used = set()
    for w, r in edges.nonzero().tolist():
        used.update({graph.writers[w], _reader_node(graph, r)})
    names = [n for n in list(graph.writers) + ["logits"] if n in used]
    fig.add_trace(go.Scatter(
        x=[pos[n][0] for n in names], y=[pos[n][1] for n in names], mode="markers+text", text=names,
        textposition="top center", marker=dict(size=12, color="#333", symbol="square"), name="nodes",
        hovertext=names, hoverinfo="text",
    ))
    ticks = [0] + [2 * l + 1 for l in range(graph.spec.n_layers)] + [2 * graph.spec.n_layers + 1]
    labels = ["embed"] + [f"L{l}" for l in range(graph.spec.n_layers)] + ["logits"]
    fig.update_layout(
        title=title or f"{circuit.method or 'circuit'}: {circuit.n_edges} edges (sparsity {circuit.sparsity:.3f})",
        xaxis=dict(tickvals=ticks, ticktext=labels, title="layer"), yaxis=dict(title="head", zeroline=False),
        plot_bgcolor="white", hovermode="closest", height=500, legend=dict(orientation="h"),
    )
    return fig


def plot_curves(curves: Sequence, metric: str = "faithfulness") -> go.Figure:
    """Several methods' faithfulness curves on one figure (x: % of edges kept)."""
    fig = go.Figure()
    for curve in curves:
        ys = curve.faithfulness if metric == "faithfulness" else curve.values
        fig.add_trace(go.Scatter(
            x=[100 * f for f in curve.fractions], y=ys, mode="lines+markers",
            name=f"{curve.method} (CPR {curve.cpr:.3f}, CMD {curve.cmd:.3f})",
        ))
    fig.update_layout(title="Faithfulness", xaxis_title="% of edges kept", yaxis_title=metric, plot_bgcolor="white")
    return fig


def plot_history(result) -> go.Figure:
    """Edge Pruning training: the objective, and sparsity against its target."""
    h = result.history
    steps = list(range(len(h["objective"])))
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=steps, y=h["objective"], name="objective", yaxis="y1"))
    fig.add_trace(go.Scatter(x=steps, y=h["sparsity"], name="sparsity", yaxis="y2"))
    fig.add_trace(go.Scatter(x=steps, y=h["target"], name="target sparsity", yaxis="y2", line=dict(dash="dash")))
    fig.update_layout(
        title="Edge Pruning training", xaxis_title="step", yaxis=dict(title="objective", type="log"),
        yaxis2=dict(title="sparsity", overlaying="y", side="right", range=[0, 1.05]), plot_bgcolor="white",
    )
    return fig


def plot_overlap(a: Circuit, b: Circuit, names: tuple[str, str] | None = None) -> go.Figure:
    """Edges in both circuits, in only one or only the other, drawn on one DAG."""
    if not a.graph.compatible_with(b.graph):
        raise EdgePruneError("the two circuits live on different graphs")
    names = names or (a.method or "A", b.method or "B")
    ea, eb = a.effective_edges(), b.effective_edges()
    groups = {f"both ({int((ea & eb).sum())})": (ea & eb, "#2ca02c"),
              f"only {names[0]} ({int((ea & ~eb).sum())})": (ea & ~eb, "#1f77b4"),
              f"only {names[1]} ({int((~ea & eb).sum())})": (~ea & eb, "#d62728")}
    pos = node_positions(a.graph)
    fig = go.Figure()
    for label, (mask, color) in groups.items():
        xs, ys, mx, my, text = [], [], [], [], []
        for w, r in mask.nonzero().tolist():
            (x0, y0), (x1, y1) = pos[a.graph.writers[w]], _reader_point(a.graph, r, pos)
            xs += [x0, x1, None]
            ys += [y0, y1, None]
            mx.append((x0 + x1) / 2)
            my.append((y0 + y1) / 2)
            text.append(a.graph.edge_name(w, r))
        fig.add_trace(go.Scattergl(x=xs, y=ys, mode="lines", name=label, line=dict(color=color, width=2)))
        fig.add_trace(go.Scatter(x=mx, y=my, mode="markers", text=text, hoverinfo="text", showlegend=False,
                                 marker=dict(size=6, color=color, opacity=0.01)))
    union = ea | eb
    nodes = sorted({a.graph.writers[w] for w, _ in union.nonzero().tolist()}
                   | {_reader_node(a.graph, r) for _, r in union.nonzero().tolist()})
    fig.add_trace(go.Scatter(x=[pos[n][0] for n in nodes], y=[pos[n][1] for n in nodes], mode="markers+text",
                             text=nodes, textposition="top center", marker=dict(size=12, color="#333"), name="nodes"))
    jaccard = float((ea & eb).sum()) / max(1, float(union.sum()))
    fig.update_layout(title=f"{names[0]} vs {names[1]}: Jaccard {jaccard:.3f}", plot_bgcolor="white", height=500)
    return fig


def save(fig: go.Figure, path: str) -> str:
    """HTML always works; PNG needs kaleido (a clear error says so)."""
    if path.endswith(".html"):
        fig.write_html(path, include_plotlyjs=True, full_html=True)
    elif path.endswith(".png"):
        try:
            fig.write_image(path)
        except (ValueError, ImportError) as exc:
            raise EdgePruneError(f"PNG export needs kaleido (pip install kaleido): {exc}") from exc
    else:
        raise EdgePruneError(f"save to .html or .png, got {path!r}")
    return path
