"""Our Edge Pruning step ÷ auto-circuit's learned-mask step, same model, batch and environment.

    python benchmarks/peers.py [--batch 32] [--seq 20] [--repeats 3] [--allocators both]

auto-circuit is never a dependency of tl_edgeprune: this script builds its own venv (benchmarks/.venvs/
autocircuit: torch 2.13.0, transformer-lens 3.9.0, auto-circuit 1.0.1 with --no-deps and the few packages it
imports), installs tl_edgeprune there too (--no-deps), and runs both sides in fresh processes of that venv on
the same GPT-2-small-shaped random HookedTransformer (graph with one input node, 32,491 edges, as auto-circuit
builds it). Every process also times a plain forward+backward, so each step is reported ÷ its own plain.
CPU timings move with the allocator, so both sides run under each allocator setting:
"default" (glibc defaults) and "no-mmap" (MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=10^11).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
from benchmarks.common import NO_MMAP  # noqa: E402

VENV = os.path.join(HERE, ".venvs", "autocircuit")
ALLOCATORS = {"default": {}, "no-mmap": NO_MMAP}
PINS = ["transformer-lens==3.9.0", "attrs", "plotly", "ordered-set", "blobfile"]


def venv_python() -> str:
    python = os.path.join(VENV, "bin", "python")
    marker = os.path.join(VENV, ".complete")
    if os.path.exists(marker):
        return python
    print(f"building {VENV} (once) ...", flush=True)
    subprocess.run([sys.executable, "-m", "venv", VENV], check=True)
    pip = [python, "-m", "pip", "install", "-q"]
    subprocess.run(pip + ["torch==2.13.0"], check=True)
    subprocess.run(pip + PINS, check=True)
    subprocess.run(pip + ["--no-deps", "auto-circuit==1.0.1"], check=True)  # its pins (kaleido, tracr...) unused
    subprocess.run(pip + ["--no-deps", "-e", ROOT], check=True)
    open(marker, "w").close()
    return python


def run(python: str, script: str, args: list[str], env_extra: dict) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_")}
    env.update(env_extra)
    out = subprocess.run([python, os.path.join(HERE, script), *args], check=True, capture_output=True, text=True,
                         env=env, cwd=os.path.dirname(ROOT))  # not inside auto_circuit's folder (its types.py)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--allocators", choices=["default", "no-mmap", "both"], default="both")
    args = ap.parse_args()
    python = venv_python()
    shape = ["--batch", str(args.batch), "--seq", str(args.seq), "--repeats", str(args.repeats)]
    names = list(ALLOCATORS) if args.allocators == "both" else [args.allocators]
    print(f"GPT-2-small shape, batch {args.batch}, seq {args.seq}, {args.repeats} repeats, venv {VENV}")
    for name in names:
        env = ALLOCATORS[name]
        ours = run(python, "engine.py", shape + ["--only-step", "--json", "--input-nodes", "merged"], env)
        theirs = run(python, "peer_autocircuit.py", shape, env)
        ours_mem = run(python, "engine.py", shape[:4] + ["--input-nodes", "merged", "--memory-only", "masked"], env)
        theirs_mem = run(python, "peer_autocircuit.py", shape[:4] + ["--repeats", "1", "--only", "step"], env)
        plain_mem = run(python, "engine.py", shape[:4] + ["--memory-only", "plain"], env)
        o, t = ours["ep_step"]["median"], theirs["step"]["median"]
        print(f"\nallocator {name}: {', '.join(f'{k}={v}' for k, v in env.items()) or 'glibc defaults'}")
        print(f"  ours         : plain {ours['plain']['median']:.2f} s, Edge Pruning step {o:.2f} s "
              f"(min {ours['ep_step']['min']:.2f}, max {ours['ep_step']['max']:.2f}); {ours['graph']}")
        print(f"  auto-circuit : plain {theirs['plain']['median']:.2f} s, learned-mask step {t:.2f} s "
              f"(min {theirs['step']['min']:.2f}, max {theirs['step']['max']:.2f}); {theirs['edges']} edges")
        print(f"  RATIO ours step / plain             : {o / ours['plain']['median']:.2f}x")
        print(f"  RATIO auto-circuit step / plain     : {t / theirs['plain']['median']:.2f}x")
        print(f"  RATIO ours step / auto-circuit step : {o / t:.2f}x")
        print(f"  peak memory of one step: plain {plain_mem['peak_bytes'] / 2**30:.2f} GiB, ours "
              f"{ours_mem['peak_bytes'] / 2**30:.2f} GiB, auto-circuit {theirs_mem['step_peak_bytes'] / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()
