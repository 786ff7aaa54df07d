"""Wall time and faithfulness of Edge Pruning, EAP, EAP-IG, ACDC and HAP, side by side in one run.

    python benchmarks/methods.py            # Tracr reverse + xproportion (full runs) and a GPT-2-small shape
    python benchmarks/methods.py --skip-gpt2

Tracr: zero ablation, every input; circuits compared at equal edge counts (EAP takes Edge Pruning's count).
GPT-2-small shape (random weights, batch 8, seq 20): a few steps only, to show cost per step; ACDC's full run
there is out of reach on a CPU, so its per-candidate forward time is measured and the full cost is printed as
an estimate (marked so).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import tl_edgeprune as tep  # noqa: E402
from benchmarks.common import gpt2_small_model  # noqa: E402
from tl_edgeprune.acdc import acdc  # noqa: E402
from tl_edgeprune.eap import eap  # noqa: E402
from tl_edgeprune.hap import hap  # noqa: E402
from tl_edgeprune.tracr_models import EDGE_PRUNING_SETTINGS  # noqa: E402

TRACR = {name: {**settings, "progress": False} for name, settings in EDGE_PRUNING_SETTINGS.items()}


def row(method, seconds, circuit, metrics, key):
    print(f"  {method:<22} {seconds:8.2f} s  {circuit.n_edges:5d} edges  {key} {metrics[key]:.3g}  "
          f"exact-match {metrics['exact_match']:.3f}")


def tracr(name: str) -> None:
    task = tep.load_tracr(name)
    data, settings = task.data(), TRACR[name]
    key = "kl" if settings["objective"] == "kl" else "mse"
    print(f"\nTracr {name}: {tep.Graph.from_model(task.model).n_edges} edges, canonical {len(task.canonical_circuit)}")
    t = time.perf_counter()
    ep = tep.edge_pruning(task.model, data, **settings).circuit()
    t_ep = time.perf_counter() - t
    row("edge pruning", t_ep, ep, ep.evaluate(task.model, data, ablation="zero"), key)
    for steps, label in ((None, "eap"), (5, "eap-ig(5)")):
        t = time.perf_counter()
        scores = eap(task.model, data, ablation="zero", ig_steps=steps, progress=False)
        c = scores.circuit(k=ep.n_edges)
        row(f"{label} top-{ep.n_edges}", time.perf_counter() - t, c, c.evaluate(task.model, data, ablation="zero"), key)
    t = time.perf_counter()
    a = acdc(task.model, data, threshold=0.01, ablation="zero", metric=settings["objective"], progress=False)
    row("acdc τ=0.01", time.perf_counter() - t, a, a.evaluate(task.model, data, ablation="zero"), key)
    t = time.perf_counter()
    h = hap(task.model, data, keep=0.5, eap_options={"ablation": "zero", "progress": False},
            **settings).circuit()
    row("hap (EAP keeps 50%)", time.perf_counter() - t, h, h.evaluate(task.model, data, ablation="zero"), key)
    print(f"  edge pruning == canonical circuit: {sorted(ep.edge_names()) == sorted(task.canonical_circuit)}; "
          f"acdc == canonical: {sorted(a.edge_names()) == sorted(task.canonical_circuit)}")


def gpt2_shape(steps: int) -> None:
    torch.manual_seed(0)
    model = gpt2_small_model()
    gen = torch.Generator().manual_seed(0)
    clean = torch.randint(0, model.cfg.d_vocab, (8, 20), generator=gen)
    corrupted = torch.randint(0, model.cfg.d_vocab, (8, 20), generator=gen)
    data = tep.paired_data(clean, corrupted, positions="last")
    print(f"\nGPT-2-small shape, random weights, batch 8 x seq 20, {torch.get_num_threads()} threads")
    t = time.perf_counter()
    res = tep.edge_pruning(model, data, 0.9, steps=steps, sparsity_warmup=steps, lr_warmup=0, batch_size=8, progress=False)
    t_ep = time.perf_counter() - t
    k = round(0.05 * res.graph.n_edges)  # compare at 95% sparsity
    circuit = res.circuit_top_k(k)
    print(f"  edge pruning: {steps} steps in {t_ep:.1f} s ({t_ep / steps:.2f} s/step); its top-{k} edges by mask "
          f"(after only {steps} steps): KL {circuit.evaluate(model, data)['kl']:.3g}")
    t = time.perf_counter()
    scores = eap(model, data, progress=False)
    t_eap = time.perf_counter() - t
    c = scores.circuit(k=k)
    print(f"  eap: {t_eap:.1f} s, top-{k} KL {c.evaluate(model, data)['kl']:.3g}")
    t = time.perf_counter()
    h = hap(model, data, 0.9, keep=0.2, steps=steps, sparsity_warmup=steps, lr_warmup=0, batch_size=8, progress=False,
            eap_options={"progress": False})
    print(f"  hap: {time.perf_counter() - t:.1f} s ({h.info['eap_seconds']:.1f} s EAP), {h.circuit().n_edges} edges")
    with tep.masked(model) as mm:
        cf = mm.interchange(corrupted)
        z = mm.graph.ones()
        with torch.no_grad():
            mm(clean, cf, z)
            t = time.perf_counter()
            for _ in range(3):
                mm(clean, cf, z)
            per = (time.perf_counter() - t) / 3
        print(f"  acdc: one candidate = one masked forward = {per:.2f} s measured; x {mm.graph.n_edges} edges "
              f"= ESTIMATE {per * mm.graph.n_edges / 3600:.1f} h for one full pass (not run)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--skip-gpt2", action="store_true")
    ap.add_argument("--gpt2-steps", type=int, default=5)
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for name in ("reverse", "xproportion"):
        tracr(name)
    if not args.skip_gpt2:
        gpt2_shape(args.gpt2_steps)


if __name__ == "__main__":
    main()
