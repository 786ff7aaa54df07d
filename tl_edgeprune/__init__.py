"""tl_edgeprune: circuits in TransformerLens models by Edge Pruning, on one masked-forward engine."""

from .counterfactual import Counterfactual
from .engine import MaskedModel, masked
from .errors import EdgePruneError, HookFiringError, UnsupportedModelError
from .graph import Graph, GraphSpec, edge_mask_from_names

__all__ = [
    "Counterfactual",
    "EdgePruneError",
    "Graph",
    "GraphSpec",
    "HookFiringError",
    "MaskedModel",
    "UnsupportedModelError",
    "edge_mask_from_names",
    "masked",
]
__version__ = "0.1.0"
