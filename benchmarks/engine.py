"""Masked Edge Pruning step ÷ the frozen forward+backward, and ÷ a training step, of the same model (time, memory).

    python benchmarks/engine.py [--model gpt2-shape|smollm2] [--batch 32] [--seq 20] [--repeats 5] [--memory]
        [--log-alpha benchmarks/results/mask_activity_smollm2_ioi_log_alpha.pt]   # with --model smollm2

Frozen (the honest floor: Edge Pruning never needs weight gradients): the model's blocks with the weights frozen,
its final norm and unembedding at the last position only (all a loss there reads), backward through the activations
only (from the embeddings on), no per-head split. Also timed, for comparison with the fifteenth session and before:
the same through model(tokens), which unembeds every position (1.48x the time on the GPT-2 shape in the sixteenth
session's run, so ratios against it flattered us). Plain: the frozen step with backward into the model's
parameters (a training step), which flatters a ratio.
Edge Pruning step, core: sample hard-concrete edge and node masks, masked forward (interchange ablation,
ỹ and the full model's logits precomputed for the batch), KL + Lagrangian sparsity terms, backward into the
masks (weights frozen), gradient clipping, AdamW, every mask entry's gradient computed (the loop computes only
the unclamped samples' ones: at the reference start, log α = 10, almost none, timed too; with ``--log-alpha`` at
a real run's masks, beside the same step computing every gradient). This is what auto-circuit's learned-mask step
does too (benchmarks/peers.py). Edge Pruning step, real loop: the median per-step time of ``tep.edge_pruning`` itself,
which also runs the corrupted forward (ỹ) and the full model's forward (target) of every batch it has not seen
(``cache_gib=0``: every step, as in a first epoch or a dataset too big to cache), or gathers them from its
per-example cache (later epochs, the default when the dataset fits).
Also printed: masked forward+backward with and without weight gradients, TL's split-q/k/v flag alone, and the
same flag with frozen weights and gradients into the residual stream only (the floor of a masked step).
Frozen, plain and core steps are timed interleaved (frozen, plain, step, frozen, ...) and each ratio is the
median of the per-round ratios; then again with each timed run preceded by an untimed run of the same step (as in a loop of
such steps: with glibc defaults, a step right after the other kind page-faults back the memory that the other's
frees returned to the kernel). The other rows are timed in blocks and compared by medians.
Peak memory (``--memory``: that alone): each step's peak RSS growth in a fresh process whose RSS follows its live
tensors (common.FOLLOW_LIVE).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from benchmarks.common import (FOLLOW_LIVE, allocator_env, fmt_stats, gpt2_small_model, in_subprocess,  # noqa: E402
                               peak_rss_bytes, reset_peak_rss, timed, timed_interleaved)

import tl_edgeprune as tep  # noqa: E402
from tl_edgeprune.data import paired_data  # noqa: E402
from tl_edgeprune.edge_pruning import frozen_parameters  # noqa: E402
from tl_edgeprune.hard_concrete import HardConcrete, gradient_support  # noqa: E402
from tl_edgeprune.metrics import kl_on_rows  # noqa: E402


def load_model(name: str, dtype: str = "float32"):
    dtype = getattr(torch, dtype)
    if name == "smollm2":
        from benchmarks.smollm2 import load_smollm2

        return load_smollm2(dtype)[0]
    torch.manual_seed(0)
    model = gpt2_small_model()
    return model if dtype == torch.float32 else model.to(dtype)


def loss_of(logits):
    return -logits[:, -1].log_softmax(-1).mean()


def last_position_logits(model, tokens):
    """[batch, 1, vocab]: the blocks, then the final norm and unembedding at the scored (last) position only, which
    is all the objective reads. ``model(tokens)`` unembeds every position: on the GPT-2 shape (50k vocabulary,
    20 positions) its frozen forward+backward was 1.48x this one's (docs/performance.md), work no masked step does."""
    resid = model(tokens, stop_at_layer=model.cfg.n_layers)[:, -1:]
    if model.cfg.normalization_type is not None:
        resid = model.ln_final(resid)
    return torch.nn.functional.linear(resid, model.unembed.W_U.T, model.unembed.b_U)


def logits_of(model, tokens, every_position: bool = False):
    return model(tokens) if every_position else last_position_logits(model, tokens)


def make_batch(model, batch: int, seq: int):
    gen = torch.Generator().manual_seed(0)
    clean = torch.randint(0, model.cfg.d_vocab, (batch, seq), generator=gen)
    corrupted = torch.randint(0, model.cfg.d_vocab, (batch, seq), generator=gen)
    return clean, corrupted


def plain_step(model, clean, every_position: bool = False):
    """A training step: the loss at the last position, backward into the weights (``every_position``: through
    ``model(tokens)``, every position unembedded, the definition of the fifteenth session and before)."""
    def step():
        model.zero_grad(set_to_none=True)
        loss_of(logits_of(model, clean, every_position)).backward()

    return step


def residual_grad_step(model, clean, every_position: bool = False):
    """Forward+backward with gradients into the residual stream only (from the embeddings on), weights frozen, the
    last position alone unembedded: the floor of a masked step. ``every_position``: through ``model(tokens)``
    (the floor of the fifteenth session and before, which unembedded 19 positions no step reads)."""
    def embed_grad(x, hook):
        return x.detach().requires_grad_(True)

    def step():
        with model.hooks(fwd_hooks=[("hook_embed", embed_grad)]):
            loss_of(logits_of(model, clean, every_position)).backward()

    return step


def over_batches(make_step, model, tokens, batch: int, frozen: bool = False, **options):
    """One ``make_step(model, batch_tokens, **options)`` (residual_grad_step or plain_step) per batch of ``tokens``,
    the weights frozen around them if ``frozen``: the baselines of a method call that runs several batches."""
    def run():
        with frozen_parameters(model) if frozen else contextlib.nullcontext():
            for start in range(0, len(tokens), batch):
                make_step(model, tokens[start : start + batch], **options)()

    return run


def plain_step_beside(mm, model, clean):
    """The plain step, runnable between masked steps (interleaved timing): the engine's hooks stay attached but
    inert (they return at once), TransformerLens's flags are the user's own, weights get gradients."""
    params = list(model.parameters())

    def step():
        with mm._plain_flags():
            for p in params:
                p.requires_grad_(True)
            try:
                plain_step(model, clean)()
            finally:
                for p in params:
                    p.requires_grad_(False)

    return step


def frozen_step_beside(mm, model, clean, every_position: bool = False):
    """The frozen forward+backward (weights frozen, gradient into the activations from the embeddings on, TL's
    plain path without the per-head split), runnable between masked steps: the engine's hooks stay inert."""
    step = residual_grad_step(model, clean, every_position)

    def run():
        with mm._plain_flags():
            step()

    return run


def edge_pruning_step(mm, clean, corrupted, target_sparsity: float = 0.5, per_step_counterfactual: bool = False,
                      position_classes=None, support: bool = False, log_alpha: dict | None = None):
    """One core Edge Pruning step, from the library's own pieces (as in tl_edgeprune/edge_pruning.py).

    ``per_step_counterfactual``: compute ỹ (single use, as the loop does) and the target inside the step, so a
    memory measurement of the step counts them. ``position_classes``: [batch, pos] class indices, for a MaskedModel
    of a positional graph. ``support``: pass the engine the samples' gradient support, as the loop does (only the
    unclamped samples' gradients are computed); off, every entry's is, the cost of any state where every reader and
    writer holds an unclamped sample (and the step every session before the seventeenth timed). ``log_alpha``:
    {"edges": [writer, reader], "nodes": [writer]} to start from (a real run's, ``real_log_alpha``); default the
    reference start, log α = 10, where nearly every sample is clamped at 1."""
    graph = mm.graph
    data = paired_data(clean, corrupted, positions="last")
    cf = full = None
    at = data.positions  # as the loop does for the built-in objectives: unembed the scored positions only, as rows
    if not per_step_counterfactual:
        cf = mm.interchange(corrupted)
        with torch.no_grad():
            full = mm.full_logits(clean, at=at, gathered=True)
    gen = torch.Generator().manual_seed(0)
    edges, nodes = HardConcrete(graph.shape, gen), HardConcrete((graph.n_writers,), gen)
    if log_alpha is not None:
        with torch.no_grad():
            edges.log_alpha.copy_(log_alpha["edges"])
            nodes.log_alpha.copy_(log_alpha["nodes"])
    lambdas = torch.nn.Parameter(torch.zeros(2))
    valid = graph.valid_mask().float()
    params = [edges.log_alpha, nodes.log_alpha, lambdas]
    optimizer = torch.optim.AdamW(params, lr=0.1, weight_decay=0.0)

    def step():
        nonlocal cf, full
        if per_step_counterfactual:
            cf = mm.interchange(corrupted, single_use=True)
            with torch.no_grad():
                full = mm.full_logits(clean, at=at, gathered=True)
        z, passes = edges.sample_with_support(gen)
        node_z, node_passes = nodes.sample_with_support(gen)
        grad_support = gradient_support(passes, valid > 0, node_passes) if support else None
        logits = mm(clean, cf, z * valid, node_z, logits_at=at, position_classes=position_classes, gathered=True,
                    grad_support=grad_support)
        gap = 1 - (edges.prob_nonzero() * valid).sum() / graph.n_edges - target_sparsity
        loss = kl_on_rows(logits, full, data) + lambdas[0] * gap + lambdas[1] * gap**2
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        lambdas.grad.neg_()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()

    return step


def real_log_alpha(path: str, graph) -> dict[int, dict[str, torch.Tensor]]:
    """A real run's log α at a few steps (benchmarks/mask_activity.py's ``_log_alpha.pt``), as full tensors."""
    saved = torch.load(path, weights_only=True)
    valid = graph.valid_mask()
    out = {}
    for step, snap in sorted(saved.items()):
        edges = torch.full(graph.shape, -100.0)
        if snap["edges"].numel() != int(valid.sum()):
            raise SystemExit(f"{path} holds {snap['edges'].numel()} edges, this graph {int(valid.sum())}: another model")
        edges[valid] = snap["edges"].float()
        out[step] = {"edges": edges, "nodes": snap["nodes"].float()}
    return out


def recomputing(mm, step):
    """The step with ``recompute_inputs`` on (each head reader's input rebuilt in backward, not kept)."""
    def run():
        mm.recompute_inputs = True
        try:
            step()
        finally:
            mm.recompute_inputs = False

    return run


def loop_step_seconds(model, clean, corrupted, steps: int, cache_gib: float, **options) -> dict:
    """Per-step wall time of tep.edge_pruning on a one-batch dataset: with cache_gib=0 every step runs the
    corrupted, full and masked forwards; with the cache, every step after the first gathers ỹ and the target.
    ``options`` go to edge_pruning (e.g. the reference's warm-ups). The loop reads its loss every step, so on a
    GPU the clock at each callback has waited for that step's kernels."""
    stamps = []
    data = paired_data(clean, corrupted, positions="last")
    tep.edge_pruning(model, data, 0.5, steps=steps, batch_size=len(clean), progress=False, cache_gib=cache_gib,
                     callback=lambda step, row: stamps.append(time.perf_counter()), **options)
    times = [b - a for a, b in zip(stamps, stamps[1:])][1:]  # drop the first interval (warm-up)
    times.sort()
    return {"min": times[0], "median": times[len(times) // 2], "max": times[-1], "n": len(times)}


def measure_memory(args) -> dict:
    """Peak RSS growth of one step, in a fresh process (so the peaks of the variants do not mix)."""
    model = load_model(args.model, args.dtype)
    clean, corrupted = make_batch(model, args.batch, args.seq)
    if args.memory_only == "plain":
        base = reset_peak_rss()
        plain_step(model, clean)()
        return {"peak_bytes": peak_rss_bytes() - base}
    if args.memory_only in ("frozen", "frozen-every"):
        with frozen_parameters(model):
            base = reset_peak_rss()
            residual_grad_step(model, clean, every_position=args.memory_only == "frozen-every")()
            return {"peak_bytes": peak_rss_bytes() - base}
    recompute = args.memory_only == "masked-recompute"
    with frozen_parameters(model), tep.masked(model, input_nodes=args.input_nodes, recompute_inputs=recompute) as mm:
        step = edge_pruning_step(mm, clean, corrupted, per_step_counterfactual=True)  # counts ỹ and the target
        base = reset_peak_rss()
        step()
        return {"peak_bytes": peak_rss_bytes() - base}


def measure(args) -> dict:
    model = load_model(args.model, args.dtype)
    clean, corrupted = make_batch(model, args.batch, args.seq)
    out = {"model": args.model, "dtype": args.dtype, "class": type(model).__name__, "batch": args.batch, "seq": args.seq,
           "torch": torch.__version__, "threads": torch.get_num_threads(), "allocator": allocator_env()}
    with frozen_parameters(model), tep.masked(model, input_nodes=args.input_nodes) as mm:
        out["graph"] = str(mm.graph)
        steps = {"frozen": frozen_step_beside(mm, model, clean),
                 "frozen_every": frozen_step_beside(mm, model, clean, every_position=True),
                 "plain": plain_step_beside(mm, model, clean), "ep_step": edge_pruning_step(mm, clean, corrupted),
                 "ep_step_recompute": recomputing(mm, edge_pruning_step(mm, clean, corrupted)),
                 "ep_step_start": edge_pruning_step(mm, clean, corrupted, support=True)}
        real = real_log_alpha(args.log_alpha, mm.graph) if args.log_alpha else {}
        for k, log_alpha in real.items():  # the loop's step (support on) and every gradient computed, same masks
            steps[f"ep_real{k}_dense"] = edge_pruning_step(mm, clean, corrupted, log_alpha=log_alpha)
            steps[f"ep_real{k}"] = edge_pruning_step(mm, clean, corrupted, support=True, log_alpha=log_alpha)
        pair = timed_interleaved(steps, args.repeats)
        settled = timed_interleaved(steps, args.repeats, settle=1)
    out["real_steps"] = sorted(real)
    for k in real:
        for kind, t in (("", pair), ("_settled", settled)):
            out[f"ep_real{k}{kind}"] = t[f"ep_real{k}"]
            out[f"ep_real{k}{kind}_frozen_ratio"] = t[f"ep_real{k}/frozen"]
            out[f"ep_real{k}{kind}_dense_frozen_ratio"] = t[f"ep_real{k}_dense/frozen"]
            out[f"ep_real{k}{kind}_support_ratio"] = t[f"ep_real{k}/ep_real{k}_dense"]
    out["ep_step_start"], out["ep_step_start_frozen_ratio"] = pair["ep_step_start"], pair["ep_step_start/frozen"]
    out["ep_step_start_settled_frozen_ratio"] = settled["ep_step_start/frozen"]
    out["frozen_every"], out["frozen_every_settled"] = pair["frozen_every"], settled["frozen_every"]
    out["ep_step_frozen_every_ratio"] = pair["ep_step/frozen_every"]
    out["ep_step_settled_frozen_every_ratio"] = settled["ep_step/frozen_every"]
    out["frozen_every_frozen_ratio"] = pair["frozen_every/frozen"]
    out["frozen"], out["plain"], out["ep_step"], out["ep_step_ratio"] = pair["frozen"], pair["plain"], pair["ep_step"], pair["ep_step/plain"]
    out["ep_step_frozen_ratio"], out["plain_frozen_ratio"] = pair["ep_step/frozen"], pair["plain/frozen"]
    out["plain_settled"], out["ep_step_settled"] = settled["plain"], settled["ep_step"]
    out["ep_step_settled_ratio"] = settled["ep_step/plain"]
    out["frozen_settled"], out["ep_step_settled_frozen_ratio"] = settled["frozen"], settled["ep_step/frozen"]
    out["ep_step_recompute"], out["ep_step_recompute_frozen_ratio"] = pair["ep_step_recompute"], pair["ep_step_recompute/frozen"]
    out["ep_step_recompute_settled_frozen_ratio"] = settled["ep_step_recompute/frozen"]
    out["recompute_cost"], out["recompute_cost_settled"] = pair["ep_step_recompute/ep_step"], settled["ep_step_recompute/ep_step"]
    if args.only_step:
        return out
    out["ep_loop_step"] = loop_step_seconds(model, clean, corrupted, steps=args.repeats + 2, cache_gib=0)
    out["ep_loop_cached"] = loop_step_seconds(model, clean, corrupted, steps=args.repeats + 2, cache_gib=64)
    if hasattr(model, "set_use_split_qkv_input"):  # TL's own cost of per-head q/k/v inputs, without our hooks
        model.set_use_split_qkv_input(True)
        model.set_use_hook_mlp_in(True)
        try:
            out["split_flag"] = timed(plain_step(model, clean), args.repeats)
            with frozen_parameters(model):
                out["split_frozen"] = timed(residual_grad_step(model, clean), args.repeats)
        finally:
            model.set_use_split_qkv_input(False)
            model.set_use_hook_mlp_in(False)
    with tep.masked(model, input_nodes=args.input_nodes) as mm:
        cf = mm.interchange(corrupted)
        # 0.9, not 1: with every mask 1 the engine skips the mixing (EAP's fast path), which is not a step's cost
        z = torch.full(mm.graph.shape, 0.9).requires_grad_(True)

        def masked():
            z.grad = None
            model.zero_grad(set_to_none=True)
            loss_of(mm(clean, cf, z)).backward()

        out["masked_params"] = timed(masked, args.repeats)
        with frozen_parameters(model):
            out["masked_frozen"] = timed(masked, args.repeats)
    return out


def report(r: dict) -> None:
    plain = r["plain"]["median"]
    print(f"model: {r['model']} ({r['class']}, {r['dtype']}), batch {r['batch']}, seq {r['seq']}, torch {r['torch']}, "
          f"{r['threads']} threads, allocator: {r['allocator']}")
    print(f"graph: {r['graph']}")
    rows = [("frozen fwd+bwd (activation grads only)", "frozen"),
            ("frozen, every position unembedded", "frozen_every"),
            ("plain fwd+bwd (param grads)", "plain"),
            ("Edge Pruning step, core (fwd+bwd+AdamW)", "ep_step"),
            ("the loop's step at the reference start", "ep_step_start"),
            ("the same, recompute_inputs=True", "ep_step_recompute"),
            ("plain, second of two in a row", "plain_settled"),
            ("Edge Pruning step, core, second of two", "ep_step_settled")]
    block_rows = [("Edge Pruning step, real loop, recomputing", "ep_loop_step"),
                  ("the same, later epochs (ỹ, target cached)", "ep_loop_cached"),
                  ("masked fwd+bwd (mask grads, frozen, every position unembedded)", "masked_frozen"),
                  ("masked fwd+bwd (mask + param grads, every position unembedded)", "masked_params"),
                  ("TL split-q/k/v flag only, no hooks", "split_flag"),
                  ("the same, frozen, gradient to resid only", "split_frozen")]
    for label, key in rows + block_rows:
        if key in r:
            print(f"{label:<42}: {fmt_stats(r[key])}")
    for key, label in (("ep_step_frozen_ratio", "Edge Pruning step, core / frozen fwd+bwd"),
                       ("ep_step_settled_frozen_ratio", "the same, each timed after one untimed run of itself"),
                       ("ep_step_start_frozen_ratio", "the loop's step at the reference start (log α = 10: nearly "
                        "every sample clamped at 1, so almost no mask gradient computed) / frozen fwd+bwd"),
                       ("ep_step_start_settled_frozen_ratio", "the same, each timed after one untimed run of itself"),
                       ("ep_step_recompute_frozen_ratio", "Edge Pruning step, recompute_inputs=True / frozen fwd+bwd"),
                       ("ep_step_recompute_settled_frozen_ratio", "the same, each timed after one untimed run of itself"),
                       ("recompute_cost", "Edge Pruning step, recompute_inputs=True / default"),
                       ("recompute_cost_settled", "the same, each timed after one untimed run of itself"),
                       ("plain_frozen_ratio", "training step / frozen fwd+bwd"),
                       ("frozen_every_frozen_ratio", "frozen fwd+bwd with every position unembedded (model(tokens), "
                        "the floor until the fifteenth session) / frozen fwd+bwd"),
                       ("ep_step_frozen_every_ratio", "Edge Pruning step, core / frozen fwd+bwd with every position "
                        "unembedded (the fifteenth session's floor, for comparison)"),
                       ("ep_step_settled_frozen_every_ratio", "the same, each timed after one untimed run of itself")):
        if key in r:
            q = r[key]
            print(f"RATIO {label}: {q['median']:.2f}x (median of {q['n']} interleaved rounds; min {q['min']:.2f}x, "
                  f"max {q['max']:.2f}x)")
    for k in r.get("real_steps", []):
        for kind, how in (("", ""), ("_settled", ", each timed after one untimed run of itself")):
            for key, label in ((f"ep_real{k}{kind}_frozen_ratio", "the loop's step (only unclamped samples' gradients)"),
                               (f"ep_real{k}{kind}_dense_frozen_ratio", "the step computing every gradient")):
                q = r[key]
                print(f"RATIO {label}, log α of step {k} of the real run / frozen fwd+bwd{how}: {q['median']:.2f}x "
                      f"(median of {q['n']}; min {q['min']:.2f}x, max {q['max']:.2f}x)")
            q = r[f"ep_real{k}{kind}_support_ratio"]
            print(f"RATIO the loop's step / every gradient computed, log α of step {k}{how}: {q['median']:.2f}x "
                  f"(median of {q['n']}; min {q['min']:.2f}x, max {q['max']:.2f}x)")
    if "frozen" in r:
        for label, key in block_rows:
            if key in r:
                print(f"RATIO {label} / frozen fwd+bwd: {r[key]['median'] / r['frozen']['median']:.2f}x (medians)")
    ratio = r["ep_step_ratio"]
    print(f"RATIO Edge Pruning step, core / plain fwd+bwd: {ratio['median']:.2f}x (median of {ratio['n']} interleaved "
          f"rounds; min {ratio['min']:.2f}x, max {ratio['max']:.2f}x)")
    ratio = r["ep_step_settled_ratio"]
    print(f"RATIO Edge Pruning step, core / plain fwd+bwd, each timed after one untimed run of itself (a a* b b* ...): "
          f"{ratio['median']:.2f}x (median of {ratio['n']} rounds; min {ratio['min']:.2f}x, max {ratio['max']:.2f}x)")
    for label, key in block_rows:
        if key in r:
            print(f"RATIO {label} / plain fwd+bwd: {r[key]['median'] / plain:.2f}x (medians)")
    if "peak_plain" in r:
        report_memory(r)


def report_memory(r: dict) -> None:
    print("peak memory: peak RSS growth of one step, each in a fresh process under "
          + " ".join(f"{k}={v}" for k, v in FOLLOW_LIVE.items()) + " (RSS follows the live tensors)")
    print(f"peak memory of one step: frozen fwd+bwd {r['peak_frozen'] / 2**20:.0f} MiB, training step "
          f"{r['peak_plain'] / 2**20:.0f} MiB, Edge Pruning step with its ỹ and target {r['peak_ep'] / 2**20:.0f} MiB")
    print(f"RATIO peak memory Edge Pruning step / frozen fwd+bwd: {r['peak_ep'] / r['peak_frozen']:.2f}x")
    print(f"RATIO peak memory Edge Pruning step / training step: {r['peak_ep'] / r['peak_plain']:.2f}x")
    print(f"peak memory of the Edge Pruning step with recompute_inputs=True (each head reader's input rebuilt in "
          f"backward): {r['peak_ep_recompute'] / 2**20:.0f} MiB")
    print(f"RATIO peak memory Edge Pruning step, recompute_inputs=True / frozen fwd+bwd: "
          f"{r['peak_ep_recompute'] / r['peak_frozen']:.2f}x")
    print(f"peak memory of the frozen fwd+bwd with every position unembedded (model(tokens), the fifteenth session's "
          f"floor): {r['peak_frozen_every'] / 2**20:.0f} MiB; against it, the Edge Pruning step "
          f"{r['peak_ep'] / r['peak_frozen_every']:.2f}x, with recompute_inputs=True "
          f"{r['peak_ep_recompute'] / r['peak_frozen_every']:.2f}x")


def measure_peaks(args) -> dict:
    """Each step's peak memory, each in a fresh process (so the peaks of the variants do not mix)."""
    extra = ["--model", args.model, "--dtype", args.dtype, "--batch", str(args.batch), "--seq", str(args.seq),
             "--input-nodes", args.input_nodes, "--memory-only"]
    kinds = {"peak_plain": "plain", "peak_frozen": "frozen", "peak_frozen_every": "frozen-every", "peak_ep": "masked",
             "peak_ep_recompute": "masked-recompute"}
    return {key: in_subprocess(os.path.abspath(__file__), *extra, kind, env=FOLLOW_LIVE)["peak_bytes"]
            for key, kind in kinds.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=["gpt2-shape", "smollm2"], default="gpt2-shape")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--input-nodes", choices=["separate", "merged"], default="separate")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="the model's dtype")
    ap.add_argument("--json", action="store_true", help="print one JSON line instead of the report")
    ap.add_argument("--only-step", action="store_true", help="plain and core step only (for benchmarks/peers.py)")
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--memory", action="store_true", help="the peak-memory figures alone")
    ap.add_argument("--log-alpha", default="",
                    help="a real run's log α (benchmarks/mask_activity.py's _log_alpha.pt): also time the loop's step "
                         "at each of its steps, beside the step computing every mask gradient")
    ap.add_argument("--memory-only", choices=["plain", "frozen", "frozen-every", "masked", "masked-recompute"],
                    help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.memory_only:
        print(json.dumps(measure_memory(args)))
        return
    if args.memory:
        report_memory(measure_peaks(args))
        return
    r = measure(args)
    if not (args.no_memory or args.only_step):
        r.update(measure_peaks(args))
    print(json.dumps(r)) if args.json else report(r)


if __name__ == "__main__":
    main()
