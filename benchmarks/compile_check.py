"""Why tl_edgeprune refuses torch.compile'd models: masked forward and mask gradients, eager vs compiled.

    python benchmarks/compile_check.py [--backend eager|inductor]

Builds a small random GPT-2-style HookedTransformer, runs one masked forward+backward (masks 0.5, interchange)
on the model itself and on ``torch.compile(model)`` (bypassing the library's refusal), and prints the largest
differences of logits and of the mask gradient, and the time of the compiled call (compilation included).
``--backend eager`` runs TorchDynamo's tracing without code generation: a difference there is Dynamo's.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import tl_edgeprune as tep  # noqa: E402
from benchmarks.common import gpt2_hooked_transformer  # noqa: E402


def masked_step(mm, clean, cf, z):
    z.grad = None
    logits = mm(clean, cf, z)
    logits.sum().backward()
    return logits.detach(), z.grad.clone()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backend", default="eager", help="torch.compile backend (eager: Dynamo only; inductor)")
    args = ap.parse_args()
    torch.manual_seed(0)
    model = gpt2_hooked_transformer(n_layers=2, d_model=64, n_heads=4, d_head=16, d_mlp=256, d_vocab=100, n_ctx=32)
    gen = torch.Generator().manual_seed(0)
    clean, corrupted = (torch.randint(0, 100, (4, 8), generator=gen) for _ in range(2))
    compiled = torch.compile(model, backend=args.backend)
    with tep.masked(model) as mm:
        cf = mm.interchange(corrupted)
        z = torch.full(mm.graph.shape, 0.5, requires_grad=True)
        eager_logits, eager_grad = masked_step(mm, clean, cf, z)
        mm.adapter.model = compiled  # what the library refuses to do (ModelAdapter raises on compiled models)
        t0 = time.perf_counter()
        try:
            logits, grad = masked_step(mm, clean, cf, z)
        except Exception as e:  # noqa: BLE001 - any failure is the finding
            print(f"torch.compile(backend={args.backend!r}): the masked forward failed: {type(e).__name__}: {e}")
            return
        finally:
            mm.adapter.model = model
    print(f"torch {torch.__version__}, torch.compile(backend={args.backend!r}), first call "
          f"{time.perf_counter() - t0:.1f} s (compilation included)")
    print(f"max |logits compiled − eager|        : {(logits - eager_logits).abs().max():.3g}")
    print(f"max |mask gradient compiled − eager| : {(grad - eager_grad).abs().max():.3g} "
          f"(largest eager entry {eager_grad.abs().max():.3g})")


if __name__ == "__main__":
    main()
