"""The masked forward: hooks that rebuild every residual-stream read as a mask-weighted mix.

Inside ``with MaskedModel(model) as mm``, each reader r receives
``Σ_j z_jr·y_j + (1 − z_jr)·ỹ_j``. The residual stream already holds ``Σ_j y_j`` (+ constant biases),
so each reader group is computed as ``resid − Σ_j (1 − z_jr)·(y_j − ỹ_j)``: one contraction per chunk of
writers, exact (bit for bit) when every mask is 1, with gradients flowing to the masks and through y.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from collections import Counter
from typing import Any, Callable, Iterable, Sequence

import einops
import torch
from jaxtyping import Bool, Float, Int

from .adapter import ModelAdapter, post_norm_message
from .counterfactual import Counterfactual
from .errors import EdgePruneError, HookFiringError, UnsupportedModelError
from .fused_qkv import (centred_residual, mixed_projection, projected_inputs, unmixed_projection_gradient,
                        weights_need_grad)
from .graph import Graph, GraphSpec, InputNodes, ReaderGroup, WriterChunk
from .layer_start import CleanStarts, LayerStart, ReplayedRows
from .runs import Capture, Forward, Mix
from .mixing import (BufferPool, DeltaBuffer, PositionLayout, SparseMixing, Window, mix_rest, mix_window,
                     plan_windows, write, write_heads)

# Relative tolerance of the attach-time check that the residual stream is the sum of the writers.
IDENTITY_TOL = {torch.float64: 1e-9, torch.float32: 1e-4}
IDENTITY_TOL_LOW_PRECISION = 3e-2


# The MaskedModel active on each model: TransformerLens keeps one hook context per model, so a second context
# would remove the first's hooks on exit (and restore flags out of order). A second one is refused instead.
_ACTIVE: "weakref.WeakKeyDictionary[Any, MaskedModel]" = weakref.WeakKeyDictionary()
_ACTIVE_LOCK = threading.Lock()


class _WritersDone(Exception):
    """Raised by the last writer hook of a capture run that needs nothing after the writers."""


class MaskedModel:
    """Context manager that installs the mixing hooks on an existing TransformerLens model.

    The model is never rewritten: on exit (or any exception) hooks and config flags are restored, so
    the model computes exactly what it did before. Outside a call of this object the hooks are inert.
    """

    def __init__(
        self,
        model: Any,
        graph: Graph | None = None,
        *,
        input_nodes: InputNodes = "separate",
        position_classes: Sequence[str] = (),
        check_identity: bool = True,
        fused_qkv: bool | None = None,
        sparse_mixing: bool = True,
        recompute_inputs: bool = False,
    ):
        """``position_classes``: for a positional graph (when ``graph`` is not given), the names of the classes;
        every masked forward then takes ``position_classes=`` [batch, pos] class indices.
        ``fused_qkv``: compute each head's q/k/v from the shared residual plus its reader's correction
        (fused_qkv.py) instead of TransformerLens's split-q/k/v path; default: wherever the model allows it
        (HookedTransformer and the Tracr twin in float32/64; ``adapter.attention_norm``), False forces TL's path.
        ``sparse_mixing``: where a window's coefficients are mostly 0 or mostly −1 (a binary mask; Edge Pruning's
        samples, most clamped), its products and the deltas' gradient skip them (mixing.SparseMixing); False keeps
        the dense products (for comparisons).
        ``recompute_inputs``: with gradients, fused q/k/v does not keep each head reader's input for backward (a
        [reader, batch, pos, d_model] per layer, the largest part of a step's memory) but rebuilds it there from the
        delta buffer (one GEMM per reader group, as in the forward) and the residual: less memory, a little more time
        (docs/performance.md)."""
        self.adapter = ModelAdapter(model)
        self.model = model
        norms = [self.adapter.attention_norm(layer) for layer in range(int(model.cfg.n_layers))]
        supported = all(norm is not None for norm in norms)
        if fused_qkv and not supported:
            raise UnsupportedModelError(
                f"fused_qkv=True: the engine cannot compute this model's per-head q/k/v itself ({type(model).__name__}, "
                f"{self.adapter.dtype}; see ModelAdapter.attention_norm). Leave fused_qkv unset to use TL's split path.")
        self.fused_qkv = supported if fused_qkv is None else bool(fused_qkv)
        self.sparse_mixing = bool(sparse_mixing)
        if not isinstance(recompute_inputs, bool):
            raise EdgePruneError(f"recompute_inputs must be True or False, got {recompute_inputs!r}")
        self.recompute_inputs = recompute_inputs
        model_spec = GraphSpec.from_config(model.cfg)
        if graph is None:
            graph = Graph.from_spec(model_spec, input_nodes, position_classes)
        elif graph.spec != model_spec:
            own = Graph.from_spec(model_spec, graph.input_nodes, graph.position_classes)
            if not own.same_structure(graph):
                raise EdgePruneError(
                    f"the graph was built for {graph.spec} but the model is {model_spec}; build it with "
                    "Graph.from_model(model)."
                )
            graph = own  # e.g. a circuit file that does not record the position embedding: same nodes and edges
        self.graph = graph
        self.check_identity = check_identity
        self._run: Forward | None = None
        self._valid: dict[tuple, torch.Tensor] = {}  # validity mask per (device, dtype), built once
        self._stack: contextlib.ExitStack | None = None
        self._user_flags: dict[str, Any] = {}
        self._pool = BufferPool()
        self._thread: int | None = None  # the thread that entered: hooks refuse forwards from any other
        self._hook_points: list[Any] = []
        self._user_hooks: list[str] = []  # hook points that carried hooks of the user's when the context began
        self._hooks_at_enter: dict[str, int] = {}  # forward hooks per hook point while this context is active
        self._writer_points: set[str] = set()  # hook points (canonical names) where writer outputs are read
        self._plan_mixing()
        self._expected_firings = self._expected_hook_keys()
        self._expected_writer_firings = Counter({k: n for k, n in self._expected_firings.items() if k[0] == "w"})
        self._columns_before: dict[int, torch.Tensor] = {}  # per layer: reader columns of the groups before it
        self._resid_extra: dict[int, list[Any]] = {}  # per layer: extra_hooks at hook_resid_pre (fused q/k/v)
        self._replayed: ReplayedRows | None = None  # clean rows the last forward from a layer left in its buffer

    # ------------------------------------------------------------------ context
    def __enter__(self) -> "MaskedModel":
        if self._stack is not None:
            raise EdgePruneError("this MaskedModel is already active; do not nest `with` on the same object")
        with _ACTIVE_LOCK:
            other = _ACTIVE.get(self.model)
            if other is not None:
                raise EdgePruneError(
                    f"another MaskedModel is already active on this model (entered in thread {other._thread_name}); "
                    "two at once would remove each other's hooks and leave the model's flags changed. Leave the first "
                    "`with` block (or let its method finish) before starting another on the same model."
                )
            _ACTIVE[self.model] = self
        self._thread, self._thread_name = threading.get_ident(), threading.current_thread().name
        stack = contextlib.ExitStack()
        try:
            stack.callback(self._release)
            self._hook_points = self.adapter.hook_points()
            self._user_hooks = [name for name, hp in self._hook_points if _forward_hooks(hp)]
            flags = self._user_flags = self.adapter.flag_state()
            stack.callback(self.adapter.restore_flags, flags)  # runs last, after the hooks are gone
            self._enable_flags()
            stack.enter_context(self.adapter.hooks(self._hook_list()))
            self._hooks_at_enter = {name: _forward_hooks(hp) for name, hp in self._hook_points}
            hook_dict = self.model.hook_dict
            writer_modules = {id(hook_dict[self._writer_hook_name(c)]) for c in self.graph.writer_chunks}
            self._writer_points = {name for name, hp in self._hook_points if id(hp) in writer_modules}
            if self.check_identity:
                self._check_residual_identity()
        except BaseException:
            self._run = None
            stack.close()
            raise
        self._stack = stack
        return self

    def __exit__(self, *exc_info) -> None:
        stack, self._stack = self._stack, None
        self._run = None
        self._replayed = None
        self._pool.clear()
        if stack is not None:
            stack.close()

    def _release(self) -> None:
        with _ACTIVE_LOCK:
            if _ACTIVE.get(self.model) is self:
                del _ACTIVE[self.model]
        self._thread = None

    def _count_hooks(self) -> int:
        return sum(_forward_hooks(hp) for _, hp in self._hook_points)

    def _check_hooks_unchanged(self) -> None:
        """A hook added at a writer's hook point after the engine's runs after it: the residual stream would get
        that hook's output while the masks mix the output the engine saw (stale). Hooks elsewhere, and hooks that
        were there before the context began (the attach-time identity check covers them), are fine."""
        if self._count_hooks() == sum(self._hooks_at_enter.values()):
            return
        now = {name: _forward_hooks(hp) for name, hp in self._hook_points}
        removed = [name for name, hp in self._hook_points if now[name] < self._hooks_at_enter[name]]
        if removed:
            raise EdgePruneError(
                f"hooks were removed from the model while this MaskedModel is active (at {removed}): was "
                "model.reset_hooks() called inside the `with` block? Leave the block first; it removes its own hooks."
            )
        at_writers = [name for name in self._writer_points if now[name] != self._hooks_at_enter[name]]
        if at_writers:
            raise EdgePruneError(
                f"a hook was added at {at_writers} while this MaskedModel is active. It runs after the engine's writer "
                "hook there, so the residual stream would carry its output while the masks mix the output the engine "
                "saw. Add it before entering the MaskedModel (the attach-time check then covers it), or outside it."
            )
        # Hooks added elsewhere (observers, interventions on reader inputs) are the user's own business.

    @contextlib.contextmanager
    def extra_hooks(self, fwd_hooks: list[tuple[str, Any]]):
        """Hooks a method adds on purpose for some forwards (EAP-IG's interpolated inputs), exempt from the check
        that nothing else hooks the model mid-context."""
        self._require_active()
        before = self._hooks_at_enter
        # Fused q/k/v reads each layer's residual at hook_resid_pre: hooks there run inside the engine's own hook,
        # before it keeps the residual, so the attention reads what they return (TL would run them after it).
        resid_points = {f"blocks.{g.layer}.hook_resid_pre": g.layer for g in self.graph.reader_groups
                        if self.fused_qkv and g.kind == "attn"}
        inner = [(name, fn) for name, fn in fwd_hooks if name in resid_points]
        try:
            for name, fn in inner:
                self._resid_extra.setdefault(resid_points[name], []).append(fn)
            with self.adapter.hooks([(name, fn) for name, fn in fwd_hooks if name not in resid_points]):
                self._hooks_at_enter = {name: _forward_hooks(hp) for name, hp in self._hook_points}
                yield
        finally:
            self._hooks_at_enter = before
            for name, fn in inner:
                self._resid_extra[resid_points[name]].remove(fn)

    def _check_thread(self) -> None:
        if threading.get_ident() != self._thread:
            raise EdgePruneError(
                f"this model is in use by a MaskedModel (Edge Pruning, EAP, ACDC or an evaluation) in thread "
                f"{self._thread_name}: a forward from another thread would run through its hooks. Wait for it to "
                "finish, or use a copy of the model (copy.deepcopy(model)) in this thread."
            )

    def _require_active(self) -> None:
        if self._stack is None:
            raise EdgePruneError("use the MaskedModel inside `with MaskedModel(model) as mm:`")
        self._check_thread()

    # ------------------------------------------------------------------ public API
    @property
    def device(self) -> torch.device:
        return self.adapter.device

    def __call__(
        self,
        tokens: Int[torch.Tensor, "batch pos"],
        counterfactual: Counterfactual,
        edge_mask: Float[torch.Tensor, "writer reader"] | None = None,
        node_mask: Float[torch.Tensor, " writer"] | None = None,
        attention_mask: Int[torch.Tensor, "batch pos"] | None = None,
        fixed_deltas: Float[torch.Tensor, "writer batch pos d_model"] | None = None,
        logits_at: Bool[torch.Tensor, "batch pos"] | None = None,
        position_classes: Int[torch.Tensor, "batch pos"] | None = None,
        start: LayerStart | None = None,
        gathered: bool = False,
        grad_support: Bool[torch.Tensor, "writer reader"] | None = None,
    ) -> Float[torch.Tensor, "batch pos vocab"] | Float[torch.Tensor, "scored vocab"]:
        """Logits of the masked forward. Masks: float (gradients flow) or bool; None means all ones.

        ``position_classes`` (positional graphs only, and required there): the class index of every position;
        reader column ``r@c`` mixes at the positions of class c only.

        ``fixed_deltas`` replaces ``y − ỹ`` by given values (no gradient through them): the mask gradient is
        then ``fixed_delta · ∂metric/∂reader_in`` whatever the input, which is what EAP-IG averages.
        ``logits_at``: the positions an objective reads; the model's final norm and unembedding run on those
        alone (the logits elsewhere are 0), which saves most of the unembedding's cost when one position counts.
        ``gathered=True`` (with ``logits_at``): return ``logits[logits_at]``, [scored, vocab], without the
        [batch, pos, vocab] of zeros around it (and its gradient), as the built-in objectives read them.
        ``start`` (``mm.clean_starts(tokens).at(l)``; without gradients): run layers l.. only, the writers before l
        taken from the clean run, for masks that remove no edge into a reader before layer l (ACDC's candidates).
        Where the model cannot start at a layer (``starts_at_layer``: a TransformerBridge), the whole model runs.
        ``grad_support`` (bool, the masks' shape): the entries whose gradient the caller reads (``edge_pruning``:
        the hard-concrete samples its clamp passes a gradient through); the masks' gradient GEMM then runs only
        over the readers (and writers) holding one, and the gradient is 0 at every other entry. Ordinary graphs
        only (a positional graph computes it everywhere).
        """
        self._require_active()
        self._check_hooks_unchanged()
        tokens = self._check_tokens(tokens, "tokens")
        attention_mask = self._check_attention_mask(attention_mask, tokens)
        logits_at = self._check_logits_at(logits_at, tokens, gathered)
        layout = self._position_layout(position_classes, tokens)
        if not isinstance(counterfactual, Counterfactual):
            raise EdgePruneError(
                "counterfactual must come from mm.interchange(corrupted), mm.mean(reference) or mm.zero(), "
                f"got {type(counterfactual).__name__}"
            )
        if counterfactual.n_writers != self.graph.n_writers:
            raise EdgePruneError(
                f"the counterfactual has {counterfactual.n_writers} writers but the graph has "
                f"{self.graph.n_writers}: it was computed for another graph"
            )
        counterfactual.check_unspent()
        counterfactual.check_fits(*tokens.shape)
        removal = self.removal_matrix(edge_mask, node_mask)
        if grad_support is not None:
            grad_support = _check_mask(grad_support, self.graph.shape, "grad_support", self.device)
            if grad_support.dtype != torch.bool:
                raise EdgePruneError(f"grad_support must be a bool tensor (where the masks' gradient is read), "
                                     f"got {grad_support.dtype}")
            if self.graph.positional:  # its GEMM is split by position class: computed everywhere
                grad_support = None
        cf = counterfactual.values
        if cf is not None:
            cf = cf.to(device=self.device, dtype=removal.dtype)
        fixed = None
        if fixed_deltas is not None:
            expected = (self.graph.n_writers, *tokens.shape, self.graph.spec.d_model)
            if tuple(fixed_deltas.shape) != expected:
                raise EdgePruneError(f"fixed_deltas must have shape {list(expected)}, got {list(fixed_deltas.shape)}")
            fixed = DeltaBuffer.fixed(fixed_deltas.detach().to(device=self.device, dtype=removal.dtype), layout)
        begin = None
        if start is not None:
            self._check_start(start, tokens, removal, fixed_deltas)
            if self.starts_at_layer(attention_mask) and start.layer > 0:
                begin = start
        in_place = None
        if counterfactual.single_use and fixed_deltas is None:
            counterfactual.spent = True  # before the forward: an exception midway leaves it half overwritten
            if cf is not None and cf.is_contiguous() and cf.shape[1:3] == tokens.shape:
                in_place = cf
        run = Mix(len(self.graph.writer_chunks), removal, cf, layout=layout, logits_at=logits_at, start=begin,
                  in_place=in_place, fixed=fixed, gathered=gathered, grad_support=grad_support)
        return self._execute(run, tokens, attention_mask)

    def starts_at_layer(self, attention_mask: torch.Tensor | None = None) -> bool:
        """Whether ``start=`` skips the layers before it on this model (else the whole model runs)."""
        return self.adapter.starts_at_layer(attention_mask)

    def clean_starts(
        self, tokens: Int[torch.Tensor, "batch pos"], attention_mask: Int[torch.Tensor, "batch pos"] | None = None
    ) -> CleanStarts:
        """One clean forward (the model's own path, no gradients), kept at every layer's start for ``start=``."""
        self._require_active()
        tokens = self._check_tokens(tokens, "tokens")
        attention_mask = self._check_attention_mask(attention_mask, tokens)
        resid_pre: dict[int, torch.Tensor] = {}

        def keep(layer):
            def hook(x, hook):
                resid_pre[layer] = x.detach()
            return hook

        n_layers = self.graph.spec.n_layers
        run = Capture(len(self.graph.writer_chunks), writers_only=True)  # m_{L-1} fires after the last layer's start
        with torch.no_grad(), self.extra_hooks([(f"blocks.{l}.hook_resid_pre", keep(l)) for l in range(n_layers)]):
            self._execute(run, tokens, attention_mask)
        if sorted(resid_pre) != list(range(n_layers)):
            raise HookFiringError(f"the clean forward fired hook_resid_pre of layers {sorted(resid_pre)}, not all "
                                  f"{n_layers}: a forward from a layer's start would be wrong")
        return CleanStarts(tokens, tuple(resid_pre[l] for l in range(n_layers)), run.buffer.values)

    def _check_start(self, start: Any, tokens: torch.Tensor, removal: torch.Tensor, fixed_deltas: Any) -> None:
        if not isinstance(start, LayerStart):
            raise EdgePruneError(f"start must be mm.clean_starts(tokens).at(layer), got {_describe(start)}")
        if torch.is_grad_enabled() or fixed_deltas is not None:
            raise EdgePruneError("start= replays the clean writers before its layer without gradients: run it under "
                                 "torch.no_grad(), without fixed_deltas (ACDC's candidates are such forwards)")
        if start.tokens is not tokens and (start.tokens.shape != tokens.shape or not torch.equal(start.tokens, tokens)):
            raise EdgePruneError("start= was recorded for other tokens: call mm.clean_starts(these tokens) first")
        columns = self._columns_before.get(start.layer)
        if columns is None:
            columns = self._columns_before[start.layer] = torch.tensor(
                self.graph.reader_columns_before(start.layer), dtype=torch.long, device=removal.device)
        if removal.device.type != "meta" and bool(removal.index_select(1, columns).any()):
            raise EdgePruneError(
                f"start= at layer {start.layer} needs every edge into the readers before that layer kept (they are "
                "replayed from the clean run), but this mask removes some: start at an earlier layer")

    def interchange(
        self,
        corrupted: Int[torch.Tensor, "batch pos"],
        attention_mask: Int[torch.Tensor, "batch pos"] | None = None,
        *,
        single_use: bool = False,
    ) -> Counterfactual:
        """Interchange ablation: ỹ are the writers' outputs on the corrupted batch.

        ``single_use=True`` keeps only the differences: the one masked forward that reads it writes y − ỹ over
        ỹ's storage instead of a second writer-sized buffer (Edge Pruning's loop, one corrupted batch per step).
        """
        self._require_active()
        corrupted = self._check_tokens(corrupted, "corrupted tokens")
        attention_mask = self._check_attention_mask(attention_mask, corrupted)
        values = self.writer_outputs(corrupted, attention_mask)
        return Counterfactual("interchange", values, self.graph.n_writers, self.graph.spec.d_model, single_use=single_use)

    def mean(
        self,
        reference: Int[torch.Tensor, "n pos"] | Iterable[Int[torch.Tensor, "batch pos"]],
        per_position: bool = True,
        attention_mask: Int[torch.Tensor, "n pos"] | None = None,
        batch_size: int = 32,
    ) -> Counterfactual:
        """Mean ablation over a reference dataset (token ids), per position or over all positions."""
        self._require_active()
        batches = []  # validate every batch before the first forward
        for tokens, mask in _split_reference(reference, attention_mask, batch_size):
            tokens = self._check_tokens(tokens, "mean-ablation reference tokens")
            if per_position and batches and tokens.shape[1] != batches[0][0].shape[1]:
                raise EdgePruneError(
                    f"mean-ablation reference batches have widths {batches[0][0].shape[1]} and {tokens.shape[1]}; "
                    "per-position means need one width (pad with an attention mask) or use per_position=False"
                )
            batches.append((tokens, self._check_attention_mask(mask, tokens)))
        if not batches:
            raise EdgePruneError("the mean-ablation reference dataset is empty")
        total, count = None, None
        for tokens, mask in batches:
            y = self.writer_outputs(tokens, mask).double()  # [writer, batch, pos, d]
            w = torch.ones(tokens.shape, dtype=y.dtype, device=y.device) if mask is None else mask.to(y.dtype)
            y = y * w[None, :, :, None]
            dims = (1,) if per_position else (1, 2)
            s, c = y.sum(dims), w.sum(tuple(d - 1 for d in dims))
            total = s if total is None else total + s
            count = c if count is None else count + c
        if bool((count == 0).any()):
            raise EdgePruneError("some positions of the mean-ablation dataset are masked out in every example")
        if per_position:
            values = (total / count[None, :, None])[:, None]
        else:
            values = (total / count)[:, None, None]
        values = values.to(self.adapter.dtype)
        kind = "mean_per_position" if per_position else "mean"
        return Counterfactual(kind, values, self.graph.n_writers, self.graph.spec.d_model)

    def zero(self) -> Counterfactual:
        """Zero ablation: a removed edge carries nothing (constant biases such as b_O stay)."""
        return Counterfactual("zero", None, self.graph.n_writers, self.graph.spec.d_model)

    def writer_outputs(
        self, tokens: Int[torch.Tensor, "batch pos"], attention_mask: Int[torch.Tensor, "batch pos"] | None = None
    ) -> Float[torch.Tensor, "writer batch pos d_model"]:
        """Every writer's output on an unmasked forward, without gradients.

        Only writers are read, so this runs the model's plain forward (no per-head q/k/v inputs) and stops once the
        last writer has fired: no final norm and no unembedding, so it costs less than ``model(tokens)``.
        """
        self._require_active()
        tokens = self._check_tokens(tokens, "tokens")
        attention_mask = self._check_attention_mask(attention_mask, tokens)
        run = Capture(len(self.graph.writer_chunks), writers_only=True)
        with torch.no_grad():
            self._execute(run, tokens, attention_mask)
        return run.buffer.values

    def check_data(self, data: Any) -> None:
        """Every example's token ids, answers and token subset against this model, before any forward: a bad row
        fails now, by its index, not after hours of training on the rows before it."""
        self._require_active()
        vocab, vocab_out, n_ctx = self.adapter.d_vocab, self.adapter.d_vocab_out, self.adapter.n_ctx
        offset = 0
        for shard in data.shards:
            self.position_classes_of(shard)  # a positional graph needs the data's classes, of the same names
            if shard.clean.shape[1] > n_ctx:
                raise EdgePruneError(f"examples {offset}..{offset + len(shard) - 1} have {shard.clean.shape[1]} "
                                     f"positions but the model's n_ctx is {n_ctx}: shorten the prompts")
            checks = [("clean tokens", shard.clean, vocab), ("corrupted tokens", shard.corrupted, vocab),
                      ("answers", shard.answers, vocab_out), ("distractors", shard.distractors, vocab_out)]
            for what, ids, size in checks:
                if ids is None:
                    continue
                bad = ((ids < 0) | (ids >= size)).reshape(len(ids), -1).any(1).nonzero().flatten()
                if len(bad):
                    row = int(bad[0])
                    values = ids[row].reshape(-1)
                    wrong = values[(values < 0) | (values >= size)].tolist()
                    raise EdgePruneError(
                        f"example {offset + row} ({len(bad)} examples in all): {what} {wrong} lie outside the model's "
                        f"{'output vocabulary' if size == vocab_out and what in ('answers', 'distractors') else 'vocabulary'}"
                        f" [0, {size}). Tokenise with this model's tokenizer, or drop those examples."
                    )
            subset = shard.token_subset
            if subset is not None and bool(((subset < 0) | (subset >= vocab_out)).any()):
                raise EdgePruneError(f"token_subset holds ids outside the model's output vocabulary [0, {vocab_out}): "
                                     f"{subset[(subset < 0) | (subset >= vocab_out)].tolist()[:5]}")
            offset += len(shard)

    def full_logits(
        self,
        tokens: Int[torch.Tensor, "batch pos"],
        attention_mask: Int[torch.Tensor, "batch pos"] | None = None,
        at: Bool[torch.Tensor, "batch pos"] | None = None,
        gathered: bool = False,
    ) -> Float[torch.Tensor, "batch pos vocab"] | Float[torch.Tensor, "scored vocab"]:
        """The unmasked model's logits (the target of Edge Pruning's objective), by the model's own forward.

        Bit-identical to ``model(tokens)`` outside the context, and as cheap: the hooks stay inert and the
        per-head q/k/v flags are off for this call. ``at``: unembed only these positions (0 elsewhere);
        ``gathered=True``: return ``logits[at]`` only, [scored, vocab].
        """
        self._require_active()
        tokens = self._check_tokens(tokens, "tokens")
        attention_mask = self._check_attention_mask(attention_mask, tokens)
        at = self._check_logits_at(at, tokens, gathered)
        self._require_idle()
        with self._plain_flags():
            return self._forward_at(tokens, attention_mask, at, gathered=gathered)

    def removal_matrix(
        self,
        edge_mask: Float[torch.Tensor, "writer reader"] | None,
        node_mask: Float[torch.Tensor, " writer"] | None = None,
    ) -> Float[torch.Tensor, "writer reader"]:
        """(1 − z_edge·z_node) on valid edges, 0 elsewhere, in the model's dtype."""
        dtype, device = self.adapter.dtype, self.device
        valid = self._valid.get((device, dtype))
        if valid is None:
            valid = self._valid[(device, dtype)] = self.graph.valid_mask(device=device).to(dtype)
        keep = None
        if edge_mask is not None:
            keep = _check_mask(edge_mask, self.graph.shape, "edge_mask", device).to(dtype)
        if node_mask is not None:
            nodes = _check_mask(node_mask, (self.graph.n_writers,), "node_mask", device).to(dtype)[:, None]
            keep = nodes if keep is None else keep * nodes
        if keep is None:
            return torch.zeros_like(valid)
        return valid * (1 - keep)

    # ------------------------------------------------------------------ running
    def _plan_mixing(self, **plan) -> None:
        """Which reader groups share a mixing window (``plan``: options of mixing.plan_windows)."""
        groups = self.graph.reader_groups
        self._windows = plan_windows([g.n_writers for g in groups], [g.stop - g.start for g in groups], **plan)
        self._window_of = {g: window for window in self._windows for g in window.groups}

    def _enable_flags(self) -> None:
        self.adapter.enable_flags(need_mlp_in=not self.graph.spec.attn_only, split_qkv=not self.fused_qkv)

    @contextlib.contextmanager
    def _plain_flags(self):
        """The user's own flags for one forward that reads no residual-stream inputs (TL's split-q/k/v path
        repeats the residual per head: 1.81x a plain step on the GPT-2 shape, docs/performance.md); the engine's
        flags come back."""
        self.adapter.restore_flags(self._user_flags)
        try:
            yield
        finally:
            self._enable_flags()

    def _require_idle(self) -> None:
        if self._run is not None:
            raise EdgePruneError("a masked forward is already running (re-entrant call from inside a hook?)")

    def _execute(self, run: Forward, tokens: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor | None:
        self._require_idle()
        self._run = run
        try:
            with self._plain_flags() if run.writers_only else contextlib.nullcontext():
                if run.start is not None:
                    self._replay_writers(run)
                logits = self._forward_at(tokens, attention_mask, run.logits_at, run.start, run.gathered)
        except _WritersDone:
            logits = None
        finally:
            self._run = None
        self._check_firings(run)
        return logits

    def _forward_at(self, tokens: torch.Tensor, attention_mask: torch.Tensor | None, at: torch.Tensor | None,
                    start: LayerStart | None = None, gathered: bool = False):
        """The model's forward (from ``start``'s layer if given); with ``at``, its unembedding sees only those
        positions (as one [1, n_at] sequence) and the logits come back as [batch, pos, vocab] with zeros elsewhere,
        or (``gathered``) as those rows alone, in ``logits[at]``'s order."""
        def forward(rows: bool):  # rows: the final residual holds the scored rows alone (adapter.unembeds_rows)
            if start is None:
                return self.adapter.forward(tokens, attention_mask, own_unembedding=rows)
            return self.adapter.forward_from(start.layer, start.resid, attention_mask, own_unembedding=rows)

        if at is None:
            return forward(False)
        with self.adapter.hooks([(self.adapter.unembed_input_hook, lambda x, hook: x[at].unsqueeze(0))]):
            logits = forward(True)
        if gathered:
            return logits[0]
        return logits.new_zeros((*at.shape, logits.shape[-1])).index_put_((at,), logits[0])  # in place: no copy

    def _replay_writers(self, run: Mix) -> None:
        """The writers before the start layer, stored from the clean run exactly as their hooks would store them;
        rows the previous forward from a layer left holding the same clean deltas are kept (layer_start.ReplayedRows)."""
        left, ys = self._replayed, run.start.writer_outputs  # read before _ensure_buffer drops it
        chunks = [(ci, chunk) for ci, chunk in enumerate(self.graph.writer_chunks) if chunk.layer < run.start.layer]
        if not chunks:
            return
        self._ensure_buffer(run, ys, ys.shape[1:])
        buffer, sparse = run.buffer, run.buffer.sparse
        memo = run.in_place is None and run.layout is None
        kept = left.rows_for(buffer.values, ys, run.cf_values) if memo and left else 0
        replayed = min(kept, chunks[-1][1].stop)  # rows this forward keeps as they are (the rest it writes)
        if replayed and sparse is not None:  # their sums hold too (the last forward may have formed some)
            sparse.prefix_sums.update((k, v) for k, v in left.prefix_sums.items() if k <= replayed)
        token = ys.new_zeros(())
        for ci, chunk in chunks:
            run.fired[("w", ci)] += 1
            if chunk.stop <= kept:
                buffer.written[chunk.start : chunk.stop] = [True] * (chunk.stop - chunk.start)
                run.tokens[ci] = token
                continue
            cf = None if run.cf_values is None else run.cf_values[chunk.start : chunk.stop]
            run.tokens[ci] = write(ys[chunk.start : chunk.stop], cf, buffer, chunk.start, chunk.stop)
        if memo:  # the live sums: those this forward forms over the replayed rows serve the next one too
            sums = {} if sparse is None else sparse.prefix_sums
            self._replayed = ReplayedRows(buffer.values, ys, run.cf_values, chunks[-1][1].stop, sums)

    def _ensure_buffer(self, run: Forward, like: torch.Tensor, shape: Sequence[int]) -> None:
        """The run's writer buffer, [writer, *shape] in ``like``'s dtype and device (shape: batch, pos, d_model)."""
        if run.buffer is not None:
            return
        if isinstance(run, Mix):  # capture buffers are handed to the caller: never reused
            self._replayed = None  # this forward may write any row of the pooled storage
            run.buffer = self._pool.buffer(self.graph.n_writers, shape, like.dtype, like.device, run.in_place)
            run.buffer.coef_zero = run.removes_nothing
            run.buffer.layout = run.layout
            if self.sparse_mixing and run.layout is None and not run.removes_nothing and like.device.type != "meta":
                run.buffer.sparse = SparseMixing(run.buffer.values)  # products may skip 0 (or −1) coefficients
        else:
            run.buffer = DeltaBuffer(self.graph.n_writers, shape, like.dtype, like.device)

    def _expected_hook_keys(self) -> Counter:
        keys = Counter()
        for ci in range(len(self.graph.writer_chunks)):
            keys[("w", ci)] = 1
        for gi, group in enumerate(self.graph.reader_groups):
            for _, offset, _, _ in self._reader_parts(group):
                keys[("r", gi, offset)] = 1
        return keys

    def _check_firings(self, run: Forward) -> None:
        expected = self._expected_writer_firings if run.writers_only else self._expected_firings
        if run.start is not None:  # the readers before the start layer do not run
            groups = self.graph.reader_groups
            expected = Counter({k: n for k, n in expected.items() if k[0] == "w" or groups[k[1]].layer >= run.start.layer})
        if run.fired == expected:
            return
        names = {key: name for name, key in self._hook_keys()}
        problems = []
        for key, want in expected.items():
            got = run.fired.get(key, 0)
            if got != want:
                problems.append(f"{names[key]} fired {got} times (expected {want})")
        raise HookFiringError(
            "the masked forward did not run as the graph says: " + "; ".join(problems) + ". The model's forward "
            "skipped or repeated these hook points, so edges through them would be silently wrong."
        )

    # ------------------------------------------------------------------ hooks
    def _reader_parts(self, group: ReaderGroup) -> list[tuple[str, int, int, bool]]:
        """(hook name, offset in group, size, per-head?) for each hook that feeds a reader group."""
        spec = self.graph.spec
        if group.kind == "attn":
            H, G, l = spec.n_heads, spec.n_kv_heads, group.layer
            if self.fused_qkv:  # after the model's own q/k/v of the shared residual (fused_qkv.py)
                return [(f"blocks.{l}.attn.hook_{x}", o, n, True) for x, o, n in (("q", 0, H), ("k", H, G), ("v", H + G, G))]
            return [
                (f"blocks.{l}.hook_q_input", 0, H, True),
                (f"blocks.{l}.hook_k_input", H, G, True),
                (f"blocks.{l}.hook_v_input", H + G, G, True),
            ]
        if group.kind == "mlp":
            return [(f"blocks.{group.layer}.hook_mlp_in", 0, 1, False)]
        return [(f"blocks.{spec.n_layers - 1}.hook_resid_post", 0, 1, False)]

    def _writer_hook_name(self, chunk: WriterChunk) -> str:
        return {
            "input": "blocks.0.hook_resid_pre",
            "tok": "hook_embed",
            "pos": "hook_pos_embed",
            "attn": f"blocks.{chunk.layer}.attn.hook_z",
            "mlp": f"blocks.{chunk.layer}.hook_mlp_out",
        }[chunk.kind]

    def _hook_keys(self) -> list[tuple[str, tuple]]:
        keys = [(self._writer_hook_name(c), ("w", ci)) for ci, c in enumerate(self.graph.writer_chunks)]
        for gi, group in enumerate(self.graph.reader_groups):
            keys += [(name, ("r", gi, offset)) for name, offset, _, _ in self._reader_parts(group)]
        return keys

    def _hook_list(self) -> list[tuple[str, Any]]:
        hooks = [(self._writer_hook_name(c), self._writer_hook(ci)) for ci, c in enumerate(self.graph.writer_chunks)]
        if self.fused_qkv:
            layers = [g.layer for g in self.graph.reader_groups if g.kind == "attn"]
            hooks += [(f"blocks.{l}.hook_resid_pre", self._resid_hook(l)) for l in layers]
            hooks += [(f"blocks.{l}.ln1.hook_normalized", self._discarded_input_hook(l))
                      for l in layers if f"blocks.{l}.ln1.hook_normalized" in self.model.hook_dict]
        for gi, group in enumerate(self.graph.reader_groups):
            for name, offset, size, per_head in self._reader_parts(group):
                hooks.append((name, self._reader_hook(gi, offset, size, per_head)))
        return hooks

    def _writer_hook(self, chunk_index: int):
        chunk = self.graph.writer_chunks[chunk_index]
        key = ("w", chunk_index)

        def hook(activation: torch.Tensor, hook: Any) -> None:
            if threading.get_ident() != self._thread:
                self._check_thread()
            run = self._run
            if run is None:
                return None
            run.fired[key] += 1
            mix = isinstance(run, Mix)
            if mix and run.fixed:
                return None
            cf = None
            if mix and run.cf_values is not None:
                cf = run.cf_values[chunk.start : chunk.stop]
            if chunk.kind == "attn":
                # Per-head outputs from hook_z and W_O: [head, batch, pos, d_model], never use_attn_result.
                W_O = self.adapter.W_O(chunk.layer)
                self._ensure_buffer(run, activation, (*activation.shape[:2], W_O.shape[-1]))
                run.tokens[chunk_index] = write_heads(activation, W_O, cf, run.buffer, chunk.start, chunk.stop)
            else:
                self._ensure_buffer(run, activation, activation.shape)
                run.tokens[chunk_index] = write(activation.unsqueeze(0), cf, run.buffer, chunk.start, chunk.stop)
            if run.writers_only and all(t is not None for t in run.tokens):
                raise _WritersDone
            return None  # writers are only observed: the residual stream itself is never changed

        return hook

    def _resid_hook(self, layer: int):
        """Fused q/k/v: keep the residual stream a layer's attention reads (its heads' shared input)."""
        def hook(activation: torch.Tensor, hook: Any) -> torch.Tensor | None:
            out = activation
            for extra in self._resid_extra.get(layer, ()):  # a method's own hooks there (extra_hooks)
                changed = extra(out, hook)
                out = out if changed is None else changed
            run = self._run
            if run is not None and not run.writers_only:
                run.layer_resid[layer] = out
            return None if out is activation else out

        return hook

    def _discarded_input_hook(self, layer: int):
        """Fused q/k/v: TL projects its own normed residual to q, k and v, which the reader hooks then replace;
        handing it zero positions skips those three GEMMs. Only where the engine's hooks are the only ones there
        and at q/k/v (a user's observer sees what it always saw) and the model's values are not read (EAP's
        every-mask-1 path reads them). A consumer other than q/k/v would get an empty sequence and fail on
        shapes, never mix silently."""
        hook_dict = self.model.hook_dict
        points = [hook_dict[f"blocks.{layer}.attn.hook_{x}"] for x in "qkv"]

        def hook(activation: torch.Tensor, hook: Any) -> torch.Tensor | None:
            run = self._run
            if (not isinstance(run, Mix) or run.removes_nothing or activation.dim() != 3
                    or any(_forward_hooks(point) != 1 for point in (hook, *points))):
                return None
            return activation[:, :0]

        return hook

    def _layer_resid(self, run: Forward, layer: int) -> torch.Tensor:
        """The residual stream the layer's attention read (kept by its hook_resid_pre hook)."""
        resid = run.layer_resid.get(layer)
        if resid is None:
            raise HookFiringError(f"blocks.{layer}.hook_resid_pre did not fire before the layer's q/k/v: the "
                                  "fused q/k/v inputs cannot be built (MaskedModel(..., fused_qkv=False))")
        return resid

    def _fused_input(self, run: Mix, group_index: int, part_index: int, activation: torch.Tensor,
                     part: torch.Tensor, window: Window, window_row: int) -> torch.Tensor:
        """q, k or v of every head reader of the group, from the layer's residual and each reader's part (rows
        ``window_row``.. of its window: backward writes the part's gradient where the mixing gathers it)."""
        layer = self.graph.reader_groups[group_index].layer
        resid = self._layer_resid(run, layer)
        # Weights are read now, inside the layer's forward: under FSDP only then are they whole (unsharded).
        W, b = self.adapter.qkv_weights(layer)[part_index]
        norm = self.adapter.attention_norm(layer)
        grad_into = None
        if torch.is_grad_enabled() and run.layout is None:
            buffer, n = run.buffer, part.shape[0]
            grad_into = lambda: buffer.window_scratch(window.index, window.n_readers)[window_row : window_row + n]
        if run.removes_nothing:
            # Every mask 1 (EAP): the value is the model's own q/k/v bit for bit, and the gradient to the parts (the
            # masks' gradient) is that of the mix at part = 0, which is exact there. The residual's own gradient
            # comes through the model's path where weights take gradients, else as the readers' sum from backward.
            if weights_need_grad(W, b, norm):
                mixed = mixed_projection(part, resid.detach(), norm, W, b)
                return activation + (mixed - mixed.detach())
            return unmixed_projection_gradient(activation, part, resid, norm, W, b, grad_into)
        rebuild = None
        if torch.is_grad_enabled() and self.recompute_inputs:
            rebuild = self._rebuild(run, group_index, part_index)
        scratch = None
        if not torch.is_grad_enabled() or rebuild is not None:  # nothing keeps the inputs past this call
            scratch = self._pool.scratch(part.shape, part.dtype, part.device)
        return mixed_projection(part, resid, norm, W, b, scratch, grad_into, rebuild)

    def _rebuild(self, run: Mix, group_index: int, part_index: int) -> Callable[[], torch.Tensor]:
        """For backward (``recompute_inputs``): this hook's parts −Σ_j (1 − z_jr)(y_j − ỹ_j) again, from the delta
        buffer's rows (backward keeps them for the mask gradient). Its window's products are computed again when
        the first of its head readers asks, by the forward's GEMMs (so the same bits), and lent until the last has."""
        window = self._window_of[group_index]

        def rebuild() -> torch.Tensor:
            parts = run.rebuilt.get(window.index)
            if parts is None:
                parts = run.rebuilt[window.index] = self._rebuilt_window(run, window)
            part = parts.pop((group_index, part_index))
            if not parts:  # the last one: the storage is free once this backward is done
                del run.rebuilt[window.index]
                run.buffer.products_read(("rebuilt", window.index))
            return part if run.layout is None else run.layout.to_model(part)

        return rebuild

    def _rebuilt_window(self, run: Mix, window: Window) -> dict[tuple[int, int], torch.Tensor]:
        """A window's products as its forward computed them (the shared prefix, then each later group's rows since),
        keyed by (group, hook) for the fused head readers, the ones that rebuild their inputs."""
        groups = [self.graph.reader_groups[g] for g in window.groups]
        store = run.buffer.recomputed_window(("rebuilt", window.index), window.n_readers)
        flat = store.view(window.n_readers, -1)
        coef = self._coef(run, 0, window.prefix, groups[0].start, groups[-1].stop).detach()
        run.buffer.mixed(coef, 0, window.prefix, flat, accumulate=False)
        parts = {}
        for g, group, offset in zip(window.groups, groups, window.offsets):
            n = group.stop - group.start
            if group.n_writers > window.prefix:
                rest = self._coef(run, window.prefix, group.n_writers, group.start, group.stop).detach()
                run.buffer.mixed(rest, window.prefix, group.n_writers, flat[offset : offset + n], accumulate=True)
            if group.kind == "attn":
                for p, part in enumerate(store[offset : offset + n].split(self._part_sizes(group))):
                    parts[(g, p)] = part
        return parts

    def _reader_hook(self, group_index: int, offset: int, size: int, per_head: bool):
        group = self.graph.reader_groups[group_index]
        key = ("r", group_index, offset)
        part_index = [o for _, o, _, _ in self._reader_parts(group)].index(offset)

        def hook(activation: torch.Tensor, hook: Any) -> torch.Tensor | None:
            if threading.get_ident() != self._thread:
                self._check_thread()
            run = self._run
            if run is None or run.writers_only:  # these read writers alone (the user may have split q/k/v on)
                return None
            run.fired[key] += 1
            if isinstance(run, Capture):
                if run.reader_inputs is not None and offset == 0:
                    if self.fused_qkv and group.kind == "attn":
                        run.reader_inputs[group_index] = run.layer_resid[group.layer]
                    else:
                        run.reader_inputs[group_index] = activation[:, :, 0] if per_head else activation
                return None
            parts = run.mixes.get(group_index)
            if parts is None:
                if self._goes_direct(run, group_index):
                    return self._direct_input(run, group_index, part_index, activation)
                parts = self._mix(run, group_index)
            part, parts[part_index] = parts[part_index], None  # read once, from the window's products storage
            if part is None:  # this hook fired twice: _check_firings reports it after the forward
                return None
            # part = −Σ_j (1 − z_jr)(y_j − ỹ_j): added, so backward needs no negation pass
            if run.layout is not None:  # stored sorted by position class: back to the model's order
                part = run.layout.to_model(part)
            window = self._window_of[group_index]
            if self.fused_qkv and group.kind == "attn":
                window_row = window.offsets[window.groups.index(group_index)] + offset  # the part's row in its window
                mixed = self._fused_input(run, group_index, part_index, activation, part, window, window_row)
            elif per_head:
                mixed = activation + einops.rearrange(part, "reader b p d -> b p reader d")
            else:
                mixed = activation + part.squeeze(0)
            run.unread[window.index] -= 1
            if run.unread[window.index] == 0:  # every reader has its input: the window's products storage is free
                run.buffer.products_read(window.index)
            return mixed

        return hook

    def _goes_direct(self, run: Mix, group_index: int) -> bool:
        """Whether this group's reader inputs are formed directly (``_direct_input``): in a forward without gradients,
        with fused q/k/v, where the coefficients of each of its hooks are sparse enough, decided when the group is
        first read (its writers are all written then) unless its window was mixed already (its parts are there)."""
        if group_index in run.direct:
            return True
        sparse = run.buffer.sparse if run.buffer is not None else None
        if (sparse is None or torch.is_grad_enabled() or not self.fused_qkv
                or self._window_of[group_index].index in run.window_tokens):
            return False
        group = self.graph.reader_groups[group_index]
        plans = []
        for _, offset, size, _ in self._reader_parts(group):  # −(1 − z) of every writer the group reads, per hook
            coef = self._coef(run, 0, group.n_writers, group.start + offset, group.start + offset + size)[0]
            plans.append(sparse.plan(coef, 0, group.n_writers))
            if plans[-1] is None:
                return False
        run.direct[group_index] = plans  # each hook's plan, used as made (_direct_input)
        return True

    def _direct_input(self, run: Mix, group_index: int, part_index: int, activation: torch.Tensor) -> torch.Tensor:
        """A hook's reader inputs, each written once from the residual (or the residual less every delta) and added
        to sparsely (mixing.SparseMixing.inputs), where the window path writes a part that is added to the residual
        afterwards; head readers are then normed and projected (fused_qkv.projected_inputs)."""
        group = self.graph.reader_groups[group_index]
        n = self._reader_parts(group)[part_index][2]
        if group.kind == "attn":  # q/k/v are fused (_goes_direct): from the layer's residual
            resid = self._layer_resid(run, group.layer)
            W, b = self.adapter.qkv_weights(group.layer)[part_index]
            norm = self.adapter.attention_norm(group.layer)
            base = centred_residual(resid, norm)
            x = self._pool.scratch((n, *base.shape), base.dtype, base.device)
        else:
            base = activation
            x = activation.new_empty((1, *activation.shape))  # handed to the model: its own storage, not a scratch
        run.buffer.sparse.inputs(run.direct[group_index][part_index], run.buffer, group.n_writers, base.reshape(-1),
                                 x.view(n, -1))
        return projected_inputs(x, norm, W, b) if group.kind == "attn" else x[0]

    def _mix(self, run: Mix, group_index: int) -> list[torch.Tensor | None]:
        """−Σ_j (1 − z_jr)(y_j − ỹ_j) for a reader group, one [reader, batch, pos, d_model] per hook.

        The group's window is mixed over its shared prefix when its first group is read; a later group adds the
        rows written since. Which writers a group reads comes from the graph (a prefix), never from hook order.
        """
        window = self._window_of[group_index]
        if window.index not in run.window_tokens:
            self._mix_window(run, window)
        if group_index not in run.mixes:
            group = self.graph.reader_groups[group_index]
            coef = self._coef(run, window.prefix, group.n_writers, group.start, group.stop)
            offset = window.offsets[window.groups.index(group_index)]
            support = None if run.grad_support is None else run.grad_support[window.prefix:group.n_writers,
                                                                               group.start:group.stop]
            run.mixes[group_index] = list(
                mix_rest(coef, run.window_tokens[window.index], run.buffer, window, offset, group.n_writers,
                         self._part_sizes(group), self._tokens(run, group, window.prefix), support)
            )
        return run.mixes[group_index]

    def _mix_window(self, run: Mix, window: Window) -> None:
        """One GEMM over the window's shared prefix: the parts of the groups that read only that prefix now,
        the others' share of it kept for when they are read."""
        groups = [self.graph.reader_groups[g] for g in window.groups]
        coef = self._coef(run, 0, window.prefix, groups[0].start, groups[-1].stop)
        leading = [(g, group) for g, group in zip(window.groups, groups) if group.n_writers == window.prefix]
        sizes = [size for _, group in leading for size in self._part_sizes(group)]
        support = None if run.grad_support is None else run.grad_support[:window.prefix,
                                                                           groups[0].start:groups[-1].stop]
        parts, run.window_tokens[window.index] = mix_window(coef, run.buffer, window, sizes,
                                                            self._tokens(run, groups[0], 0), support)
        # the groups that will read these products: not those before a start layer, nor those formed directly
        runs = [group for g, group in zip(window.groups, groups)
                if (run.start is None or group.layer >= run.start.layer) and g not in run.direct]
        run.unread[window.index] = sum(len(self._part_sizes(group)) for group in runs)
        parts = iter(parts)
        for g, group in leading:
            run.mixes[g] = [next(parts) for _ in self._part_sizes(group)]

    def _coef(self, run: Mix, w0: int, w1: int, r0: int, r1: int) -> torch.Tensor:
        """−(1 − z) of writers [w0, w1) into base readers [r0, r1), as [class, writer, reader]: a view of the
        removal matrix's class-major columns (exact: IEEE negation is lossless)."""
        n_classes = self.graph.n_classes
        removal = run.removal.view(run.removal.shape[0], n_classes, -1)
        return -removal[w0:w1, :, r0:r1].permute(1, 0, 2)

    def position_classes_of(self, batch: Any) -> torch.Tensor | None:
        """A batch's position classes if this graph is positional (``None`` for the ordinary graph)."""
        if not self.graph.positional:
            return None
        classes = getattr(batch, "position_classes", None)
        names = getattr(batch, "position_names", None)
        if classes is None:
            raise EdgePruneError(
                f"the graph is positional ({list(self.graph.position_classes)}) but the data has no position classes: "
                "use a task generator (tasks.ioi, ...) or paired_data(..., position_classes=, position_names=)")
        if names is not None and tuple(names) != self.graph.position_classes:
            raise EdgePruneError(f"the data's position classes {list(names)} are not the graph's "
                                 f"{list(self.graph.position_classes)}: circuits apply to data of the same classes")
        return classes

    def _position_layout(self, classes: Any, tokens: torch.Tensor) -> PositionLayout | None:
        graph = self.graph
        if classes is None:
            if graph.positional:
                raise EdgePruneError(
                    f"this graph is positional ({list(graph.position_classes)}): pass position_classes= (the class "
                    "index of every position, [batch, pos]; data.position_classes) to every masked forward")
            return None
        if not graph.positional:
            raise EdgePruneError("position_classes were given but the graph has none: build the MaskedModel with "
                                 "position_classes=[names] (Graph.from_model(model, position_classes=...))")
        if (not isinstance(classes, torch.Tensor) or classes.dtype not in (torch.int64, torch.int32)
                or tuple(classes.shape) != tuple(tokens.shape)):
            raise EdgePruneError(f"position_classes must be an integer tensor of the tokens' shape {list(tokens.shape)}, "
                                 f"got {_describe(classes)}")
        classes = classes.to(self.device, torch.long)
        if classes.device.type != "meta":
            lo, hi = int(classes.min()), int(classes.max())
            if lo < 0 or hi >= graph.n_classes:
                raise EdgePruneError(f"position_classes hold indices in [{lo}, {hi}] but the graph has {graph.n_classes} "
                                     f"classes {list(graph.position_classes)}")
        return PositionLayout.from_classes(classes, graph.n_classes)

    def _part_sizes(self, group: ReaderGroup) -> list[int]:
        return [size for _, _, size, _ in self._reader_parts(group)]

    def _tokens(self, run: Mix, group: ReaderGroup, start: int) -> list[torch.Tensor]:
        """Autograd tokens of the writer chunks in rows [start, group.n_writers), checking that each has fired."""
        if run.fixed:
            return []
        tokens = []
        for ci, chunk in enumerate(self.graph.writer_chunks):
            if chunk.start < start:
                continue
            if chunk.start >= group.n_writers:
                break
            if run.tokens[ci] is None:
                raise HookFiringError(
                    f"reader {self.graph.readers[group.start]} was read before its upstream writer "
                    f"{self.graph.writers[chunk.start]} ({self._writer_hook_name(chunk)}) fired"
                )
            tokens.append(run.tokens[ci])
        return tokens

    # ------------------------------------------------------------------ checks
    def _check_residual_identity(self) -> None:
        """At attach time: each reader's residual must be Σ upstream writers + a constant (the biases)."""
        gen = torch.Generator().manual_seed(0)
        n_pos = min(self.adapter.n_ctx, 6)
        tokens = torch.randint(0, self.adapter.d_vocab, (2, n_pos), generator=gen).to(self.device)
        # one position unembedded: the check reads the readers' inputs, never the logits (a full unembedding
        # through TL 3's Unembed also copies W_Uᵀ: 0.1 s on GPT-2's vocabulary, on every attach)
        at = torch.zeros(tokens.shape, dtype=torch.bool, device=self.device)
        at[0, -1] = True
        run = Capture(len(self.graph.writer_chunks), writers_only=False, reader_inputs=True, logits_at=at)
        with torch.no_grad():
            self._execute(run, tokens, None)
            ys = run.buffer.values
            dtype = ys.dtype
            tol = IDENTITY_TOL.get(dtype, IDENTITY_TOL_LOW_PRECISION)
            for gi, group in enumerate(self.graph.reader_groups):
                resid = run.reader_inputs[gi]
                const = resid - ys[: group.n_writers].sum(0)
                deviation = float((const - const[:1, :1]).abs().max())
                scale = max(1.0, float(resid.abs().max()))
                if deviation > tol * scale:
                    reader = self.graph.readers[group.start]
                    found = (f"at {reader} the residual stream differs from the sum of its upstream writers by "
                             f"{deviation:.3g}, relative to a scale of {scale:.3g}")
                    if self._user_hooks:
                        raise EdgePruneError(
                            f"{found}. The model carries hooks of its own at {self._user_hooks}: a hook that changes "
                            "activations there (scaling, patching, steering) breaks the identity the masks rely on. "
                            "Remove them (model.reset_hooks()) or fold their change into the weights, then mask again."
                        )
                    raise UnsupportedModelError(post_norm_message(self.adapter.architecture_name(), detail=found))

    def _check_tokens(self, tokens: Any, what: str) -> torch.Tensor:
        if isinstance(tokens, (str, list, tuple)):
            raise EdgePruneError(
                f"{what}: pass token ids (a LongTensor [batch, pos]), not text; tokenise with "
                "model.to_tokens(prompts) so clean and corrupted prompts get the same BOS handling"
            )
        if not isinstance(tokens, torch.Tensor) or tokens.dtype not in (torch.int64, torch.int32):
            raise EdgePruneError(f"{what} must be an integer tensor of token ids, got {_describe(tokens)}")
        if tokens.dim() != 2:
            raise EdgePruneError(f"{what} must be [batch, pos], got shape {list(tokens.shape)} (use tokens[None])")
        if tokens.numel() == 0:
            raise EdgePruneError(f"{what} is empty: shape {list(tokens.shape)}")
        if tokens.shape[1] > self.adapter.n_ctx:
            raise EdgePruneError(f"{what} has {tokens.shape[1]} positions but the model's n_ctx is {self.adapter.n_ctx}")
        lo, hi = int(tokens.min()), int(tokens.max())
        if lo < 0 or hi >= self.adapter.d_vocab:
            raise EdgePruneError(f"{what} has ids in [{lo}, {hi}] outside the vocabulary [0, {self.adapter.d_vocab})")
        return tokens.to(self.device, torch.long)

    def _check_logits_at(self, at: Any, tokens: torch.Tensor, gathered: bool = False) -> torch.Tensor | None:
        if not isinstance(gathered, bool):
            raise EdgePruneError(f"gathered must be True or False, got {gathered!r}")
        if at is None:
            if gathered:
                raise EdgePruneError("gathered=True returns the logits at logits_at's positions: pass logits_at= "
                                     "(e.g. batch.positions) too")
            return None
        if not isinstance(at, torch.Tensor) or at.dtype != torch.bool or tuple(at.shape) != tuple(tokens.shape):
            raise EdgePruneError(
                f"logits_at must be a bool tensor of the tokens' shape {list(tokens.shape)} (True where the logits are "
                f"read, e.g. batch.positions), got {_describe(at)}"
            )
        at = at.to(self.device)
        if at.device.type != "meta" and not bool(at.any()):
            raise EdgePruneError("logits_at selects no position: nothing would be unembedded")
        return at

    def _check_attention_mask(self, mask: Any, tokens: torch.Tensor) -> torch.Tensor | None:
        if mask is None:
            return None
        if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != tuple(tokens.shape):
            raise EdgePruneError(
                f"attention_mask must be a tensor of the tokens' shape {list(tokens.shape)}, got {_describe(mask)}"
            )
        return mask.to(self.device)


def masked(model: Any, graph: Graph | None = None, **kwargs: Any) -> MaskedModel:
    """``with masked(model) as mm:`` — the engine, installed on an existing TransformerLens model."""
    return MaskedModel(model, graph, **kwargs)


def _check_mask(mask: Any, shape: Sequence[int], what: str, device: torch.device) -> torch.Tensor:
    if not isinstance(mask, torch.Tensor):
        raise EdgePruneError(f"{what} must be a torch tensor of shape {list(shape)}, got {type(mask).__name__}")
    if tuple(mask.shape) != tuple(shape):
        raise EdgePruneError(
            f"{what} has shape {list(mask.shape)} but this graph needs {list(shape)} ([n_writers, n_readers] for "
            "edges, [n_writers] for nodes); start from graph.ones() or graph.zeros()"
        )
    if mask.dtype != torch.bool and not mask.is_floating_point():
        raise EdgePruneError(f"{what} must be float (for gradients) or bool, got {mask.dtype}")
    device = torch.device(device)
    if mask.device.type != device.type or (mask.device.index or 0) != (device.index or 0):
        raise EdgePruneError(f"{what} is on {mask.device} but the model is on {device}; use {what}.to('{device}')")
    if mask.is_floating_point() and mask.device.type != "meta":
        values = mask.detach()
        if not bool(((values >= 0) & (values <= 1)).all()):  # NaN fails both comparisons
            bad = (~((values >= 0) & (values <= 1))).nonzero()[0].tolist()
            raise EdgePruneError(
                f"{what} must hold values in [0, 1] (1 keeps the clean edge, 0 the ablated one); entry {bad} is "
                f"{float(values[tuple(bad)])}. A NaN mask would give finite, wrong logits; clamp or fix the mask."
            )
    return mask


def _describe(x: Any) -> str:
    if isinstance(x, torch.Tensor):
        return f"tensor {x.dtype} of shape {list(x.shape)}"
    return type(x).__name__


def _split_reference(reference: Any, attention_mask: Any, batch_size: int):
    """Yield (tokens, mask) batches from a tensor (split into batch_size rows) or an iterable of batches."""
    if isinstance(reference, torch.Tensor):
        if reference.dim() != 2:
            raise EdgePruneError(f"mean-ablation reference must be [n, pos] token ids, got shape {list(reference.shape)}")
        for start in range(0, reference.shape[0], batch_size):
            mask = None if attention_mask is None else attention_mask[start : start + batch_size]
            yield reference[start : start + batch_size], mask
        return
    for item in reference:
        if isinstance(item, (tuple, list)) and len(item) == 2:
            yield item[0], item[1]
        else:
            yield item, None


def _forward_hooks(hook_point: Any) -> int:
    return len(hook_point._forward_hooks) + len(hook_point._forward_pre_hooks)
