"""The GPU check's measurements, in one process (run by benchmarks/gpu_check.sh; rehearse with --device cpu --small).

    python benchmarks/gpu_check.py --device cuda --out OUT          # GPT-2-small shape, random weights
    python benchmarks/gpu_check.py --device cpu --small --out OUT   # the CPU rehearsal (a 2-layer model)

Each part is timed and recorded on its own, so one failure (say, a bf16 dtype mismatch) is reported and the rest
still runs: the frozen forward+backward (the floor: gradients into the residual stream only, weights frozen), a
training step, the Edge Pruning loop's step (tep.edge_pruning itself, after its first epoch; also with
recompute_inputs=True) and EAP per batch,
in float32 and bfloat16, with peak device memory; Edge Pruning on Tracr reverse (recovery of the canonical
circuit); 200 steps of the reference schedule at batch 32, projected to 3,000 steps beside the paper's 2,756 s
(one H100, GPT-2 IOI). Writes OUT/gpu_check.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import traceback
import warnings

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import tl_edgeprune as tep  # noqa: E402

from benchmarks.common import gpt2_small_model, timed_interleaved  # noqa: E402
from benchmarks.engine import loop_step_seconds, make_batch, plain_step, residual_grad_step  # noqa: E402
from tl_edgeprune.edge_pruning import frozen_parameters  # noqa: E402

PAPER_SECONDS_3000_STEPS = 2756  # Edge Pruning, GPT-2 IOI, one H100 (the paper's appendix)
SMALL = dict(n_layers=2, d_model=64, n_heads=4, d_head=16, d_mlp=256, d_vocab=500, n_ctx=64)


def synced(fn, device: torch.device):
    """fn, then a device sync, so wall time is the kernels' time and not their launch."""
    def run():
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    return run


def peak_bytes(fn, device: torch.device) -> int | None:
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return int(torch.cuda.max_memory_allocated(device))


def measure_dtype(model, device: torch.device, dtype: torch.dtype, batch: int, seq: int, repeats: int) -> dict:
    """Frozen forward+backward, training step, Edge Pruning loop step and EAP per batch, in one dtype."""
    model = model.to(dtype)
    clean, corrupted = make_batch(model, batch, seq)  # token ids on the CPU: the model and the loop move them
    residual, train = synced(residual_grad_step(model, clean), device), synced(plain_step(model, clean), device)

    def frozen():  # backward through the activations only: the floor of what Edge Pruning computes
        with frozen_parameters(model):
            residual()

    out: dict = {"dtype": str(dtype).replace("torch.", ""), "batch": batch, "seq": seq}
    pair = timed_interleaved({"frozen": frozen, "train": train}, repeats)
    out["frozen_fwd_bwd"], out["training_step"] = pair["frozen"], pair["train"]
    out["training_step/frozen"] = pair["train/frozen"]
    out["peak_bytes"] = {"frozen": peak_bytes(frozen, device), "train": peak_bytes(train, device)}
    ep = loop_step_seconds(model, clean, corrupted, steps=2 + repeats, cache_gib=64)  # ỹ, target cached after step 0
    out["edge_pruning_step"] = ep
    out["edge_pruning_step/frozen"] = ep["median"] / out["frozen_fwd_bwd"]["median"]
    out["edge_pruning_step/training_step"] = ep["median"] / out["training_step"]["median"]
    out["peak_bytes"]["edge_pruning"] = peak_bytes(
        lambda: loop_step_seconds(model, clean, corrupted, steps=4, cache_gib=64), device)
    # recompute_inputs: each head reader's input rebuilt in backward, not kept (memory against a little time)
    rebuilt = loop_step_seconds(model, clean, corrupted, steps=2 + repeats, cache_gib=64, recompute_inputs=True)
    out["edge_pruning_step_recompute_inputs"] = rebuilt
    out["edge_pruning_step_recompute_inputs/frozen"] = rebuilt["median"] / out["frozen_fwd_bwd"]["median"]
    out["peak_bytes"]["edge_pruning_recompute_inputs"] = peak_bytes(
        lambda: loop_step_seconds(model, clean, corrupted, steps=4, cache_gib=64, recompute_inputs=True), device)
    one = tep.paired_data(clean, corrupted, positions="last")
    eap_times = [_seconds(lambda: tep.eap(model, one, batch_size=batch, progress=False), device) for _ in range(repeats)]
    out["eap_per_batch"] = {"median": statistics.median(eap_times), "min": min(eap_times), "max": max(eap_times)}
    out["eap/frozen"] = out["eap_per_batch"]["median"] / out["frozen_fwd_bwd"]["median"]
    return out


def _seconds(fn, device: torch.device) -> float:
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


def tracr_recovery(device: torch.device) -> dict:
    from tl_edgeprune.tracr_models import EDGE_PRUNING_SETTINGS

    task = tep.load_tracr("reverse")
    model = task.model.to(device)
    t0 = time.perf_counter()
    result = tep.edge_pruning(model, task.data(), **{**EDGE_PRUNING_SETTINGS["reverse"], "progress": False})
    edges = sorted(result.circuit().edge_names())
    return {"recovered": edges == sorted(task.canonical_circuit), "edges": len(edges),
            "seconds": time.perf_counter() - t0}


def reference_schedule(model, steps: int, seq: int) -> dict:
    """``steps`` steps of the paper's schedule (3,000 steps, ramp 2,500, lr warm-up 200) at batch 32, ỹ and the
    target cached as in the later epochs of a real run."""
    clean, corrupted = make_batch(model, 32, seq)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a 2,500-step ramp in a shorter run is the point here
        timing = loop_step_seconds(model.to(torch.float32), clean, corrupted, steps=steps, cache_gib=64,
                                   sparsity_warmup=2500, lr_warmup=200)
    projected = timing["median"] * 3000
    return {**timing, "projected_3000_steps_seconds": projected, "paper_3000_steps_seconds": PAPER_SECONDS_3000_STEPS,
            "projected/paper": projected / PAPER_SECONDS_3000_STEPS}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--out", required=True)
    p.add_argument("--small", action="store_true", help="a 2-layer model and short runs: the CPU rehearsal")
    p.add_argument("--repeats", type=int, default=10)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    os.makedirs(args.out, exist_ok=True)
    report: dict = {"device": str(device), "torch": torch.__version__, "python": platform.python_version(),
                    "threads": torch.get_num_threads(), "small": args.small, "parts": {}, "errors": {}}
    if device.type == "cuda":
        report["gpu"] = torch.cuda.get_device_name(device)
    try:
        import importlib.metadata as md

        report["transformer_lens"] = md.version("transformer-lens")
    except Exception:  # noqa: BLE001 - recorded, not fatal
        pass
    shape = SMALL if args.small else {}
    repeats = 3 if args.small else args.repeats
    parts = {
        "gpt2_float32": lambda: measure_dtype(gpt2_small_model(**shape).to(device), device, torch.float32, 32, 20, repeats),
        "gpt2_bfloat16": lambda: measure_dtype(gpt2_small_model(**shape).to(device), device, torch.bfloat16, 32, 20, repeats),
        # the CPU rehearsal skips it: the suite recovers Tracr reverse on the CPU already (README test)
        **({} if args.small else {"tracr_reverse": lambda: tracr_recovery(device)}),
        "reference_schedule": lambda: reference_schedule(gpt2_small_model(**shape).to(device),
                                                         20 if args.small else 200, 20),
    }
    for name, part in parts.items():
        t0 = time.perf_counter()
        try:
            report["parts"][name] = part()
        except Exception as exc:  # noqa: BLE001 - each part stands alone: report and go on
            report["errors"][name] = "".join(traceback.format_exception(exc))[-3000:]
        print(f"{name}: {time.perf_counter() - t0:.0f} s, {'error' if name in report['errors'] else 'ok'}", flush=True)
        with open(os.path.join(args.out, "gpu_check.json"), "w") as f:  # after every part: a killed run keeps them
            json.dump(report, f, indent=1)
    return 1 if report["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
