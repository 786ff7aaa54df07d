"""How often Edge Pruning recovers the Tracr ground truth, over seeds (the settings in tracr_models.py).

    python benchmarks/tracr_seeds.py [--seeds 0 1 2 3 4] [--task reverse xproportion]
    python benchmarks/tracr_seeds.py --task reverse --attribution-start 22      # EAP's top 22 edges at +3, rest −3
    python benchmarks/tracr_seeds.py --task reverse --target 1.0 | --balanced    # the other A/Bs of docs/results.md

reverse: success = exactly the canonical 11 edges; xproportion: the 5 functional edges, inside the canonical 7.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import tl_edgeprune as tep  # noqa: E402
from tl_edgeprune.tracr_models import (  # noqa: E402
    CANONICAL_CIRCUITS,
    EDGE_PRUNING_SETTINGS,
    XPROPORTION_FUNCTIONAL,
    load_tracr,
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--task", nargs="+", default=["reverse", "xproportion"])
    ap.add_argument("--attribution-start", type=int, default=0, metavar="K",
                    help="start log α at +3 on EAP's top K edges and −3 elsewhere (hap.attribution_init)")
    ap.add_argument("--ig-steps", type=int, default=None, help="with --attribution-start: EAP-IG's scores")
    ap.add_argument("--steps", type=int, default=None, help="steps (warm-ups scaled as the task's settings are)")
    ap.add_argument("--target", type=float, default=None)
    ap.add_argument("--balanced", action="store_true", help="repeat shorter inputs so every length weighs the same")
    args = ap.parse_args()
    for name in args.task:
        task = load_tracr(name)
        data, canonical = task.data(), set(CANONICAL_CIRCUITS[name])
        if args.balanced:
            big = max(len(s) for s in data.shards)
            data = tep.ShardedData([s.select(torch.arange(big) % len(s)) for s in data.shards])
        base = dict(EDGE_PRUNING_SETTINGS[name])
        if args.steps:
            scale = args.steps / base["steps"]
            base.update(steps=args.steps, sparsity_warmup=round(base["sparsity_warmup"] * scale),
                        lr_warmup=round(base["lr_warmup"] * scale))
        if args.target is not None:
            base["target_sparsity"] = args.target
        if args.attribution_start:
            scores = tep.eap(task.model, data, ablation=base["ablation"], ig_steps=args.ig_steps, progress=False)
            n = scores.graph.n_edges
            base["init_log_alpha"] = tep.attribution_init(scores, keep=args.attribution_start / n, high=3.0, low=-3.0)
            base["start_sparsity"] = min(base["target_sparsity"], 1 - args.attribution_start / n)
        wins = 0
        for seed in args.seeds:
            t = time.perf_counter()
            settings = {**base, "seed": seed, "progress": False}
            edges = set(tep.edge_pruning(task.model, data, **settings).circuit().edge_names())
            ok = edges == canonical if name == "reverse" else set(XPROPORTION_FUNCTIONAL) <= edges <= canonical
            wins += ok
            print(f"{name} seed {seed}: {'recovered' if ok else 'missed'} ({len(edges)} edges, "
                  f"{time.perf_counter() - t:.0f} s){'' if ok else ' diff ' + str(sorted(edges ^ canonical))}", flush=True)
        print(f"{name}: {wins} of {len(args.seeds)} seeds recovered the ground truth")


if __name__ == "__main__":
    main()
