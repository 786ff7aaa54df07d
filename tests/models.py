"""Randomly initialised TransformerLens models of many architectures, for the exactness tests."""

from __future__ import annotations

import tempfile

import torch

from tl_edgeprune.adapter import hooked_transformer_class, transformer_bridge_class

D_VOCAB = 40
N_CTX = 16

HOOKED_ARCHS = {
    # GPT-2 style: LayerNorm, learned positions, sequential attention then MLP.
    "gpt2": dict(normalization_type="LN", positional_embedding_type="standard", act_fn="gelu_new"),
    # NeoX/Pythia style: rotary, parallel attention+MLP (the MLP reads resid_pre).
    "neox": dict(
        normalization_type="LN", positional_embedding_type="rotary", rotary_dim=4, parallel_attn_mlp=True, act_fn="gelu"
    ),
    # Llama style: RMSNorm, gated SiLU MLP, grouped-query attention with 2 KV heads for 4 query heads.
    "llama": dict(
        normalization_type="RMS",
        positional_embedding_type="rotary",
        rotary_dim=8,
        gated_mlp=True,
        act_fn="silu",
        n_key_value_heads=2,
    ),
    "attn_only": dict(normalization_type="LN", positional_embedding_type="standard", attn_only=True, act_fn="gelu"),
    "alibi": dict(normalization_type="LN", positional_embedding_type="alibi", act_fn="gelu"),
    "shortformer": dict(normalization_type="LN", positional_embedding_type="shortformer", act_fn="gelu"),
}


def hooked_model(arch: str, n_layers: int = 2, dtype=torch.float32, seed: int = 0):
    HookedTransformer = hooked_transformer_class()
    from transformer_lens import HookedTransformerConfig

    cfg = HookedTransformerConfig(
        n_layers=n_layers,
        d_model=32,
        n_heads=4,
        d_head=8,
        d_mlp=64,
        d_vocab=D_VOCAB,
        n_ctx=N_CTX,
        seed=seed,
        dtype=dtype,
        **HOOKED_ARCHS[arch],
    )
    model = HookedTransformer(cfg).eval()
    # Non-zero biases everywhere, so that "biases cancel" is tested rather than assumed.
    with torch.no_grad():
        gen = torch.Generator().manual_seed(seed + 1)
        for name, p in model.named_parameters():
            if name.split(".")[-1].startswith("b_"):
                p.copy_(0.1 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return model


def word_tokenizer(vocab_size: int = D_VOCAB):
    """A tiny word-level tokenizer saved to disk (the bridge cannot boot from an in-memory one)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(vocab_size - 1)}
    vocab["<unk>"] = vocab_size - 1
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<unk>", eos_token="<unk>")
    folder = tempfile.mkdtemp(prefix="tep_tok_")
    tok.save_pretrained(folder)
    return PreTrainedTokenizerFast.from_pretrained(folder)


def bridge_model(arch: str = "gpt2", seed: int = 0, n_layers: int = 2, dtype=torch.float32):
    """A TransformerBridge booted offline from a randomly initialised local `transformers` model."""
    TransformerBridge = transformer_bridge_class()
    import transformers

    torch.manual_seed(seed)
    if arch == "gpt2":
        cfg = transformers.GPT2Config(n_layer=n_layers, n_head=4, n_embd=32, vocab_size=D_VOCAB, n_positions=N_CTX)
        hf, name = transformers.GPT2LMHeadModel(cfg), "openai-community/gpt2"
    elif arch == "neox":  # Pythia-style: rotary on half of each head, parallel attention and MLP
        cfg = transformers.GPTNeoXConfig(num_hidden_layers=n_layers, num_attention_heads=4, hidden_size=32, intermediate_size=64,
                                         vocab_size=D_VOCAB, max_position_embeddings=N_CTX, rotary_pct=0.5,
                                         use_parallel_residual=True)
        hf, name = transformers.GPTNeoXForCausalLM(cfg), "EleutherAI/pythia-70m"
    elif arch == "llama":
        cfg = transformers.LlamaConfig(
            num_hidden_layers=n_layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            hidden_size=32,
            intermediate_size=64,
            vocab_size=D_VOCAB,
            max_position_embeddings=N_CTX,
        )
        hf, name = transformers.LlamaForCausalLM(cfg), "meta-llama/Llama-3.2-1B"
    else:
        raise ValueError(arch)
    # the transformers model is cast before booting: a bridge cast afterwards keeps parts (rotary tables) in float32
    return TransformerBridge.boot_transformers(name, hf_model=hf.to(dtype).eval(), tokenizer=word_tokenizer())
