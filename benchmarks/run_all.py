"""Every benchmark ratio that can be measured on this machine, in one run.

    python benchmarks/run_all.py [--repeats 3]

1. masked Edge Pruning step ÷ plain forward+backward (GPT-2-small shape, batch 32, seq 20): benchmarks/engine.py
2. EAP over N examples ÷ one plain forward+backward per batch (same model)
3. writer-buffer bytes ÷ theory (writers × batch × seq × d_model × 4 bytes)
4. ACDC wall time on Tracr reverse, and each method's time and KL: benchmarks/methods.py
Not here (see docs/performance.md): SmolLM2-135M and auto-circuit comparisons, GPU timings.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
import tl_edgeprune as tep  # noqa: E402
from benchmarks.common import fmt_stats, gpt2_small_model, timed  # noqa: E402
from tl_edgeprune.eap import eap  # noqa: E402
from tl_edgeprune.mixing import DeltaBuffer  # noqa: E402


def eap_ratio(repeats: int, n: int = 64, batch: int = 32, seq: int = 20) -> None:
    torch.manual_seed(0)
    model = gpt2_small_model()
    gen = torch.Generator().manual_seed(0)
    clean = torch.randint(0, model.cfg.d_vocab, (n, seq), generator=gen)
    corrupted = torch.randint(0, model.cfg.d_vocab, (n, seq), generator=gen)
    data = tep.paired_data(clean, corrupted, positions="last")

    def plain():
        for start in range(0, n, batch):
            model.zero_grad(set_to_none=True)
            model(clean[start : start + batch])[:, -1].log_softmax(-1).mean().backward()

    t_plain = timed(plain, repeats)
    t_eap = timed(lambda: eap(model, data, batch_size=batch, progress=False), repeats)
    print(f"plain fwd+bwd over {n} examples : {fmt_stats(t_plain)}")
    print(f"EAP over {n} examples           : {fmt_stats(t_eap)}")
    print(f"RATIO EAP / plain fwd+bwd per batch: {t_eap['median'] / t_plain['median']:.2f}x "
          "(EAP also runs the corrupted forward for ỹ)")
    graph = tep.Graph.from_model(model)
    theory = graph.n_writers * batch * seq * model.cfg.d_model * 4
    buffer = DeltaBuffer(graph.n_writers, (batch, seq, model.cfg.d_model), torch.float32, torch.device("cpu"))
    print(f"RATIO writer buffer / theory: {buffer.values.nbytes / theory:.2f}x ({buffer.values.nbytes / 2**20:.0f} MiB; "
          "its gradient twin, allocated during backward, doubles that)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    print("== 1. engine (benchmarks/engine.py)", flush=True)
    subprocess.run([sys.executable, os.path.join(HERE, "engine.py"), "--repeats", str(args.repeats)], check=True)
    print("\n== 2-3. EAP and buffer memory", flush=True)
    eap_ratio(args.repeats)
    print("\n== 4. methods (benchmarks/methods.py)", flush=True)
    subprocess.run([sys.executable, os.path.join(HERE, "methods.py")], check=True)


if __name__ == "__main__":
    main()
