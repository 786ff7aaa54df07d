"""Where an Edge Pruning step spends its time: cProfile of a few steps of ``tep.edge_pruning``.

    python benchmarks/profile_loop.py [--model smollm2|gpt2-shape] [--batch 16] [--steps 4]

Look at the rows of tl_edgeprune/mixing.py (forward; backward: mask gradient and accumulate_grad) against
the total, and at TransformerLens's own rows.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import tl_edgeprune as tep  # noqa: E402
from benchmarks.engine import load_model, make_batch  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=["gpt2-shape", "smollm2"], default="smollm2")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=20)
    ap.add_argument("--steps", type=int, default=4)
    args = ap.parse_args()
    model = load_model(args.model)
    clean, corrupted = make_batch(model, args.batch, args.seq)
    data = tep.paired_data(clean, corrupted, positions="last")
    tep.edge_pruning(model, data, 0.5, steps=2, batch_size=args.batch, progress=False)  # warm-up
    profiler = cProfile.Profile()
    profiler.enable()
    tep.edge_pruning(model, data, 0.5, steps=args.steps, batch_size=args.batch, progress=False)
    profiler.disable()
    pstats.Stats(profiler).sort_stats("cumtime").print_stats(40)


if __name__ == "__main__":
    main()
