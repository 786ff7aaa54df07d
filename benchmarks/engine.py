"""Masked forward+backward ÷ plain forward+backward of the same model (time and peak memory).

GPT-2-small-shaped random model, batch 32, seq 20 (change with --batch/--seq). Run:
    python benchmarks/engine.py [--repeats 5]
Plain: model(tokens) then backward of a loss into the model's parameters (a standard training step).
Masked: the engine with interchange ablation, edge masks requiring grad, parameters frozen (what Edge
Pruning does); also reported with parameters requiring grad, to compare like with like.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from benchmarks.common import allocator_env, fmt_stats, gpt2_small_model, in_subprocess, peak_rss_bytes, reset_peak_rss, timed  # noqa: E402

import tl_edgeprune as tep  # noqa: E402


def loss_of(logits):
    return -logits[:, -1].log_softmax(-1).mean()


def make_steps(model, batch, seq):
    gen = torch.Generator().manual_seed(0)
    clean = torch.randint(0, model.cfg.d_vocab, (batch, seq), generator=gen)
    corrupted = torch.randint(0, model.cfg.d_vocab, (batch, seq), generator=gen)

    def plain():
        model.zero_grad(set_to_none=True)
        loss_of(model(clean)).backward()

    def masked_step(mm, cf, z):
        def step():
            z.grad = None
            model.zero_grad(set_to_none=True)
            loss_of(mm(clean, cf, z)).backward()

        return step

    return clean, corrupted, plain, masked_step


def measure_memory(which: str, batch: int, seq: int) -> dict:
    """Peak RSS growth of one step, in a fresh process (so the peaks of the two variants do not mix)."""
    torch.manual_seed(0)
    model = gpt2_small_model()
    clean, corrupted, plain, masked_step = make_steps(model, batch, seq)
    if which == "plain":
        base = reset_peak_rss()
        plain()
        return {"peak_bytes": peak_rss_bytes() - base}
    for p in model.parameters():
        p.requires_grad_(False)
    with tep.masked(model) as mm:
        cf = mm.interchange(corrupted)
        z = mm.graph.ones().requires_grad_(True)
        base = reset_peak_rss()
        masked_step(mm, cf, z)()
        return {"peak_bytes": peak_rss_bytes() - base}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--memory-only", choices=["plain", "masked"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.memory_only:
        print(json.dumps(measure_memory(args.memory_only, args.batch, args.seq)))
        return

    torch.manual_seed(0)
    model = gpt2_small_model()
    clean, corrupted, plain, masked_step = make_steps(model, args.batch, args.seq)
    print(f"model: GPT-2-small shape ({type(model).__name__}), batch {args.batch}, seq {args.seq}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, allocator: {allocator_env()}")
    t_plain = timed(plain, args.repeats)
    # TransformerLens's own cost of per-head q/k/v inputs, without any of our hooks.
    model.set_use_split_qkv_input(True)
    model.set_use_hook_mlp_in(True)
    try:
        t_split = timed(plain, args.repeats)
    finally:
        model.set_use_split_qkv_input(False)
        model.set_use_hook_mlp_in(False)
    with tep.masked(model) as mm:
        cf = mm.interchange(corrupted)
        print(f"graph: {mm.graph}")
        z = mm.graph.ones().requires_grad_(True)
        t_masked_params = timed(masked_step(mm, cf, z), args.repeats)
        flags = [p.requires_grad for p in model.parameters()]
        for p in model.parameters():
            p.requires_grad_(False)
        try:
            t_masked = timed(masked_step(mm, cf, z), args.repeats)
        finally:
            for p, f in zip(model.parameters(), flags):
                p.requires_grad_(f)
    script = os.path.abspath(__file__)
    extra = ["--batch", str(args.batch), "--seq", str(args.seq), "--memory-only"]
    m_plain = in_subprocess(script, *extra, "plain")["peak_bytes"]
    m_masked = in_subprocess(script, *extra, "masked")["peak_bytes"]

    print(f"plain fwd+bwd (param grads)          : {fmt_stats(t_plain)}")
    print(f"TL split-q/k/v flag only, no hooks   : {fmt_stats(t_split)}")
    print(f"masked fwd+bwd (mask grads, frozen)  : {fmt_stats(t_masked)}")
    print(f"masked fwd+bwd (mask + param grads)  : {fmt_stats(t_masked_params)}")
    print(f"RATIO time  masked(frozen) / plain   : {t_masked['median'] / t_plain['median']:.2f}x (medians)")
    print(f"RATIO time  masked(+params) / plain  : {t_masked_params['median'] / t_plain['median']:.2f}x (medians)")
    print(f"RATIO time  TL split flag / plain    : {t_split['median'] / t_plain['median']:.2f}x (medians)")
    print(f"peak memory of one step: plain {m_plain / 2**20:.0f} MiB, masked {m_masked / 2**20:.0f} MiB")
    print(f"RATIO peak memory masked / plain     : {m_masked / m_plain:.2f}x")


if __name__ == "__main__":
    main()
