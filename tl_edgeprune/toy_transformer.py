"""A small norm-free, bidirectional transformer on TransformerLens's own hook machinery (HookedRootModule).

It exists because Tracr's compiled models (no LayerNorm, ReLU MLPs, bidirectional attention) have no
HuggingFace architecture to boot a TransformerBridge from, and transformer-lens 4 removed
HookedTransformer. It exposes the same hook names and flags as HookedTransformer, so the engine treats
both alike; on transformer-lens ≤ 3 the Tracr models load as a real HookedTransformer instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import einops
import torch
from torch import nn
from transformer_lens.hook_points import HookPoint

try:  # transformer-lens 4 exports it at top level only; 2.x/3.x from hook_points
    from transformer_lens import HookedRootModule
except ImportError:  # pragma: no cover - depends on the installed version
    from transformer_lens.hook_points import HookedRootModule


@dataclass
class ToyConfig:
    n_layers: int
    d_model: int
    n_heads: int
    d_head: int
    d_mlp: int
    d_vocab: int
    d_vocab_out: int
    n_ctx: int
    original_architecture: str = "toy"
    n_key_value_heads: int | None = None
    attn_only: bool = False
    parallel_attn_mlp: bool = False
    positional_embedding_type: str = "standard"
    use_split_qkv_input: bool = False
    use_hook_mlp_in: bool = False
    use_attn_result: bool = False
    use_normalization_before_and_after: bool = False
    dtype: torch.dtype = torch.float32


class _Param(nn.Module):
    def __init__(self, **shapes):
        super().__init__()
        for name, shape in shapes.items():
            setattr(self, name, nn.Parameter(torch.zeros(shape)))


class ToyAttention(nn.Module):
    def __init__(self, cfg: ToyConfig):
        super().__init__()
        H, d, e = cfg.n_heads, cfg.d_model, cfg.d_head
        for k in "QKV":
            setattr(self, f"W_{k}", nn.Parameter(torch.zeros(H, d, e)))
            setattr(self, f"b_{k}", nn.Parameter(torch.zeros(H, e)))
        self.W_O = nn.Parameter(torch.zeros(H, e, d))
        self.b_O = nn.Parameter(torch.zeros(d))
        self.scale = e**0.5
        for name in ("hook_q", "hook_k", "hook_v", "hook_attn_scores", "hook_pattern", "hook_z"):
            setattr(self, name, HookPoint())

    def forward(self, q_in, k_in, v_in):
        """Inputs are [batch, pos, d_model] or, with split q/k/v, [batch, pos, head, d_model]."""
        def project(x, W, b):
            pattern = "b p h d, h d e -> b p h e" if x.dim() == 4 else "b p d, h d e -> b p h e"
            return einops.einsum(x, W, pattern) + b

        q = self.hook_q(project(q_in, self.W_Q, self.b_Q))
        k = self.hook_k(project(k_in, self.W_K, self.b_K))
        v = self.hook_v(project(v_in, self.W_V, self.b_V))
        scores = self.hook_attn_scores(einops.einsum(q, k, "b q h e, b k h e -> b h q k") / self.scale)
        pattern = self.hook_pattern(scores.softmax(-1))  # bidirectional: no causal mask (as compiled by tracr)
        z = self.hook_z(einops.einsum(pattern, v, "b h q k, b k h e -> b q h e"))
        return einops.einsum(z, self.W_O, "b p h e, h e d -> b p d") + self.b_O


class ToyMLP(nn.Module):
    def __init__(self, cfg: ToyConfig):
        super().__init__()
        self.W_in = nn.Parameter(torch.zeros(cfg.d_model, cfg.d_mlp))
        self.b_in = nn.Parameter(torch.zeros(cfg.d_mlp))
        self.W_out = nn.Parameter(torch.zeros(cfg.d_mlp, cfg.d_model))
        self.b_out = nn.Parameter(torch.zeros(cfg.d_model))
        self.hook_pre, self.hook_post = HookPoint(), HookPoint()

    def forward(self, x):
        post = self.hook_post(torch.relu(self.hook_pre(x @ self.W_in + self.b_in)))
        return post @ self.W_out + self.b_out


class ToyBlock(nn.Module):
    def __init__(self, cfg: ToyConfig):
        super().__init__()
        self.cfg = cfg
        self.attn, self.mlp = ToyAttention(cfg), ToyMLP(cfg)
        for name in ("hook_resid_pre", "hook_q_input", "hook_k_input", "hook_v_input", "hook_attn_out",
                     "hook_resid_mid", "hook_mlp_in", "hook_mlp_out", "hook_resid_post"):
            setattr(self, name, HookPoint())

    def forward(self, resid_pre):
        resid_pre = self.hook_resid_pre(resid_pre)
        if self.cfg.use_split_qkv_input:
            per_head = einops.repeat(resid_pre, "b p d -> b p h d", h=self.cfg.n_heads)
            q_in, k_in, v_in = self.hook_q_input(per_head), self.hook_k_input(per_head.clone()), self.hook_v_input(per_head.clone())
        else:
            q_in = k_in = v_in = resid_pre
        attn_out = self.hook_attn_out(self.attn(q_in, k_in, v_in))
        resid_mid = self.hook_resid_mid(resid_pre + attn_out)
        mlp_in = self.hook_mlp_in(resid_mid.clone()) if self.cfg.use_hook_mlp_in else resid_mid
        mlp_out = self.hook_mlp_out(self.mlp(mlp_in))
        return self.hook_resid_post(resid_mid + mlp_out)


class ToyTransformer(HookedRootModule):
    """Token + learned position embeddings, blocks, linear unembedding; HookedTransformer's hook names."""

    def __init__(self, n_layers, d_model, n_heads, d_head, d_mlp, d_vocab, d_vocab_out, n_ctx, name: str = "toy"):
        super().__init__()
        self.cfg = ToyConfig(n_layers, d_model, n_heads, d_head, d_mlp, d_vocab, d_vocab_out, n_ctx, name)
        self.embed = _Param(W_E=(d_vocab, d_model))
        self.pos_embed = _Param(W_pos=(n_ctx, d_model))
        self.unembed = _Param(W_U=(d_model, d_vocab_out), b_U=(d_vocab_out,))
        self.hook_embed, self.hook_pos_embed = HookPoint(), HookPoint()
        self.blocks = nn.ModuleList([ToyBlock(self.cfg) for _ in range(n_layers)])
        self.setup()

    def set_use_split_qkv_input(self, value: bool) -> None:
        self.cfg.use_split_qkv_input = bool(value)

    def set_use_hook_mlp_in(self, value: bool) -> None:
        self.cfg.use_hook_mlp_in = bool(value)

    def forward(self, tokens: torch.Tensor, return_type: str = "logits", attention_mask=None,
                start_at_layer: int | None = None) -> torch.Tensor:
        """``start_at_layer``: as HookedTransformer's, ``tokens`` is then the residual stream before that layer."""
        if attention_mask is not None:
            raise ValueError("ToyTransformer attends bidirectionally over whole inputs; it takes no attention_mask")
        if start_at_layer is None:
            positions = torch.arange(tokens.shape[1], device=tokens.device)
            resid = self.hook_embed(self.embed.W_E[tokens]) + self.hook_pos_embed(self.pos_embed.W_pos[positions])[None]
        else:
            resid = tokens
        for block in self.blocks[start_at_layer or 0:]:
            resid = block(resid)
        return resid @ self.unembed.W_U + self.unembed.b_U
