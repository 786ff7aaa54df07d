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

Positional graphs (a coefficient per position class) keep the same GEMMs: the buffer stores positions sorted by
class (``PositionLayout``), so each class is a contiguous run of columns, mixed with its own coefficients; the
reader hooks put the mixed inputs back in the model's order.
"""

from __future__ import annotations

import warnings
import weakref
from dataclasses import dataclass
from typing import Sequence

import torch
from jaxtyping import Bool, Float
from torch.autograd import Function


@dataclass(frozen=True)
class PositionLayout:
    """The flattened (batch, pos) axis sorted by position class: the buffer's row ``i`` holds position
    ``order[i]``; ``inverse`` maps back. Class c occupies sorted positions ``segments[c]``."""

    order: torch.Tensor  # [batch·pos] long
    inverse: torch.Tensor  # [batch·pos] long
    segments: tuple[tuple[int, int], ...]

    @classmethod
    def from_classes(cls, classes: torch.Tensor, n_classes: int) -> "PositionLayout":
        flat = classes.reshape(-1)
        order = torch.sort(flat, stable=True).indices
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(len(order), device=order.device)
        counts = torch.bincount(flat, minlength=n_classes).tolist()  # one host sync per masked forward
        ends = [sum(counts[: c + 1]) for c in range(n_classes)]
        return cls(order, inverse, tuple(zip([0, *ends[:-1]], ends)))

    def to_sorted(self, x: torch.Tensor) -> torch.Tensor:
        """[n, batch, pos, d] in the model's order -> the same in class order."""
        n, b, p, d = x.shape
        return x.reshape(n, b * p, d).index_select(1, self.order).view(n, b, p, d)

    def to_model(self, x: torch.Tensor) -> torch.Tensor:
        """The inverse of ``to_sorted``."""
        n, b, p, d = x.shape
        return x.reshape(n, b * p, d).index_select(1, self.inverse).view(n, b, p, d)


class DeltaBuffer:
    """``y − ỹ`` of every writer in one forward (and, during backward, its gradient), plus the working storage
    of the mixing windows: their products in the forward, their readers' gathered gradients in backward."""

    def __init__(self, n_writers: int, shape: Sequence[int], dtype: torch.dtype, device: torch.device,
                 slot: list | None = None, values: torch.Tensor | None = None):
        self.shape = tuple(shape)  # (batch, pos, d_model)
        # [values, grad, gradient scratch, forward products] storage, filled on first use, pooled across steps
        self.slot = [None, None, None, None] if slot is None else slot
        if values is None and self.slot[0] is None:
            self.slot[0] = torch.empty((n_writers, *self.shape), dtype=dtype, device=device)
        self.values = self.slot[0] if values is None else values  # given: a single-use ỹ, overwritten in place
        self.grad: torch.Tensor | None = None
        self.grad_filled = [False] * n_writers  # rows of grad that hold sums; the others are uninitialised
        self.owed: dict[int, list[torch.Tensor]] = {}  # row -> −Σ of readers' gradients a sparse backward owes it
        self.written = [False] * n_writers
        self._lent: dict[tuple[int, int], torch.Tensor] = {}  # (slot, window) -> storage that window is using
        # Every coefficient is exactly 0 (all masks 1: EAP's gradient at z = 1): the products are 0 and the deltas
        # get no gradient, so only the mask gradient's GEMM runs (the others would read the buffer for zeros).
        self.coef_zero = False
        self.scratch_filled: dict[int, set[int]] = {}  # window -> offsets whose gradients are gathered
        self.layout: PositionLayout | None = None  # positional graphs: positions stored sorted by class
        # Products (and, with gradients, the deltas' gradient) may skip the coefficients left at 0, or start from the
        # sum of every delta and add back the coefficients not at −1 (SparseMixing).
        self.sparse: SparseMixing | None = None

    def column_segments(self) -> list[tuple[int, int, int]]:
        """(class, first, last) columns of each non-empty class in the [row, batch·pos·d_model] view."""
        if self.layout is None:
            return [(0, 0, self.values[0].numel())]
        d = self.shape[-1]
        return [(c, a * d, b * d) for c, (a, b) in enumerate(self.layout.segments) if b > a]

    @classmethod
    def fixed(cls, values: torch.Tensor, layout: PositionLayout | None = None) -> "DeltaBuffer":
        """A buffer holding given deltas (e.g. clean − corrupted for EAP-IG), not recomputed in the forward."""
        values = values.contiguous() if layout is None else layout.to_sorted(values)
        buffer = cls(values.shape[0], values.shape[1:], values.dtype, values.device,
                     slot=[values, None, None, None])
        buffer.written = [True] * values.shape[0]
        buffer.layout = layout
        return buffer

    def rows(self, start: int, stop: int) -> torch.Tensor:
        return self.values[start:stop].view(stop - start, -1)

    def _borrow(self, slot: int, window, n_rows: int) -> torch.Tensor:
        """[n_rows, batch, pos, d_model] for one window until it gives it back: the pooled storage if no other
        window holds it (fresh pages cost a page fault each on CPU), else fresh storage."""
        key = (slot, window)
        if key in self._lent:
            return self._lent[key]
        store = self.slot[slot]
        if any(s == slot for s, _ in self._lent):
            store = self.values.new_empty((n_rows, *self.shape))
        elif store is None or store.shape[0] < n_rows:
            store = self.slot[slot] = self.values.new_empty((n_rows, *self.shape))
        self._lent[key] = store = store[:n_rows]
        return store

    def _give_back(self, slot: int, window) -> None:
        self._lent.pop((slot, window), None)

    def window_products(self, window: int, n_rows: int) -> torch.Tensor:
        """Where a window's mixed reader inputs are computed; given back once its readers have all read them."""
        return self._borrow(3, window, n_rows)

    def products_read(self, window) -> None:
        self._give_back(3, window)

    def products(self, coef: torch.Tensor, start: int, stop: int, out: torch.Tensor, accumulate: bool) -> None:
        """out (+)= coef[c]ᵀ·delta[start:stop] over each class c's columns: the plain GEMMs of the mixing
        (``coef``: [class, stop − start, reader]; ``out``: [reader, batch·pos·d_model])."""
        rows = self.rows(start, stop)
        for c, a, b in self.column_segments():
            if accumulate:
                out[:, a:b].addmm_(coef[c].t(), rows[:, a:b])
            else:
                torch.mm(coef[c].t(), rows[:, a:b], out=out[:, a:b])

    def mixed(self, coef: torch.Tensor, start: int, stop: int, out: torch.Tensor, accumulate: bool):
        """``products``, or SparseMixing's sparse forms where the coefficients allow: returns the sparse plan taken
        (None: the GEMMs), which the backward follows for the deltas' gradient. The same coefficients always take
        the same form, so a product computed again (recompute_inputs) has the same bits."""
        if self.sparse is not None:
            plan = self.sparse.product(coef[0], self, start, stop, out, accumulate)
            if plan is not None:
                return plan
        self.products(coef, start, stop, out, accumulate)
        return None

    def recomputed_window(self, key, n_rows: int) -> torch.Tensor:
        """[n_rows, batch, pos, d_model] in the products storage, for a window's products computed again in backward
        (the forward's windows have all given it back), under ``key`` until ``products_read(key)``."""
        return self._borrow(3, key, n_rows)

    def window_scratch(self, window: int, n_rows: int) -> torch.Tensor:
        """Where a window gathers its readers' gradients: its groups' backwards fill it one by one, the window's
        shared product (whose backward runs last) reads it all and gives it back."""
        return self._borrow(2, window, n_rows)

    def scratch_read(self, window: int) -> None:
        self._give_back(2, window)
        self.scratch_filled.pop(window, None)

    def gathered_rows(self, rows: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """``rows[index]`` in the forward products' pooled storage (free in backward unless inputs are rebuilt,
        then fresh): fresh storage of this size page-faults every step on CPU. Give it back with
        ``gathered_read``; ask for at most a window's readers' rows at a time (the storage is that size)."""
        store = self._borrow(3, "gathered", len(index)).view(len(index), -1)
        return torch.index_select(rows, 0, index, out=store)

    def gathered_read(self) -> None:
        self._give_back(3, "gathered")

    def _grad_storage(self) -> torch.Tensor:
        if self.grad is None:
            if self.slot[1] is None:
                self.slot[1] = torch.empty_like(self.values)
            self.grad = self.slot[1]
        return self.grad

    def accumulate_grad(self, start: int, stop: int, coef: torch.Tensor, grad_out: torch.Tensor,
                        plan: tuple[bool, torch.Tensor | None] | None = None) -> None:
        """grad[start:stop] += coef[c]·grad_out over each class c's columns, assigning (not adding to zeros) rows no
        reader has reached yet. ``coef``: [class, stop − start, readers]; ``plan``: the sparse form the forward's
        product took (``mixed``), which this product then takes too."""
        if plan is not None:
            self.accumulate_planned(start, stop, plan, grad_out)
            return
        rows, filled = self._grad_storage()[start:stop].view(stop - start, -1), self.grad_filled
        i = start
        while i < stop:  # runs of rows that are all filled or all not (in practice one or two runs)
            j = i + 1
            while j < stop and filled[j] == filled[i]:
                j += 1
            segment = rows[i - start : j - start]
            for cls, a, b in self.column_segments():
                c = coef[cls, i - start : j - start]
                if filled[i]:
                    segment[:, a:b].addmm_(c, grad_out[:, a:b])
                else:
                    torch.mm(c, grad_out[:, a:b], out=segment[:, a:b])
            i = j
        filled[start:stop] = [True] * (stop - start)

    def accumulate_planned(self, start: int, stop: int, plan: tuple[bool, torch.Tensor | None],
                           grad_out: Float[torch.Tensor, "reader n"]) -> None:
        """grad[start:stop] += coef·grad_out in the sparse form the forward took (``SparseMixing.plan``): one axpy
        per nonzero coefficient, and, where the plan starts from −Σ rows (most coefficients −1), −Σ_r grad_out[r]
        owed to every row and paid when its writer takes its gradient (``grad_rows``), instead of a GEMM."""
        use_complement, coef = plan
        grad, filled = self._grad_storage(), self.grad_filled
        if coef is not None:
            touched = coef.any(1).nonzero().flatten().tolist()  # rows with a nonzero coefficient
            for i in touched:
                if not filled[start + i]:
                    grad[start + i].zero_()
                    filled[start + i] = True
            _add_sparse(grad[start:stop].view(stop - start, -1), coef.t(), grad_out)
        if use_complement:
            owed = grad_out.sum(0).neg_()
            for i in range(start, stop):
                self.owed.setdefault(i, []).append(owed)

    def grad_rows(self, start: int, stop: int) -> torch.Tensor | None:
        """The accumulated gradient of writers [start, stop), what the sparse backwards owe them included; None if
        no reader sent any."""
        owed = [self.owed.pop(i, []) for i in range(start, stop)]
        filled = self.grad_filled[start:stop]
        if self.grad is None or not (any(filled) or any(owed)):
            return None
        rows = self.grad[start:stop].view(stop - start, -1)
        i = 0
        while i < stop - start:  # runs of rows owed the same sums (in practice a writer chunk is one run)
            key = [id(t) for t in owed[i]]
            j = i + 1
            while j < stop - start and [id(t) for t in owed[j]] == key and filled[j] == filled[i]:
                j += 1
            if owed[i]:
                total = owed[i][0] if len(owed[i]) == 1 else torch.stack(owed[i]).sum(0)
                if filled[i]:
                    rows[i:j].add_(total)
                else:
                    rows[i:j].copy_(total.expand(j - i, -1))
            elif not filled[i]:
                rows[i:j].zero_()
            i = j
        return self.grad[start:stop]


class SparseMixing:
    """Products ``coefᵀ·rows`` that skip work where a forward's coefficients allow (ordinary graph).

    Binary masks far from all-ones or all-zeros are the rule in ACDC and in circuit evaluation, and most of Edge
    Pruning's samples are clamped at 0 or 1: coefficients are 0 (kept edge) or −1 (removed). Where few coefficients
    are nonzero, the product is a sparse one (one row·axpy per removed edge); where few are not −1, it starts from
    −Σ of the rows (prefix sums, formed when first asked for) and adds the kept edges sparsely. Dense masks take the
    plain GEMM (sparse_below: 8 %, where a CSR product of the GPT-2 shape's windows stopped winning on this CPU).
    Exact up to float rounding (sums ordered differently)."""

    def __init__(self, values: torch.Tensor, sparse_below: float = 0.08):
        self.values = values  # the deltas, [writer, ...]: rows are summed once the readers that ask have them all
        self.prefix_sums = {0: values.new_zeros(values[0].numel())}  # rows summed -> Σ of those rows
        self.sparse_below = sparse_below  # density of the coefficients under which the sparse product is cheaper

    def prefix_sum(self, stop: int) -> torch.Tensor:
        """Σ of rows [0, stop), from the nearest sum below it (every row before ``stop`` must be written)."""
        if stop not in self.prefix_sums:
            below = max(k for k in self.prefix_sums if k < stop)
            rows = self.values[below:stop].reshape(stop - below, -1)
            self.prefix_sums[stop] = self.prefix_sums[below] + rows.sum(0)
        return self.prefix_sums[stop]

    def plan(self, coef: torch.Tensor, start: int, stop: int) -> tuple[bool, torch.Tensor | None] | None:
        """(whether to start from −Σ rows, the sparse coefficients to add, None if none) where the sparse product
        is cheaper than the plain GEMM, else None. ``coef``: [stop − start, reader]."""
        shifted = coef + 1
        n_zero_off = int(torch.count_nonzero(coef))
        n_minus_one_off = int(torch.count_nonzero(shifted))
        use_complement = n_minus_one_off < n_zero_off
        nnz = n_minus_one_off if use_complement else n_zero_off
        if nnz > self.sparse_below * coef.numel():
            return None
        return use_complement, ((shifted if use_complement else coef) if nnz else None)

    def product(self, coef: torch.Tensor, buffer: "DeltaBuffer", start: int, stop: int, out: torch.Tensor,
                accumulate: bool) -> tuple[bool, torch.Tensor | None] | None:
        """out (+)= coefᵀ·delta[start:stop] (coef [stop − start, reader], out [reader, batch·pos·d_model]) if the
        coefficients are sparse enough, returning the plan taken; None (nothing done) where the caller's plain GEMM
        is cheaper."""
        plan = self.plan(coef, start, stop)
        if plan is None:
            return None
        use_complement, sparse = plan
        if use_complement:  # −Σ rows, plus (coef + 1)·rows on the (writer, reader) pairs not removed
            row_sum = self.prefix_sum(stop) - self.prefix_sum(start)
            if accumulate:
                out.sub_(row_sum)
            else:
                torch.neg(row_sum.expand_as(out), out=out)
        elif not accumulate:
            out.zero_()
        _add_sparse(out, sparse, buffer.rows(start, stop))
        return plan

    def inputs(self, plan: tuple[bool, torch.Tensor | None], buffer: "DeltaBuffer", stop: int, base: torch.Tensor,
               out: torch.Tensor) -> None:
        """out = base + coefᵀ·delta[:stop] for readers that read the residual ``base`` ([batch·pos·d_model]), by the
        ``plan(coef, 0, stop)`` the caller made: each reader's input written once (from base, or from base − Σ rows)
        and added to sparsely, instead of a product that the reader then adds to base."""
        use_complement, sparse = plan
        start_from = base - self.prefix_sum(stop) if use_complement else base
        out.copy_(start_from.expand_as(out))
        _add_sparse(out, sparse, buffer.rows(0, stop))


def _add_sparse(out: torch.Tensor, coef: torch.Tensor | None, rows: torch.Tensor) -> None:
    """out += coefᵀ·rows, one row·axpy per nonzero coefficient (a CSR product); nothing for None."""
    if coef is None:
        return
    with warnings.catch_warnings():  # "sparse CSR support is in beta": the product itself is plain
        warnings.simplefilter("ignore", UserWarning)
        torch.addmm(out, coef.t().to_sparse_csr(), rows, out=out)


class BufferPool:
    """Lends the same [writer, batch, pos, d_model] storage (and its gradient twin) to successive masked
    forwards of one shape, once the autograd graph of the previous one is gone. A fresh 300 MB tensor per
    step page-faults on first touch; on CPU that was a large share of the step's time.

    Only for mixing buffers: their tensors are reachable through the DeltaBuffer alone, so a dead weak
    reference to it proves nobody can still read or write them.
    """

    def __init__(self) -> None:
        self._slots: dict[tuple, tuple[list, weakref.ref]] = {}
        self._scratch: dict[tuple, torch.Tensor] = {}

    def scratch(self, shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """Storage for a temporary that nothing keeps after the call using it (a no-gradient forward's reader
        inputs): the same tensor every time for one shape, so it is not page-faulted in again."""
        key = (tuple(shape), dtype, torch.device(device))
        if key not in self._scratch:
            self._scratch[key] = torch.empty(tuple(shape), dtype=dtype, device=device)
        return self._scratch[key]

    def buffer(self, n_writers: int, shape: Sequence[int], dtype: torch.dtype, device: torch.device,
               values: torch.Tensor | None = None) -> DeltaBuffer:
        """``values``: storage to write the deltas into (a single-use ỹ); then only the gradient twin is pooled."""
        key = (n_writers, tuple(shape), dtype, torch.device(device))
        entry = self._slots.get(key)
        slot = entry[0] if entry is not None and entry[1]() is None else [None, None, None, None]  # in use: fresh storage
        buffer = DeltaBuffer(n_writers, shape, dtype, device, slot=slot, values=values)
        self._slots[key] = (slot, weakref.ref(buffer))
        return buffer

    def clear(self) -> None:
        self._slots.clear()
        self._scratch.clear()


@dataclass(frozen=True)
class Window:
    """Consecutive reader groups mixed off one pass over the first group's prefix of writers."""

    index: int
    groups: tuple[int, ...]  # reader-group indices, in forward order
    prefix: int  # writers [0, prefix) are read by every group of the window
    offsets: tuple[int, ...]  # each group's first row in the window's [reader, ...] gradient scratch
    n_readers: int


def plan_windows(prefixes: Sequence[int], widths: Sequence[int], growth: float = 0.25,
                 max_readers: int | None = None) -> tuple[Window, ...]:
    """Group consecutive reader groups while their prefixes grow by at most ``growth`` of the first one's
    (the rows read twice) and the window's readers fit ``max_readers`` (its products wait in one storage, its
    gradients are gathered together; default: 64, or the widest group and one more). ``growth=0`` mixes
    each group on its own."""
    if max_readers is None:
        max_readers = max(64, max(widths) + 1)
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


def _gather(part_grads: Sequence[torch.Tensor | None], into: torch.Tensor, split_sizes: Sequence[int]) -> None:
    """Copy the readers' gradients (often permuted views) into one contiguous [reader, ...] block; a gradient that a
    reader's backward already wrote there (fused_qkv's ``grad_into``) stays where it is."""
    for g, dst in zip(part_grads, into.split(tuple(split_sizes))):
        if g is None:
            dst.zero_()
        elif not (g.data_ptr() == dst.data_ptr() and g.shape == dst.shape and g.stride() == dst.stride()):
            dst.copy_(g)


class _Write(Function):
    @staticmethod
    def forward(ctx, y, counterfactual, buffer: DeltaBuffer, start: int, stop: int):
        target = buffer.values[start:stop]
        if buffer.layout is not None:  # positions sorted by class: y − ỹ first, then gathered into place
            delta = y.expand(target.shape) if counterfactual is None else torch.sub(y.expand(target.shape), counterfactual)
            n, b, p, d = target.shape
            torch.index_select(delta.reshape(n, b * p, d), 1, buffer.layout.order, out=target.view(n, b * p, d))
        elif counterfactual is None:
            target.copy_(y)
        else:  # y may lack the batch (a [1, pos, d_model] positional embedding): expand it, never resize target
            torch.sub(y.expand(target.shape), counterfactual, out=target)
        ctx.buffer, ctx.start, ctx.stop = buffer, start, stop
        return y.new_zeros(())

    @staticmethod
    def backward(ctx, _token_grad):
        buffer = _release(ctx)
        grad = buffer.grad_rows(ctx.start, ctx.stop)
        if grad is not None and buffer.layout is not None:
            grad = buffer.layout.to_model(grad)
        return grad, None, None, None, None


class _MixWindow(Function):
    """The window's shared product ``coefᵀ·delta[:prefix]`` for all its readers, in one GEMM (and one GEMM per
    backward product): returns the parts of the groups that read only the prefix, and a token that the
    window's later groups take, so this backward runs after theirs and finds their gradients gathered."""

    @staticmethod
    def forward(ctx, coef, buffer: DeltaBuffer, window: Window, split_sizes: tuple[int, ...], support, *tokens):
        products = buffer.window_products(window.index, window.n_readers)
        ctx.plan = None
        if buffer.coef_zero:
            products.zero_()
        else:
            ctx.plan = buffer.mixed(coef, 0, window.prefix, products.view(window.n_readers, -1), accumulate=False)
        ctx.save_for_backward(coef)
        ctx.buffer, ctx.window, ctx.split_sizes, ctx.n_tokens = buffer, window, split_sizes, len(tokens)
        ctx.support = support
        own = sum(split_sizes)
        return (*products[:own].split(split_sizes), coef.new_zeros(()))

    @staticmethod
    def backward(ctx, *grads):
        (coef,) = ctx.saved_tensors
        buffer, window = _release(ctx), ctx.window
        grad_out = buffer.window_scratch(window.index, window.n_readers)
        own = sum(ctx.split_sizes)
        _gather(grads[:-1], grad_out[:own], ctx.split_sizes)
        filled = buffer.scratch_filled.get(window.index, set())
        for offset, end in zip(window.offsets, (*window.offsets[1:], window.n_readers)):
            if offset >= own and offset not in filled:  # a later group whose readers sent no gradient
                grad_out[offset:end].zero_()
        flat = grad_out.view(window.n_readers, -1)
        grad_coef = None
        if ctx.needs_input_grad[0]:
            grad_coef = _coef_grad(buffer, buffer.rows(0, window.prefix), flat, coef, ctx.support)
        if any(ctx.needs_input_grad[5:]) and not buffer.coef_zero:
            buffer.accumulate_grad(0, window.prefix, coef, flat, ctx.plan)
        buffer.scratch_read(window.index)
        return (grad_coef, None, None, None, None, *(coef.new_zeros(()) for _ in range(ctx.n_tokens)))


class _MixRest(Function):
    """A later group of a window: its rows of the shared product, plus ``coefᵀ·delta[prefix:stop]`` for the
    writers since the window began, added in place."""

    @staticmethod
    def forward(ctx, coef, window_token, buffer: DeltaBuffer, window: Window, offset: int, stop: int,
                split_sizes: tuple[int, ...], support, *tokens):
        n_out = coef.shape[-1]
        products = buffer.window_products(window.index, window.n_readers)[offset : offset + n_out]
        ctx.plan = None
        if stop > window.prefix and not buffer.coef_zero:
            ctx.plan = buffer.mixed(coef, window.prefix, stop, products.view(n_out, -1), accumulate=True)
        ctx.save_for_backward(coef)
        ctx.buffer, ctx.window, ctx.offset, ctx.stop = buffer, window, offset, stop
        ctx.split_sizes, ctx.n_tokens, ctx.support = split_sizes, len(tokens), support
        return products.split(split_sizes)

    @staticmethod
    def backward(ctx, *part_grads):
        (coef,) = ctx.saved_tensors
        buffer, window, n_out = _release(ctx), ctx.window, coef.shape[-1]
        grad_out = buffer.window_scratch(window.index, window.n_readers)[ctx.offset : ctx.offset + n_out]
        _gather(part_grads, grad_out, ctx.split_sizes)
        buffer.scratch_filled.setdefault(window.index, set()).add(ctx.offset)
        flat = grad_out.view(n_out, -1)
        grad_coef = None
        if ctx.needs_input_grad[0]:
            grad_coef = _coef_grad(buffer, buffer.rows(window.prefix, ctx.stop), flat, coef, ctx.support)
        if any(ctx.needs_input_grad[8:]) and not buffer.coef_zero and ctx.stop > window.prefix:
            buffer.accumulate_grad(window.prefix, ctx.stop, coef, flat, ctx.plan)
        window_token_grad = coef.new_zeros(()) if ctx.needs_input_grad[1] else None
        return (grad_coef, window_token_grad, None, None, None, None, None, None,
                *(coef.new_zeros(()) for _ in range(ctx.n_tokens)))


def _coef_grad(buffer: DeltaBuffer, rows: torch.Tensor, flat: torch.Tensor, coef: torch.Tensor,
               support: torch.Tensor | None = None) -> torch.Tensor:
    """∂/∂coef[c] = delta[:, class c's columns] · grad_out[:, the same]ᵀ, per class (0 for a class absent here);
    with ``support`` ([writer, reader], one class), only where it holds (0 elsewhere)."""
    segments = buffer.column_segments()
    if len(segments) == 1 and coef.shape[0] == 1:
        if support is not None:
            return _supported_row_dots(buffer, rows, flat, support).unsqueeze(0)
        return _row_dots(rows, flat).unsqueeze(0)
    grad = coef.new_zeros(coef.shape)
    for c, a, b in segments:
        grad[c] = _row_dots(rows[:, a:b], flat[:, a:b])
    return grad


def _row_dots(rows: Float[torch.Tensor, "writer n"], flat: Float[torch.Tensor, "reader n"]) -> torch.Tensor:
    """rows·flatᵀ, [writer, reader], n ≫ both. On CPU, with more writers than readers, MKL's kernel for the
    transposed product (flat·rowsᵀ) is 10–25 % faster on the mixing's shapes (docs/performance.md)."""
    if rows.device.type == "cpu" and rows.shape[0] > flat.shape[0]:
        return flat.mm(rows.t()).t()
    return rows.mm(flat.t())


GATHERED_ROWS = 64  # writers gathered at a time (plan_windows' default window holds 64 readers' products)
GATHER_BELOW = 0.5  # gather the writers holding a support entry when they are at most this share of the rows


def _supported_row_dots(buffer: DeltaBuffer, rows: Float[torch.Tensor, "writer n"],
                        flat: Float[torch.Tensor, "reader n"], support: Bool[torch.Tensor, "writer reader"]) -> torch.Tensor:
    """rows·flatᵀ where ``support`` holds, 0 elsewhere. In a real run most samples are clamped and those that are
    not sit on few writers (docs/performance.md): one GEMM over the span of readers holding an entry and the
    writers holding one, gathered when that at least halves the rows (a gathered GEMM costs more per dot than the
    full one, and a row's copy 10–17 dots: benchmarks/gather_cost.py breaks even at 54–76 % of the rows kept)."""
    out = rows.new_zeros((rows.shape[0], flat.shape[0]))
    readers = support.any(0).nonzero().flatten()
    if readers.numel() == 0:
        return out
    r0, r1 = int(readers[0]), int(readers[-1]) + 1
    writers = support[:, r0:r1].any(1).nonzero().flatten()
    if writers.numel() <= GATHER_BELOW * rows.shape[0]:
        for chunk in writers.split(GATHERED_ROWS):  # the pooled storage's size: no more memory than the forward's
            out[chunk, r0:r1] = _row_dots(buffer.gathered_rows(rows, chunk), flat[r0:r1])
            buffer.gathered_read()
    else:
        w0, w1 = int(writers[0]), int(writers[-1]) + 1
        out[w0:w1, r0:r1] = _row_dots(rows[w0:w1], flat[r0:r1])
    return out.masked_fill_(~support, 0)


def write(y: torch.Tensor, counterfactual: torch.Tensor | None, buffer: DeltaBuffer, start: int, stop: int):
    """Store ``y − ỹ`` for writers [start, stop); returns the token that carries their gradient."""
    buffer.written[start:stop] = [True] * (stop - start)
    return _Write.apply(y, counterfactual, buffer, start, stop)


def write_heads(z: torch.Tensor, W_O: torch.Tensor, counterfactual: torch.Tensor | None, buffer: DeltaBuffer,
                start: int, stop: int):
    """Store ``y − ỹ`` of a layer's heads, ``y_h = z_h·W_O[h]``, computed straight into the buffer's rows (no
    [head, batch, pos, d_model] temporary: a fresh one page-faults on CPU); returns the token that carries their
    gradient to ``z``. A positional layout, or W_O taking a gradient, goes through y and ``write`` instead."""
    if buffer.layout is not None or (torch.is_grad_enabled() and W_O.requires_grad):
        return write(torch.einsum("bphe,hed->hbpd", z, W_O), counterfactual, buffer, start, stop)
    buffer.written[start:stop] = [True] * (stop - start)
    return _WriteHeads.apply(z, W_O, counterfactual, buffer, start, stop)


class _WriteHeads(Function):
    @staticmethod
    def forward(ctx, z, W_O, counterfactual, buffer: DeltaBuffer, start: int, stop: int):
        batch, pos, heads, e = z.shape
        target = buffer.values[start:stop]
        z3, out = z.permute(2, 0, 1, 3).reshape(heads, batch * pos, e), target.view(heads, batch * pos, -1)
        if counterfactual is None:
            torch.bmm(z3, W_O, out=out)
        else:  # −ỹ + z·W_O in the GEMM; a single-use ỹ is the target's own storage (overwritten in place)
            if counterfactual.data_ptr() != target.data_ptr():
                target.copy_(counterfactual)  # [head, batch|1, pos|1, d_model]: broadcast
            out.baddbmm_(z3, W_O, beta=-1)
        ctx.save_for_backward(W_O)
        ctx.buffer, ctx.start, ctx.stop, ctx.z_shape = buffer, start, stop, z.shape
        return z.new_zeros(())

    @staticmethod
    def backward(ctx, _token_grad):
        (W_O,) = ctx.saved_tensors
        buffer = _release(ctx)
        grad = buffer.grad_rows(ctx.start, ctx.stop)
        if grad is None:
            return None, None, None, None, None, None
        batch, pos, heads, e = ctx.z_shape
        grad_z = torch.bmm(grad.reshape(heads, batch * pos, -1), W_O.transpose(1, 2))
        return grad_z.view(heads, batch, pos, e).permute(1, 2, 0, 3), None, None, None, None, None


def mix_window(coef: torch.Tensor, buffer: DeltaBuffer, window: Window, split_sizes: Sequence[int],
               tokens: list[torch.Tensor], support: torch.Tensor | None = None
               ) -> tuple[list[torch.Tensor], torch.Tensor]:
    """``Σ_{j < prefix} coef[c(p), j, r]·delta_j`` for every reader of the window (``coef``: [class, writer,
    reader]; one class for the ordinary graph). Returns the parts (one
    [reader, batch, pos, d_model] per split) of the groups that read only the prefix, and the window token.
    ``support`` ([writer, reader] bool): where the coefficients' gradient is read (None: everywhere)."""
    *parts, token = _MixWindow.apply(coef, buffer, window, tuple(split_sizes), support, *tokens)
    return parts, token


def mix_rest(coef: torch.Tensor, window_token: torch.Tensor, buffer: DeltaBuffer, window: Window, offset: int,
             stop: int, split_sizes: Sequence[int], tokens: list[torch.Tensor],
             support: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
    """A later group's readers: the window's product at ``offset`` plus ``Σ_{prefix <= j < stop} coef·delta_j``."""
    return _MixRest.apply(coef, window_token, buffer, window, offset, stop, tuple(split_sizes), support, *tokens)
