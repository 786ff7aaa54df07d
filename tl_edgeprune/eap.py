"""EAP and EAP-IG: edge scores from the mask gradient at z = 1, one backward pass per batch.

EAP: score(j→r) = (y_j − ỹ_j)·∂m/∂reader_in_r (Syed et al. 2023). EAP-IG, inputs variant (Hanna et al.
2024): the gradient is averaged over ``ig_steps`` inputs whose embeddings interpolate from corrupted to
clean; the engine's ``fixed_deltas`` keeps the clean ``y − ỹ`` as the factor at every step.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Union

import torch
from tqdm.auto import tqdm

from .ablations import Ablation, counterfactual_source
from .circuit import Circuit
from .data import PairedData, as_data, position_names_for
from .edge_pruning import frozen_parameters
from .engine import MaskedModel
from . import validation
from .errors import EdgePruneError
from .fingerprint import model_fingerprint
from .graph import Graph, InputNodes
from .metrics import _last_scored
from .options import checked_options
from .threads import torch_threads

Metric = Callable[[torch.Tensor, PairedData], torch.Tensor]


def default_metric(logits: torch.Tensor, batch: PairedData) -> torch.Tensor:
    """Logit difference (answer − distractor) when the data has them; else the answer's log-prob;
    else the mean log-prob of the model's own prediction at every scored position."""
    if batch.answers is not None:
        rows = torch.arange(len(batch), device=logits.device)
        return _answer_metric(logits[rows, _last_scored(batch).to(logits.device)], batch)
    return _prediction_metric(logits[batch.positions.to(logits.device)])


def default_metric_on_rows(scored: torch.Tensor, batch: PairedData) -> torch.Tensor:
    """``default_metric`` on ``logits[batch.positions]`` (the engine's ``gathered=True``), for a batch whose every
    example scores a position: an example's last scored row is its count's running sum − 1 (row-major order)."""
    if batch.answers is not None:
        last = batch.positions.sum(1).cumsum(0).to(scored.device) - 1
        return _answer_metric(scored[last], batch)
    return _prediction_metric(scored)


def _answer_metric(final: torch.Tensor, batch: PairedData) -> torch.Tensor:
    """[example, vocab] logits at each example's last scored position -> logit difference or answer log-prob."""
    rows = torch.arange(len(batch), device=final.device)
    answers = batch.answers.to(final.device)
    if batch.distractors is not None:
        return (final[rows, answers] - final[rows, batch.distractors.to(final.device)]).mean()
    return final.log_softmax(-1)[rows, answers].mean()


def _prediction_metric(scored: torch.Tensor) -> torch.Tensor:
    """[scored, vocab] -> mean log-prob of the model's own prediction (a numeric output: its mean value)."""
    if scored.shape[-1] == 1:  # numeric output: the value itself
        return scored[..., 0].mean()
    logp = scored.log_softmax(-1)
    return logp.gather(-1, logp.argmax(-1, keepdim=True).detach()).mean()


@dataclass
class EdgeScores:
    """Per-edge attribution scores on a graph (signed; mean over the dataset's examples)."""

    graph: Graph
    scores: torch.Tensor
    method: str
    seconds: float
    model: dict | None = None  # fingerprint of the model scored (class, name, weights hash)

    def __repr__(self) -> str:
        top = float(self.scores.abs().max()) if self.scores.numel() else 0.0
        return (f"EdgeScores({self.method}: {self.graph.n_edges:,} edges, max |score| {top:.3g}, "
                f"{self.seconds:.1f} s; .circuit(k=...) for the top k)")

    def circuit(self, k: int | None = None, fraction: float | None = None, absolute: bool = True) -> Circuit:
        """The top-k (or a fraction of) edges by |score| (or signed score)."""
        return Circuit.top_k(self.graph, self.scores, k=k, fraction=fraction, absolute=absolute, method=self.method,
                             model=self.model)

    def greedy_circuit(self, k: int, absolute: bool = True) -> Circuit:
        from .selection import greedy

        circuit = greedy(self.graph, self.scores, k, absolute=absolute, method=self.method)
        circuit.model = self.model
        return circuit


@checked_options()
def eap(
    model: Any,
    data: PairedData,
    *,
    metric: Union[str, Metric] = "default",
    ablation: Ablation = "interchange",
    ig_steps: int | None = None,
    batch_size: int = 32,
    input_nodes: InputNodes = "separate",
    mean_reference: torch.Tensor | None = None,
    progress: bool = True,
    threads: int | None = None,
    ig_grid: str = "right",
    gradient_at: str = "clean",
    positional: bool = False,
) -> EdgeScores:
    """EAP scores for every edge (``ig_steps=m`` gives EAP-IG with m interpolation steps).

    ``ig_grid``: where EAP-IG's m gradients are taken between corrupted (α = 0) and clean (α = 1): "right" is
    α = 1/m, …, 1 (ours); "left" is α = 0, …, (m−1)/m (EAP-IG's current main branch).
    ``gradient_at="corrupted"``: the gradient is taken on the corrupted run instead of the clean one (the
    "denoising" form of TransformerLens 4.3's attribution_patch), still times the clean − corrupted writer outputs.
    ``threads``: torch threads for the run (default: 1 for a small CPU model, else torch's setting; threads.py).
    ``positional=True``: one score per edge and position class of the data (``a0.h1->a2.h3<q>@END``): the EAP
    formula summed over that class's positions only.
    """
    validation.choice("ig_grid", ig_grid, ("right", "left"))
    validation.choice("gradient_at", gradient_at, ("clean", "corrupted"))
    if gradient_at == "corrupted" and ig_steps is not None:
        raise EdgePruneError("gradient_at='corrupted' is plain EAP on the corrupted run; EAP-IG (ig_steps) already "
                             "integrates from the corrupted to the clean run: pass one of the two")
    data = as_data(data)
    classes = position_names_for(data, positional)
    if ig_steps is not None:
        validation.integer("ig_steps", ig_steps, minimum=1)
    validation.integer("batch_size", batch_size, minimum=1)
    metric_fn = default_metric if metric == "default" else metric
    if not callable(metric_fn):
        raise EdgePruneError(f"metric must be 'default' or a callable (logits, batch) -> scalar, got {metric!r}")
    t0 = time.perf_counter()
    with torch_threads(model, threads), frozen_parameters(model), MaskedModel(model, input_nodes=input_nodes,
                                                                                    position_classes=classes) as mm:
        mm.check_data(data)
        graph = mm.graph
        total = torch.zeros(graph.shape, dtype=torch.float64)
        # plain EAP reads each ỹ once: keep only y − ỹ (EAP-IG reads ỹ for its fixed deltas, then every step)
        source = counterfactual_source(mm, ablation, data, mean_reference,
                                       single_use=ig_steps is None and gradient_at == "clean")
        batches = list(data.batches(batch_size))
        for batch in tqdm(batches, disable=not progress, desc="EAP-IG" if ig_steps else "EAP"):
            batch = batch.to(mm.device)
            cf = source(batch)
            z = graph.ones(device=mm.device).requires_grad_(True)
            # the default metric reads scored positions only: only those are unembedded, and handed over as rows
            # where every example scores one (a user's metric gets every position)
            at, batch_metric = None, metric_fn
            if metric_fn is default_metric:
                at = batch.positions
                if bool(at.any(1).all()):
                    batch_metric = default_metric_on_rows
            gathered = batch_metric is default_metric_on_rows
            if gradient_at == "corrupted":  # one gradient at α = 0: the corrupted run, with the clean deltas
                _integrated_gradients(mm, batch, cf, z, batch_metric, 1, "left", at, gathered)
            elif ig_steps is None:
                batch_metric(mm(batch.clean, cf, z, attention_mask=batch.attention_mask, logits_at=at,
                                position_classes=mm.position_classes_of(batch), gathered=gathered), batch).backward()
            else:
                _integrated_gradients(mm, batch, cf, z, batch_metric, ig_steps, ig_grid, at, gathered)
            total += z.grad.detach().double().cpu() * len(batch)
        scores = (total / len(data)) * graph.valid_mask()
    method = f"eap-ig({ig_steps})" if ig_steps else "eap"
    if ig_steps and ig_grid == "left":
        method += " left grid"
    if gradient_at == "corrupted":
        method = "eap (gradient at corrupted)"
    if positional:
        method += " positional"
    return EdgeScores(graph, scores.float(), method, time.perf_counter() - t0, model_fingerprint(model))


def _integrated_gradients(mm: MaskedModel, batch: PairedData, cf, z: torch.Tensor, metric_fn: Metric, steps: int,
                          grid: str = "right", logits_at: torch.Tensor | None = None, gathered: bool = False) -> None:
    """Accumulate (1/m) Σ_k grad at inputs interpolated from corrupted (α=0) to clean (α=1) into z.grad: at
    α = k/m for k = 1..m ("right") or k = 0..m−1 ("left")."""
    clean_y = mm.writer_outputs(batch.clean, batch.attention_mask)
    corrupted_y = torch.zeros_like(clean_y) if cf.values is None else cf.values.to(clean_y.dtype).expand_as(clean_y)
    deltas = clean_y - corrupted_y
    inputs = [c for c in mm.graph.writer_chunks if c.kind in ("tok", "pos", "input")]
    n_in = max(c.stop for c in inputs)
    input_delta = deltas[:n_in].sum(0)  # the residual stream's input: embeddings (clean − corrupted)
    for k in (range(1, steps + 1) if grid == "right" else range(steps)):
        alpha = k / steps

        def interpolate(resid, hook, shift=(alpha - 1.0) * input_delta):
            return resid + shift  # clean embeddings → corrupted + α·(clean − corrupted)

        with mm.extra_hooks([("blocks.0.hook_resid_pre", interpolate)]):
            logits = mm(batch.clean, cf, z, attention_mask=batch.attention_mask, fixed_deltas=deltas,
                        logits_at=logits_at, position_classes=mm.position_classes_of(batch), gathered=gathered)
        (metric_fn(logits, batch) / steps).backward()
