"""How much of the masks' gradient a real Edge Pruning run reads: the room a clamp-aware mask gradient has.

    python benchmarks/mask_activity.py [--steps 150] [--out benchmarks/results/mask_activity_smollm2_ioi.json]
    python benchmarks/mask_activity.py --ab 2 --steps 60      # whole runs with and without the support, timed
    python benchmarks/mask_activity.py --coefficients          # the saved masks' share of sparse mixing windows

A hard-concrete sample clamped at 0 or 1 passes no gradient to its log α, so the entries of the masks' gradient
GEMM (``∂metric/∂z``, one dot over batch·pos·d_model per edge) at clamped samples are computed and thrown away.
This runs the documented real-model recipe (SmolLM2-135M, IOI, Edge Pruning from EAP-IG's top 5 % at ±3, target
0.95, the cached EAP-IG scores of ``real_circuits.py``, node masks on as by default) and records, every step, the
share of edges whose gradient is read (the edge's sample, or its writer's node sample, passes one), and the share
of the GEMM's work left when only the rows (writers) and columns (readers) holding such an edge are computed, per
reader group and per mixing window (as the engine computes it). The log α of a few steps (``--snapshots``) go to
a ``_log_alpha.pt`` beside ``--out``, for ``benchmarks/engine.py --log-alpha``, which times the step at those
masks. ``--coefficients``: at those saved masks (one sample each), how many mixing windows have few enough
coefficients (−(1 − z_edge·z_node) on valid edges) off 0 or off −1 for the sparse forms (mixing.SparseMixing's
threshold). Needs the SmolLM2 install of ``benchmarks/smollm2.py``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import tl_edgeprune as tep  # noqa: E402
from tl_edgeprune import hard_concrete, tasks  # noqa: E402
from tl_edgeprune.hard_concrete import gradient_support  # noqa: E402
from tl_edgeprune.engine import MaskedModel  # noqa: E402
from tl_edgeprune.hap import attribution_init  # noqa: E402
from tl_edgeprune.mixing import plan_windows  # noqa: E402

from benchmarks.smollm2 import load_smollm2  # noqa: E402


def activity(graph: tep.Graph, windows, passes: torch.Tensor) -> dict[str, float]:
    """Share of valid edges whose sample passes a gradient, and of the per-group GEMM work (writers × readers ×
    batch·pos·d_model) left when a group computes only the writers and readers that hold one (``windows``: the
    engine's plan, ``mixing.plan_windows`` with its defaults)."""
    valid = graph.valid_mask()
    active = passes & valid
    full = left = 0
    for group in graph.reader_groups:
        block = active[: group.n_writers, group.start : group.stop]
        full += group.n_writers * (group.stop - group.start)
        left += int(block.any(1).sum()) * int(block.any(0).sum())
    # as the engine mixes: each window's prefix of writers for all its readers in one GEMM (the rest is small)
    groups = graph.reader_groups
    window_full = window_left = 0
    for w in windows:
        block = active[: w.prefix, groups[w.groups[0]].start : groups[w.groups[-1]].stop]
        window_full += block.numel()
        window_left += int(block.any(1).sum()) * int(block.any(0).sum())
    return {"edges": float(active.sum()) / float(valid.sum()), "gemm_work": left / full,
            "window_work": window_left / window_full, "readers": float(active.any(0).sum()) / graph.n_readers}


@contextlib.contextmanager
def every_gradient():
    """The engine as before the seventeenth session: ``grad_support`` dropped, every mask gradient computed."""
    call = MaskedModel.__call__
    MaskedModel.__call__ = lambda self, *a, grad_support=None, **k: call(self, *a, **k)
    try:
        yield
    finally:
        MaskedModel.__call__ = call


def ab_runs(run, args) -> None:
    """Whole runs of the recipe with the support (the loop as it is) and without, alternating; per-step seconds
    from the loop's callback (the first step, which fills the example cache, dropped), medians per arm."""
    per_step: dict[str, list[list[float]]] = {"support": [], "every gradient": []}
    for r in range(args.ab):
        for arm in (("support", "every gradient") if r % 2 == 0 else ("every gradient", "support")):
            stamps: list[float] = []
            with every_gradient() if arm == "every gradient" else contextlib.nullcontext():
                res = run(callback=lambda step, row: stamps.append(time.perf_counter()))
            per_step[arm].append([b - a for a, b in zip(stamps, stamps[1:])])
            print(f"round {r}, {arm}: {sum(per_step[arm][-1]):.0f} s for steps 1..{args.steps - 1}, circuit sparsity "
                  f"{res.history['circuit_sparsity'][-1]:.4f}", flush=True)
    half = (args.steps - 1) // 2
    for label, lo, hi in (("every step", 0, None), ("first half", 0, half), ("second half", half, None)):
        med = {arm: statistics.median([t for times in runs for t in times[lo:hi]]) for arm, runs in per_step.items()}
        print(f"{label}: median step {med['support']:.3f} s with the support, {med['every gradient']:.3f} s computing "
              f"every gradient: RATIO {med['support'] / med['every gradient']:.3f}x "
              f"({args.ab} runs each, {torch.get_num_threads()} thread(s))")
    totals = [sum(a) / sum(b) for a, b in zip(per_step["support"], per_step["every gradient"])]
    print(f"RATIO whole runs, support / every gradient, per round: {', '.join(f'{t:.3f}x' for t in totals)}")


def coefficient_sparsity(graph: tep.Graph, windows, path: str) -> None:
    """Per saved step, each mixing window's share of coefficients off 0 or off −1, whichever is fewer (the form
    SparseMixing would take), against its threshold."""
    from tl_edgeprune.mixing import SparseMixing

    threshold = SparseMixing.__init__.__defaults__[0]
    saved = torch.load(path, weights_only=True)
    valid = graph.valid_mask()
    gen = torch.Generator().manual_seed(0)
    for step, snap in sorted(saved.items()):
        edges = hard_concrete.HardConcrete(graph.shape, gen)
        nodes = hard_concrete.HardConcrete((graph.n_writers,), gen)
        with torch.no_grad():
            edges.log_alpha.fill_(-100.0)
            edges.log_alpha[valid] = snap["edges"].float()
            nodes.log_alpha.copy_(snap["nodes"].float())
            coef = -(valid.float() * (1 - edges.sample(gen) * nodes.sample(gen)[:, None]))
        shares = []
        for w in windows:
            first, last = graph.reader_groups[w.groups[0]], graph.reader_groups[w.groups[-1]]
            c = coef[: w.prefix, first.start : last.stop]
            shares.append(min(float((c != 0).float().mean()), float((c != -1).float().mean())))
        shares = torch.tensor(shares)
        print(f"step {step}: {len(shares)} windows, share of coefficients off 0 or off -1 (the fewer): median "
              f"{shares.median():.3f}, min {shares.min():.3f}, max {shares.max():.3f}; "
              f"{int((shares <= threshold).sum())} at most the sparse threshold {threshold}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--target", type=float, default=0.95)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--snapshots", default="25,75,125",
                   help="steps whose log α (before the step) go to --out's .pt twin, for benchmarks/engine.py --log-alpha")
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "mask_activity_smollm2_ioi.json"))
    p.add_argument("--ab", type=int, default=0, metavar="ROUNDS",
                   help="instead: time ROUNDS pairs of whole runs, the loop as it is and with every mask gradient "
                        "computed (grad_support dropped), alternating which goes first")
    p.add_argument("--coefficients", action="store_true",
                   help="instead: the share of sparse mixing windows at the masks saved beside --out")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, tok = load_smollm2()
    data = tasks.ioi(tok, n=160, seed=0, prepend_bos=False).data
    train = data.select(slice(0, 96))
    graph = tep.Graph.from_model(model)
    windows = plan_windows([g.n_writers for g in graph.reader_groups], [g.stop - g.start for g in graph.reader_groups])
    if args.coefficients:
        coefficient_sparsity(graph, windows, os.path.splitext(args.out)[0] + "_log_alpha.pt")
        return
    cached = os.path.join(os.path.dirname(__file__), "results", "smollm2", "scores_ioi_eap-ig_n160_train96.pt")
    saved = torch.load(cached, weights_only=True)
    scores = tep.EdgeScores(graph, saved["scores"], saved["method"], saved["seconds"], saved["model"])
    init = attribution_init(scores, keep=0.05, high=3.0, low=-3.0)

    rows: list[dict[str, float]] = []
    sample = hard_concrete.HardConcrete.sample_with_support

    edge_passes: list[torch.Tensor] = []
    keep_at = {int(s) for s in args.snapshots.split(",") if s}
    valid = graph.valid_mask()
    snapshots: dict[int, dict[str, torch.Tensor]] = {}

    def recording(self, generator=None):  # edge gates are sampled first, then node gates, every step
        z, passes = sample(self, generator)
        if tuple(z.shape) == graph.shape:
            edge_passes.append(passes)
            if len(rows) in keep_at:
                snapshots[len(rows)] = {"edges": self.log_alpha.detach()[valid].clone()}
        else:  # what edge_pruning passes the engine: a node's gradient reads every edge out of it
            if len(rows) in keep_at:
                snapshots[len(rows)]["nodes"] = self.log_alpha.detach().clone()
            rows.append(activity(graph, windows, gradient_support(edge_passes.pop(), valid, passes)))
        return z, passes

    def run(**extra):
        return tep.edge_pruning(model, train, args.target, steps=args.steps, sparsity_warmup=int(0.8 * args.steps),
                                lr_warmup=min(200, args.steps // 10), lr=0.8, lambda_lr=0.8, batch_size=16,
                                init_log_alpha=init, start_sparsity=min(args.target, 0.95), seed=0, progress=False,
                                **extra)

    if args.ab:
        ab_runs(run, args)
        return
    hard_concrete.HardConcrete.sample_with_support = recording
    t0 = time.perf_counter()
    try:
        res = run()
    finally:
        hard_concrete.HardConcrete.sample_with_support = sample
    seconds = time.perf_counter() - t0
    for i in range(0, len(rows), max(1, len(rows) // 15)):
        r = rows[i]
        print(f"step {i:4d}: edges passing a gradient {r['edges']:.4f}, readers holding one {r['readers']:.3f}, "
              f"GEMM work left {r['gemm_work']:.3f} per group, {r['window_work']:.3f} per window", flush=True)
    mean = {k: sum(r[k] for r in rows) / len(rows) for k in rows[0]}
    print(f"mean over {len(rows)} steps: edges {mean['edges']:.4f}, readers {mean['readers']:.3f}, "
          f"GEMM work left {mean['gemm_work']:.3f} per group, {mean['window_work']:.3f} per window; run {seconds:.0f} s at {torch.get_num_threads()} thread(s); "
          f"circuit sparsity {res.history['circuit_sparsity'][-1]:.4f}")
    with open(args.out, "w") as f:
        json.dump({"steps": rows, "mean": mean, "seconds": seconds, "threads": torch.get_num_threads(),
                   "recipe": "SmolLM2 IOI, EAP-IG top 5% at +-3, target 0.95, lr 0.8, batch 16"}, f)
    if snapshots:  # the valid entries of the edge log α (graph.valid_mask() order), in float16 to keep the file small
        torch.save({step: {"edges": snap["edges"].half(), "nodes": snap["nodes"].half()}
                    for step, snap in snapshots.items()}, os.path.splitext(args.out)[0] + "_log_alpha.pt")


if __name__ == "__main__":
    main()
