"""The hot path: writer deltas stored once, each reader group mixed by one matrix product.

Every writer's ``y − ỹ`` is written into one [writer, batch·pos·d_model] buffer as its hook fires; a
reader group (one layer's q/k/v inputs, an MLP input, the final read) then needs a single GEMM over
the prefix of writers upstream of it. Autograd sees this through two Functions: ``write`` returns a
scalar token that links the writer into the graph, and ``mix`` takes the tokens of the rows it reads,
so the autograd engine runs every reader's backward before its writers'. Gradients w.r.t. the deltas
are accumulated in place into one buffer of the same size, instead of one temporary per edge group.
"""

from __future__ import annotations

import weakref
from typing import Sequence

import torch
from torch.autograd import Function


class DeltaBuffer:
    """``y − ỹ`` of every writer in one forward (and, during backward, its gradient)."""

    def __init__(self, n_writers: int, shape: Sequence[int], dtype: torch.dtype, device: torch.device,
                 slot: list | None = None, values: torch.Tensor | None = None):
        self.shape = tuple(shape)  # (batch, pos, d_model)
        self.slot = [None, None, None] if slot is None else slot  # [values, grad, scratch] storage, filled on first use
        if values is None and self.slot[0] is None:
            self.slot[0] = torch.empty((n_writers, *self.shape), dtype=dtype, device=device)
        self.values = self.slot[0] if values is None else values  # given: a single-use ỹ, overwritten in place
        self.grad: torch.Tensor | None = None
        self.grad_rows_filled = 0  # rows [0, filled) of grad hold sums; the rest is uninitialised
        self.written = [False] * n_writers

    @classmethod
    def fixed(cls, values: torch.Tensor) -> "DeltaBuffer":
        """A buffer holding given deltas (e.g. clean − corrupted for EAP-IG), not recomputed in the forward."""
        buffer = cls.__new__(cls)
        buffer.shape = tuple(values.shape[1:])
        buffer.values = values.contiguous()
        buffer.slot = [buffer.values, None, None]
        buffer.grad, buffer.grad_rows_filled = None, 0
        buffer.written = [True] * values.shape[0]
        return buffer

    def rows(self, stop: int) -> torch.Tensor:
        return self.values[:stop].view(stop, -1)

    def scratch(self, n_rows: int) -> torch.Tensor:
        """[n_rows, batch, pos, d_model] working storage for one reader group's gradients, shared by all groups
        (their backwards run one after another) and pooled: fresh pages cost a page fault each on CPU."""
        store = self.slot[2]
        if store is None or store.shape[0] < n_rows:
            store = self.slot[2] = self.values.new_empty((n_rows, *self.shape))
        return store[:n_rows]

    def accumulate_grad(self, stop: int, coef: torch.Tensor, grad_out: torch.Tensor) -> None:
        """grad[:stop] += coef·grad_out, assigning (not adding to zeros) rows no reader has reached yet."""
        if self.grad is None:
            if self.slot[1] is None:
                self.slot[1] = torch.empty_like(self.values)
            self.grad = self.slot[1]
        rows = self.grad[:stop].view(stop, -1)
        filled = self.grad_rows_filled
        if filled < stop:
            if filled:
                rows[:filled].addmm_(coef[:filled], grad_out)
            torch.mm(coef[filled:stop], grad_out, out=rows[filled:stop])
        else:
            rows.addmm_(coef, grad_out)
        self.grad_rows_filled = max(filled, stop)


class BufferPool:
    """Lends the same [writer, batch, pos, d_model] storage (and its gradient twin) to successive masked
    forwards of one shape, once the autograd graph of the previous one is gone. A fresh 300 MB tensor per
    step page-faults on first touch; on CPU that was a large share of the step's time.

    Only for mixing buffers: their tensors are reachable through the DeltaBuffer alone, so a dead weak
    reference to it proves nobody can still read or write them.
    """

    def __init__(self) -> None:
        self._slots: dict[tuple, tuple[list, weakref.ref]] = {}

    def buffer(self, n_writers: int, shape: Sequence[int], dtype: torch.dtype, device: torch.device,
               values: torch.Tensor | None = None) -> DeltaBuffer:
        """``values``: storage to write the deltas into (a single-use ỹ); then only the gradient twin is pooled."""
        key = (n_writers, tuple(shape), dtype, torch.device(device))
        entry = self._slots.get(key)
        slot = entry[0] if entry is not None and entry[1]() is None else [None, None, None]  # in use: fresh storage
        buffer = DeltaBuffer(n_writers, shape, dtype, device, slot=slot, values=values)
        self._slots[key] = (slot, weakref.ref(buffer))
        return buffer

    def clear(self) -> None:
        self._slots.clear()


def _release(ctx) -> DeltaBuffer:
    """Take the buffer out of the autograd node: a model that keeps references to its activations (the bridge
    does) keeps the nodes alive after backward, and the buffer with them, so the pool could never reuse it."""
    buffer, ctx.buffer = ctx.buffer, None
    if buffer is None:
        raise RuntimeError("tl_edgeprune: a masked forward supports one backward pass (retain_graph=True is not "
                           "supported); run the masked forward again")
    return buffer


class _Write(Function):
    @staticmethod
    def forward(ctx, y, counterfactual, buffer: DeltaBuffer, start: int, stop: int):
        target = buffer.values[start:stop]
        if counterfactual is None:
            target.copy_(y)
        else:
            torch.sub(y, counterfactual, out=target)
        ctx.buffer, ctx.start, ctx.stop = buffer, start, stop
        return y.new_zeros(())

    @staticmethod
    def backward(ctx, _token_grad):
        buffer = _release(ctx)
        if buffer.grad is None or buffer.grad_rows_filled < ctx.stop:  # no reader sent gradients here
            return None, None, None, None, None
        return buffer.grad[ctx.start : ctx.stop], None, None, None, None


class _Mix(Function):
    """One GEMM per reader group, forward and backward: the skinny products are memory-bound, so the q, k and
    v readers of a layer share one pass over the delta buffer instead of one pass each."""

    @staticmethod
    def forward(ctx, coef, buffer: DeltaBuffer, n_writers: int, split_sizes: tuple[int, ...], *tokens):
        mixed = coef.t().mm(buffer.rows(n_writers)).view(coef.shape[1], *buffer.shape)
        ctx.save_for_backward(coef)
        ctx.buffer, ctx.n_writers, ctx.split_sizes = buffer, n_writers, split_sizes
        ctx.n_tokens = len(tokens)
        return mixed.split(split_sizes)

    @staticmethod
    def backward(ctx, *part_grads):
        (coef,) = ctx.saved_tensors
        buffer, n = _release(ctx), ctx.n_writers
        # The readers' gradients arrive as (often permuted) views: one strided copy gathers them.
        grad_out = buffer.scratch(coef.shape[1])
        for g, dst in zip(part_grads, grad_out.split(ctx.split_sizes)):
            dst.copy_(g)
        grad_out = grad_out.view(coef.shape[1], -1)
        grad_coef = buffer.rows(n).mm(grad_out.t()) if ctx.needs_input_grad[0] else None
        if any(ctx.needs_input_grad[4:]):
            buffer.accumulate_grad(n, coef, grad_out)
        token_grads = tuple(coef.new_zeros(()) for _ in range(ctx.n_tokens))
        return (grad_coef, None, None, None, *token_grads)


def write(y: torch.Tensor, counterfactual: torch.Tensor | None, buffer: DeltaBuffer, start: int, stop: int):
    """Store ``y − ỹ`` for writers [start, stop); returns the token that carries their gradient."""
    buffer.written[start:stop] = [True] * (stop - start)
    return _Write.apply(y, counterfactual, buffer, start, stop)


def mix(
    coef: torch.Tensor, buffer: DeltaBuffer, n_writers: int, split_sizes: tuple[int, ...], tokens: list[torch.Tensor]
) -> tuple[torch.Tensor, ...]:
    """``Σ_j coef[j, r]·delta_j`` for the first n_writers rows: one [reader, batch, pos, d_model] per split."""
    return _Mix.apply(coef, buffer, n_writers, tuple(split_sizes), *tokens)
