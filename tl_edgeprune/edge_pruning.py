"""Edge Pruning (Bhaskar et al. 2024): learn hard-concrete edge masks under a Lagrangian sparsity target.

loss = objective(full ‖ circuit) + λ1·(s − t) + λ2·(s − t)², with s = 1 − Σz/N over real edges, t rising
linearly to the target, log α minimised and λ maximised (gradient ascent), one mask sample per step.
"""

from __future__ import annotations

import contextlib
import os
import time
import warnings
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Union

import torch
from torch import nn
from tqdm.auto import tqdm

from . import checkpoint, validation
from .ablations import Ablation, counterfactual_source
from .circuit import Circuit
from .data import PairedData, as_data, position_names_for
from .distributed import data_parallel, rank_slice
from .engine import MaskedModel
from .errors import EdgePruneError
from .example_cache import ExampleCache
from .fingerprint import model_fingerprint, tensor_digest
from .graph import Graph, GraphSpec, InputNodes
from .hard_concrete import HardConcrete, gradient_support
from .metrics import ON_SCORED_ROWS, Objective, resolve_objective
from .options import checked_options
from .threads import torch_threads


@dataclass
class EdgePruningConfig:
    """Every setting of a run (documented on ``edge_pruning``); defaults are the reference's GPT-2 settings."""

    target_sparsity: float = 0.95
    start_sparsity: float = 0.0
    steps: int = 3000
    sparsity_warmup: int | None = None  # None: 5/6 of steps (the reference's 2,500 of 3,000)
    lr: float = 0.8
    lambda_lr: float = 0.8
    lr_warmup: int | None = None  # None: 1/15 of steps (the reference's 200 of 3,000)
    init_log_alpha: float | torch.Tensor = 10.0
    batch_size: int = 32
    grad_clip: float | None = 1.0
    node_masks: bool = True
    sparsity_from: str = "expected"
    objective: Union[str, Objective] = "kl"
    ablation: Ablation = "interchange"
    seed: int = 0
    input_nodes: InputNodes = "separate"
    positional: bool = False
    checkpoint_path: str | None = None
    checkpoint_every: int | None = None
    progress: bool = True
    cache_gib: float = 2.0
    recompute_inputs: bool = False

    def __post_init__(self) -> None:
        # The warm-ups scale with the run, so a short run still reaches its target (the reference's 2,500-step ramp
        # on a 5-step run would return every edge). Integers only: a bad steps value is reported by validate().
        if isinstance(self.steps, int) and not isinstance(self.steps, bool):
            if self.sparsity_warmup is None:  # the ramp ends by the last step (index steps − 1)
                self.sparsity_warmup = min(round(self.steps * 5 / 6), max(self.steps - 1, 0))
            if self.lr_warmup is None:
                self.lr_warmup = round(self.steps / 15)

    def final_ramp(self) -> float:
        """How far the target has ramped at the last step (below 1 when the warm-up outlasts the run)."""
        return min(1.0, (self.steps - 1) / self.sparsity_warmup) if self.sparsity_warmup else 1.0

    def final_target(self) -> float:
        return self.start_sparsity + (self.target_sparsity - self.start_sparsity) * self.final_ramp()

    def validate(self) -> None:
        """Every setting's type and range: NaN rates, a clip of 0 or a float step count fail here, not mid-run."""
        v = validation
        v.real("target_sparsity", self.target_sparsity, low=0.0, high=2.0, low_open=True,
               hint=" (values above 1 push harder)")
        v.real("start_sparsity", self.start_sparsity, low=0.0, high=float(self.target_sparsity),
               hint=" (the target ramps from start_sparsity to target_sparsity)")
        v.integer("steps", self.steps, minimum=1)
        v.integer("batch_size", self.batch_size, minimum=1)
        v.integer("sparsity_warmup", self.sparsity_warmup, minimum=0)
        v.integer("lr_warmup", self.lr_warmup, minimum=0)
        v.integer("seed", self.seed)
        v.positive("lr", self.lr)
        if isinstance(self.init_log_alpha, torch.Tensor):
            if not self.init_log_alpha.is_floating_point() or not bool(torch.isfinite(self.init_log_alpha).all()):
                raise EdgePruneError("init_log_alpha as a tensor must hold finite floats ([n_writers, n_readers])")
        else:
            v.real("init_log_alpha", self.init_log_alpha, low=-20.0, high=20.0)
        v.positive("lambda_lr", self.lambda_lr)
        if self.grad_clip is not None:
            v.positive("grad_clip", self.grad_clip, hint=" (a clip of 0 freezes every mask, a negative one reverses "
                       "the updates; pass grad_clip=None for no clipping)")
        v.choice("sparsity_from", self.sparsity_from, ("sampled", "expected"))
        v.choice("input_nodes", self.input_nodes, ("separate", "merged"))
        v.real("cache_gib", self.cache_gib, low=0.0, hint=" (0 turns the per-example cache off)")
        for name in ("node_masks", "progress", "positional", "recompute_inputs"):
            if not isinstance(getattr(self, name), bool):
                raise EdgePruneError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.checkpoint_path is not None and not isinstance(self.checkpoint_path, (str, os.PathLike)):
            raise EdgePruneError(f"checkpoint_path must be a file path, got {self.checkpoint_path!r}")
        if self.checkpoint_every is not None:
            v.integer("checkpoint_every", self.checkpoint_every, minimum=1)
            if not self.checkpoint_path:
                raise EdgePruneError("checkpoint_every needs a checkpoint_path (the file to write)")

    @classmethod
    def reference(cls, **overrides: Any) -> "EdgePruningConfig":
        """The Edge Pruning paper's GPT-2 settings exactly (sampled sparsity estimate), as a named preset."""
        return cls(**({"sparsity_from": "sampled"} | overrides))

    @property
    def checkpoint_interval(self) -> int | None:
        if not self.checkpoint_path:
            return None
        return self.checkpoint_every or DEFAULT_CHECKPOINT_EVERY

    def fingerprint(self) -> dict:
        """The settings that must match for a checkpoint to be resumed (objective and ablation: run_identity)."""
        keep = ("target_sparsity", "start_sparsity", "steps", "sparsity_warmup", "lr", "lambda_lr", "lr_warmup", "batch_size",
                "grad_clip", "node_masks", "sparsity_from", "seed", "input_nodes", "init_log_alpha")
        out = {k: getattr(self, k) for k in keep}
        if isinstance(self.init_log_alpha, torch.Tensor):
            out["init_log_alpha"] = "sha256:" + tensor_digest([self.init_log_alpha]).hexdigest()
        if self.positional:  # only when set: checkpoints of ordinary runs keep their identity
            out["positional"] = True
        return out


DEFAULT_CHECKPOINT_EVERY = 50


@dataclass
class EdgePruningResult:
    graph: Graph
    edge_log_alpha: torch.Tensor
    node_log_alpha: torch.Tensor | None
    trainable: torch.Tensor  # [writer, reader] edges the masks could keep
    history: dict[str, list[float]]
    config: EdgePruningConfig
    seconds: float = 0.0
    info: dict = field(default_factory=dict)
    model: dict | None = None  # fingerprint of the model trained on (class, name, weights hash)

    def __repr__(self) -> str:
        done = len(self.history.get("objective", []))
        read = self.history.get("circuit_sparsity") or [float("nan")]
        return (f"EdgePruningResult({done} of {self.config.steps} steps, target {self.config.target_sparsity:g}, "
                f"circuit sparsity {read[-1]:.3f} at the end, {self.seconds:.0f} s; .circuit() reads it out)")

    def soft_masks(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Deterministic eval masks (edges, nodes) by the reference rule."""
        edges = _gate(self.edge_log_alpha).deterministic(self.trainable)
        nodes = None if self.node_log_alpha is None else _gate(self.node_log_alpha).deterministic()
        return edges, nodes

    def circuit(self, prune_dangling: bool = False) -> Circuit:
        """Binary circuit by the reference binary search (binary density = mean soft mask)."""
        edges, nodes = self.soft_masks()
        node_keep = None if nodes is None else nodes >= 0.5
        circuit = Circuit.from_soft_mask(self.graph, edges, node_keep, info=self._info(), model=self.model)
        return circuit.prune_dangling() if prune_dangling else circuit

    def circuit_top_k(self, k: int) -> Circuit:
        """Exactly k edges, chosen by soft mask value."""
        edges, _ = self.soft_masks()
        return Circuit.top_k(self.graph, edges, k=k, absolute=False, method="edge_pruning", model=self.model)

    @classmethod
    def from_checkpoint(cls, path: str) -> "EdgePruningResult":
        """The masks of a checkpoint (of a run still going, or killed), to read out its circuit now."""
        state = checkpoint.read(path)
        identity = state["identity"]
        spec = dict(identity["graph"])
        input_nodes = spec.pop("input_nodes")
        classes = spec.pop("position_classes", ())
        graph = Graph.from_spec(GraphSpec(**spec), input_nodes, classes)
        config = EdgePruningConfig(**identity["settings"])
        return cls(graph=graph, edge_log_alpha=state["edge_log_alpha"], node_log_alpha=state["node_log_alpha"],
                   trainable=state["trainable"], history={k: list(v) for k, v in state["history"].items()},
                   config=config, info={"checkpoint": path, "step": state["step"]}, model=identity["model"])

    def _info(self) -> dict:
        return {"target_sparsity": self.config.target_sparsity, "steps": self.config.steps, "seconds": self.seconds,
                **self.info}


CONFIG_DEFAULTS = {f.name: f.default for f in fields(EdgePruningConfig)}


def _is_default(name: str, value: Any) -> bool:
    default = CONFIG_DEFAULTS[name]
    return not isinstance(value, torch.Tensor) and type(value) is type(default) and value == default


def _gate(log_alpha: torch.Tensor) -> HardConcrete:
    gate = HardConcrete(tuple(log_alpha.shape))
    gate.log_alpha.data = log_alpha.detach().clone().cpu()
    return gate


@contextlib.contextmanager
def frozen_parameters(model: nn.Module):
    """No gradients for the model's own weights during mask training; restored afterwards."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warm-up, then linear decay to 0 at the last step."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    return max(0.0, (total - step) / max(1, total - warmup))


class StepBatches:
    """The batch of each step, a pure function of (seed, step), so a resumed run sees the same data."""

    def __init__(self, data, batch_size: int, seed: int):
        self.data, self.batch_size, self.seed = data, batch_size, seed
        self.per_epoch = sum(1 for _ in data.batch_rows(batch_size))
        self.epoch, self.rows = None, []

    def __call__(self, step: int) -> tuple[PairedData, int, torch.Tensor]:
        """(batch, its shard, its rows in that shard): the rows key the per-example cache."""
        epoch, index = divmod(step, self.per_epoch)
        if epoch != self.epoch:
            self.epoch = epoch
            self.rows = list(self.data.batch_rows(self.batch_size, shuffle_seed=self.seed * 1_000_003 + epoch))
        shard, rows = self.rows[index]
        return self.data.shards[shard].select(rows), shard, rows


@checked_options()
def edge_pruning(
    model: Any,
    data: PairedData,
    target_sparsity: float = 0.95,
    *,
    steps: int = 3000,
    sparsity_warmup: int | None = None,
    lr: float = 0.8,
    lambda_lr: float = 0.8,
    lr_warmup: int | None = None,
    batch_size: int = 32,
    init_log_alpha: float | torch.Tensor = 10.0,
    start_sparsity: float = 0.0,
    objective: Union[str, Objective] = "kl",
    ablation: Ablation = "interchange",
    input_nodes: InputNodes = "separate",
    positional: bool = False,
    node_masks: bool = True,
    sparsity_from: str = "expected",
    grad_clip: float | None = 1.0,
    seed: int = 0,
    checkpoint_path: str | None = None,
    checkpoint_every: int | None = None,
    resume: bool = False,
    progress: bool = True,
    cache_gib: float = 2.0,
    recompute_inputs: bool = False,
    trainable_edges: torch.Tensor | None = None,
    mean_reference: torch.Tensor | None = None,
    callback: Callable[[int, dict], None] | None = None,
    config: EdgePruningConfig | None = None,
    threads: int | None = None,
) -> EdgePruningResult:
    """Train Edge Pruning masks on ``data`` and return them; ``.circuit()`` reads out the binary circuit.

    Defaults are the paper's GPT-2 settings, except the expected-L0 sparsity (docs/method.md says why);
    ``config=EdgePruningConfig.reference()`` is the paper's exactly.

    target_sparsity: fraction of edges to remove; the target ramps to it from ``start_sparsity`` over
        ``sparsity_warmup`` steps. Values above 1 push harder (the Tracr settings use 1.02).
    steps: optimisation steps, one batch and one mask sample each.
    sparsity_warmup: steps of the linear target ramp (default 5/6 of ``steps``).
    lr, lambda_lr: AdamW learning rates of log α (edges and nodes) and of the Lagrange multipliers.
    lr_warmup: steps of linear learning-rate warm-up (default 1/15 of ``steps``), then constant.
    batch_size: examples per step.
    init_log_alpha: where log α starts, N(init, 0.01). The reference's 10 keeps every gate at 1 for the first tens
        of steps; a [n_writers, n_readers] tensor sets each edge (``hap.attribution_init(scores)``: start at
        EAP's circuit, the fast route on real models, docs/results.md).
    start_sparsity: where the target ramp starts (HAP and attribution starts: the starting circuit's sparsity).
    objective: "kl" (to the full model, at the scored positions), "mse", "logit_diff", or a function
        (circuit_logits, full_logits, batch) -> scalar to minimise.
    ablation: what a removed edge carries: "interchange" (corrupted run), "zero" or "mean".
    input_nodes: "separate" (tok and pos writers) or "merged" (one input node, as EAP-IG's graphs).
    positional: learn one mask per edge and position class of the data (``a0.h1->a2.h3<q>@END``); the sparsity
        counts every positional edge. The data must name its classes (tasks.ioi, by_position, paired_data).
    node_masks: also learn one gate per writer node (the reference does).
    sparsity_from: "expected" (Σ P(z>0), smooth in log α) or "sampled" (the reference's Σz).
    grad_clip: max gradient norm, None for none.
    seed: hard-concrete noise and batch order; the same seed gives the same run.
    checkpoint_path, checkpoint_every: write the run's state there every ``checkpoint_every`` steps (default
        50) and at the end; ``resume=True`` continues it bit for bit and refuses a checkpoint of another run.
    progress: a progress bar with the circuit's sparsity, the loss and the time per step.
    cache_gib: keep each example's ỹ and full logits after the first epoch if they fit in this many GiB.
    recompute_inputs: keep less for backward: each head reader's input is rebuilt there instead of kept from the
        forward (the largest part of a step's memory; docs/performance.md gives the trade on GPT-2 and SmolLM2).
    trainable_edges: [writer, reader] bool; only these edges are learned, the rest fixed at 0 (HAP).
    mean_reference: the data whose mean activations "mean" ablation uses (default: ``data``'s corrupted side).
    callback: called as callback(step, row) after each step, row holding that step's history entries.
    config: a whole EdgePruningConfig instead of the settings above (e.g. ``EdgePruningConfig.reference()``).
    threads: torch threads for the run (default: 1 for a small CPU model, else torch's setting; threads.py).

    A step whose loss or gradients are not finite stops the run before any update; its state is saved beside
    the checkpoint (or in a fresh temporary folder), never over it.
    """
    settings = {name: value for name, value in locals().items() if name in CONFIG_DEFAULTS}
    if config is None:
        cfg = EdgePruningConfig(**settings)
    elif not isinstance(config, EdgePruningConfig):
        raise EdgePruneError(f"config must be an EdgePruningConfig, got {type(config).__name__}")
    else:
        given = [k for k, v in settings.items() if not _is_default(k, v)]
        if given:
            raise EdgePruneError(f"pass either config= or settings, not both (also given: {', '.join(given)}); "
                                 f"put them in the config, e.g. EdgePruningConfig.reference({given[0]}=...)")
        cfg = config
    cfg.validate()
    if cfg.final_ramp() < 0.99:
        warnings.warn(f"sparsity_warmup={cfg.sparsity_warmup} is longer than steps={cfg.steps}: by the last step the "
                      f"target has only reached {cfg.final_target():.3f}, not target_sparsity={cfg.target_sparsity:g}, "
                      "so the circuit will keep more edges than asked. Leave sparsity_warmup unset (5/6 of steps) "
                      "or raise steps.", UserWarning, stacklevel=3)
    if not isinstance(resume, bool):
        raise EdgePruneError(f"resume must be True or False, got {resume!r}")
    if callback is not None and not callable(callback):
        raise EdgePruneError(f"callback must be a function (step, row) -> None, got {type(callback).__name__}")
    data = as_data(data)
    classes = position_names_for(data, cfg.positional)
    objective = resolve_objective(cfg.objective)
    if resume and not cfg.checkpoint_path:
        raise EdgePruneError("resume=True needs the checkpoint_path of the run to continue")
    t0 = time.perf_counter()
    rank, world = data_parallel()
    with torch_threads(model, threads) as n_threads, frozen_parameters(model), \
            MaskedModel(model, input_nodes=cfg.input_nodes, position_classes=classes,
                        recompute_inputs=cfg.recompute_inputs) as mm:
        mm.check_data(data)
        graph, device = mm.graph, mm.device
        valid = graph.valid_mask()
        trainable = valid if trainable_edges is None else valid & _check_trainable(trainable_edges, graph)
        trainable_f = trainable.to(device=device, dtype=torch.float32)
        identity = checkpoint.run_identity(cfg, graph, model, data, cfg.objective, cfg.ablation, trainable,
                                           mean_reference)
        gen = torch.Generator().manual_seed(cfg.seed)
        per_edge = isinstance(cfg.init_log_alpha, torch.Tensor)
        if per_edge and tuple(cfg.init_log_alpha.shape) != graph.shape:
            raise EdgePruneError(f"init_log_alpha as a tensor must have the graph's shape {list(graph.shape)}, "
                                 f"got {list(cfg.init_log_alpha.shape)}")
        edge_gates = HardConcrete(graph.shape, gen, device, 0.0 if per_edge else cfg.init_log_alpha)
        if per_edge:  # the same N(0, 0.01) noise as a scalar start, shifted edge by edge
            with torch.no_grad():
                edge_gates.log_alpha.add_(cfg.init_log_alpha.to(device=device, dtype=torch.float32))
        node_start = float(cfg.init_log_alpha.max()) if per_edge else cfg.init_log_alpha
        node_gates = HardConcrete((graph.n_writers,), gen, device, node_start) if cfg.node_masks else None
        lambdas = nn.Parameter(torch.zeros(2, device=device))
        groups = [{"params": [edge_gates.log_alpha], "lr": cfg.lr}]
        if node_gates is not None:
            groups.append({"params": [node_gates.log_alpha], "lr": cfg.lr})
        groups.append({"params": [lambdas], "lr": cfg.lambda_lr})
        optimizer = torch.optim.AdamW(groups, weight_decay=0.0)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg.lr_warmup, cfg.steps))
        params = [p for g in groups for p in g["params"]]
        history: dict[str, list[float]] = {k: [] for k in HISTORY}
        start = 0
        if resume:
            state = checkpoint.load(cfg.checkpoint_path, identity)
            start, history = _restore(state, edge_gates, node_gates, lambdas, optimizer, scheduler, gen)
        source = counterfactual_source(mm, cfg.ablation, data, mean_reference, single_use=True)  # keep y − ỹ only
        # The built-in objectives read scored positions only: only those are unembedded, cached, and handed over as
        # rows ([scored, vocab]: no [batch, pos, vocab] of zeros, nor its gradient)
        on_rows = ON_SCORED_ROWS.get(objective)
        scored_only = on_rows is not None
        if on_rows is not None:
            objective = on_rows
        per_example = ExampleCache(mm, data, source, cfg.cache_gib, scored_only=scored_only)
        step_batches = StepBatches(data, cfg.batch_size, cfg.seed)

        def batch_at(step: int) -> tuple[PairedData, int, torch.Tensor]:
            batch, shard, rows = step_batches(step)
            if world > 1:
                mine = rank_slice(len(batch), rank, world)
                batch, rows = batch.select(mine), rows[mine]
            return batch.to(device), shard, rows

        if start and cfg.cache_gib > 0:
            # The cache of an unbroken run holds each example as computed in its first-epoch batch (a row's
            # values differ in the last bits with its batch-mates): replay those batches, so resume is exact.
            for step in range(min(start, step_batches.per_epoch)):
                per_example(*batch_at(step))
                if not per_example.enabled:
                    break

        def save(step: int, path: str, generator_state: torch.Tensor) -> None:
            if rank != 0:  # masks are replicated: one rank writes
                return
            checkpoint.save(path, identity, step, _state(edge_gates, node_gates, lambdas, optimizer, scheduler,
                                                         generator_state, history) | {"trainable": trainable})

        def fail(step: int, what: str, generator_state: torch.Tensor, updated: bool) -> None:
            last = cfg.checkpoint_path if cfg.checkpoint_path and os.path.exists(cfg.checkpoint_path) else None
            kept = f" The last periodic checkpoint, {last}, is untouched." if last else ""
            if updated:  # the parameters themselves went non-finite: there is no good state in memory to save
                raise EdgePruneError(f"step {step}: the update made {what} non-finite (lower lr/lambda_lr).{kept}")
            dump = checkpoint.failure_path(cfg.checkpoint_path, step)
            save(step, dump, generator_state)
            raise EdgePruneError(
                f"step {step}: {what} is not finite, so the step was not applied. The state before it is saved at "
                f"{dump} (resume from it with checkpoint_path={dump!r}, resume=True, after fixing the cause: "
                f"lower lr/lambda_lr, or check the objective and the data).{kept}"
            )

        interval = cfg.checkpoint_interval
        bar = tqdm(range(start, cfg.steps), disable=not cfg.progress or rank != 0, desc="edge pruning", initial=start, total=cfg.steps)
        for step in bar:
            generator_state = gen.get_state()  # before this step's sample: a failure dump resumes this very step
            batch, shard, rows = batch_at(step)
            cf, full = per_example(batch, shard, rows)  # ỹ and the target (the unmasked model's logits)
            z, passes = edge_gates.sample_with_support(gen)
            nodes, node_passes = node_gates.sample_with_support(gen) if node_gates is not None else (None, None)
            z, support = z * trainable_f, gradient_support(passes, trainable_f > 0, node_passes)
            logits = mm(batch.clean, cf, z, nodes, attention_mask=batch.attention_mask,
                        logits_at=batch.positions if scored_only else None,
                        position_classes=mm.position_classes_of(batch), gathered=scored_only,
                        grad_support=support)
            obj = objective(logits, full, batch)
            if cfg.sparsity_from == "sampled":
                sparsity = 1 - z.sum() / graph.n_edges
            else:
                sparsity = 1 - (edge_gates.prob_nonzero() * trainable_f).sum() / graph.n_edges
            ramp = min(1.0, step / cfg.sparsity_warmup) if cfg.sparsity_warmup else 1.0
            target = cfg.start_sparsity + (cfg.target_sparsity - cfg.start_sparsity) * ramp
            gap = sparsity - target
            loss = obj + lambdas[0] * gap + lambdas[1] * gap**2
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if world > 1:  # average gradients over ranks: the same update everywhere keeps masks replicated
                for p in params:
                    if p.grad is not None:
                        torch.distributed.all_reduce(p.grad)
                        p.grad /= world
            bad = checkpoint.nonfinite({"the objective": obj, "the loss": loss,
                                        "the gradient of the edge log α": edge_gates.log_alpha.grad,
                                        "the gradient of the node log α": None if node_gates is None else node_gates.log_alpha.grad,
                                        "the gradient of λ": lambdas.grad})
            if bad is not None:
                fail(step, f"{bad} ({_value_of(bad, obj, loss)})", generator_state, updated=False)
            lambdas.grad.neg_()  # gradient ascent on λ
            if cfg.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            optimizer.step()
            scheduler.step()
            bad = checkpoint.nonfinite({"edge log α": edge_gates.log_alpha, "λ": lambdas,
                                        "node log α": None if node_gates is None else node_gates.log_alpha})
            if bad is not None:
                fail(step, bad, generator_state, updated=True)
            reported = torch.stack([loss.detach(), obj.detach()]).float()
            if world > 1:  # the history holds the whole batch's values: the mean of the ranks' slices
                torch.distributed.all_reduce(reported)
                reported /= world
            row = {"loss": float(reported[0]), "objective": float(reported[1]), "sparsity": float(sparsity.detach()), "target": target,
                   "lambda1": float(lambdas[0].detach()), "lambda2": float(lambdas[1].detach()), "lr": scheduler.get_last_lr()[0],
                   "circuit_sparsity": readout_sparsity(graph, edge_gates, node_gates, trainable),
                   "seconds": time.perf_counter() - t0}
            for k in HISTORY:
                history[k].append(row[k])
            if callback is not None:
                callback(step, row)
            if step % 10 == 0 or step == cfg.steps - 1:
                # in words: the objective on this batch, the read-out circuit's sparsity, and the ramp's target now
                bar.set_postfix({"objective": f"{row['objective']:.4f}", "circuit sparsity": f"{row['circuit_sparsity']:.3f}",
                                 "target": f"{target:.3f}"})
            if interval and ((step + 1) % interval == 0 or step + 1 == cfg.steps):
                save(step + 1, cfg.checkpoint_path, gen.get_state())
        bar.close()
        return EdgePruningResult(
            graph=graph,
            edge_log_alpha=edge_gates.log_alpha.detach().cpu(),
            node_log_alpha=None if node_gates is None else node_gates.log_alpha.detach().cpu(),
            trainable=trainable,
            history=history,
            config=cfg,
            seconds=time.perf_counter() - t0,
            info={"example_cache": per_example.describe(), "threads": n_threads},
            model=model_fingerprint(model),
        )


# history: per step. "sparsity" is the training estimate (expected L0 or the sample's); "circuit_sparsity" is what
# result.circuit() would read out at that step. The callback's row also has "seconds" since the call began (not in
# the history, so a resumed run's history equals an unbroken one's).
HISTORY = ("loss", "objective", "sparsity", "target", "lambda1", "lambda2", "lr", "circuit_sparsity")


def readout_sparsity(graph: Graph, edge_gates: HardConcrete, node_gates: HardConcrete | None,
                     trainable: torch.Tensor) -> float:
    """Sparsity of the circuit the reference read-out gives now (``EdgePruningResult.circuit()``), counting an edge
    only if its source node is kept."""
    from .circuit import binary_search_threshold

    valid = graph.valid_mask()
    soft = edge_gates.deterministic(trainable).detach().cpu().double()
    edges = (soft >= binary_search_threshold(soft, valid)) & valid
    if node_gates is not None:
        edges &= (node_gates.deterministic().detach().cpu() >= 0.5)[:, None]
    return 1.0 - int(edges.sum()) / graph.n_edges


def _value_of(name: str, obj: torch.Tensor, loss: torch.Tensor) -> str:
    if name == "the objective":
        return f"{float(obj.detach())}"
    if name == "the loss":
        return f"{float(loss.detach())}; objective {float(obj.detach())}"
    return "NaN or inf entries"


def _check_trainable(trainable_edges: Any, graph: Graph) -> torch.Tensor:
    """A [writer, reader] bool mask exactly (a [reader] vector would broadcast over writers silently)."""
    if not isinstance(trainable_edges, torch.Tensor) or tuple(trainable_edges.shape) != graph.shape:
        shape = list(trainable_edges.shape) if isinstance(trainable_edges, torch.Tensor) else type(trainable_edges).__name__
        raise EdgePruneError(f"trainable_edges must be a bool tensor of the graph's shape {list(graph.shape)} "
                             f"([n_writers, n_readers], e.g. circuit.edges), got {shape}")
    if trainable_edges.dtype != torch.bool:
        values = trainable_edges.detach().cpu()
        if not bool(((values == 0) | (values == 1)).all()):
            raise EdgePruneError("trainable_edges must be bool (or 0/1): True marks the edges the masks may keep")
    return trainable_edges.bool().cpu()


def _state(edge_gates, node_gates, lambdas, optimizer, scheduler, generator_state, history) -> dict:
    return {
        "edge_log_alpha": edge_gates.log_alpha.detach().cpu(),
        "node_log_alpha": None if node_gates is None else node_gates.log_alpha.detach().cpu(),
        "lambdas": lambdas.detach().cpu(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "generator": generator_state,
        "history": history,
    }


def _restore(state, edge_gates, node_gates, lambdas, optimizer, scheduler, gen) -> tuple[int, dict]:
    with torch.no_grad():
        edge_gates.log_alpha.copy_(state["edge_log_alpha"])
        if node_gates is not None:
            node_gates.log_alpha.copy_(state["node_log_alpha"])
        lambdas.copy_(state["lambdas"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    gen.set_state(state["generator"])
    return state["step"], {k: list(v) for k, v in state["history"].items()}
