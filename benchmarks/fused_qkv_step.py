"""The Edge Pruning step with the engine's own per-head q/k/v (fused_qkv.py) ÷ with TransformerLens's split-q/k/v
path, and both ÷ the frozen forward+backward, on one model (two copies, same weights), interleaved.

    python benchmarks/fused_qkv_step.py [--model gpt2-shape|smollm2] [--batch 32] [--seq 20] [--repeats 5]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import tl_edgeprune as tep  # noqa: E402

from benchmarks.common import allocator_env, fmt_stats, timed_interleaved  # noqa: E402
from benchmarks.engine import edge_pruning_step, frozen_step_beside, load_model, make_batch  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="gpt2-shape", choices=["gpt2-shape", "smollm2"])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    model = load_model(args.model)
    clean, corrupted = make_batch(model, args.batch, args.seq)
    print(f"{args.model}, batch {args.batch}, seq {args.seq}, {torch.get_num_threads()} torch thread(s), "
          f"{allocator_env()}, torch {torch.__version__}", flush=True)
    twin = copy.deepcopy(model)
    with tep.masked(model, fused_qkv=True) as fm, tep.masked(twin, fused_qkv=False) as sm:
        for p in list(model.parameters()) + list(twin.parameters()):
            p.requires_grad_(False)
        steps = {"frozen": frozen_step_beside(fm, model, clean),
                 "split (TL)": edge_pruning_step(sm, clean, corrupted),
                 "fused": edge_pruning_step(fm, clean, corrupted)}
        stats = timed_interleaved(steps, args.repeats, warmup=1, settle=1)
    for key in steps:
        print(f"  {key:<12} {fmt_stats(stats[key])}")
    for key in ("fused/split (TL)", "split (TL)/frozen", "fused/frozen"):
        s = stats[key]
        print(f"  {key:<18} median {s['median']:.2f}x  (min {s['min']:.2f}x, max {s['max']:.2f}x)")
    print(json.dumps({"model": args.model, "batch": args.batch, "seq": args.seq, "threads": torch.get_num_threads(),
                      "allocator": allocator_env(), **stats}))


if __name__ == "__main__":
    main()
