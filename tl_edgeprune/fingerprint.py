"""Fingerprints of a model's weights and of a dataset, so a circuit or a checkpoint is matched to what made it.

A circuit found on one model evaluates on any model of the same shape, and a checkpoint resumes with any data of
the same size: both silently wrong. Hashing the bytes (not the shapes) tells them apart.
"""

from __future__ import annotations

import hashlib
import weakref
from typing import Any, Iterable

import torch

_MODEL_CACHE: "weakref.WeakKeyDictionary[Any, tuple[tuple, str]]" = weakref.WeakKeyDictionary()


def tensor_digest(tensors: Iterable[torch.Tensor | None], digest: Any = None) -> Any:
    """Feed dtype, shape and bytes of each tensor (None as a marker) into a hash."""
    digest = digest or hashlib.sha256()
    for t in tensors:
        if t is None:
            digest.update(b"<none>")
            continue
        t = t.detach()
        if hasattr(t, "full_tensor"):  # a DTensor (FSDP-sharded weights): hash the whole tensor, as unsharded
            t = t.full_tensor()
        digest.update(f"{t.dtype}{tuple(t.shape)}".encode())
        if t.device.type == "meta" or t.numel() == 0:
            continue
        # A copy: .numpy() of the tensor's own storage would pin it as non-resizable, which breaks FSDP's resharding.
        digest.update(t.cpu().reshape(-1).clone().view(torch.uint8).numpy())
    return digest


def weights_digest(model: torch.nn.Module) -> str:
    """SHA-256 of every parameter (name, dtype, shape, bytes); cached until a parameter changes."""
    named = list(model.named_parameters())
    key = tuple((name, id(p), p._version, p.data_ptr()) for name, p in named)
    cached = _MODEL_CACHE.get(model)
    if cached is not None and cached[0] == key:
        return cached[1]
    digest = hashlib.sha256()
    for name, p in named:
        digest.update(name.encode())
        tensor_digest([p], digest)
    value = digest.hexdigest()
    _MODEL_CACHE[model] = (key, value)
    return value


def model_fingerprint(model: Any) -> dict[str, str]:
    """What identifies a model: its TransformerLens class, its name and a hash of its weights."""
    return {
        "class": type(model).__name__,
        "name": str(getattr(model.cfg, "model_name", "") or ""),
        "weights_sha256": weights_digest(model),
    }


def describe_difference(saved: dict, now: dict) -> str:
    """'name: a != b; ...' for the fields of two fingerprints that differ."""
    keys = sorted(set(saved) | set(now))
    return "; ".join(f"{k}: {saved.get(k)!r} then, {now.get(k)!r} now" for k in keys if saved.get(k) != now.get(k))


POSITION_FIELDS = ("position_classes", "position_names")


def data_digest(data: Any) -> str:
    """SHA-256 of every tensor of a PairedData or ShardedData (tokens, masks, positions, answers, ...)."""
    from dataclasses import fields

    digest = hashlib.sha256()
    for shard in data.shards:
        digest.update(b"<shard>")
        # position classes enter only when present, so the digest of ordinary data (old checkpoints) is unchanged
        tensor_digest([getattr(shard, f.name) for f in fields(shard) if f.name not in POSITION_FIELDS], digest)
        if shard.position_names is not None:
            digest.update(("<positions>" + "|".join(shard.position_names)).encode())
            tensor_digest([shard.position_classes], digest)
    return digest.hexdigest()
