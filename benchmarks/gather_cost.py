"""What a gathered masks'-gradient GEMM costs against the full one (why mixing.GATHER_BELOW is one half).

    python benchmarks/gather_cost.py [--n 184320] [--writers 200] [--readers 60] [--kept 64]

At SmolLM2's batch·pos·d_model (16 × 20 × 576 by default), one thread: the full [readers, n]·[n, writers] product
(flat·rowsᵀ, as mixing._row_dots takes it on CPU), the gather of ``--kept`` writer rows into pooled storage, the
product over the gathered rows, and the same over a quarter of the readers (a reader group rather than a window).
Each time is the median of 7 runs after one untimed; "a dot" is one reader-writer pair's dot over n.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from benchmarks.common import timed  # noqa: E402


def median_seconds(fn, repeats: int = 7) -> float:
    return timed(fn, repeats)["median"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=16 * 20 * 576)
    ap.add_argument("--writers", type=int, default=200)
    ap.add_argument("--readers", type=int, default=60)
    ap.add_argument("--kept", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    rows = torch.randn(args.writers, args.n, generator=gen)
    flat = torch.randn(args.readers, args.n, generator=gen)
    store = torch.empty(args.kept, args.n)
    index = torch.randperm(args.writers, generator=gen)[: args.kept].sort().values
    group = max(1, args.readers // 4)
    full = median_seconds(lambda: flat.mm(rows.t()))
    gather = median_seconds(lambda: torch.index_select(rows, 0, index, out=store))
    kept = median_seconds(lambda: flat.mm(store.t()))
    kept_group = median_seconds(lambda: flat[:group].mm(store.t()))
    dot = full / (args.writers * args.readers)
    print(f"n {args.n}, {args.writers} writers, {args.readers} readers, {args.kept} kept, "
          f"{torch.get_num_threads()} thread(s), torch {torch.__version__}")
    print(f"full GEMM: {full * 1e3:.1f} ms, {dot * 1e6:.2f} µs a dot")
    print(f"gather of {args.kept} rows: {gather * 1e3:.1f} ms, {gather / args.kept * 1e6:.1f} µs a row "
          f"= {gather / args.kept / dot:.1f} dots of the full GEMM")
    print(f"GEMM over the gathered rows: {kept * 1e3:.1f} ms, {kept / (args.kept * args.readers) * 1e6:.2f} µs a dot")
    print(f"the same for {group} readers (a reader group): {kept_group / (args.kept * group) * 1e6:.2f} µs a dot")
    per_kept_row = kept / args.kept + gather / args.kept
    print(f"RATIO break-even share of rows kept (gathered GEMM + gather = full GEMM): "
          f"{full / args.writers / per_kept_row:.2f}")


if __name__ == "__main__":
    main()
