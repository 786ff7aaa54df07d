"""Where a whole ``tep.eap`` call's time goes beyond its batches' work, and the mixing's GEMM orientation.

    python benchmarks/eap_overheads.py [--rounds 3] [--skip faults,attach,row-dots]

- faults: a first touch of fresh memory against a second pass over it (what a freshly allocated tensor costs on
  this machine), then the frozen step, a training step and a whole ``tep.eap`` call on 64 examples (2 batches of
  32), in rounds, each with its wall time and the memory it page-faulted in (``getrusage`` minor faults × 4 KiB);
- attach: the time to attach and detach ``tep.masked`` (graph, hooks, the attach-time identity check);
- row-dots: the masks' gradient GEMM on the shapes of one GPT-2-shape EAP batch, as rows·flatᵀ and as
  (flat·rowsᵀ)ᵀ (mixing._row_dots picks the second where writers outnumber readers, on CPU).
GPT-2-small shape, random weights, one torch thread unless OMP_NUM_THREADS says otherwise.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import tl_edgeprune as tep  # noqa: E402
from benchmarks.common import allocator_env, gpt2_small_model, timed  # noqa: E402
from benchmarks.engine import over_batches, plain_step, residual_grad_step  # noqa: E402
from tl_edgeprune.eap import eap  # noqa: E402

# (writers, readers) of the masks' gradient GEMMs of one EAP batch on the GPT-2 shape, batch 32 × 20
GPT2_EAP_SHAPES = [(13, 1), (12, 1), (145, 38), (132, 37), (119, 37), (106, 37), (93, 37), (80, 37), (67, 37),
                   (1, 36), (53, 38), (40, 37), (27, 37), (14, 37), (2, 36)]


def minor_fault_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt * 4096


def first_touch() -> None:
    for _ in range(3):
        t0 = time.perf_counter()
        x = torch.empty(2**28)  # 1 GiB of float32
        x.fill_(1.0)
        t1 = time.perf_counter()
        x.fill_(2.0)
        print(f"1 GiB: first touch {t1 - t0:.3f} s, second pass {time.perf_counter() - t1:.3f} s")
        del x


def faults(model, rounds: int, n: int = 64, batch: int = 32, seq: int = 20) -> None:
    gen = torch.Generator().manual_seed(0)
    clean = torch.randint(0, model.cfg.d_vocab, (n, seq), generator=gen)
    corrupted = torch.randint(0, model.cfg.d_vocab, (n, seq), generator=gen)
    data = tep.paired_data(clean, corrupted, positions="last")

    steps = {"frozen": over_batches(residual_grad_step, model, clean, batch, frozen=True),
             "training step": over_batches(plain_step, model, clean, batch),
             "tep.eap call": lambda: eap(model, data, batch_size=batch, progress=False)}
    for r in range(rounds):
        for name, step in steps.items():
            f0, t0 = minor_fault_bytes(), time.perf_counter()
            step()
            print(f"round {r}: {name:14s} {time.perf_counter() - t0:6.2f} s, page-faulted "
                  f"{(minor_fault_bytes() - f0) / 2**20:6.0f} MiB")


def attach(model, rounds: int) -> None:
    for _ in range(rounds):
        t0 = time.perf_counter()
        with tep.masked(model):
            t1 = time.perf_counter()
        print(f"attach {t1 - t0:.3f} s, detach {time.perf_counter() - t1:.3f} s")


def row_dots(rounds: int, n: int = 32 * 20 * 768) -> None:
    gen = torch.Generator().manual_seed(0)
    rows_all, flat_all = torch.randn(150, n, generator=gen), torch.randn(40, n, generator=gen)

    def median_ms(fn) -> float:
        return timed(fn, rounds + 2)["median"] * 1e3

    total = {"rows·flatᵀ": 0.0, "(flat·rowsᵀ)ᵀ": 0.0, "picked": 0.0}
    for w, r in GPT2_EAP_SHAPES:
        rows, flat = rows_all[:w], flat_all[:r]
        a, b = median_ms(lambda: rows.mm(flat.t())), median_ms(lambda: flat.mm(rows.t()).t())
        total["rows·flatᵀ"] += a
        total["(flat·rowsᵀ)ᵀ"] += b
        total["picked"] += b if w > r else a
        print(f"{w:4d} writers, {r:3d} readers: rows·flatᵀ {a:7.1f} ms, (flat·rowsᵀ)ᵀ {b:7.1f} ms, ratio {b / a:.2f}, "
              f"bit-equal {torch.equal(rows.mm(flat.t()), flat.mm(rows.t()).t())}")
    print("per EAP batch: " + ", ".join(f"{k} {v:.0f} ms" for k, v in total.items()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--skip", default="")
    args = ap.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    print(f"allocator: {allocator_env()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    model = gpt2_small_model().eval() if {"faults", "attach"} - skip else None
    if "faults" not in skip:
        first_touch()
        faults(model, args.rounds)
    if "attach" not in skip:
        attach(model, args.rounds)
    if "row-dots" not in skip:
        row_dots(args.rounds)


if __name__ == "__main__":
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)
    main()
