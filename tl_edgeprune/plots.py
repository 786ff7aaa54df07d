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
from .graph import Graph, base_reader_name

KIND_COLORS = {"q": "#1f77b4", "k": "#2ca02c", "v": "#9467bd", "mlp": "#ff7f0e", "logits": "#d62728"}
KIND_LABELS = {"q": "q input", "k": "k input", "v": "v input", "mlp": "MLP input", "logits": "logits"}
LANE = -1.5  # the row below the heads that holds the inputs, the MLPs and the logits
WIDTH_BINS = 4  # edges are drawn in this many width classes per kind: widths follow each edge's score
MAX_LABELLED_NODES = 40  # above this, node names are on hover and on the axes, not printed on the plot


def node_positions(graph: Graph) -> dict[str, tuple[float, float]]:
    """x: stage (inputs 0, attention of layer l at 2l+1, its MLP at 2l+2, logits last); y: head index for heads,
    and one lane below the heads for inputs, MLPs and logits, so no MLP sits among the heads."""
    pos: dict[str, tuple[float, float]] = {}
    inputs = [w for w in graph.writers if w in ("tok", "pos", "input")]
    for i, name in enumerate(inputs):
        pos[name] = (0.0, LANE - i)
    for name in graph.writers:
        m = re.fullmatch(r"a(\d+)\.h(\d+)", name)
        if m:
            pos[name] = (2 * int(m.group(1)) + 1.0, float(int(m.group(2))))
        m = re.fullmatch(r"m(\d+)", name)
        if m:
            pos[name] = (2 * int(m.group(1)) + 2.0, LANE)
    pos["logits"] = (2 * graph.spec.n_layers + 1.0, LANE)
    return pos


def _reader_kind(reader: str) -> str:
    reader = base_reader_name(reader)  # a positional reader's kind is its base reader's
    if reader == "logits":
        return "logits"
    m = re.search(r"<([qkv])>$", reader)
    return m.group(1) if m else "mlp"


KIND_OFFSET = {"q": 0.25, "k": 0.0, "v": -0.25, "mlp": 0.0, "logits": 0.0}
PORT_DX = 0.22  # q/k/v ports sit on the head's left side, one above the other


def _reader_point(graph: Graph, r: int, pos: dict) -> tuple[float, float]:
    """Where an edge into reader r ends: a q, k or v port on the head's left (q top, v bottom), else the node."""
    x, y = pos[_reader_node(graph, r)]
    kind = _reader_kind(graph.readers[r])
    return x - PORT_DX * (kind in "qkv"), y + KIND_OFFSET[kind]


def _reader_node(graph: Graph, r: int) -> str:
    targets = graph.reader_targets(r)
    return "logits" if not targets else graph.writers[targets[0]]


def _axes(fig: go.Figure, graph: Graph, height: int | None = None) -> None:
    """Layer names on x; head indices (integers) on y, and the lane of inputs, MLPs and logits below them."""
    n_layers, n_heads = graph.spec.n_layers, graph.spec.n_heads
    ticks = [0] + [2 * l + 1.5 for l in range(n_layers)] + [2 * n_layers + 1]
    labels = ["embed"] + [f"L{l}" for l in range(n_layers)] + ["logits"]
    inputs = [w for w in graph.writers if w in ("tok", "pos", "input")]
    y_ticks = [LANE - i for i in range(len(inputs))][::-1] + list(range(n_heads))
    y_labels = inputs[::-1] + [f"h{h}" for h in range(n_heads)]
    y_labels[len(inputs) - 1] = f"{inputs[0]} · MLP · logits" if inputs else "MLP · logits"
    fig.update_layout(
        xaxis=dict(tickvals=ticks, ticktext=labels, title="layer (attention heads, then the MLP, of each)",
                   showgrid=False, zeroline=False),
        yaxis=dict(tickvals=y_ticks, ticktext=y_labels, title="head", showgrid=False, zeroline=False,
                   range=[LANE - len(inputs) + 0.4, n_heads - 0.4]),
        plot_bgcolor="white", hovermode="closest", legend=dict(orientation="h", y=-0.18),
        height=height or max(420, 34 * (n_heads + len(inputs) + 1) + 160),
    )


def plot_circuit(
    circuit: Circuit, title: str | None = None, prune_dangling: bool = True, show_dangling: bool = True,
    max_width: float = 5.0,
) -> go.Figure:
    """The circuit as a DAG (x = layer, y = head; inputs, MLPs and logits in the lane below). Each edge's width
    follows its own |score| (or the mask); q/k/v edges end at ports on the head; edges into nodes that reach no
    output are drawn dimmed (or dropped with show_dangling=False)."""
    graph = circuit.graph
    pos = node_positions(graph)
    edges = circuit.effective_edges()
    live = circuit.prune_dangling().effective_edges() if prune_dangling else edges
    scores = circuit.scores.abs() if circuit.scores is not None else edges.float()
    kept_scores = scores[edges]
    top = float(kept_scores.max()) if kept_scores.numel() and float(kept_scores.max()) > 0 else 1.0
    n = int(edges.sum())
    opacity = 0.85 if n <= 60 else max(0.3, 0.85 * (60 / n) ** 0.35)  # thousands of edges stay legible
    fig = go.Figure()
    lines: dict[tuple[str, bool, int], dict[str, list]] = {}
    hovers: dict[tuple[str, bool], dict[str, list]] = {}
    ports: dict[str, set] = {}
    for w, r in edges.nonzero().tolist():
        alive = bool(live[w, r])
        if not alive and not show_dangling:
            continue
        kind = _reader_kind(graph.readers[r])
        (x0, y0), (x1, y1) = pos[graph.writers[w]], _reader_point(graph, r, pos)
        rel = float(scores[w, r]) / top
        width_bin = min(WIDTH_BINS - 1, int(rel * WIDTH_BINS))
        line = lines.setdefault((kind, alive, width_bin), {"x": [], "y": []})
        line["x"] += [x0, x1, None]
        line["y"] += [y0, y1, None]
        hover = hovers.setdefault((kind, alive), {"x": [], "y": [], "text": []})
        hover["x"].append((x0 + x1) / 2)
        hover["y"].append((y0 + y1) / 2)
        hover["text"].append(f"{graph.edge_name(w, r)}<br>score {float(scores[w, r]):.4g}")
        if kind in "qkv":
            ports.setdefault(kind, set()).add((x1, y1))
    shown = set()
    for (kind, alive, width_bin), e in sorted(lines.items(), key=lambda kv: (not kv[0][1], list(KIND_COLORS).index(kv[0][0]), kv[0][2])):
        label = KIND_LABELS[kind] if alive else f"{KIND_LABELS[kind]} (dangling)"
        fig.add_trace(go.Scattergl(
            x=e["x"], y=e["y"], mode="lines", name=label, legendgroup=label, showlegend=label not in shown,
            hoverinfo="skip", opacity=opacity if alive else 0.15,
            line=dict(color=KIND_COLORS[kind], width=0.6 + (max_width - 0.6) * (width_bin + 1) / WIDTH_BINS),
        ))
        shown.add(label)
    for (kind, alive), e in hovers.items():
        label = KIND_LABELS[kind] if alive else f"{KIND_LABELS[kind]} (dangling)"
        fig.add_trace(go.Scatter(
            x=e["x"], y=e["y"], mode="markers", marker=dict(size=6, color=KIND_COLORS[kind], opacity=0.01),
            text=e["text"], hoverinfo="text", showlegend=False, legendgroup=label, name=f"{label} hover",
        ))
    for kind, points in sorted(ports.items()):
        xs, ys = zip(*sorted(points))
        fig.add_trace(go.Scatter(
            x=xs, y=ys, mode="markers", name=f"{kind} port", legendgroup=KIND_LABELS[kind], showlegend=False,
            marker=dict(size=5, color=KIND_COLORS[kind], symbol="triangle-right"), hoverinfo="skip",
        ))
    used = set()
    for w, r in edges.nonzero().tolist():
        if show_dangling or live[w, r]:
            used.update({graph.writers[w], _reader_node(graph, r)})
    names = [n for n in list(graph.writers) + ["logits"] if n in used]
    labelled = len(names) <= MAX_LABELLED_NODES
    fig.add_trace(go.Scatter(
        x=[pos[n][0] for n in names], y=[pos[n][1] for n in names], mode="markers+text" if labelled else "markers",
        text=names, textposition="top center", name="nodes", hovertext=names, hoverinfo="text",
        marker=dict(size=11 if labelled else 8, color="#333",
                    symbol=["square" if not n.startswith("a") else "circle" for n in names]),
    ))
    _axes(fig, graph)
    fig.update_layout(title=title or f"{circuit.method or 'circuit'}: {circuit.n_edges} edges (sparsity {circuit.sparsity:.3f})"
                      + ("" if labelled else " — hover a node or edge for its name"))
    return fig


def _writer_stage(graph: Graph, name: str) -> float:
    """x of a node in the positional figure: inputs 0, layer l's heads 2l+1, its MLP 2l+2, logits last."""
    if name in ("tok", "pos", "input"):
        return 0.0
    if name == "logits":
        return 2 * graph.spec.n_layers + 1.0
    m = re.fullmatch(r"a(\d+)\.h\d+", name)
    return 2 * int(m.group(1)) + 1.0 if m else 2 * int(name[1:]) + 2.0


def _within_row(graph: Graph, name: str) -> float:
    """A node's offset inside its position row: heads spread over [−0.35, 0.35], everything else at 0."""
    m = re.fullmatch(r"a\d+\.h(\d+)", name)
    if not m or graph.spec.n_heads == 1:
        return 0.0
    return -0.35 + 0.7 * int(m.group(1)) / (graph.spec.n_heads - 1)


def plot_positional_circuit(
    circuit: Circuit, data=None, tokens: Sequence[str] | None = None, example: int = 0, title: str | None = None,
    max_width: float = 4.0,
) -> go.Figure:
    """A positional circuit: x = layer, y = position class (one row each, labelled with the token a reference prompt
    has there when ``data`` and ``tokens`` are given: ``tokens`` are that example's token strings). An edge
    ``w->r@c`` runs inside row c, from w to r; heads spread within a row by index. Hover gives names and scores."""
    graph = circuit.graph
    if not graph.positional:
        raise EdgePruneError("plot_positional_circuit needs a positional circuit (positional=True); plot_circuit "
                             "draws the others")
    classes = graph.position_classes
    labels = list(classes)
    if data is not None and tokens is not None:
        if data.position_classes is None or tuple(data.position_names or ()) != classes:
            raise EdgePruneError(f"the data's position classes {data.position_names} are not the circuit's {list(classes)}")
        row = data.position_classes[example].tolist()
        if len(tokens) != len(row):
            raise EdgePruneError(f"tokens has {len(tokens)} entries but example {example} has {len(row)} positions")
        for c, name in enumerate(classes):
            at = [i for i, k in enumerate(row) if k == c]
            token = str(tokens[at[0]]).replace("Ġ", " ").replace("▁", " ") if at else ""  # BPE/SentencePiece spaces
            shown = repr(token) + (f" +{len(at) - 1}" if len(at) > 1 else "") if at else "(none)"
            labels[c] = f"{name}: {shown}"
    edges = circuit.effective_edges()
    scores = circuit.scores.abs() if circuit.scores is not None else edges.float()
    kept = scores[edges]
    top = float(kept.max()) if kept.numel() and float(kept.max()) > 0 else 1.0
    n = int(edges.sum())
    opacity = 0.85 if n <= 60 else max(0.3, 0.85 * (60 / n) ** 0.35)
    lines: dict[tuple[str, int], dict[str, list]] = {}
    hovers: dict[str, dict[str, list]] = {}
    nodes: dict[tuple[str, int], tuple[float, float]] = {}
    for w, r in edges.nonzero().tolist():
        c = graph.reader_class(r)
        kind = _reader_kind(graph.readers[r])
        writer, reader = graph.writers[w], _reader_node(graph, r)
        x0, y0 = _writer_stage(graph, writer), c + _within_row(graph, writer)
        x1, y1 = _writer_stage(graph, reader), c + _within_row(graph, reader)
        nodes[(writer, c)], nodes[(reader, c)] = (x0, y0), (x1, y1)
        width_bin = min(WIDTH_BINS - 1, int(float(scores[w, r]) / top * WIDTH_BINS))
        line = lines.setdefault((kind, width_bin), {"x": [], "y": []})
        line["x"] += [x0, x1, None]
        line["y"] += [y0, y1, None]
        hover = hovers.setdefault(kind, {"x": [], "y": [], "text": []})
        hover["x"].append((x0 + x1) / 2)
        hover["y"].append((y0 + y1) / 2)
        hover["text"].append(f"{graph.edge_name(w, r)}<br>score {float(scores[w, r]):.4g}")
    fig = go.Figure()
    shown = set()
    for (kind, width_bin), e in sorted(lines.items(), key=lambda kv: (list(KIND_COLORS).index(kv[0][0]), kv[0][1])):
        fig.add_trace(go.Scattergl(
            x=e["x"], y=e["y"], mode="lines", name=KIND_LABELS[kind], legendgroup=kind, showlegend=kind not in shown,
            hoverinfo="skip", opacity=opacity,
            line=dict(color=KIND_COLORS[kind], width=0.6 + (max_width - 0.6) * (width_bin + 1) / WIDTH_BINS),
        ))
        shown.add(kind)
    for kind, e in hovers.items():
        fig.add_trace(go.Scatter(x=e["x"], y=e["y"], mode="markers", text=e["text"], hoverinfo="text",
                                 marker=dict(size=6, color=KIND_COLORS[kind], opacity=0.01), showlegend=False,
                                 legendgroup=kind, name=f"{KIND_LABELS[kind]} hover"))
    points = sorted(nodes.items())
    fig.add_trace(go.Scatter(
        x=[xy[0] for _, xy in points], y=[xy[1] for _, xy in points], mode="markers", name="nodes",
        hovertext=[f"{name} at {classes[c]}" for (name, c), _ in points], hoverinfo="text",
        marker=dict(size=7, color="#333", symbol=["circle" if name.startswith("a") else "square"
                                                 for (name, _), _ in points]),
    ))
    n_layers = graph.spec.n_layers
    x_ticks = [0] + [2 * l + 1.5 for l in range(n_layers)] + [2 * n_layers + 1]
    x_labels = ["embed"] + [f"L{l}" for l in range(n_layers)] + ["logits"]
    fig.update_layout(
        title=title or f"{circuit.method or 'circuit'}: {circuit.n_edges} positional edges "
                       f"(sparsity {circuit.sparsity:.4f}) — hover an edge for its name",
        xaxis=dict(tickvals=x_ticks, ticktext=x_labels, title="layer", showgrid=False, zeroline=False),
        yaxis=dict(tickvals=list(range(len(classes))), ticktext=labels, title="position class", autorange="reversed",
                   zeroline=False),
        height=max(360, 110 * len(classes) + 120), width=max(700, 45 * n_layers + 250), plot_bgcolor="white",
        legend=dict(orientation="h", y=-0.12),
    )
    return fig


def plot_curves(curves: Sequence, metric: str = "faithfulness") -> go.Figure:
    """Several methods on one figure (x: % of edges kept). A curve of two or more cuts of one method's scores is a
    line named with its CPR/CMD; a curve built from a list of circuits (Edge Pruning, ACDC) is a set of points,
    each labelled with its circuit's method, since an area under a few unrelated circuits means nothing."""
    fig = go.Figure()
    for curve in curves:
        ys = curve.faithfulness if metric == "faithfulness" else curve.values
        xs = [100 * f for f in curve.fractions]
        labels = curve.extra.get("methods")
        if labels and len(set(labels)) > 1 or len(xs) < 3:
            fig.add_trace(go.Scatter(x=xs, y=ys, mode="markers+text", name=curve.method, text=labels or None,
                                     textposition="top right", marker=dict(size=12, symbol="diamond")))
        else:
            fig.add_trace(go.Scatter(x=xs, y=ys, mode="lines+markers",
                                     name=f"{curve.method} (CPR {curve.cpr:.3f}, CMD {curve.cmd:.3f})"))
    fig.update_layout(title="Faithfulness against circuit size", xaxis=dict(title="% of edges kept", type="log"),
                      yaxis_title=metric, plot_bgcolor="white", showlegend=True, legend=dict(orientation="h", y=-0.2))
    return fig


def _smooth(values: Sequence[float], span: int) -> list[float]:
    """An exponential moving average (span steps): the per-batch objective is noisy from one step to the next."""
    out, avg, alpha = [], None, 2 / (span + 1)
    for v in values:
        avg = v if avg is None else alpha * v + (1 - alpha) * avg
        out.append(avg)
    return out


def plot_history(result) -> go.Figure:
    """Edge Pruning training: the objective (smoothed, raw faintly), and the read-out circuit's sparsity and the
    training estimate against the ramping target."""
    h = result.history
    steps = list(range(len(h["objective"])))
    span = max(1, len(steps) // 50)
    positive = all(v > 0 for v in h["objective"])
    spread = positive and max(h["objective"]) > 30 * min(h["objective"])
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=steps, y=h["objective"], name="objective (per batch)", yaxis="y1",
                             line=dict(color="#888", width=1), opacity=0.35))
    fig.add_trace(go.Scatter(x=steps, y=_smooth(h["objective"], span), name=f"objective (smoothed, {span} steps)",
                             yaxis="y1", line=dict(color="#333", width=2)))
    if h.get("circuit_sparsity"):
        fig.add_trace(go.Scatter(x=steps, y=h["circuit_sparsity"], name="circuit sparsity (read out)", yaxis="y2",
                                 line=dict(color="#1f77b4", width=2)))
    fig.add_trace(go.Scatter(x=steps, y=h["sparsity"], name="sparsity (training estimate)", yaxis="y2",
                             line=dict(color="#1f77b4", width=1, dash="dot")))
    fig.add_trace(go.Scatter(x=steps, y=h["target"], name="target sparsity", yaxis="y2",
                             line=dict(color="#d62728", dash="dash")))
    top = max([1.0] + list(h["target"]))
    fig.update_layout(
        title="Edge Pruning training" + (" (a target above 1 pushes past every edge: the read-out stops at the "
                                         "edges the objective needs)" if top > 1 else ""),
        xaxis_title="step", yaxis=dict(title="objective", type="log" if spread else "linear"),
        yaxis2=dict(title="sparsity", overlaying="y", side="right", range=[0, top + 0.05]), plot_bgcolor="white",
        legend=dict(orientation="h", y=-0.2),
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
    labelled = len(nodes) <= MAX_LABELLED_NODES
    fig.add_trace(go.Scatter(x=[pos[n][0] for n in nodes], y=[pos[n][1] for n in nodes],
                             mode="markers+text" if labelled else "markers", text=nodes, hovertext=nodes,
                             hoverinfo="text", textposition="top center", marker=dict(size=10, color="#333"),
                             name="nodes"))
    jaccard = float((ea & eb).sum()) / max(1, float(union.sum()))
    _axes(fig, a.graph)
    fig.update_layout(title=f"{names[0]} vs {names[1]}: Jaccard {jaccard:.3f}")
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
