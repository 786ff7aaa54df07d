"""What one forward through the engine's hooks carries: one small class per kind of forward.

The hooks read the active run. A ``Capture`` records the writers' outputs (a counterfactual's ỹ, a clean record
for forwards from a layer, the attach-time identity check); a ``Mix`` rebuilds every reader's input from masks.
Each holds what its kind needs and nothing else, so a new kind of forward is a new class, not a new flag.
"""

from __future__ import annotations

from collections import Counter

import torch

from .layer_start import LayerStart
from .mixing import DeltaBuffer, PositionLayout


class Forward:
    """What every forward through the hooks keeps: the writers' buffer, one autograd token per writer chunk, the
    residual stream each layer's attention read (fused q/k/v), and which hooks fired (checked afterwards)."""

    writers_only = False  # the model's own flags: only the writers' hooks act, and the forward ends after the last
    start: LayerStart | None = None  # where the forward begins (a Mix from a layer); None: the whole model
    logits_at: torch.Tensor | None = None  # [batch, pos] bool: unembed only these positions
    gathered = False  # with logits_at: return those positions' logits alone, [scored, vocab]

    def __init__(self, n_chunks: int):
        self.buffer: DeltaBuffer | None = None  # y (capture) or y − ỹ (mix) of every writer
        self.tokens: list[torch.Tensor | None] = [None] * n_chunks
        self.fired: Counter = Counter()
        self.layer_resid: dict[int, torch.Tensor] = {}


class Capture(Forward):
    """Records every writer's output y, no masks. ``writers_only``: with the model's own flags, stopped once the
    last writer fired (no final norm or unembedding); ``reader_inputs``: also keep each reader group's input;
    ``logits_at``: unembed only these positions (their rows come back gathered)."""

    def __init__(self, n_chunks: int, *, writers_only: bool, reader_inputs: bool = False,
                 logits_at: torch.Tensor | None = None):
        super().__init__(n_chunks)
        self.writers_only = writers_only
        self.logits_at, self.gathered = logits_at, logits_at is not None
        self.reader_inputs: dict[int, torch.Tensor] | None = {} if reader_inputs else None


class Mix(Forward):
    """A masked forward: reader r gets resid − Σ_j (1 − z_jr)(y_j − ỹ_j).

    ``removal``: [writer, reader], (1 − z) on valid edges; ``cf_values``: ỹ (None: zero ablation);
    ``in_place``: a single-use ỹ the deltas overwrite; ``fixed``: deltas given from outside (EAP-IG), so the
    writers' outputs are not read; ``layout``: a positional graph's positions sorted by class;
    ``grad_support``: where the masks' gradient is read (its GEMM skips the rest)."""

    def __init__(self, n_chunks: int, removal: torch.Tensor, cf_values: torch.Tensor | None, *,
                 layout: PositionLayout | None = None, logits_at: torch.Tensor | None = None,
                 start: LayerStart | None = None, in_place: torch.Tensor | None = None,
                 fixed: DeltaBuffer | None = None, gathered: bool = False,
                 grad_support: torch.Tensor | None = None):
        super().__init__(n_chunks)
        self.removal, self.cf_values = removal, cf_values
        self.layout, self.logits_at, self.start, self.in_place = layout, logits_at, start, in_place
        self.gathered = gathered
        self.grad_support = grad_support  # [writer, reader] bool: where the masks' gradient is read (None: all)
        # Every mask 1 (EAP): the mixing's products are exactly 0 (a meta tensor has no values to look at).
        self.removes_nothing = removal.device.type != "meta" and not bool(removal.detach().any())
        self.fixed = fixed is not None
        if fixed is not None:
            fixed.coef_zero = self.removes_nothing
            self.buffer = fixed
        self.mixes: dict[int, list[torch.Tensor | None]] = {}  # per reader group, one part per hook (None once used)
        self.window_tokens: dict[int, torch.Tensor] = {}  # per mixed window: what its later groups link to
        self.unread: dict[int, int] = {}  # per mixed window: parts not yet read (its products storage is lent)
        self.direct: dict[int, list] = {}  # reader groups formed directly (no gradients, sparse): each hook's plan
        self.rebuilt: dict[int, dict] = {}  # per window: (group, hook) -> part rebuilt in backward, not yet used
