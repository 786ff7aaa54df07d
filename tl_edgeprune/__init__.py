"""tl_edgeprune: circuits in TransformerLens models by Edge Pruning, on one masked-forward engine.

The methods are functions here (``tep.edge_pruning``, ``tep.eap``, ``tep.acdc``, ``tep.hap``). Importing them from
their modules (``from tl_edgeprune.eap import eap``) gives the same functions and leaves these names as they are.
"""

from . import tasks

from .circuit import Circuit, evaluate_circuits
from .counterfactual import Counterfactual
from .data import PairedData, ShardedData, as_data, by_position, paired_data
from .distributed import shard_model
from .edge_pruning import EdgePruningConfig, EdgePruningResult, edge_pruning
from .engine import MaskedModel, masked
from .errors import EdgePruneError, HookFiringError, UnsupportedModelError
from .graph import Graph, GraphSpec, edge_mask_from_names
from .hard_concrete import HardConcrete
from .eap import EdgeScores, eap
from .acdc import acdc
from .hap import attribution_init, hap
from .tracr_models import load_tracr

__all__ = [
    "Circuit",
    "Counterfactual",
    "EdgePruneError",
    "EdgePruningConfig",
    "EdgePruningResult",
    "Graph",
    "GraphSpec",
    "HardConcrete",
    "HookFiringError",
    "MaskedModel",
    "PairedData",
    "ShardedData",
    "as_data",
    "by_position",
    "UnsupportedModelError",
    "EdgeScores",
    "acdc",
    "attribution_init",
    "eap",
    "edge_mask_from_names",
    "evaluate_circuits",
    "edge_pruning",
    "hap",
    "load_tracr",
    "masked",
    "paired_data",
    "shard_model",
]
__version__ = "0.1.0"
