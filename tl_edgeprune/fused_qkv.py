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
from typing import Callable, Literal

import torch
from jaxtyping import Float
from torch.autograd import Function


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
    grad_into: Callable[[], torch.Tensor] | None = None,
    rebuild: Callable[[], torch.Tensor] | None = None,
) -> Float[torch.Tensor, "batch pos reader d_head"]:
    """``norm(resid + part_r)·W_r + b_r`` for every reader r, laid out as TransformerLens's q/k/v.

    The inputs are formed once, reader-major; the norm's statistics come from them (mean and mean square; centred
    by the shared residual's mean first, so the difference loses nothing) and its scaling is applied after the
    projection, in d_head space, so no normalised copy is ever written. The backward is written out
    (``_NormProject``): one GEMM and two in-place passes over the inputs, where autograd's took five fresh tensors
    and a strided GEMM (docs/performance.md). With weights that need gradients, autograd's own path runs.
    ``grad_into``: gives the [reader, batch, pos, d_model] storage the parts' gradient is to be written to (the
    mixing's gathering block), so backward writes it there instead of into a fresh tensor the mixing copies.
    ``rebuild``: gives ``part`` again, in storage backward may overwrite; the inputs are then not kept for backward
    (formed in ``scratch``) but formed again from it: the largest tensor a step keeps, traded for one add pass and
    the caller's recomputation."""
    n, batch, pos, d = part.shape
    e = W.shape[-1]
    resid = centred_residual(resid, norm)
    Wg, const = _folded(norm, W, b)
    if weights_need_grad(W, b, norm):
        out = _autograd_projection(part, resid, norm, Wg, const)
    else:
        out = _NormProject.apply(part, resid, Wg, const, norm.kind, norm.eps, scratch, grad_into, rebuild)
    return out.view(n, batch, pos, e).permute(1, 2, 0, 3)


def centred_residual(resid: torch.Tensor, norm: Norm) -> torch.Tensor:
    """LayerNorm ignores a per-position shift: the shared residual centred once, so that each reader's input
    (it plus a part) has a small mean and E[x²] − E[x]² is safe. Unchanged under the other norms."""
    return resid - resid.mean(-1, keepdim=True) if norm.kind == "ln" else resid


def _folded(norm: Norm, W: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """γ∘W and b + β·W: the norm's affine part folded into the projection."""
    Wg = W if norm.weight is None else W * norm.weight[None, :, None]
    const = b if norm.bias is None else b + torch.einsum("d,nde->ne", norm.bias, W)
    return Wg, const


def projected_inputs(
    x: Float[torch.Tensor, "reader batch pos d_model"],
    norm: Norm,
    W: Float[torch.Tensor, "reader d_model d_head"],
    b: Float[torch.Tensor, "reader d_head"],
) -> Float[torch.Tensor, "batch pos reader d_head"]:
    """``norm(x_r)·W_r + b_r`` for inputs the caller formed (no gradients): a forward without gradients writes
    each reader's input once (``centred_residual`` plus its part, mixing.SparseMixing.inputs) instead of a part
    that ``mixed_projection`` then adds to the residual."""
    n, batch, pos, d = x.shape
    Wg, const = _folded(norm, W, b)
    out, *_ = _normed_projection(x.view(n, batch * pos, d), Wg, const, norm.kind, norm.eps)
    return out.view(n, batch, pos, -1).permute(1, 2, 0, 3)


def _normed_projection(x, Wg, const, kind: str, eps: float):
    """[reader, batch·pos, d_head] = rstd·(x·γW − mean·Σ_d γW) + const, x [reader, batch·pos, d_model]; also
    the centred projection, rstd and mean (None without a norm), which backward reads."""
    proj = torch.bmm(x, Wg)
    if kind == "none":
        return proj.add_(const[:, None, :]), proj, None, None
    var = torch.linalg.vector_norm(x, dim=-1).square_().div_(x.shape[-1])  # E[x²]
    mean = None
    if kind == "ln":
        mean = x.mean(-1)
        var.sub_(mean.square())
        proj.sub_(mean[..., None] * Wg.sum(1)[:, None, :])  # (x − mean)·γW
    rstd = torch.rsqrt(var.add_(eps))
    return torch.addcmul(const[:, None, :], rstd[..., None], proj), proj, rstd, mean


def weights_need_grad(W: torch.Tensor, b: torch.Tensor | None, norm: Norm) -> bool:
    """Whether this forward must give the projection's or the norm's weights gradients: the written-out backwards
    (``_NormProject``, ``_SharedInput``) give none, so autograd's own path runs then."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (W, b, norm.weight, norm.bias))


def _autograd_projection(part, resid, norm: Norm, Wg, const) -> torch.Tensor:
    """The same arithmetic as ``_NormProject`` through autograd (for weights that take gradients)."""
    n, batch, pos, d = part.shape
    x = (resid + part).view(n, batch * pos, d)
    proj = torch.bmm(x, Wg)
    if norm.kind == "none":
        return proj + const[:, None, :]
    square_mean = torch.linalg.vector_norm(x, dim=-1).square() / d
    var = square_mean
    if norm.kind == "ln":
        mean = x.mean(-1)
        var = square_mean - mean.square()
        proj = proj - mean[..., None] * Wg.sum(1)[:, None, :]
    return torch.rsqrt(var + norm.eps)[..., None] * proj + const[:, None, :]


class _NormProject(Function):
    """[reader, batch·pos, d_head] = rstd·(x·γW − mean·Σ_d γW) + const, x = resid + part_r (rstd, mean per row)."""

    @staticmethod
    def forward(ctx, part, resid, Wg, const, kind: str, eps: float, scratch, grad_into, rebuild):
        n, batch, pos, d = part.shape
        ctx.grad_into = grad_into
        rebuild = rebuild if any(ctx.needs_input_grad[:2]) and kind != "none" else None  # else x is never re-read
        ctx.rebuild = rebuild
        # never the parts' storage (lent to later readers); ``scratch`` when nothing keeps x (no gradients, or
        # backward rebuilds it): a fresh tensor of this size page-faults on CPU, costing 3x the add
        keeps_x = any(ctx.needs_input_grad[:2]) and rebuild is None
        x = torch.add(part, resid, out=scratch) if scratch is not None and not keeps_x else part + resid
        x = x.view(n, batch * pos, d)
        ctx.kind, ctx.shapes = kind, (part.shape, resid.shape)
        out, proj, rstd, mean = _normed_projection(x, Wg, const, kind, eps)
        if kind == "none":
            ctx.save_for_backward(Wg)
        else:
            ctx.save_for_backward(Wg, x if rebuild is None else None, proj, rstd, mean, resid if rebuild else None)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        part_shape, resid_shape = ctx.shapes
        go = grad_out.contiguous()  # the q/k/v layout's permuted view: a strided GEMM below was ~4x slower
        out = _destination(ctx, part_shape)
        if ctx.kind == "none":
            (Wg,) = ctx.saved_tensors
            grad_x = torch.bmm(go, Wg.transpose(1, 2), out=out)
        else:
            Wg, x, centred, rstd, mean, resid = ctx.saved_tensors
            if x is None:  # the inputs again: the part rebuilt (storage lent to this backward) plus the residual
                rebuild, ctx.rebuild = ctx.rebuild, None
                n, batch, pos, d = part_shape
                x = rebuild().reshape(n, batch * pos, d).add_(resid.reshape(1, batch * pos, d))
            d = x.shape[-1]
            g_proj = go * rstd[..., None]
            g_var = (go * centred).sum(-1).mul_(rstd.pow(3)).mul_(-0.5)  # ∂/∂var through rstd
            grad_x = torch.bmm(g_proj, Wg.transpose(1, 2), out=out)
            grad_x.addcmul_(x, (g_var * (2.0 / d))[..., None])  # var's E[x²] part
            if ctx.kind == "ln":  # the mean's part, through the centring and through var
                g_mean = (g_proj * Wg.sum(1)[:, None, :]).sum(-1).add_(2 * mean * g_var).neg_()
                grad_x.add_((g_mean / d)[..., None])
        grad_part = grad_x.view(part_shape) if ctx.needs_input_grad[0] else None
        grad_resid = grad_x.sum(0).view(resid_shape) if ctx.needs_input_grad[1] else None
        return grad_part, grad_resid, None, None, None, None, None, None, None


def _destination(ctx, part_shape) -> torch.Tensor | None:
    """[reader, batch·pos, d_model] storage for the parts' gradient, from ``grad_into`` (once: the node may outlive
    backward, and must not keep the mixing's buffer alive)."""
    grad_into, ctx.grad_into = ctx.grad_into, None
    if grad_into is None or not ctx.needs_input_grad[0]:
        return None
    n, batch, pos, d = part_shape
    return grad_into().view(n, batch * pos, d)


def unmixed_projection_gradient(
    activation: Float[torch.Tensor, "batch pos reader d_head"],
    part: Float[torch.Tensor, "reader batch pos d_model"],
    resid: Float[torch.Tensor, "batch pos d_model"],
    norm: Norm,
    W: Float[torch.Tensor, "reader d_model d_head"],
    b: Float[torch.Tensor, "reader d_head"],
    grad_into: Callable[[], torch.Tensor] | None = None,
) -> Float[torch.Tensor, "batch pos reader d_head"]:
    """The model's own q/k/v (``activation``, detached), with the gradient to ``part`` and ``resid`` of
    ``mixed_projection`` at part = 0: every mask 1 (EAP's gradient at z = 1), where each reader's input is the
    shared residual itself. The residual's gradient through q/k/v is the sum of the readers' (which backward has
    anyway), so TL's own q/k/v backward does not run as well.

    Nothing per reader is computed forward (the value is the model's own q/k/v, which is also the projection the
    norm's backward reads), and backward needs one GEMM per reader and the norm's statistics of the one shared
    input, not of a copy per reader (``_SharedInput``)."""
    n, batch, pos, d = part.shape
    Wg, const = _folded(norm, W, b)
    out = _SharedInput.apply(part, resid.reshape(batch * pos, d), Wg.detach(), const.detach(), activation.detach(),
                             norm.kind, norm.eps, grad_into)
    return activation.detach() + out.view(n, batch, pos, -1).permute(1, 2, 0, 3)


class _SharedInput(Function):
    """Backward of rstd·((x − mean)·γW_r) + const_r at x_r = x for every reader r, x shared, written in d_head space
    where it can be: ∂/∂x_r = g_r·(rstd·γW̄_r)ᵀ + (x − mean)·c_r, with γW̄_r = γW_r less its mean over d_model
    (LayerNorm's mean; γW_r itself under RMSNorm) and c_r = −rstd²·(g_r·(q_r − const_r))/d, q_r the model's own
    projection (= rstd·(x − mean)·γW_r + const_r). The d_model-sized gradient is written once, by the GEMM, and read
    once more (its x term): a row dot of it with x wrote a fresh tensor of its size, which page-faults on CPU."""

    @staticmethod
    def forward(ctx, part, x, Wg, const, activation, kind: str, eps: float, grad_into):
        n, batch, pos, d = part.shape
        ctx.kind, ctx.part_shape, ctx.grad_into = kind, part.shape, grad_into
        if kind == "none":
            ctx.save_for_backward(Wg)
        else:
            if kind == "ln":  # (x − mean) once: the statistics and the backward's x term read it
                x = x - x.mean(-1, keepdim=True)
            rstd = torch.rsqrt(torch.linalg.vector_norm(x, dim=-1).square_().div_(d).add_(eps))
            ctx.save_for_backward(Wg, x, rstd, const, activation)
        return part.new_zeros((n, batch * pos, Wg.shape[-1]))

    @staticmethod
    def backward(ctx, grad_out):
        Wg, *saved = ctx.saved_tensors
        g = grad_out.contiguous()
        dest = _destination(ctx, ctx.part_shape)
        if ctx.kind == "none":
            u = torch.bmm(g, Wg.transpose(1, 2), out=dest)
        else:
            x, rstd, const, activation = saved
            n, d, e = Wg.shape
            centred = activation.permute(2, 0, 1, 3).reshape(n, -1, e) - const[:, None, :]  # rstd·(x − mean)·γW_r
            coef = torch.linalg.vecdot(g, centred).mul_(rstd.square()).div_(-d)  # [reader, batch·pos]
            Wc = Wg - Wg.mean(1, keepdim=True) if ctx.kind == "ln" else Wg
            u = torch.bmm(g * rstd[..., None], Wc.transpose(1, 2), out=dest)
            u.addcmul_(x.expand_as(u), coef[..., None])
        grad_x = u.sum(0) if ctx.needs_input_grad[1] else None
        return u.view(ctx.part_shape), grad_x, None, None, None, None, None, None
