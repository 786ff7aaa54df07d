"""Where an Edge Pruning step spends its time: cProfile of a few steps of ``tep.edge_pruning``.

    python benchmarks/profile_loop.py [--model smollm2|gpt2-shape] [--batch 16] [--steps 4]
    python benchmarks/profile_loop.py --ops --model gpt2-shape --batch 32 [--dtype bfloat16] [--eap]

Look at the rows of tl_edgeprune/mixing.py (forward; backward: mask gradient and accumulate_grad) against
the total, and at TransformerLens's own rows. ``--ops``: torch.profiler of one core step (benchmarks/engine.py),
operators grouped by input shape: `[batch, pos, head, d_model]` rows are TL's per-head q/k/v path, `mm` rows
with a `batch·pos·d_model` dimension are the mixing. ``--eap``: the same table for one ``tep.eap`` call on one batch.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import tl_edgeprune as tep  # noqa: E402
from benchmarks.engine import edge_pruning_step, load_model, make_batch  # noqa: E402


def profile_ops(model, args) -> None:
    from torch.profiler import ProfilerActivity, profile

    from tl_edgeprune.edge_pruning import frozen_parameters

    clean, corrupted = make_batch(model, args.batch, args.seq)
    if args.eap:
        data = tep.paired_data(clean, corrupted, positions="last")
        tep.eap(model, data, batch_size=args.batch, progress=False)  # warm-up
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            tep.eap(model, data, batch_size=args.batch, progress=False)
        print(prof.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=25,
                                                                max_name_column_width=24, max_shapes_column_width=64))
        return
    with frozen_parameters(model), tep.masked(model) as mm:
        step = edge_pruning_step(mm, clean, corrupted)
        step(), step()  # warm-up (and the buffer pool)
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            step()
    print(prof.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=25,
                                                            max_name_column_width=24, max_shapes_column_width=64))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=["gpt2-shape", "smollm2"], default="smollm2")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=20)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--ops", action="store_true", help="torch.profiler operator table of one core step")
    ap.add_argument("--eap", action="store_true", help="with --ops: of one tep.eap call on one batch instead")
    args = ap.parse_args()
    model = load_model(args.model, args.dtype)
    if args.ops:
        profile_ops(model, args)
        return
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
