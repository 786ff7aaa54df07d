"""torch's intra-op thread count for one run: a tiny model gains nothing from several threads, and loses badly.

On a shared 2-core machine two threads spin-waiting on Tracr's tiny ops made a 45 s run take 8.5 min; one thread
was as fast when idle. So a CPU model under SMALL_MODEL_PARAMETERS runs on one thread unless told otherwise; the
process's own setting is restored afterwards.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch

from . import validation

SMALL_MODEL_PARAMETERS = 10_000_000


def chosen_threads(model: Any, threads: int | None) -> int | None:
    """The thread count for this model: ``threads`` if given, 1 for a small CPU model, else None (leave torch's)."""
    if threads is not None:
        return validation.integer("threads", threads, minimum=1)
    params = list(model.parameters()) if hasattr(model, "parameters") else []
    on_cpu = all(p.device.type == "cpu" for p in params)
    return 1 if on_cpu and sum(p.numel() for p in params) < SMALL_MODEL_PARAMETERS else None


@contextlib.contextmanager
def torch_threads(model: Any, threads: int | None) -> Iterator[int]:
    """Run the block with ``chosen_threads(model, threads)`` torch threads; yields the count in force."""
    chosen = chosen_threads(model, threads)
    before = torch.get_num_threads()
    if chosen is not None and chosen != before:
        torch.set_num_threads(chosen)
    try:
        yield torch.get_num_threads()
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)
