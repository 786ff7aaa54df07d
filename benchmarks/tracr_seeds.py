"""How often Edge Pruning recovers the Tracr ground truth, over seeds (the settings in tracr_models.py).

    python benchmarks/tracr_seeds.py [--seeds 0 1 2 3 4] [--task reverse xproportion]

reverse: success = exactly the canonical 11 edges; xproportion: the 5 functional edges, inside the canonical 7.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import tl_edgeprune as tep  # noqa: E402
from tl_edgeprune.tracr_models import (  # noqa: E402
    CANONICAL_CIRCUITS,
    EDGE_PRUNING_SETTINGS,
    XPROPORTION_FUNCTIONAL,
    load_tracr,
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--task", nargs="+", default=["reverse", "xproportion"])
    args = ap.parse_args()
    for name in args.task:
        task = load_tracr(name)
        data, canonical = task.data(), set(CANONICAL_CIRCUITS[name])
        wins = 0
        for seed in args.seeds:
            t = time.perf_counter()
            settings = {**EDGE_PRUNING_SETTINGS[name], "seed": seed, "progress": False}
            edges = set(tep.edge_pruning(task.model, data, **settings).circuit().edge_names())
            ok = edges == canonical if name == "reverse" else set(XPROPORTION_FUNCTIONAL) <= edges <= canonical
            wins += ok
            print(f"{name} seed {seed}: {'recovered' if ok else 'missed'} ({len(edges)} edges, "
                  f"{time.perf_counter() - t:.0f} s){'' if ok else ' diff ' + str(sorted(edges ^ canonical))}", flush=True)
        print(f"{name}: {wins} of {len(args.seeds)} seeds recovered the ground truth")


if __name__ == "__main__":
    main()
