"""Hard-concrete masks (Louizos et al. 2018), with Edge Pruning's constants.

A mask entry is ``z = clamp(σ((log u − log(1−u) + log α)/β)·(r − l) + l, 0, 1)`` with u ~ U(eps, 1−eps):
exactly 0 or 1 with positive probability, differentiable in log α in between.
"""

from __future__ import annotations

import math

import torch
from jaxtyping import Bool, Float
from torch import nn

LEFT, RIGHT, BETA, EPS = -0.1, 1.1, 2.0 / 3.0, 1e-6
INIT_MEAN, INIT_STD = 10.0, 0.01


class HardConcrete(nn.Module):
    """A tensor of hard-concrete gates over ``shape``; ``log_alpha`` is the learned parameter."""

    def __init__(self, shape: tuple[int, ...], generator: torch.Generator | None = None, device=None,
                 init_mean: float = INIT_MEAN):
        super().__init__()
        init = torch.empty(shape, dtype=torch.float32).normal_(init_mean, INIT_STD, generator=generator)
        self.log_alpha = nn.Parameter(init.to(device))

    def sample(self, generator: torch.Generator | None = None) -> Float[torch.Tensor, "..."]:
        """One stochastic sample (shared over the batch), differentiable in log α."""
        return self.sample_with_support(generator)[0]

    def sample_with_support(self, generator: torch.Generator | None = None
                            ) -> tuple[Float[torch.Tensor, "..."], Bool[torch.Tensor, "..."]]:
        """A sample and where it passes a gradient to log α: a sample clamped at 0 or 1 passes none, so the
        gradient with respect to it there need not be computed (torch's clamp passes it at the ends themselves)."""
        u = torch.rand(self.log_alpha.shape, generator=generator, dtype=self.log_alpha.dtype)
        u = u.to(self.log_alpha.device).clamp(EPS, 1 - EPS)
        s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + self.log_alpha) / BETA)
        stretched = s * (RIGHT - LEFT) + LEFT
        passes = (stretched >= 0.0) & (stretched <= 1.0)
        return stretched.clamp(0.0, 1.0), passes

    def prob_nonzero(self) -> Float[torch.Tensor, "..."]:
        """P(z > 0): the expected L0 contribution of each gate."""
        return torch.sigmoid(self.log_alpha - BETA * math.log(-LEFT / RIGHT))

    def deterministic(self, valid: torch.Tensor | None = None) -> Float[torch.Tensor, "..."]:
        """Eval mask: σ(0.8·log α/β), with the round(Σ P(z=0)) smallest entries set to 0 (reference rule)."""
        with torch.no_grad():
            la = self.log_alpha.detach()
            soft = torch.sigmoid(0.8 * la / BETA)
            sel = torch.ones_like(soft, dtype=torch.bool) if valid is None else valid.to(soft.device)
            expected_zeros = int(round(float((1 - self.prob_nonzero()[sel]).sum())))
            if expected_zeros > 0:
                flat = soft[sel]
                order = torch.argsort(flat)[:expected_zeros]
                flat[order] = 0.0
                soft = soft.clone()
                soft[sel] = flat
            if valid is not None:
                soft = soft * valid.to(soft.dtype).to(soft.device)
            return soft


def gradient_support(edge_passes: Bool[torch.Tensor, "writer reader"], trainable: Bool[torch.Tensor, "writer reader"],
                     node_passes: Bool[torch.Tensor, " writer"] | None = None) -> Bool[torch.Tensor, "writer reader"]:
    """Where a step reads the masks' gradient (the engine's ``grad_support``): the trainable edges whose sample
    passes one, and every edge out of a node whose own sample does (a node's gradient reads them all)."""
    support = edge_passes & trainable
    return support if node_passes is None else support | node_passes[:, None]
