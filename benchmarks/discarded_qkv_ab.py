"""A/B of handing TransformerLens's own (discarded) q/k/v projection zero positions under the fused path
(engine.MaskedModel._discarded_input_hook), interleaved on one warm model, one thread by default:

    python benchmarks/discarded_qkv_ab.py [--model gpt2-shape|smollm2] [--rounds 4]

- the Edge Pruning core step (batch 32 × 20, as benchmarks/engine.py) and the frozen forward+backward;
- an ACDC candidate from layer L/2 (96 × 16, 3.4 % kept after it, as benchmarks/acdc_candidates.py) and a plain
  forward of the same data.
"skip" is the library's default; "full" lets TL project the normed residual as it would without the hook.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import tl_edgeprune as tep  # noqa: E402
import tl_edgeprune.engine as E  # noqa: E402
from tl_edgeprune.edge_pruning import frozen_parameters  # noqa: E402

from benchmarks.common import allocator_env, fmt_stats, timed_interleaved  # noqa: E402
from benchmarks.engine import edge_pruning_step, load_model, make_batch, residual_grad_step  # noqa: E402

SKIP = {"on": True}
_original = E.MaskedModel._discarded_input_hook


def _switchable(self, layer):
    inner = _original(self, layer)
    return lambda x, hook: inner(x, hook) if SKIP["on"] else None


def ratio(s: dict) -> str:
    return f"median {s['median']:.2f}x (min {s['min']:.2f}, max {s['max']:.2f})"


def switched(on: bool, step):
    def run():
        SKIP["on"] = on
        try:
            return step()
        finally:
            SKIP["on"] = True
    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="gpt2-shape", choices=["gpt2-shape", "smollm2"])
    ap.add_argument("--rounds", type=int, default=4)
    args = ap.parse_args()
    E.MaskedModel._discarded_input_hook = _switchable
    model = load_model(args.model)
    clean, corrupted = make_batch(model, 32, 20)
    a_clean, a_corrupted = make_batch(model, 96, 16)
    a_data = tep.paired_data(a_clean, a_corrupted, positions="last")
    print(f"{args.model}, {torch.get_num_threads()} torch thread(s), {allocator_env()}, torch {torch.__version__}")
    with frozen_parameters(model):
        frozen = residual_grad_step(model, clean)
        with tep.masked(model) as mm:
            step = edge_pruning_step(mm, clean, corrupted)
            layer = mm.graph.spec.n_layers // 2
            with torch.no_grad():
                cf = mm.interchange(a_corrupted)
                starts = mm.clean_starts(a_clean)
                gen = torch.Generator().manual_seed(0)
                mask = (torch.rand(mm.graph.shape, generator=gen) < 0.034).float() * mm.graph.valid_mask().float()
                mask[:, mm.graph.reader_columns_before(layer)] = 1.0

            def candidate():
                with torch.no_grad():
                    mm(a_clean, cf, mask, logits_at=a_data.positions, start=starts.at(layer))

            def plain():
                with torch.no_grad():
                    mm.full_logits(a_clean)

            steps = {"frozen fwd+bwd": frozen, "EP step, full": switched(False, step), "EP step, skip": step,
                     "plain forward (96x16)": plain, f"ACDC candidate from layer {layer}, full": switched(False, candidate),
                     f"ACDC candidate from layer {layer}, skip": candidate}
            stats = timed_interleaved(steps, args.rounds)
    for name in steps:
        print(f"  {name:45s} {fmt_stats(stats[name])}")
    for a, b in (("EP step, skip", "EP step, full"), (f"ACDC candidate from layer {layer}, skip",
                                                      f"ACDC candidate from layer {layer}, full")):
        print(f"  {a} ÷ full: {ratio(stats[f'{a}/{b}'])}")
    for name in ("EP step, full", "EP step, skip"):
        print(f"  {name} ÷ frozen: {ratio(stats[f'{name}/frozen fwd+bwd'])}")
    for name in (f"ACDC candidate from layer {layer}, full", f"ACDC candidate from layer {layer}, skip"):
        print(f"  {name} ÷ plain forward: {ratio(stats[f'{name}/plain forward (96x16)'])}")


if __name__ == "__main__":
    main()
