"""The positional Edge Pruning step ÷ the ordinary one, and both ÷ the frozen forward+backward, on one model.

    python benchmarks/positional_step.py [--model gpt2-shape|smollm2] [--batch 32] [--seq 20] [--repeats 7]

A positional graph has one copy of every reader per position class; the mixing reads the same buffer with the same
GEMMs, one per class over its columns, plus a gather of every writer's delta into class order and back for every
reader's input. Classes: "ioi" is IOI's layout (four named positions and the rest: 5 classes), "by-position" makes
each of the --seq positions a class. The steps are timed interleaved (frozen, ordinary, positional, ...), on two
copies of the model with the same weights (one MaskedModel each), each ratio the median of per-round ratios.
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


def layouts(batch: int, seq: int) -> dict[str, tuple[tuple[str, ...], torch.Tensor]]:
    ioi = torch.full((batch, seq), 4, dtype=torch.long)
    for c, at in enumerate((2, 4, seq - 6, seq - 1)):  # IO, S1, S2, END
        ioi[:, at] = c
    return {"ioi": (("IO", "S1", "S2", "END", "other"), ioi),
            "by-position": (tuple(f"p{i}" for i in range(seq)), torch.arange(seq).expand(batch, seq).clone())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="gpt2-shape", choices=["gpt2-shape", "smollm2"])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--layouts", default="ioi,by-position")
    args = ap.parse_args()
    model = load_model(args.model)
    clean, corrupted = make_batch(model, args.batch, args.seq)
    results = {"model": args.model, "batch": args.batch, "seq": args.seq, "threads": torch.get_num_threads(),
               "allocator": allocator_env(), "torch": torch.__version__}
    print(f"{args.model}, batch {args.batch}, seq {args.seq}, {torch.get_num_threads()} torch thread(s), "
          f"{allocator_env()}", flush=True)
    for name in args.layouts.split(","):
        names, classes = layouts(args.batch, args.seq)[name]
        twin = copy.deepcopy(model)
        with tep.masked(model) as mm, tep.masked(twin, position_classes=names) as pm:
            for p in list(model.parameters()) + list(twin.parameters()):
                p.requires_grad_(False)
            steps = {"frozen": frozen_step_beside(mm, model, clean),
                     "ordinary": edge_pruning_step(mm, clean, corrupted),
                     "positional": edge_pruning_step(pm, clean, corrupted, position_classes=classes)}
            stats = timed_interleaved(steps, args.repeats, warmup=1, settle=1)
        del twin
        results[name] = {"classes": len(names), "edges": pm.graph.n_edges, **stats}
        print(f"\n{name}: {len(names)} classes, {pm.graph.n_edges:,} positional edges "
              f"(ordinary graph {mm.graph.n_edges:,})")
        for key in ("frozen", "ordinary", "positional"):
            print(f"  {key:<22} {fmt_stats(stats[key])}")
        for key in ("positional/ordinary", "ordinary/frozen", "positional/frozen"):
            s = stats[key]
            print(f"  {key:<22} median {s['median']:.2f}x  (min {s['min']:.2f}x, max {s['max']:.2f}x)")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
