"""One self-contained HTML report of a comparison: results, settings, versions, each circuit's edges, the figures.

A researcher keeps the report, so it says how it was made (settings, package versions, threads, machine) and
lists every edge with its score in a sortable table, next to the plotly figures (plotly.js inlined once).
"""

from __future__ import annotations

import html
import importlib.metadata
import platform
from typing import Any, Sequence

import torch

from .circuit import Circuit
from .files import atomic_write

PACKAGES = ("tl_edgeprune", "transformer-lens", "torch", "transformers", "plotly")

SORT_SCRIPT = """<script>
document.querySelectorAll('table.sortable th').forEach(function (th, col) {
  th.addEventListener('click', function () {
    var table = th.closest('table'), body = table.tBodies[0], rows = Array.from(body.rows);
    var up = th.dataset.order !== 'up'; th.dataset.order = up ? 'up' : 'down';
    rows.sort(function (a, b) {
      var x = a.cells[col].dataset.value || a.cells[col].textContent, y = b.cells[col].dataset.value || b.cells[col].textContent;
      var nx = parseFloat(x), ny = parseFloat(y);
      var c = (!isNaN(nx) && !isNaN(ny)) ? nx - ny : x.localeCompare(y);
      return up ? c : -c;
    });
    rows.forEach(function (r) { body.appendChild(r); });
  });
});
</script>"""

STYLE = """<style>
body { font-family: sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
th, td { border: 1px solid #ccc; padding: 3px 9px; text-align: right; }
th { background: #f3f3f3; cursor: pointer; } td:first-child, th:first-child { text-align: left; }
details { margin-bottom: 1em; } .note { color: #555; max-width: 60em; }
</style>"""


def versions() -> dict[str, str]:
    """The installed versions of the packages a result depends on, the thread count and the machine."""
    out = {}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    out["python"] = platform.python_version()
    out["torch threads"] = str(torch.get_num_threads())
    out["machine"] = f"{platform.machine()}, {platform.system()}"
    return out


def without_rounding_below_zero(value: float) -> float:
    """KL and MSE are ≥ 0: a tiny negative value is float rounding, and is shown as 0."""
    return 0.0 if -1e-5 < value < 0 else value


def _cell(value: Any) -> str:
    if isinstance(value, float):
        shown = f"{without_rounding_below_zero(value):.4g}"
        return f"<td data-value='{value!r}'>{shown}</td>"
    if isinstance(value, bool):
        return f"<td>{'yes' if value else 'no'}</td>"
    return f"<td>{html.escape(str(value))}</td>"


def html_table(rows: Sequence[dict], columns: Sequence[str], table_id: str = "", sortable: bool = True) -> str:
    """Rows of dicts as an HTML table; columns that no row has are left out."""
    columns = [c for c in columns if any(c in r and r[c] is not None for r in rows)]
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(_cell(r.get(c, "")) for c in columns) + "</tr>" for r in rows)
    attrs = (f" id='{table_id}'" if table_id else "") + (" class='sortable'" if sortable else "")
    return f"<table{attrs}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def edge_rows(circuit: Circuit) -> list[dict]:
    """Every kept edge of a circuit with its score (|score| first), for the per-method tables."""
    graph = circuit.graph
    rows = []
    for w, r in circuit.edges.nonzero().tolist():
        score = float(circuit.scores[w, r]) if circuit.scores is not None else None
        rows.append({"edge": graph.edge_name(w, r), "writer": graph.writers[w], "reader": graph.readers[r],
                     "score": score})
    return sorted(rows, key=lambda e: -abs(e["score"] or 0.0))


def write_report(path: str, title: str, results: Sequence[dict], settings: dict[str, Any], circuits: dict[str, Circuit],
                 figures: Sequence, notes: Sequence[str] = ()) -> None:
    """The report as one HTML file, written atomically."""
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>{STYLE}</head><body>",
             f"<h1>{html.escape(title)}</h1>"]
    parts += [f"<p class='note'>{html.escape(n)}</p>" for n in notes]
    parts.append("<h2>Results</h2>")
    parts.append(html_table(results, ["method", "edges", "sparsity", "kl", "mse", "exact_match", "seconds", "canonical"],
                            table_id="results"))
    parts.append("<h2>Settings</h2>")
    parts.append(html_table([{"setting": k, "value": v} for k, v in settings.items()], ["setting", "value"],
                            table_id="settings", sortable=False))
    parts.append("<h2>Versions</h2>")
    parts.append(html_table([{"package": k, "version": v} for k, v in versions().items()], ["package", "version"],
                            table_id="versions", sortable=False))
    parts.append("<h2>Edges of each circuit</h2><p class='note'>Click a column to sort.</p>")
    for name, circuit in circuits.items():
        rows = edge_rows(circuit)
        parts.append(f"<details><summary>{html.escape(name)}: {len(rows)} edges</summary>"
                     + html_table(rows, ["edge", "writer", "reader", "score"], table_id=f"edges-{name}") + "</details>")
    parts.append("<h2>Figures</h2>")
    for i, fig in enumerate(figures):
        parts.append(f"<div class='figure'>{fig.to_html(full_html=False, include_plotlyjs=(i == 0))}</div>")
    parts.append(SORT_SCRIPT + "</body></html>")
    document = "".join(parts)
    atomic_write(path, lambda f: f.write(document), text=True)
