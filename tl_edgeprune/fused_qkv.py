"""Per-head q/k/v from the shared residual stream plus each reader's own correction, without TransformerLens's
split-q/k/v path (which copies the residual once per head and normalises every copy: docs/performance.md).

A head reader's input is ``x_r = resid + part_r`` (``part_r = −Σ_j (1 − z_jr)(y_j − ỹ_j)``, from the mixing).
Each head's input ``resid + part_r`` is formed once (reader-major; centred by the residual's own mean under LayerNorm,
which ignores such a shift), its norm statistics read from it (two reductions), and the norm's
scaling applied after one batched GEMM with ``γ∘W``, in d_head space. Same arithmetic as the model's norm and
projection up to rounding (~1e-6 in float32).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from jaxtyping import Float


@dataclass(frozen=True)
class Norm:
    """A pre-attention norm: "ln" (centred), "rms", or "none"; weight and bias may be None (folded)."""

    kind: Literal["ln", "rms", "none"]
    eps: float = 0.0
    weight: torch.Tensor | None = None
    bias: torch.Tensor | None = None


def mixed_projection(
    part: Float[torch.Tensor, "reader batch pos d_model"],
    resid: Float[torch.Tensor, "batch pos d_model"],
    norm: Norm,
    W: Float[torch.Tensor, "reader d_model d_head"],
    b: Float[torch.Tensor, "reader d_head"],
    scratch: torch.Tensor | None = None,
) -> Float[torch.Tensor, "batch pos reader d_head"]:
    """``norm(resid + part_r)·W_r + b_r`` for every reader r, laid out as TransformerLens's q/k/v.

    The inputs are formed once, reader-major; the norm's statistics come from them (mean and mean square; centred
    by the shared residual's mean first, so the difference loses nothing) and its scaling is applied after the projection, in d_head space, so no normalised copy is ever written."""
    n, batch, pos, d = part.shape
    e = W.shape[-1]
    if norm.kind == "ln":  # LayerNorm ignores a per-position shift: centre the shared residual once, so each
        resid = resid - resid.mean(-1, keepdim=True)  # reader's input has a small mean and E[x²] − E[x]² is safe
    # [reader, batch, pos, d_model], never the parts' storage (lent to later readers). ``scratch``: storage to write it
    # into when nothing keeps it (no gradients): a fresh tensor of this size page-faults on CPU, costing 3x the add.
    x = resid + part if scratch is None else torch.add(part, resid, out=scratch)
    if norm.kind == "none":
        return (torch.bmm(x.view(n, batch * pos, d), W).view(n, batch, pos, e) + b[:, None, None, :]).permute(1, 2, 0, 3)
    Wg = W if norm.weight is None else W * norm.weight[None, :, None]
    const = b if norm.bias is None else b + torch.einsum("d,nde->ne", norm.bias, W)
    proj = torch.bmm(x.view(n, batch * pos, d), Wg).view(n, batch, pos, e)
    # Statistics from two plain reductions (torch's var_mean was 20x slower on CPU: docs/performance.md).
    square_mean = torch.linalg.vector_norm(x, dim=-1).square() / d
    if norm.kind == "ln":
        mean = x.mean(-1)
        var = square_mean - mean.square()
        proj = proj - mean[..., None] * Wg.sum(1)[:, None, None, :]  # (x − mean)·γW
    else:  # rms
        var = square_mean
    out = torch.rsqrt(var + norm.eps)[..., None] * proj + const[:, None, None, :]
    return out.permute(1, 2, 0, 3)
