"""The hot path: writer deltas stored once, reader groups mixed by a few matrix products.

Every writer's ``y − ỹ`` is written into one [writer, batch·pos·d_model] buffer as its hook fires. Reader
groups (one layer's q/k/v inputs, an MLP input, the final read) each read a prefix of that buffer, and
consecutive groups read almost the same prefix: a *window* of groups is mixed by one GEMM over its first
group's prefix (run when that group is read) plus, per later group, a small GEMM over the rows written
since. The products are memory-bound, so reading the shared prefix once per window instead of once per
group is what sets their cost. Autograd sees this through two Functions: ``write`` returns a scalar token
that links the writer into the graph, and ``mix`` takes the tokens of the rows it reads, so the autograd
engine runs every reader's backward before its writers'. Gradients w.r.t. the deltas are accumulated in
place into one buffer of the same size.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
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
        self.grad_filled = [False] * n_writers  # rows of grad that hold sums; the others are uninitialised
        self.scratch_owner: int | None = None  # the window whose gathered gradients the scratch holds
        self.written = [False] * n_writers

    @classmethod
    def fixed(cls, values: torch.Tensor) -> "DeltaBuffer":
        """A buffer holding given deltas (e.g. clean − corrupted for EAP-IG), not recomputed in the forward."""
        buffer = cls.__new__(cls)
        buffer.shape = tuple(values.shape[1:])
        buffer.values = values.contiguous()
        buffer.slot = [buffer.values, None, None]
        buffer.grad, buffer.grad_filled, buffer.scratch_owner = None, [False] * values.shape[0], None
        buffer.written = [True] * values.shape[0]
        return buffer

    def rows(self, start: int, stop: int) -> torch.Tensor:
        return self.values[start:stop].view(stop - start, -1)

    def window_scratch(self, window: int, n_rows: int) -> torch.Tensor:
        """[n_rows, batch, pos, d_model] storage where a window gathers its readers' gradients (its groups'
        backwards fill it one by one; the window's first group reads it all). Pooled, since fresh pages cost
        a page fault each on CPU, and lent to one window at a time: another one gets fresh storage."""
        if self.scratch_owner not in (None, window):
            return self.values.new_empty((n_rows, *self.shape))
        self.scratch_owner = window
        store = self.slot[2]
        if store is None or store.shape[0] < n_rows:
            store = self.slot[2] = self.values.new_empty((n_rows, *self.shape))
        return store[:n_rows]

    def release_scratch(self, window: int) -> None:
        if self.scratch_owner == window:
            self.scratch_owner = None

    def accumulate_grad(self, start: int, stop: int, coef: torch.Tensor, grad_out: torch.Tensor) -> None:
        """grad[start:stop] += coef·grad_out, assigning (not adding to zeros) rows no reader has reached yet."""
        if self.grad is None:
            if self.slot[1] is None:
                self.slot[1] = torch.empty_like(self.values)
            self.grad = self.slot[1]
        rows, filled = self.grad[start:stop].view(stop - start, -1), self.grad_filled
        i = start
        while i < stop:  # runs of rows that are all filled or all not (in practice one or two runs)
            j = i + 1
            while j < stop and filled[j] == filled[i]:
                j += 1
            segment, c = rows[i - start : j - start], coef[i - start : j - start]
            if filled[i]:
                segment.addmm_(c, grad_out)
            else:
                torch.mm(c, grad_out, out=segment)
            i = j
        filled[start:stop] = [True] * (stop - start)

    def grad_rows(self, start: int, stop: int) -> torch.Tensor | None:
        """The accumulated gradient of writers [start, stop); None if no reader sent any."""
        filled = self.grad_filled[start:stop]
        if self.grad is None or not any(filled):
            return None
        for i, done in enumerate(filled):
            if not done:
                self.grad[start + i].zero_()
        return self.grad[start:stop]


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


@dataclass(frozen=True)
class Window:
    """Consecutive reader groups mixed off one pass over the first group's prefix of writers."""

    index: int
    groups: tuple[int, ...]  # reader-group indices, in forward order
    prefix: int  # writers [0, prefix) are read by every group of the window
    offsets: tuple[int, ...]  # each group's first row in the window's [reader, ...] gradient scratch
    n_readers: int


def plan_windows(prefixes: Sequence[int], widths: Sequence[int], growth: float = 0.25,
                 max_readers: int = 64) -> tuple[Window, ...]:
    """Group consecutive reader groups while their prefixes grow by at most ``growth`` of the first one's
    (the rows read twice) and the window's readers fit ``max_readers`` (its outputs wait, its gradients are
    gathered together). ``growth=0`` mixes each group on its own."""
    windows: list[Window] = []
    start = 0
    for g in range(1, len(prefixes) + 1):
        if (g < len(prefixes) and prefixes[g] - prefixes[start] <= growth * prefixes[start]
                and sum(widths[start : g + 1]) <= max_readers):
            continue
        offsets = tuple(sum(widths[start:k]) for k in range(start, g))
        windows.append(Window(len(windows), tuple(range(start, g)), prefixes[start], offsets, sum(widths[start:g])))
        start = g
    return tuple(windows)


def _release(ctx) -> DeltaBuffer:
    """Take the buffer out of the autograd node: a model that keeps references to its activations (the bridge
    does) keeps the nodes alive after backward, and the buffer with them, so the pool could never reuse it."""
    buffer, ctx.buffer = ctx.buffer, None
    if buffer is None:
        raise RuntimeError("tl_edgeprune: a masked forward supports one backward pass (retain_graph=True is not "
                           "supported); run the masked forward again")
    return buffer


def _is_view_of(grad: torch.Tensor, dst: torch.Tensor) -> bool:
    return grad.data_ptr() == dst.data_ptr() and grad.shape == dst.shape and grad.stride() == dst.stride()


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
        grad = _release(ctx).grad_rows(ctx.start, ctx.stop)
        return grad, None, None, None, None


class _Mix(Function):
    """``base + coefᵀ·delta[rows]`` for some readers of a window, one GEMM in forward and in each backward
    product; q, k and v (and the later groups of a window) share the pass over the memory-bound buffer."""

    @staticmethod
    def forward(ctx, coef, base, buffer: DeltaBuffer, rows: tuple[int, int], split_sizes: tuple[int, ...],
                place: tuple[Window, int, bool], *tokens):
        n_out = coef.shape[1]
        delta = buffer.rows(*rows)
        if base is None:
            mixed = coef.t().mm(delta)
        else:
            mixed = torch.addmm(base.view(n_out, -1), coef.t(), delta)
        ctx.save_for_backward(coef)
        ctx.buffer, ctx.rows, ctx.split_sizes, ctx.place = buffer, rows, split_sizes, place
        ctx.n_tokens = len(tokens)
        return mixed.view(n_out, *buffer.shape).split(split_sizes)

    @staticmethod
    def backward(ctx, *part_grads):
        (coef,) = ctx.saved_tensors
        buffer, (start, stop) = _release(ctx), ctx.rows
        window, offset, last = ctx.place
        # Gather the readers' gradients (often permuted views) into the window's scratch, where a later group's
        # backward already left its own: they arrive as views of it and are not copied again.
        grad_out = buffer.window_scratch(window.index, window.n_readers)[offset : offset + coef.shape[1]]
        for g, dst in zip(part_grads, grad_out.split(ctx.split_sizes)):
            if g is None:
                dst.zero_()
            elif not _is_view_of(g, dst):
                dst.copy_(g)
        flat = grad_out.view(coef.shape[1], -1)
        grad_coef = buffer.rows(start, stop).mm(flat.t()) if ctx.needs_input_grad[0] else None
        if any(ctx.needs_input_grad[6:]):
            buffer.accumulate_grad(start, stop, coef, flat)
        if last:
            buffer.release_scratch(window.index)
        grad_base = grad_out if ctx.needs_input_grad[1] else None
        token_grads = tuple(coef.new_zeros(()) for _ in range(ctx.n_tokens))
        return (grad_coef, grad_base, None, None, None, None, *token_grads)


def write(y: torch.Tensor, counterfactual: torch.Tensor | None, buffer: DeltaBuffer, start: int, stop: int):
    """Store ``y − ỹ`` for writers [start, stop); returns the token that carries their gradient."""
    buffer.written[start:stop] = [True] * (stop - start)
    return _Write.apply(y, counterfactual, buffer, start, stop)


def mix(coef: torch.Tensor, base: torch.Tensor | None, buffer: DeltaBuffer, rows: tuple[int, int],
        split_sizes: Sequence[int], place: tuple[Window, int, bool], tokens: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """``base + Σ_{j in rows} coef[j, r]·delta_j``, one [reader, batch, pos, d_model] per split.

    ``place``: (window, offset of these readers in it, whether this is the window's shared product — the last
    of its backwards)."""
    return _Mix.apply(coef, base, buffer, tuple(rows), tuple(split_sizes), place, *tokens)
