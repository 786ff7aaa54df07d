"""Edge Pruning (Bhaskar et al. 2024): learn hard-concrete edge masks under a Lagrangian sparsity target.

loss = objective(full ‖ circuit) + λ1·(s − t) + λ2·(s − t)², with s = 1 − Σz/N over real edges, t rising
linearly to the target, log α minimised and λ maximised (gradient ascent), one mask sample per step.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Union

import torch
from torch import nn
from tqdm.auto import tqdm

from .ablations import Ablation, counterfactual_source
from .circuit import Circuit, _atomic_write
from .data import PairedData, as_data
from .engine import MaskedModel
from .errors import EdgePruneError
from .example_cache import ExampleCache
from .graph import Graph, InputNodes
from .hard_concrete import HardConcrete
from .metrics import OBJECTIVES, Objective, resolve_objective


@dataclass
class EdgePruningConfig:
    """Defaults are the reference's GPT-2 settings (see docs/method.md for the mapping)."""

    target_sparsity: float = 0.95
    start_sparsity: float = 0.0  # the target rises linearly from here (HAP starts at its preselection's sparsity)
    steps: int = 3000
    sparsity_warmup: int = 2500
    lr: float = 0.8  # log α of edges and nodes
    lambda_lr: float = 0.8
    lr_warmup: int = 200
    batch_size: int = 32
    grad_clip: float = 1.0
    node_masks: bool = True
    # "expected": 1 − Σ P(z>0)/N (Louizos et al.'s L0 expectation, smooth in log α). "sampled": 1 − Σz/N from the
    # sampled gates, as the reference code does; at log α ≈ 10 the clamp saturates and its gradient is 0 unless
    # u < 2.2e-4, and on Tracr reverse it never left sparsity 0 in 6000 steps here (docs/method.md).
    sparsity_from: str = "expected"
    objective: Union[str, Objective] = "kl"
    ablation: Ablation = "interchange"
    seed: int = 0
    input_nodes: InputNodes = "separate"
    checkpoint_path: str | None = None
    checkpoint_every: int | None = None
    progress: bool = True
    # Keep every example's ỹ and full-model logits (at its scored positions, for the built-in objectives) after its
    # first epoch if the whole dataset's take at most this many GiB (on the model's device); later epochs then skip
    # both no-gradient forwards. 0 recomputes every step.
    cache_gib: float = 2.0

    def validate(self) -> None:
        if not (0 < self.target_sparsity <= 2):
            raise EdgePruneError(f"target_sparsity must lie in (0, 2], got {self.target_sparsity} (values above 1 push harder)")
        if not (0 <= self.start_sparsity <= self.target_sparsity):
            raise EdgePruneError(f"start_sparsity must lie in [0, target_sparsity], got {self.start_sparsity}")
        for name in ("steps", "batch_size"):
            if getattr(self, name) < 1:
                raise EdgePruneError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("sparsity_warmup", "lr_warmup"):
            if getattr(self, name) < 0:
                raise EdgePruneError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.sparsity_from not in ("sampled", "expected"):
            raise EdgePruneError(f"sparsity_from must be 'sampled' or 'expected', got {self.sparsity_from!r}")
        if self.lr <= 0 or self.lambda_lr <= 0:
            raise EdgePruneError("learning rates must be positive")
        if not self.cache_gib >= 0:
            raise EdgePruneError(f"cache_gib must be >= 0 (0 turns the per-example cache off), got {self.cache_gib}")
        if self.checkpoint_every is not None and (self.checkpoint_every < 1 or not self.checkpoint_path):
            raise EdgePruneError("checkpoint_every needs a checkpoint_path and a positive interval")

    def fingerprint(self) -> dict:
        """What must match for a checkpoint to be resumed."""
        keep = ("target_sparsity", "start_sparsity", "steps", "sparsity_warmup", "lr", "lambda_lr", "lr_warmup", "batch_size",
                "grad_clip", "node_masks", "sparsity_from", "seed", "input_nodes")
        return {k: getattr(self, k) for k in keep}


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

    def soft_masks(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Deterministic eval masks (edges, nodes) by the reference rule."""
        edges = _gate(self.edge_log_alpha).deterministic(self.trainable)
        nodes = None if self.node_log_alpha is None else _gate(self.node_log_alpha).deterministic()
        return edges, nodes

    def circuit(self, prune_dangling: bool = False) -> Circuit:
        """Binary circuit by the reference binary search (binary density = mean soft mask)."""
        edges, nodes = self.soft_masks()
        node_keep = None if nodes is None else nodes >= 0.5
        circuit = Circuit.from_soft_mask(self.graph, edges, node_keep, info=self._info())
        return circuit.prune_dangling() if prune_dangling else circuit

    def circuit_top_k(self, k: int) -> Circuit:
        """Exactly k edges, chosen by soft mask value."""
        edges, _ = self.soft_masks()
        return Circuit.top_k(self.graph, edges, k=k, absolute=False, method="edge_pruning")

    def _info(self) -> dict:
        return {"target_sparsity": self.config.target_sparsity, "steps": self.config.steps, "seconds": self.seconds,
                **self.info}


def _data_parallel() -> tuple[int, int]:
    """(rank, world size) when torch.distributed is initialised (e.g. under torchrun), else (0, 1)."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _rank_slice(n: int, rank: int, world: int) -> slice:
    """This rank's equal slice of a batch of n; the mean of the ranks' gradients is then the full batch's."""
    if n % world:
        raise EdgePruneError(f"data-parallel Edge Pruning needs batches divisible by the {world} ranks; got {n} "
                             "(choose batch_size and a dataset size that are multiples of the world size)")
    return slice(rank * n // world, (rank + 1) * n // world)


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


def edge_pruning(
    model: Any,
    data: PairedData,
    target_sparsity: float = 0.95,
    *,
    trainable_edges: torch.Tensor | None = None,
    mean_reference: torch.Tensor | None = None,
    resume: bool = False,
    callback: Callable[[int, dict], None] | None = None,
    **options: Any,
) -> EdgePruningResult:
    """Train Edge Pruning masks on ``data`` and return them; ``.circuit()`` reads out the binary circuit.

    ``trainable_edges`` ([writer, reader] bool) restricts learning to those edges, the rest fixed at 0 (HAP).
    """
    cfg = EdgePruningConfig(target_sparsity=target_sparsity, **options)
    cfg.validate()
    data = as_data(data)
    if len(data) == 0:
        raise EdgePruneError("the dataset is empty")
    objective = resolve_objective(cfg.objective)
    if resume and not (cfg.checkpoint_path and os.path.exists(cfg.checkpoint_path)):
        raise EdgePruneError(f"resume=True but there is no checkpoint at {cfg.checkpoint_path!r}")
    t0 = time.perf_counter()
    rank, world = _data_parallel()
    with frozen_parameters(model), MaskedModel(model, input_nodes=cfg.input_nodes) as mm:
        graph, device = mm.graph, mm.device
        valid = graph.valid_mask()
        trainable = valid if trainable_edges is None else valid & trainable_edges.bool().cpu()
        trainable_f = trainable.to(device=device, dtype=torch.float32)
        n_edges = graph.n_edges
        gen = torch.Generator().manual_seed(cfg.seed)
        edge_gates = HardConcrete(graph.shape, gen, device)
        node_gates = HardConcrete((graph.n_writers,), gen, device) if cfg.node_masks else None
        lambdas = nn.Parameter(torch.zeros(2, device=device))
        groups = [{"params": [edge_gates.log_alpha], "lr": cfg.lr}]
        if node_gates is not None:
            groups.append({"params": [node_gates.log_alpha], "lr": cfg.lr})
        groups.append({"params": [lambdas], "lr": cfg.lambda_lr})
        optimizer = torch.optim.AdamW(groups, weight_decay=0.0)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg.lr_warmup, cfg.steps))
        params = [p for g in groups for p in g["params"]]
        history: dict[str, list[float]] = {k: [] for k in ("loss", "objective", "sparsity", "target", "lambda1", "lambda2", "lr")}
        start = 0
        if resume:
            start, history = _load_checkpoint(cfg, edge_gates, node_gates, lambdas, optimizer, scheduler, gen)
        source = counterfactual_source(mm, cfg.ablation, data, mean_reference, single_use=True)  # keep y − ỹ only
        # The built-in objectives read scored positions only: only those are unembedded, and cached.
        scored_only = objective in OBJECTIVES.values()
        per_example = ExampleCache(mm, data, source, cfg.cache_gib, scored_only=scored_only)

        def save(step: int, path: str) -> None:
            if rank != 0:  # masks are replicated: one rank writes
                return
            _save_checkpoint(path, cfg, step, edge_gates, node_gates, lambdas, optimizer, scheduler, gen, history)

        step_batches = StepBatches(data, cfg.batch_size, cfg.seed)
        bar = tqdm(range(start, cfg.steps), disable=not cfg.progress or rank != 0, desc="edge pruning", initial=start, total=cfg.steps)
        for step in bar:
            batch, shard, rows = step_batches(step)
            if world > 1:
                mine = _rank_slice(len(batch), rank, world)
                batch, rows = batch.select(mine), rows[mine]
            batch = batch.to(device)
            cf, full = per_example(batch, shard, rows)  # ỹ and the target (the unmasked model's logits)
            z = edge_gates.sample(gen) * trainable_f
            nodes = node_gates.sample(gen) if node_gates is not None else None
            logits = mm(batch.clean, cf, z, nodes, attention_mask=batch.attention_mask,
                        logits_at=batch.positions if scored_only else None)
            obj = objective(logits, full, batch)
            if cfg.sparsity_from == "sampled":
                sparsity = 1 - z.sum() / n_edges
            else:
                sparsity = 1 - (edge_gates.prob_nonzero() * trainable_f).sum() / n_edges
            ramp = min(1.0, step / cfg.sparsity_warmup) if cfg.sparsity_warmup else 1.0
            target = cfg.start_sparsity + (cfg.target_sparsity - cfg.start_sparsity) * ramp
            gap = sparsity - target
            loss = obj + lambdas[0] * gap + lambdas[1] * gap**2
            if not torch.isfinite(loss):
                path = cfg.checkpoint_path or os.path.join(tempfile.gettempdir(), f"edge_pruning_failed_step{step}.pt")
                save(step, path)
                raise EdgePruneError(
                    f"the loss became {float(loss.detach())} at step {step} (objective {float(obj.detach())}); the state before this "
                    f"step is saved at {path}. Lower lr/lambda_lr, check the data, or resume from the checkpoint."
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if world > 1:  # average gradients over ranks: the same update everywhere keeps masks replicated
                for p in params:
                    if p.grad is not None:
                        torch.distributed.all_reduce(p.grad)
                        p.grad /= world
            lambdas.grad.neg_()  # gradient ascent on λ
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            optimizer.step()
            scheduler.step()
            row = {"loss": float(loss.detach()), "objective": float(obj.detach()), "sparsity": float(sparsity.detach()), "target": target,
                   "lambda1": float(lambdas[0].detach()), "lambda2": float(lambdas[1].detach()), "lr": scheduler.get_last_lr()[0]}
            for k, v in row.items():
                history[k].append(v)
            if callback is not None:
                callback(step, row)
            if step % 10 == 0 or step == cfg.steps - 1:
                bar.set_postfix(obj=f"{row['objective']:.4f}", s=f"{row['sparsity']:.3f}", t=f"{target:.3f}",
                                l1=f"{row['lambda1']:.2f}")
            if cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0:
                save(step + 1, cfg.checkpoint_path)
        bar.close()
        return EdgePruningResult(
            graph=graph,
            edge_log_alpha=edge_gates.log_alpha.detach().cpu(),
            node_log_alpha=None if node_gates is None else node_gates.log_alpha.detach().cpu(),
            trainable=trainable,
            history=history,
            config=cfg,
            seconds=time.perf_counter() - t0,
            info={"example_cache": per_example.describe()},
        )


def _save_checkpoint(path, cfg, step, edge_gates, node_gates, lambdas, optimizer, scheduler, gen, history) -> None:
    state = {
        "step": step,
        "fingerprint": cfg.fingerprint(),
        "edge_log_alpha": edge_gates.log_alpha.detach().cpu(),
        "node_log_alpha": None if node_gates is None else node_gates.log_alpha.detach().cpu(),
        "lambdas": lambdas.detach().cpu(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "generator": gen.get_state(),
        "history": history,
    }
    _atomic_write(path, lambda f: torch.save(state, f))


def _load_checkpoint(cfg, edge_gates, node_gates, lambdas, optimizer, scheduler, gen):
    state = torch.load(cfg.checkpoint_path, weights_only=False)
    if state["fingerprint"] != cfg.fingerprint():
        diff = {k: (state["fingerprint"].get(k), v) for k, v in cfg.fingerprint().items() if state["fingerprint"].get(k) != v}
        raise EdgePruneError(f"the checkpoint was made with other settings (checkpoint, now): {diff}")
    with torch.no_grad():
        edge_gates.log_alpha.copy_(state["edge_log_alpha"])
        if node_gates is not None:
            node_gates.log_alpha.copy_(state["node_log_alpha"])
        lambdas.copy_(state["lambdas"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    gen.set_state(state["generator"])
    return state["step"], {k: list(v) for k, v in state["history"].items()}
