"""Memory per GPU of Edge Pruning on a model sharded by FSDP2 (``tep.shard_model``), part by part, from the shapes.

    python benchmarks/fsdp_memory.py [--gpus 8 16 32] [--batch-per-gpu 1] [--seq 64]

Arithmetic, not a measurement (no GPU here): weights are sharded over the GPUs; everything else is per GPU and
scales with that GPU's examples × positions. The writer-buffer factor (ỹ overwritten by y − ỹ, its gradient twin,
the mixing's products and gradient scratch: 2.5× one buffer) is the one measured on the GPT-2 shape
(``benchmarks/run_all.py`` section 5). The reader inputs are what any per-head masking must hold for backward: each
head reader's own [d_model] input per position (q, k and v per head; k/v per KV head under GQA), kept once on the
fused path (float32/64 HookedTransformer) and twice on TransformerLens's split path (the input and its normed copy).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from tl_edgeprune.graph import Graph, GraphSpec  # noqa: E402

# Public configs (Hugging Face config.json): n_layers, n_heads, n_kv_heads, d_model, d_mlp, vocab.
MODELS = {
    "CodeLlama-13B": dict(n_layers=40, n_heads=40, n_kv_heads=40, d_model=5120, d_mlp=13824, vocab=32016),
    "CodeLlama-7B": dict(n_layers=32, n_heads=32, n_kv_heads=32, d_model=4096, d_mlp=11008, vocab=32016),
    "SmolLM2-135M": dict(n_layers=30, n_heads=9, n_kv_heads=3, d_model=576, d_mlp=1536, vocab=49152),
}
GIB = 2**30
BUFFER_FACTOR = 2.5  # measured, GPT-2 shape: 1.00 (ỹ → y − ỹ) + 1.00 (gradient twin) + 0.24 + 0.24 (mixing storage)
MASK_COPIES = 7  # log α, its gradient, AdamW's two moments, the sampled z, the removal matrix, the validity mask


def n_params(m: dict) -> int:
    d, h, kv, L = m["d_model"], m["n_heads"], m["n_kv_heads"], m["n_layers"]
    d_head = d // h
    attn = d * h * d_head * 2 + d * kv * d_head * 2  # W_Q, W_O; W_K, W_V per KV head
    mlp = 3 * d * m["d_mlp"]  # gated MLP
    return 2 * m["vocab"] * d + L * (attn + mlp + 2 * d) + d


def parts(m: dict, gpus: int, examples: int, seq: int, weight_bytes: int, act_bytes: int, split_path: bool) -> dict:
    spec = GraphSpec(m["n_layers"], m["n_heads"], m["n_kv_heads"], m["d_model"], positional_embedding_type="rotary")
    graph = Graph.from_spec(spec, "separate")
    tokens = examples * seq
    readers_per_layer = m["n_heads"] + 2 * m["n_kv_heads"]
    return {
        "edges": graph.n_edges,
        "weights": n_params(m) * weight_bytes / gpus,
        "masks": MASK_COPIES * graph.n_writers * graph.n_readers * 4,
        "writer buffer": BUFFER_FACTOR * graph.n_writers * tokens * m["d_model"] * act_bytes,
        "reader inputs": (2 if split_path else 1) * m["n_layers"] * readers_per_layer * tokens * m["d_model"] * act_bytes,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="CodeLlama-13B", choices=sorted(MODELS))
    ap.add_argument("--gpus", type=int, nargs="+", default=[8, 16, 32])
    ap.add_argument("--batch-per-gpu", type=int, default=1)
    ap.add_argument("--seq", type=int, default=64)
    args = ap.parse_args()
    m = MODELS[args.model]
    print(f"{args.model}: {n_params(m) / 1e9:.2f} B parameters; {args.batch_per_gpu} example(s) × {args.seq} positions "
          "per GPU; bfloat16 weights and activations (TransformerLens's split q/k/v path), float32 masks")
    print("| GPUs | edges | weights (sharded) | masks | writer buffer | reader inputs | sum of these |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for gpus in args.gpus:
        p = parts(m, gpus, args.batch_per_gpu, args.seq, 2, 2, split_path=True)
        total = sum(v for k, v in p.items() if k != "edges")
        cells = " | ".join(f"{p[k] / GIB:.2f} GiB" for k in ("weights", "masks", "writer buffer", "reader inputs"))
        print(f"| {gpus} | {p['edges']:,} | {cells} | {total / GIB:.2f} GiB |")
    print("The model's own activations (attention, MLP) come on top, as in any frozen forward+backward; the example "
          "cache (cache_gib) keeps each example's ỹ: "
          f"{parts(m, 1, 1, args.seq, 2, 2, True)['writer buffer'] / BUFFER_FACTOR / GIB:.2f} GiB per example here, "
          "so leave it at its default budget or set cache_gib=0.")


if __name__ == "__main__":
    main()
