"""ACDC's candidates on the code of another checkout (a worktree of an earlier commit) or this one: was a slower
run the code or the machine?

    git worktree add /tmp/before f559f37
    for r in 1 2; do for root in . /tmp/before; do python benchmarks/acdc_tree_ab.py --root $root; done; done

Each run times, interleaved (3 rounds), a plain forward of 96 × 16 examples (every position unembedded), the
whole-model candidate and candidates from layers 6 and 11 (3.4 % of the edges after the start layer kept, as
benchmarks/acdc_candidates.py), on the GPT-2 shape, one thread, and prints the medians. Alternating the checkouts
in separate processes spreads the machine's drift over both.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."),
                    help="the checkout whose tl_edgeprune is timed (default: this one)")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    root = os.path.abspath(args.root)
    sys.path.insert(0, root)
    import tl_edgeprune as tep
    from benchmarks.common import timed_interleaved
    from benchmarks.engine import load_model, make_batch
    from tl_edgeprune.edge_pruning import frozen_parameters

    assert os.path.abspath(tep.__file__).startswith(root), f"imported {tep.__file__}, not the code under {root}"
    model = load_model("gpt2-shape")
    clean, corrupted = make_batch(model, 96, 16)
    at = tep.paired_data(clean, corrupted, positions="last").positions
    with torch.no_grad(), frozen_parameters(model), tep.masked(model) as mm:
        graph, cf, starts = mm.graph, mm.interchange(corrupted), mm.clean_starts(clean)
        gen = torch.Generator().manual_seed(0)

        def mask_from(layer):
            mask = (torch.rand(graph.shape, generator=gen) < 0.034).float() * graph.valid_mask().float()
            mask[:, graph.reader_columns_before(layer)] = 1.0
            return mask

        masks = {layer: mask_from(layer) for layer in (0, 6, 11)}
        steps = {"plain forward": lambda: mm.full_logits(clean),
                 "whole model": lambda: mm(clean, cf, masks[0], logits_at=at, gathered=True)}
        for layer in (6, 11):
            steps[f"from layer {layer}"] = lambda layer=layer: mm(clean, cf, masks[layer], logits_at=at,
                                                                  start=starts.at(layer), gathered=True)
        t = timed_interleaved(steps, args.rounds)
    print(f"{root}: " + ", ".join(f"{k} {t[k]['median']:.3f} s" for k in steps) + f" (medians of {args.rounds}, "
          f"{torch.get_num_threads()} thread(s))")


if __name__ == "__main__":
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)
    main()
