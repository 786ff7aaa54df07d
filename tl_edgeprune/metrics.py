"""Objectives for training and metrics for evaluation, all at the dataset's scored positions.

An objective is ``f(circuit_logits, full_logits, batch) -> scalar``; "kl" and "mse" are built in.
"""

from __future__ import annotations

from typing import Callable, Union

import torch
from jaxtyping import Float

from .data import PairedData
from .errors import EdgePruneError

Objective = Callable[[torch.Tensor, torch.Tensor, PairedData], torch.Tensor]


def _restrict(logits: torch.Tensor, batch: PairedData) -> torch.Tensor:
    return logits if batch.token_subset is None else logits[..., batch.token_subset.to(logits.device)]


def kl_divergence(circuit_logits, full_logits, batch: PairedData) -> Float[torch.Tensor, ""]:
    """KL(full ‖ circuit) averaged over scored positions; over the token subset (renormalised) if one is set."""
    pos = batch.positions.to(circuit_logits.device)
    return kl_on_rows(circuit_logits[pos], full_logits[pos], batch)


def mean_squared_error(circuit_logits, full_logits, batch: PairedData) -> Float[torch.Tensor, ""]:
    """For numeric outputs (e.g. Tracr xproportion): MSE of the raw outputs at scored positions."""
    pos = batch.positions.to(circuit_logits.device)
    return mse_on_rows(circuit_logits[pos], full_logits[pos], batch)


def kl_on_rows(circuit_rows: Float[torch.Tensor, "scored vocab"], full_rows: Float[torch.Tensor, "scored vocab"],
               batch: PairedData) -> Float[torch.Tensor, ""]:
    """``kl_divergence`` on the scored positions' logits alone (``logits[batch.positions]``, as the engine returns
    them with ``gathered=True``): the same arithmetic, without [batch, pos, vocab] tensors of zeros."""
    log_q = _restrict(circuit_rows, batch).float().log_softmax(-1)
    log_p = _restrict(full_rows, batch).float().log_softmax(-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1).mean()


def mse_on_rows(circuit_rows: Float[torch.Tensor, "scored vocab"], full_rows: Float[torch.Tensor, "scored vocab"],
                batch: PairedData) -> Float[torch.Tensor, ""]:
    """``mean_squared_error`` on the scored positions' logits alone."""
    return (_restrict(circuit_rows, batch).float() - _restrict(full_rows, batch).float()).pow(2).mean()


OBJECTIVES: dict[str, Objective] = {"kl": kl_divergence, "mse": mean_squared_error}
# The built-in objectives read the scored positions alone: their forms on those rows (engine's gathered=True)
ON_SCORED_ROWS: dict[Objective, Objective] = {kl_divergence: kl_on_rows, mean_squared_error: mse_on_rows}


def resolve_objective(objective: Union[str, Objective]) -> Objective:
    if callable(objective):
        return objective
    try:
        return OBJECTIVES[objective]
    except KeyError:
        raise EdgePruneError(f"objective must be one of {sorted(OBJECTIVES)} or a callable, got {objective!r}") from None


def _last_scored(batch: PairedData) -> torch.Tensor:
    """Index of the last scored position per example (where answers are read)."""
    width = batch.positions.shape[1]
    return (batch.positions.long() * torch.arange(1, width + 1, device=batch.positions.device)).argmax(1)


def answer_metrics(circuit_logits, full_logits, batch: PairedData) -> dict[str, float]:
    """Logit/probability difference and accuracy at each example's last scored position (needs answers)."""
    out: dict[str, float] = {}
    if batch.answers is None:
        return out
    rows = torch.arange(len(batch), device=circuit_logits.device)
    at = _last_scored(batch).to(circuit_logits.device)
    logits = circuit_logits[rows, at].float()
    probs = logits.softmax(-1)
    answers = batch.answers.to(logits.device)
    out["accuracy"] = float((logits.argmax(-1) == answers).float().mean())
    if batch.distractors is not None:
        distractors = batch.distractors.to(logits.device)
        out["logit_diff"] = float((logits[rows, answers] - logits[rows, distractors]).mean())
        out["prob_diff"] = float((probs[rows, answers] - probs[rows, distractors]).mean())
    return out


def exact_match(circuit_logits, full_logits, batch: PairedData) -> float:
    """Fraction of examples whose argmax agrees with the full model at every scored position."""
    agree = _restrict(circuit_logits, batch).argmax(-1) == _restrict(full_logits, batch).argmax(-1)
    agree = agree | ~batch.positions.to(agree.device)
    return float(agree.all(1).float().mean())


def require_positions(batch: PairedData) -> None:
    if not bool(batch.positions.any()):
        raise EdgePruneError("this batch has no valid positions to score")
