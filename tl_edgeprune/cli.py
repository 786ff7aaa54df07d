"""``tl-edgeprune demo``: Edge Pruning, EAP and ACDC on a shipped Tracr model, a table and an HTML report.
``tl-edgeprune run``: the same on the user's JSONL data with a model from a local transformers folder."""

from __future__ import annotations

import argparse
import os
import sys
import time

from .acdc import acdc
from .eap import eap
from .edge_pruning import edge_pruning
from .errors import EdgePruneError
from .graph import Graph
from .hap import hap
from .plots import plot_circuit, plot_curves, plot_history, plot_overlap
from .report import without_rounding_below_zero, write_report
from .selection import faithfulness_curve
from .tracr_models import EDGE_PRUNING_SETTINGS, TASKS, load_tracr

METHODS = ("edge_pruning", "eap", "acdc", "hap")


def run_methods(model, data, methods: list[str], settings: dict, ablation: str, acdc_threshold: float,
                acdc_metric: str, eap_edges: int, progress: bool) -> tuple[dict, object, object]:
    """Run the chosen methods on one model and dataset: {name: (circuit, seconds)}, the Edge Pruning result and
    the EAP scores (None where not run). EAP is cut at Edge Pruning's edge count when both run, else eap_edges."""
    circuits, ep_result, scores = {}, None, None
    if "edge_pruning" in methods:
        t = time.perf_counter()
        ep_result = edge_pruning(model, data, **settings)
        circuits["edge_pruning"] = (ep_result.circuit(), time.perf_counter() - t)
    if "eap" in methods:
        t = time.perf_counter()
        scores = eap(model, data, ablation=ablation, progress=progress)
        k = circuits["edge_pruning"][0].n_edges if ep_result is not None else eap_edges
        circuits["eap"] = (scores.circuit(k=k), time.perf_counter() - t)
    if "acdc" in methods:
        t = time.perf_counter()
        circuits["acdc"] = (acdc(model, data, acdc_threshold, metric=acdc_metric, ablation=ablation, progress=progress),
                            time.perf_counter() - t)
    if "hap" in methods:
        t = time.perf_counter()
        result = hap(model, data, keep=0.5, eap_options={"ablation": ablation, "progress": progress}, **settings)
        circuits["hap"] = (result.circuit(), time.perf_counter() - t)
    return circuits, ep_result, scores


def report_rows(model, data, circuits: dict, ablation: str, key: str, canonical: list[str] | None) -> list[dict]:
    rows = []
    for name, (circuit, seconds) in circuits.items():
        metrics = circuit.evaluate(model, data, ablation=ablation)
        rows.append({"method": name, "edges": circuit.n_edges, "sparsity": circuit.sparsity, key: metrics[key],
                     "exact_match": metrics["exact_match"],
                     "seconds": seconds,
                     "canonical": None if canonical is None else sorted(circuit.edge_names()) == sorted(canonical)})
    return rows


def run_demo(task_name: str, methods: list[str], out: str, target: float | None, steps: int | None,
             acdc_threshold: float, seed: int, progress: bool) -> list[dict]:
    task = load_tracr(task_name)
    data = task.data()
    settings = {**EDGE_PRUNING_SETTINGS[task_name], "seed": seed, "progress": progress}
    if target is not None:
        settings["target_sparsity"] = target
    if steps is not None:
        settings["steps"] = steps
        settings["sparsity_warmup"] = min(settings["sparsity_warmup"], max(1, int(steps * 0.95)))
        settings["lr_warmup"] = min(settings["lr_warmup"], steps // 4)
    key = "kl" if settings["objective"] == "kl" else "mse"
    circuits, ep_result, scores = run_methods(task.model, data, methods, settings, "zero", acdc_threshold,
                                              settings["objective"], len(task.canonical_circuit), progress)
    rows = report_rows(task.model, data, circuits, "zero", key, task.canonical_circuit)
    figures = comparison_figures(task.model, data, circuits, ep_result, scores, "zero")
    notes = ["Tracr's compiled model has a known circuit: 'canonical' says whether a method found exactly it."]
    if settings["target_sparsity"] > 1:
        notes.append(f"The target sparsity {settings['target_sparsity']:g} is above 1 on purpose: it keeps pushing "
                     "every gate down, and the read-out keeps the edges the objective cannot do without.")
    report_settings = {"task": f"Tracr {task_name}", "methods": ", ".join(methods), "ablation": "zero",
                       "acdc threshold": acdc_threshold, **{k: v for k, v in settings.items() if k != "progress"}}
    write_report(os.path.join(out, "report.html"), f"tl_edgeprune demo: Tracr {task_name}", rows, report_settings,
                 {name: c for name, (c, _) in circuits.items()}, figures, notes)
    return rows


def comparison_figures(model, data, circuits: dict, ep_result, scores, ablation: str) -> list:
    """Each circuit, Edge Pruning's training, the faithfulness curves (EAP's cuts and every other method's
    circuit as a point, on one figure with a legend), and the overlap of Edge Pruning and ACDC."""
    figures = [plot_circuit(c, title=f"{name}: {c.n_edges} edges") for name, (c, _) in circuits.items()]
    if ep_result is not None:
        figures.append(plot_history(ep_result))
    curves = []
    if scores is not None:
        n = scores.graph.n_edges
        small = {1, 3, 5, 8, 11, 16, 24, 32, 48, 64}
        sizes = sorted({k for k in small if k < n} | {max(1, round(n * f)) for f in (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5)} | {n})
        curves.append(faithfulness_curve(model, data, scores, sizes, ablation=ablation))
    points = [c for name, (c, _) in circuits.items() if name != "eap"]
    for name, (c, _) in circuits.items():
        c.method = c.method or name  # the point's label
    if points:
        curves.append(faithfulness_curve(model, data, points, ablation=ablation, method="learned circuits"))
    if curves:
        figures.append(plot_curves(curves))
    if "edge_pruning" in circuits and "acdc" in circuits:
        figures.append(plot_overlap(circuits["edge_pruning"][0], circuits["acdc"][0], ("edge_pruning", "acdc")))
    return figures


def run_local(model_dir: str, jsonl: str, methods: list[str], out: str, target: float, steps: int, ablation: str,
              acdc_threshold: float, seed: int, progress: bool) -> list[dict]:
    """A model from a local ``transformers`` folder (booted as a TransformerBridge) on the user's JSONL data."""
    from .adapter import transformer_bridge_class
    from .tasks import from_jsonl

    bridge = transformer_bridge_class()
    if bridge is None:
        raise EdgePruneError("loading a local transformers folder needs TransformerBridge (transformer-lens >= 3)")
    if not os.path.isdir(model_dir):
        raise EdgePruneError(f"--model-dir {model_dir!r} is not a folder (it should hold config.json and the weights)")
    model = bridge.boot_transformers(model_dir)
    task = from_jsonl(model.tokenizer, jsonl)
    settings = dict(target_sparsity=target, steps=steps, ablation=ablation, seed=seed, progress=progress)  # warm-ups: 5/6, 1/15
    graph_edges = Graph.from_model(model).n_edges
    eap_edges = max(1, int(round((1 - min(target, 1.0)) * graph_edges)))
    circuits, ep_result, scores = run_methods(model, task.data, methods, settings, ablation, acdc_threshold, "kl",
                                              eap_edges, progress)
    rows = report_rows(model, task.data, circuits, ablation, "kl", canonical=None)
    os.makedirs(out, exist_ok=True)
    for name, (circuit, _) in circuits.items():
        circuit.to_json(os.path.join(out, f"{name}_circuit.json"))
    figures = comparison_figures(model, task.data, circuits, ep_result, scores, ablation)
    title = f"tl_edgeprune: {os.path.basename(os.path.abspath(model_dir))} on {os.path.basename(jsonl)}"
    report_settings = {"model": os.path.abspath(model_dir), "data": os.path.abspath(jsonl), "examples": len(task.data),
                       "methods": ", ".join(methods), "acdc threshold": acdc_threshold,
                       **{k: v for k, v in settings.items() if k != "progress"}}
    notes = ["Every metric is measured on the data the circuits were found on; judge them on held-out data too."]
    write_report(os.path.join(out, "report.html"), title, rows, report_settings,
                 {name: c for name, (c, _) in circuits.items()}, figures, notes)
    return rows


def format_table(rows: list[dict], key: str) -> str:
    """The results as text (rounding below 0 shown as 0). The "canonical" column appears only where a ground truth exists (the Tracr demo)."""
    canonical = any(r.get("canonical") is not None for r in rows)
    lines = [f"{'method':<14}{'edges':>7}{key.upper():>12}{'exact match':>13}{'time (s)':>10}"
             + ("  canonical" if canonical else "")]
    for r in rows:
        value = without_rounding_below_zero(r[key])
        line = f"{r['method']:<14}{r['edges']:>7}{value:>12.3g}{r['exact_match']:>13.3f}{r['seconds']:>10.1f}"
        lines.append(line + (f"  {'yes' if r['canonical'] else 'no'}" if canonical else ""))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tl-edgeprune", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run the methods on a shipped Tracr model (offline) and write a report")
    demo.add_argument("--task", choices=sorted(TASKS), default="reverse")
    demo.add_argument("--methods", default="edge_pruning,eap,acdc", help=f"comma-separated, of {','.join(METHODS)}")
    demo.add_argument("--target", type=float, help="Edge Pruning target sparsity (default: the task's setting)")
    demo.add_argument("--steps", type=int, help="Edge Pruning steps (default: the task's setting)")
    demo.add_argument("--acdc-threshold", type=float, default=0.01)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--out", default="tl_edgeprune_demo", help="output folder for report.html")
    demo.add_argument("--no-progress", action="store_true")
    run = sub.add_parser("run", help="your JSONL data on a model from a local transformers folder")
    run.add_argument("--model-dir", required=True, help="a folder from save_pretrained (config, weights, tokenizer)")
    run.add_argument("--jsonl", required=True, help="lines of {clean, corrupted, answer, distractor}")
    run.add_argument("--methods", default="edge_pruning,eap")
    run.add_argument("--target", type=float, default=0.95)
    run.add_argument("--steps", type=int, default=3000)
    run.add_argument("--ablation", choices=["interchange", "mean", "zero"], default="interchange")
    run.add_argument("--acdc-threshold", type=float, default=0.01)
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--out", default="tl_edgeprune_run")
    run.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown or not methods:
        parser.error(f"unknown methods {unknown}; choose from {', '.join(METHODS)}")
    try:
        rows, key = _run(args, methods)
    except EdgePruneError as exc:  # a user error: one line with the fix, no traceback
        print(f"tl-edgeprune: error: {exc}", file=sys.stderr)
        return 2
    print(format_table(rows, key))
    print(f"report: {os.path.join(args.out, 'report.html')}")
    return 0


def _run(args: argparse.Namespace, methods: list[str]) -> tuple[list[dict], str]:
    if args.command == "demo":
        rows = run_demo(args.task, methods, args.out, args.target, args.steps, args.acdc_threshold, args.seed,
                        progress=not args.no_progress)
        key = "kl" if EDGE_PRUNING_SETTINGS[args.task]["objective"] == "kl" else "mse"
    else:
        rows = run_local(args.model_dir, args.jsonl, methods, args.out, args.target, args.steps, args.ablation,
                         args.acdc_threshold, args.seed, progress=not args.no_progress)
        key = "kl"
    return rows, key


if __name__ == "__main__":
    sys.exit(main())
