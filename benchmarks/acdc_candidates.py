"""What one ACDC candidate costs: a masked forward over the whole dataset, ÷ one plain forward of the same data.

    python benchmarks/acdc_candidates.py [--model gpt2-shape|smollm2] [--n 96] [--seq 16] [--repeats 5]

ACDC (tl_edgeprune.acdc) judges every edge by one masked forward of all the data, without gradients, against the
full model's logits computed once. Timed interleaved, on the same batches (the data as one batch, acdc's default
batch_size=256), the model's weights frozen, no gradients:

- "plain forward, scored positions only": the model's own forward, its final norm and unembedding at the scored
  (last) position only: all the metric reads, so the floor a candidate is judged against (since the sixteenth
  session);
- "plain forward": ``model(clean)``, every position unembedded (what a TransformerLens user runs; the baseline
  until the fifteenth session; its every-position unembedding made ratios against it flatter us, by the factor
  printed as the second ratio);
- "candidate, all positions unembedded": the masked forward as acdc ran it until this change;
- "candidate, whole model, scored positions only": ``logits_at=`` the positions the metric reads (last here),
  returned as those rows alone (``gathered=True``, as acdc does since the thirteenth session);
- "from layer l": acdc now, for a candidate into a reader of layer l (``start=mm.clean_starts(clean).at(l)``).

- "from layer l, clean rows replayed": the same with the writers before l written into the buffer again (as until
  the twelfth session); "clean rows kept": the rows the previous candidate from that layer left are reused
  (layer_start.ReplayedRows), which is every candidate of a layer after its first in a pass. Sparse products
  (mixing.SparseMixing) throughout, acdc's default.

A pass's average candidate weighs each start layer by its share of the graph's edges (readers of later layers have
more writers). The masks keep a random ``--keep`` of the edges into the readers after the start layer (default
3.4 %: the 96.6 % sparsity of the paper's IOI circuits, which ACDC's pass approaches as it goes: the readers after
the current one are already judged), every edge before it. Random placement is the sparse products' worst case
for structure, and their cost depends only on how many coefficients are not 0 (or not −1). Projected pass = the
graph's edges × the average candidate. Needs transformer-lens 3 (a HookedTransformer: a bridge cannot start at a
layer).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import tl_edgeprune as tep  # noqa: E402
from tl_edgeprune.edge_pruning import frozen_parameters  # noqa: E402

from benchmarks.common import allocator_env, fmt_stats, timed_interleaved  # noqa: E402
from benchmarks.engine import load_model, make_batch  # noqa: E402


def pass_weights(graph) -> list[float]:
    """The share of a pass's candidates judged from each start layer (a group's edges start at its layer; the
    logits' at the last layer)."""
    valid = graph.valid_mask()
    weights = [0.0] * graph.spec.n_layers
    for group in graph.reader_groups:
        weights[min(group.layer, graph.spec.n_layers - 1)] += float(valid[:, graph.reader_columns(group)].sum())
    return [w / graph.n_edges for w in weights]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="gpt2-shape", choices=["gpt2-shape", "smollm2"])
    ap.add_argument("--n", type=int, default=96, help="examples (IOI's training split on SmolLM2 is 96)")
    ap.add_argument("--seq", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--keep", type=float, default=0.034, help="fraction of the edges after the start layer kept")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args()
    model = load_model(args.model)
    clean, corrupted = make_batch(model, args.n, args.seq)
    data = tep.paired_data(clean, corrupted, positions="last")
    threads = torch.get_num_threads()
    print(f"{args.model}, {args.n} examples x {args.seq} positions (one batch), last position scored, "
          f"{threads} torch thread(s), {allocator_env()}, torch {torch.__version__}", flush=True)
    with torch.no_grad(), frozen_parameters(model), tep.masked(model) as mm:
        graph = mm.graph
        cf = mm.interchange(corrupted)
        starts = mm.clean_starts(clean)
        assert mm.starts_at_layer(), "this model cannot start at a layer (a TransformerBridge): use transformer-lens 3"
        gen = torch.Generator().manual_seed(0)
        at = data.positions
        weights = pass_weights(graph)

        def mask_from(layer):  # a random --keep kept, every reader before the start layer intact
            mask = (torch.rand(graph.shape, generator=gen) < args.keep).float() * graph.valid_mask().float()
            mask[:, graph.reader_columns_before(layer)] = 1.0
            return mask

        masks = [mask_from(layer) for layer in range(graph.spec.n_layers)]

        def replayed(forward):  # the clean rows written again, as before ReplayedRows (the twelfth session)
            def run():
                mm._replayed = None
                return forward()
            return run

        steps = {
            "plain forward, scored positions only": lambda: mm.full_logits(clean, at=at, gathered=True),
            "plain forward": lambda: mm.full_logits(clean),  # the model's own forward, every position unembedded
            "candidate, whole model, all positions unembedded": lambda: mm(clean, cf, masks[0]),
            "candidate, whole model, scored positions only": lambda: mm(clean, cf, masks[0], logits_at=at, gathered=True),
        }
        for layer in range(1, graph.spec.n_layers):
            def candidate(layer=layer):
                return mm(clean, cf, masks[layer], logits_at=at, start=starts.at(layer), gathered=True)
            # In this order the second finds the clean rows the first left, as each of a layer's candidates after
            # its first does in a pass (acdc judges a reader's edges one after another, layers from the last).
            steps[f"from layer {layer}, clean rows replayed"] = replayed(candidate)
            steps[f"from layer {layer}, clean rows kept"] = candidate
        stats = timed_interleaved(steps, args.repeats, keep_times=True)
    for name in steps:
        print(f"  {name:50s} {fmt_stats(stats[name])}")
    # A pass: the share of candidates at each start layer times that layer's candidate (layer 0: the whole model).
    def per_pass(i, kept):
        suffix = ", clean rows kept" if kept else ", clean rows replayed"
        t = [stats["times"]["candidate, whole model, scored positions only"][i]]
        t += [stats["times"][f"from layer {layer}{suffix}"][i] for layer in range(1, graph.spec.n_layers)]
        return sum(w * x for w, x in zip(weights, t))

    n_rounds = len(stats["times"]["plain forward"])
    replayed_pass = [per_pass(i, False) for i in range(n_rounds)]
    avg = [per_pass(i, True) for i in range(n_rounds)]
    plain = stats["times"]["plain forward, scored positions only"]
    plain_every = stats["times"]["plain forward"]
    old = stats["times"]["candidate, whole model, all positions unembedded"]
    rows = {"before (whole model, every position unembedded)": old,
            "from the reader's layer, clean rows replayed per candidate (eleventh session)": replayed_pass,
            "now (from the reader's layer, clean rows kept between candidates)": avg}
    results = {"model": args.model, "n": args.n, "seq": args.seq, "threads": threads, "allocator": allocator_env(),
               "edges": graph.n_edges, "pass_weights": weights, "stats": {k: v for k, v in stats.items() if k != "times"}}
    for name, times in rows.items():
        ratios = sorted(a / b for a, b in zip(times, plain))
        every = sorted(a / b for a, b in zip(times, plain_every))
        med = sorted(times)[len(times) // 2]
        print(f"  {name}: per candidate ÷ plain forward (scored positions unembedded), median "
              f"{ratios[len(ratios) // 2]:.2f}x (min {ratios[0]:.2f}, max {ratios[-1]:.2f}); ÷ plain forward with every "
              f"position unembedded {every[len(every) // 2]:.2f}x (min {every[0]:.2f}, max {every[-1]:.2f}); a pass "
              f"over {graph.n_edges:,} candidates: {med * graph.n_edges / 3600:.1f} h, {1 / med:.2f} candidates/s")
        results[name] = {"ratio_to_plain": ratios, "ratio_to_plain_every_position": every, "seconds": times}
    for label, base in (("before", old), ("clean rows replayed", replayed_pass)):
        speed = sorted(a / b for a, b in zip(base, avg))
        print(f"  candidates per second, now ÷ {label}: median {speed[len(speed) // 2]:.2f}x (min {speed[0]:.2f}, "
              f"max {speed[-1]:.2f})")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
