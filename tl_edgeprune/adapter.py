"""The one seam between tl_edgeprune and TransformerLens's two model classes.

Everything model-specific (which class, which flags, how to read W_O, how to run) lives here, and is
detected from capabilities at run time, never from version numbers.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
from torch import nn

from .distributed import is_sharded
from .errors import UnsupportedModelError


def hooked_transformer_class() -> type | None:
    """TransformerLens 2.x/3.x's HookedTransformer, or None where it was removed (4.x)."""
    try:
        from transformer_lens import HookedTransformer  # type: ignore[attr-defined]
    except ImportError:
        return None
    return HookedTransformer


def transformer_bridge_class() -> type | None:
    try:
        from transformer_lens.model_bridge import TransformerBridge
    except ImportError:
        return None
    return TransformerBridge


# Architectures where a norm sits after attention/MLP outputs, so per-head outputs do not add up.
POST_NORM_HINTS = ("Gemma2", "Gemma3", "Olmo2", "OLMo2", "Olmo3")


class ModelAdapter:
    """Wraps a HookedTransformer or TransformerBridge behind the few operations the engine needs."""

    FLAGS = ("use_split_qkv_input", "use_hook_mlp_in", "use_attn_result")

    def __init__(self, model: Any):
        from .toy_transformer import ToyTransformer

        hooked, bridge = hooked_transformer_class(), transformer_bridge_class()
        if (hooked is not None and isinstance(model, hooked)) or isinstance(model, ToyTransformer):
            self.kind = "hooked"
        elif bridge is not None and isinstance(model, bridge):
            self.kind = "bridge"
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):  # torch.compile's OptimizedModule
            raise UnsupportedModelError(
                "this model was wrapped by torch.compile: TorchDynamo traces through the mixing hooks and their "
                "autograd functions and returns wrong mask gradients (measured: docs/performance.md). Pass the "
                "uncompiled model, `compiled._orig_mod`."
            )
        else:
            supported = [c.__name__ for c in (hooked, bridge) if c is not None]
            raise UnsupportedModelError(
                f"tl_edgeprune masks TransformerLens models ({' or '.join(supported)}), got {type(model).__name__}. "
                "Load the model with TransformerLens first, e.g. TransformerBridge.boot_transformers(name) "
                "or HookedTransformer.from_pretrained(name)."
            )
        self.model = model
        self.cfg = model.cfg
        self._check_architecture()

    # ------------------------------------------------------------------ facts
    @property
    def device(self) -> torch.device:
        for p in self.model.parameters():
            return p.device
        return torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        for p in self.model.parameters():
            if p.is_floating_point():
                return p.dtype
        return torch.float32

    @property
    def d_vocab(self) -> int:
        return int(self.cfg.d_vocab)

    @property
    def d_vocab_out(self) -> int:
        """Size of the logits' last axis (differs from d_vocab for Tracr's output space)."""
        out = int(getattr(self.cfg, "d_vocab_out", -1) or -1)
        return out if out > 0 else self.d_vocab

    @property
    def n_ctx(self) -> int:
        return int(getattr(self.cfg, "n_ctx", 0) or 1 << 30)

    @property
    def unembed_input_hook(self) -> str:
        """Where the rows to unembed can be chosen: the model's code after it acts per position on any shape (the
        bridge's HF model reshapes after its final norm, so there it is the unembedding's own input)."""
        if self.kind == "bridge":
            return "unembed.hook_in"
        return f"blocks.{self.cfg.n_layers - 1}.hook_resid_post"

    def architecture_name(self) -> str:
        return str(getattr(self.cfg, "original_architecture", None) or type(self.model).__name__)

    def _check_architecture(self) -> None:
        cfg = self.cfg
        arch = self.architecture_name()
        if getattr(cfg, "use_normalization_before_and_after", False) or any(h in arch for h in POST_NORM_HINTS):
            raise UnsupportedModelError(post_norm_message(arch, detail="its config says so"))
        if not hasattr(self.model, "blocks") or len(self.model.blocks) != int(cfg.n_layers):
            raise UnsupportedModelError(
                f"{arch}: expected a decoder with `blocks` ({cfg.n_layers} layers); encoder, encoder-decoder "
                "and multimodal-only models have no residual-stream edges that tl_edgeprune can mask."
            )
        for name in ("n_layers", "n_heads", "d_model", "d_vocab"):
            if getattr(cfg, name, None) is None:
                raise UnsupportedModelError(f"{arch}: the config has no {name}; cannot build the graph")

    def W_O(self, layer: int) -> torch.Tensor:
        """[head, d_head, d_model]: per-head outputs are einsum(hook_z, W_O), never use_attn_result."""
        return self.model.blocks[layer].attn.W_O

    # ------------------------------------------------------------------ flags
    def flag_state(self) -> dict[str, Any]:
        return {f: getattr(self.cfg, f, None) for f in self.FLAGS}

    def enable_flags(self, need_mlp_in: bool, split_qkv: bool = True) -> None:
        """``split_qkv=False``: the engine computes per-head q/k/v itself (fused_qkv.py), so TL's split path is off."""
        try:
            if split_qkv:
                self.model.set_use_split_qkv_input(True)
            elif getattr(self.cfg, "use_split_qkv_input", False):
                self.model.set_use_split_qkv_input(False)
            if need_mlp_in:
                self.model.set_use_hook_mlp_in(True)
        except (NotImplementedError, AssertionError, ValueError, AttributeError) as exc:
            raise UnsupportedModelError(
                f"{self.architecture_name()}: TransformerLens cannot split this model's q/k/v or MLP inputs "
                f"({type(exc).__name__}: {exc}). tl_edgeprune needs hook_q_input/hook_k_input/hook_v_input "
                "and hook_mlp_in on every layer."
            ) from exc

    def restore_flags(self, state: dict[str, Any]) -> None:
        setters = {
            "use_split_qkv_input": "set_use_split_qkv_input",
            "use_hook_mlp_in": "set_use_hook_mlp_in",
        }
        for flag, setter in setters.items():
            old = state.get(flag)
            if old is not None and getattr(self.cfg, flag, None) != old:
                getattr(self.model, setter)(bool(old))

    # ------------------------------------------------------------------ running
    @contextlib.contextmanager
    def hooks(self, fwd_hooks: list[tuple[str, Any]]) -> Iterator[None]:
        """TransformerLens's own scoped hooks: removed on exit and on any exception."""
        with self.model.hooks(fwd_hooks=fwd_hooks):
            yield

    def forward(self, tokens: torch.Tensor, attention_mask: torch.Tensor | None = None,
                own_unembedding: bool = False) -> torch.Tensor:
        """The model's logits. ``own_unembedding``: the final norm and unembedding applied here (``unembeds_rows``)
        where the adapter can, for a forward whose final residual holds only the scored rows."""
        return self._logits(tokens, attention_mask, own_unembedding)

    def _logits(self, input: torch.Tensor, attention_mask: torch.Tensor | None, own_unembedding: bool,
                **kwargs: Any) -> torch.Tensor:
        if attention_mask is not None:
            kwargs["attention_mask"] = attention_mask
        if own_unembedding and self.unembeds_rows():
            return self._unembed(self.model(input, stop_at_layer=self.cfg.n_layers, **kwargs))
        return self.model(input, return_type="logits", **kwargs)

    def unembeds_rows(self) -> bool:
        """Whether the final norm and unembedding may be applied here rather than by the model's forward:
        TransformerLens 3's Unembed copies W_Uᵀ on every call (154 MB on GPT-2: 0.16 s on this CPU, as much as
        a few rows' unembedding itself), and the same product reads W_U in place. Only a HookedTransformer
        with TL's own Unembed on one device, not sharded by FSDP (the final weights are whole only inside the
        model's forward then), with no hook of anyone's on it (they would not fire)."""
        if self.kind != "hooked" or getattr(self.cfg, "n_devices", 1) != 1:
            return False
        try:
            from transformer_lens.components import Unembed
        except ImportError:  # transformer-lens 4: a "hooked" model is the Tracr twin (toy_transformer), not TL's
            return False

        unembed = getattr(self.model, "unembed", None)
        if type(unembed) is not Unembed or (self.cfg.normalization_type is not None
                                            and not hasattr(self.model, "ln_final")):
            return False
        if is_sharded(self.model):
            return False
        return not any(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks
                       or getattr(m, "_backward_pre_hooks", None) for m in unembed.modules())

    def _unembed(self, resid: torch.Tensor) -> torch.Tensor:
        """HookedTransformer.forward after its blocks: final norm, unembedding, Gemma's logit soft cap."""
        if self.cfg.normalization_type is not None:
            resid = self.model.ln_final(resid)
        unembed = self.model.unembed
        logits = torch.nn.functional.linear(resid, unembed.W_U.T, unembed.b_U)
        cap = getattr(self.cfg, "output_logits_soft_cap", None)
        return cap * torch.tanh(logits / cap) if cap is not None and cap > 0 else logits

    def attention_norm(self, layer: int):
        """The pre-attention norm of a layer as fused_qkv.Norm, or None where the engine cannot compute per-head q/k/v
        itself (a bridge, low precision, shortformer, 4-bit, ungrouped GQA, an unknown norm): TL's split path then."""
        from .fused_qkv import Norm
        from .toy_transformer import ToyTransformer

        if isinstance(self.model, ToyTransformer):
            return Norm("none")
        cfg = self.cfg
        if (self.kind != "hooked" or self.dtype not in (torch.float32, torch.float64)
                or getattr(cfg, "positional_embedding_type", None) == "shortformer"
                or getattr(cfg, "load_in_4bit", False) or getattr(cfg, "ungroup_grouped_query_attention", False)
                or getattr(cfg, "use_attn_in", False) or getattr(cfg, "n_devices", 1) != 1):
            return None
        from transformer_lens.components import LayerNorm, LayerNormPre, RMSNorm, RMSNormPre

        ln = getattr(self.model.blocks[layer], "ln1", None)
        kind = type(ln)
        if kind is LayerNorm:
            return Norm("ln", float(ln.eps), ln.w, ln.b)
        if kind is LayerNormPre:
            return Norm("ln", float(ln.eps))
        if kind is RMSNorm:
            return Norm("rms", float(ln.eps), ln.w)
        if kind is RMSNormPre:
            return Norm("rms", float(ln.eps))
        if isinstance(ln, nn.Identity):
            return Norm("none")
        return None

    def qkv_weights(self, layer: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """[(W, b)] of q, k, v: [heads, d_model, d_head] and [heads, d_head]; k/v per key-value head (GQA)."""
        attn = self.model.blocks[layer].attn
        grouped = hasattr(attn, "_W_K")
        return [(attn.W_Q, attn.b_Q), (attn._W_K, attn._b_K) if grouped else (attn.W_K, attn.b_K),
                (attn._W_V, attn._b_V) if grouped else (attn.W_V, attn.b_V)]

    def starts_at_layer(self, attention_mask: torch.Tensor | None) -> bool:
        """Whether ``forward_from`` runs exactly what ``forward`` runs from a layer on: HookedTransformer (and the
        Tracr twin) take ``start_at_layer``; a TransformerBridge runs its HF model whole. Shortformer blocks need
        their position embedding, and a left-padding tokenizer makes the full forward build a mask from the
        tokens: both are left to the full forward."""
        if self.kind != "hooked" or getattr(self.cfg, "positional_embedding_type", None) == "shortformer":
            return False
        tokenizer = getattr(self.model, "tokenizer", None)
        return attention_mask is not None or getattr(tokenizer, "padding_side", "right") != "left"

    def forward_from(self, layer: int, resid: torch.Tensor, attention_mask: torch.Tensor | None = None,
                     own_unembedding: bool = False) -> torch.Tensor:
        """Logits from the residual stream before ``layer`` (``starts_at_layer`` must hold)."""
        return self._logits(resid, attention_mask, own_unembedding, start_at_layer=layer)

    def hook_points(self) -> list[tuple[str, nn.Module]]:
        """(name, module) of every TransformerLens hook point of the model."""
        from transformer_lens.hook_points import HookPoint

        return [(name, m) for name, m in self.model.named_modules() if isinstance(m, HookPoint)]

    def hook_counts(self) -> dict[str, int]:
        """Hooks currently attached to each hook point, to prove the model is left as it was."""
        counts = {}
        for name, module in self.model.named_modules():
            fwd = getattr(module, "fwd_hooks", None)
            bwd = getattr(module, "bwd_hooks", None)
            if fwd is not None or bwd is not None:
                counts[name] = len(fwd or []) + len(bwd or [])
            if isinstance(module, nn.Module):
                counts[name + "#torch"] = len(module._forward_hooks) + len(module._backward_hooks)
        return counts


def post_norm_message(arch: str, detail: str) -> str:
    return (
        f"{arch} applies a norm to the attention/MLP output before it enters the residual stream "
        f"({detail}). Per-head outputs are then not additive, so per-head edges do not exist and "
        "masking them would give wrong circuits. tl_edgeprune refuses such models (Gemma-2/3, OLMo-2); "
        "use a pre-norm model (GPT-2, Pythia, Llama, Qwen, Gemma-1, ...)."
    )
