"""Plots (plotly figures, HTML), the CLI demo, and the report as a browser renders it."""

import os
import re
import shutil
import subprocess
import tempfile

import plotly.graph_objects as go
import pytest
import torch

import tl_edgeprune as tep
from tl_edgeprune import plots
from tl_edgeprune.cli import main
from tl_edgeprune.eap import eap
from tl_edgeprune.selection import faithfulness_curve
from tl_edgeprune.tracr_models import load_tracr


@pytest.fixture(scope="module")
def reverse():
    task = load_tracr("reverse")
    return task, tep.Circuit.from_names(tep.Graph.from_model(task.model), task.canonical_circuit, method="canonical")


def hover_edges(fig):
    return {line.split("<br>")[0] for t in fig.data if t.text is not None and t.hoverinfo == "text"
            for line in t.text if "->" in line}


def test_circuit_plot_shows_every_edge_with_hover(reverse):
    task, circuit = reverse
    fig = plots.plot_circuit(circuit)
    assert isinstance(fig, go.Figure)
    assert hover_edges(fig) == set(circuit.edge_names())
    kinds = {t.name for t in fig.data if t.mode == "lines"}
    assert {"q input", "k input", "v input", "MLP input", "logits"} <= kinds
    nodes = next(t for t in fig.data if t.name == "nodes")
    assert "logits" in nodes.text and "a3.h0" in nodes.text and nodes.mode == "markers+text"  # few nodes: labelled
    ports = {t.name for t in fig.data if t.name.endswith(" port")}
    assert ports == {"q port", "k port", "v port"}  # q/k/v edges end at marked ports on the head
    # a one-head model's y axis: integer head ticks, and the lane of inputs, MLPs and logits below
    assert list(fig.layout.yaxis.ticktext)[-1] == "h0" and all(float(v).is_integer() or v < 0 for v in fig.layout.yaxis.tickvals)


def test_edge_width_follows_each_edges_own_score(reverse):
    task, circuit = reverse
    graph = circuit.graph
    scores = torch.zeros(graph.shape)
    names = sorted(circuit.edge_names())
    for i, name in enumerate(names):
        scores[graph.edge_index(name)] = (i + 1) / len(names)
    fig = plots.plot_circuit(tep.Circuit(graph, circuit.edges, scores=scores))
    widths = {t.line.width for t in fig.data if t.mode == "lines"}
    assert len(widths) >= 3  # several width classes, not one per kind


def test_dangling_edges_are_dimmed_or_dropped(reverse):
    task, circuit = reverse
    extra = tep.Circuit.from_names(circuit.graph, task.canonical_circuit + ["tok->a1.h0<q>"])  # a1.h0 reaches nothing
    dimmed = plots.plot_circuit(extra)
    assert any(t.name.endswith("(dangling)") and t.opacity < 0.5 for t in dimmed.data if t.mode == "lines")
    dropped = plots.plot_circuit(extra, show_dangling=False)
    assert hover_edges(dropped) == set(task.canonical_circuit)


def test_large_circuits_stay_one_trace_per_kind():
    graph = tep.Graph.from_spec(tep.GraphSpec(12, 12, 12, 768))
    scores = torch.rand(graph.shape, generator=torch.Generator().manual_seed(0))
    circuit = tep.Circuit.top_k(graph, scores, k=2000)
    fig = plots.plot_circuit(circuit)
    # bounded by kinds × width classes, not by edges: (4 widths + 1 hover) × 5 kinds × live/dangling + ports + nodes
    assert len(fig.data) <= 5 * 5 * 2 + 3 + 1 and len(hover_edges(fig)) == 2000
    nodes = next(t for t in fig.data if t.name == "nodes")
    assert nodes.mode == "markers"  # hundreds of nodes: names on hover and on the axes, not printed over each other


def test_curves_history_overlap_and_saving(reverse, tmp_path):
    task, circuit = reverse
    data = task.data()
    scores = eap(task.model, data, ablation="zero", progress=False)
    curve = faithfulness_curve(task.model, data, scores, [3, 11, 40, 94], ablation="zero")
    fig = plots.plot_curves([curve])
    assert list(fig.data[0].x) == [100 * f for f in curve.fractions]
    assert fig.layout.showlegend
    points = faithfulness_curve(task.model, data, [circuit, scores.circuit(k=5)], ablation="zero", method="circuits")
    both = plots.plot_curves([curve, points])
    assert both.data[1].mode == "markers+text" and list(both.data[1].text) == ["eap", "canonical"]
    assert "CPR" not in both.data[1].name  # an area under unrelated circuits is not shown
    result = tep.edge_pruning(task.model, data, 0.5, steps=5, batch_size=64, ablation="zero", progress=False)
    history = plots.plot_history(result)
    assert [t.name for t in history.data][:2] == ["objective (per batch)", "objective (smoothed, 1 steps)"]
    assert "circuit sparsity (read out)" in [t.name for t in history.data]
    other = scores.circuit(k=11)
    overlap = plots.plot_overlap(circuit, other, ("canonical", "eap"))
    both = len(set(circuit.edge_names()) & set(other.edge_names()))
    assert f"both ({both})" in [t.name for t in overlap.data]
    assert list(overlap.layout.xaxis.ticktext)[:2] == ["embed", "L0"]  # layer names, not 0–8
    path = plots.save(fig, str(tmp_path / "curve.html"))
    assert "plotly" in open(path).read()[:5000].lower()
    with pytest.raises(tep.EdgePruneError, match=".html or .png"):
        plots.save(fig, str(tmp_path / "curve.svgz"))


def test_cli_demo_writes_table_and_report(tmp_path, capsys):
    out = str(tmp_path / "demo")
    assert main(["demo", "--steps", "40", "--no-progress", "--out", out]) == 0
    printed = capsys.readouterr().out
    assert re.search(r"^acdc\s+11\s", printed, flags=re.M) and "edge_pruning" in printed and "eap" in printed
    report = open(os.path.join(out, "report.html")).read()
    assert "tl_edgeprune demo: Tracr reverse" in report and report.count("class='figure'") >= 5
    with pytest.raises(SystemExit):
        main(["demo", "--methods", "magic"])


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROME_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--virtual-time-budget=8000"]


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (CI installs it: apt-get install chromium)")
def test_report_renders_in_headless_chromium(tmp_path):
    from PIL import Image

    out = str(tmp_path / "demo")
    main(["demo", "--steps", "40", "--methods", "edge_pruning,acdc", "--no-progress", "--out", out])
    url = "file://" + os.path.join(out, "report.html")
    profile = tempfile.mkdtemp()
    dom = subprocess.run([CHROMIUM, *CHROME_FLAGS, f"--user-data-dir={profile}", "--dump-dom", url],
                         capture_output=True, text=True, timeout=120).stdout
    rendered = set(re.findall(r'<g class="textpoint"[^>]*><text[^>]*>([^<]+)</text>', dom))
    assert {"tok", "pos", "a0.h0", "a3.h0", "m2", "logits"} <= rendered  # drawn by plotly, not just in the JSON
    for table in ("results", "settings", "versions"):  # HTML tables, not a <pre> block
        assert re.search(rf"<table id=\"{table}\"", dom), table
    assert "transformer-lens" in dom and "edges-edge_pruning" in dom and "<pre" not in dom
    png = str(tmp_path / "shot.png")
    subprocess.run([CHROMIUM, *CHROME_FLAGS, f"--user-data-dir={profile}", "--window-size=1200,1400",
                    f"--screenshot={png}", url], capture_output=True, timeout=120)
    image = Image.open(png).convert("L")
    lo, hi = image.getextrema()
    assert hi - lo > 100 and len(set(image.getdata())) > 20  # not blank


def test_cli_run_on_a_local_transformers_folder_and_jsonl(tmp_path, capsys):
    import json

    import transformers

    from .models import word_tokenizer

    model_dir = tmp_path / "model"
    cfg = transformers.GPT2Config(n_layer=2, n_head=4, n_embd=32, vocab_size=40, n_positions=16)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(model_dir)
    word_tokenizer().save_pretrained(model_dir)
    lines = [{"clean": f"w{i} w{i + 1} w{i + 2}", "corrupted": f"w{i + 3} w{i + 1} w{i + 2}", "answer": " w7",
              "distractor": " w8"} for i in range(8)]
    jsonl = tmp_path / "data.jsonl"
    jsonl.write_text("\n".join(json.dumps(line) for line in lines))
    out = tmp_path / "out"
    assert main(["run", "--model-dir", str(model_dir), "--jsonl", str(jsonl), "--steps", "10", "--no-progress",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "edge_pruning" in printed and "eap" in printed
    assert (out / "report.html").exists() and (out / "edge_pruning_circuit.json").exists()
    report = (out / "report.html").read_text()
    assert "<h1>tl_edgeprune: model on data.jsonl</h1>" in report and "Tracr" not in report
    assert "canonical" not in printed.split("report:")[0]  # no ground truth here: no such column
    assert main(["run", "--model-dir", str(tmp_path / "nope"), "--jsonl", str(jsonl), "--no-progress"]) == 2
    error = capsys.readouterr().err
    assert error.startswith("tl-edgeprune: error: --model-dir") and "is not a folder" in error
    assert "Traceback" not in error and error.count("\n") == 1  # one line, with the fix, no traceback


def test_cli_table_shows_rounding_below_zero_as_zero():
    from tl_edgeprune.cli import format_table

    rows = [{"method": "eap", "edges": 3, "kl": -2.49e-7, "exact_match": 1.0, "seconds": 0.1, "canonical": None}]
    table = format_table(rows, "kl")
    assert "-" not in table.split("\n")[1] and "canonical" not in table


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (CI installs it: apt-get install chromium)")
def test_a_500_edge_circuit_of_a_12_layer_model_renders_readably(tmp_path):
    """At 500 edges of a GPT-2-sized graph: head ticks h0–h11 and layer names are drawn, node names are not printed
    over each other (hover only), and the screenshot is a picture, not a blank page."""
    from PIL import Image

    from tl_edgeprune.selection import greedy

    graph = tep.Graph.from_spec(tep.GraphSpec(12, 12, 12, 768))
    scores = torch.rand(graph.shape, generator=torch.Generator().manual_seed(0)) ** 4
    circuit = greedy(graph, scores, 500, method="eap")
    path = plots.save(plots.plot_circuit(circuit), str(tmp_path / "c500.html"))
    url, profile = "file://" + path, tempfile.mkdtemp()
    dom = subprocess.run([CHROMIUM, *CHROME_FLAGS, f"--user-data-dir={profile}", "--dump-dom", url],
                         capture_output=True, text=True, timeout=180).stdout
    yticks = set(re.findall(r'<g class="ytick">.*?<text[^>]*>([^<]+)</text>', dom))
    xticks = set(re.findall(r'<g class="xtick">.*?<text[^>]*>([^<]+)</text>', dom))
    assert {f"h{h}" for h in range(12)} <= yticks and {f"L{l}" for l in range(12)} | {"embed", "logits"} <= xticks
    assert not re.findall(r'<g class="textpoint"', dom)  # no node names printed on top of each other
    png = str(tmp_path / "c500.png")
    subprocess.run([CHROMIUM, *CHROME_FLAGS, f"--user-data-dir={profile}", "--window-size=1400,800",
                    f"--screenshot={png}", url], capture_output=True, timeout=180)
    image = Image.open(png).convert("L")
    lo, hi = image.getextrema()
    assert hi - lo > 100 and len(set(image.getdata())) > 20
