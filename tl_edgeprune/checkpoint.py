"""Edge Pruning checkpoints: what a run must match to be resumed, and files that load without running code.

A checkpoint records the run's identity (settings, graph, a hash of the model's weights and of the data, the
objective, the ablation, the trainable edges) beside its state; a resume with anything else is refused by name.
Files hold tensors and plain types only and are read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import asdict
from typing import Any

import torch

from .counterfactual import Counterfactual
from .errors import EdgePruneError, first_line
from .files import atomic_write
from .fingerprint import data_digest, model_fingerprint, tensor_digest

FORMAT = "tl_edgeprune/edge_pruning_checkpoint"
VERSION = 2


def describe_callable(fn: Any) -> str:
    """A stable name for an objective: the built-in's name, or module.qualname of the user's function."""
    if isinstance(fn, str):
        return fn
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', type(fn).__name__)}"


def describe_ablation(ablation: Any) -> str:
    if isinstance(ablation, Counterfactual):
        values = [] if ablation.values is None else [ablation.values]
        return f"{ablation.kind} counterfactual sha256:{tensor_digest(values).hexdigest()[:16]}"
    return str(ablation)


def run_identity(cfg: Any, graph: Any, model: Any, data: Any, objective: Any, ablation: Any,
                 trainable: torch.Tensor, mean_reference: torch.Tensor | None) -> dict[str, Any]:
    """Everything that makes a resume meaningful, as plain types."""
    return {
        "settings": cfg.fingerprint(),
        "graph": {**asdict(graph.spec), "input_nodes": graph.input_nodes,
                  **({"position_classes": list(graph.position_classes)} if graph.positional else {})},
        "model": {k: v for k, v in model_fingerprint(model).items() if k != "name"},  # a name may be a temp folder's
        "data": {"examples": len(data), "sha256": data_digest(data)},
        "objective": describe_callable(objective),
        "ablation": describe_ablation(ablation),
        "trainable_edges": tensor_digest([trainable]).hexdigest(),
        "mean_reference": None if mean_reference is None else tensor_digest([mean_reference]).hexdigest(),
    }


def _differences(saved: Any, now: Any, prefix: str = "") -> list[str]:
    if isinstance(saved, dict) and isinstance(now, dict):
        out = []
        for key in sorted(set(saved) | set(now), key=str):
            out += _differences(saved.get(key), now.get(key), f"{prefix}{key}.")
        return out
    return [] if saved == now else [f"{prefix[:-1]}: {saved!r} in the checkpoint, {now!r} now"]


def nonfinite(tensors: dict[str, torch.Tensor | None]) -> str | None:
    """The name of the first tensor holding a NaN or an infinity, or None (one host sync for all)."""
    named = [(name, t) for name, t in tensors.items() if t is not None and t.is_floating_point()]
    if not named:
        return None
    flags = torch.stack([torch.isfinite(t.detach()).all() for _, t in named])
    if bool(flags.all()):
        return None
    return named[int((~flags).nonzero()[0])][0]


def save(path: str, identity: dict, step: int, state: dict[str, Any]) -> None:
    """Write atomically; a state holding NaN/inf is never written (it would replace a good checkpoint)."""
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    for k, opt_state in state.get("optimizer", {}).get("state", {}).items():
        tensors.update({f"optimizer state {k}.{name}": v for name, v in opt_state.items() if isinstance(v, torch.Tensor)})
    bad = nonfinite(tensors)
    if bad is not None:
        raise EdgePruneError(f"refusing to write a checkpoint whose {bad} is not finite (step {step}); {path} is untouched")
    payload = {"format": FORMAT, "version": VERSION, "identity": identity, "step": step, **state}
    atomic_write(path, lambda f: torch.save(payload, f))


def read(path: str) -> dict[str, Any]:
    """A checkpoint's contents, or an error that says what the file is and what to do."""
    if os.path.isdir(path):
        raise EdgePruneError(f"checkpoint_path {path!r} is a folder, not a checkpoint file; name a file inside it")
    if not os.path.exists(path):
        raise EdgePruneError(f"resume=True but there is no checkpoint at {path!r}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch's unpickler raises many types on a bad file (IndexError on some random bytes)
        raise EdgePruneError(
            f"{path!r} cannot be read as an Edge Pruning checkpoint ({type(exc).__name__}: {first_line(exc)}). It may be "
            "truncated, empty or another kind of file; files are loaded with weights_only=True, so one that would run "
            "code on load is refused too. Delete it to start afresh, or point checkpoint_path at a real checkpoint."
        ) from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        what = "a saved Circuit" if isinstance(payload, dict) and "edges" in payload and "cfg" in payload else "not one"
        raise EdgePruneError(f"{path!r} is not an Edge Pruning checkpoint ({what}); point checkpoint_path at a "
                             "checkpoint written by edge_pruning(..., checkpoint_path=...)")
    if payload.get("version") != VERSION:
        raise EdgePruneError(f"{path!r} is a version {payload.get('version')} checkpoint; this tl_edgeprune reads "
                             f"version {VERSION}. Start the run afresh (resume=False).")
    return payload


def load(path: str, identity: dict) -> dict[str, Any]:
    """Read and refuse a checkpoint made by another run, naming every difference."""
    payload = read(path)
    diff = _differences(payload["identity"], identity)
    if diff:
        raise EdgePruneError(
            f"the checkpoint {path!r} was made with other settings, so resuming would mix two runs: " + "; ".join(diff)
            + ". Resume with what made it, or start afresh (resume=False, or another checkpoint_path)."
        )
    return payload


def failure_path(checkpoint_path: str | None, step: int) -> str:
    """Where a failing step's state goes: beside the user's checkpoint, else in a folder of this run's own."""
    if checkpoint_path:
        root, ext = os.path.splitext(checkpoint_path)
        return f"{root}.failed-step{step}{ext or '.pt'}"
    return os.path.join(tempfile.mkdtemp(prefix="tl_edgeprune-"), f"failed-step{step}.pt")

