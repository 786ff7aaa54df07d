"""Shared benchmark helpers: GPT-2-small-shaped random models, timing stats, per-process peak memory."""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch

# glibc settings under which freed memory stays mapped: no page faults from mmap/trim on every large allocation.
NO_MMAP = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(10**11)}
GPT2_SMALL = dict(n_layers=12, d_model=768, n_heads=12, d_head=64, d_mlp=3072, d_vocab=50257, n_ctx=1024)


def gpt2_hooked_transformer(seed: int = 0, **overrides):
    """The GPT-2-small-shaped random HookedTransformer (transformer-lens < 4); no tl_edgeprune import, so the
    auto-circuit venv builds the very same model."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = HookedTransformerConfig(act_fn="gelu_new", normalization_type="LN", seed=seed, **{**GPT2_SMALL, **overrides})
    return HookedTransformer(cfg).eval()


def gpt2_small_model(seed: int = 0, **overrides):
    """A randomly initialised GPT-2-small-shaped model: HookedTransformer where it exists, else a bridge."""
    from tl_edgeprune.adapter import hooked_transformer_class

    shape = {**GPT2_SMALL, **overrides}
    if hooked_transformer_class() is not None:
        return gpt2_hooked_transformer(seed, **overrides)
    import transformers

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
    from tests.models import word_tokenizer

    torch.manual_seed(seed)
    hf_cfg = transformers.GPT2Config(
        n_layer=shape["n_layers"], n_head=shape["n_heads"], n_embd=shape["d_model"], n_inner=shape["d_mlp"],
        vocab_size=shape["d_vocab"], n_positions=shape["n_ctx"],
    )
    from transformer_lens.model_bridge import TransformerBridge

    return TransformerBridge.boot_transformers(
        "openai-community/gpt2", hf_model=transformers.GPT2LMHeadModel(hf_cfg).eval(), tokenizer=word_tokenizer(100)
    )


def timed(fn, repeats: int, warmup: int = 1) -> dict:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return {"min": min(times), "median": statistics.median(times), "max": max(times), "n": repeats}


def timed_interleaved(steps: dict, repeats: int, warmup: int = 1, settle: int = 0, keep_times: bool = False) -> dict:
    """Time several steps round-robin (a, b, a, b, ...), so that drift on a shared machine hits them alike.

    ``settle``: run each step that many times untimed right before its timed run (a a* b b* ...), so each is
    timed in the allocator state its own previous run left, as in a loop of such steps; with 0, each step
    first takes back memory the other step's frees returned to the kernel (glibc's trim), which on CPU costs
    page faults. Returns stats per step and, for each later step, the stats of its per-round ratio to each
    earlier one ("b/a"); ``keep_times``: also every round's seconds per step, under "times"."""
    names = list(steps)
    for _ in range(warmup):
        for name in names:
            steps[name]()
    times = {name: [] for name in names}
    for _ in range(repeats):
        for name in names:
            for _ in range(settle):
                steps[name]()
            t0 = time.perf_counter()
            steps[name]()
            times[name].append(time.perf_counter() - t0)
    out = {name: _stats(t) for name, t in times.items()}
    for i, base in enumerate(names):  # every later step against every earlier one, round by round
        for name in names[i + 1:]:
            out[f"{name}/{base}"] = _stats([a / b for a, b in zip(times[name], times[base])])
    if keep_times:
        out["times"] = times
    return out


def _stats(values: list[float]) -> dict:
    return {"min": min(values), "median": statistics.median(values), "max": max(values), "n": len(values)}


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_peak_rss() -> int:
    """Reset the kernel's high-water mark (VmHWM) to the current RSS and return that RSS."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return rss_bytes()


def peak_rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# glibc settings under which a process's RSS follows its live tensors: every block over 64 KiB is its own mapping,
# returned to the kernel when freed, so memory a model's loading freed (SmolLM2's de-quantisation) is not reused
# unseen by the step measured after it (with the defaults, SmolLM2's frozen step once measured 298 MiB, once 825).
FOLLOW_LIVE = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}


def in_subprocess(script: str, *args: str, env: dict | None = None) -> dict:
    """Run `python script args` and parse the JSON it prints last (each memory figure gets a fresh process);
    ``env``: variables added to this process's environment there."""
    out = subprocess.run([sys.executable, script, *args], check=True, capture_output=True, text=True,
                         env=None if env is None else {**os.environ, **env}).stdout
    return json.loads(out.strip().splitlines()[-1])


def allocator_env() -> str:
    keys = ["MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_ARENA_MAX", "LD_PRELOAD", "OMP_NUM_THREADS"]
    set_ = {k: os.environ[k] for k in keys if k in os.environ}
    return ", ".join(f"{k}={v}" for k, v in set_.items()) or "glibc malloc defaults"


def fmt_stats(s: dict) -> str:
    return f"min {s['min']:.3f}s  median {s['median']:.3f}s  max {s['max']:.3f}s  (n={s['n']})"
