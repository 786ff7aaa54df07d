"""Tracr's compiled `reverse` and `xproportion` as TransformerLens models, with their ground-truth circuits.

The converted weights ship with the package (``data/tracr_*.pt.gz``) so nothing here needs jax; the
optional extra ``[tracr]`` recompiles them (``compile_tracr``), which a slow test checks against tracr.
"""

from __future__ import annotations

import gzip
import io
import itertools
import os
from dataclasses import dataclass
from typing import Any

import torch

from .adapter import hooked_transformer_class
from .data import PairedData, ShardedData, paired_data
from .errors import EdgePruneError

DATA_DIR = os.path.join(os.path.dirname(__file__), "data")

TASKS = {
    "reverse": {"vocab": [1, 2, 3], "max_seq_len": 5, "numeric": False},
    "xproportion": {"vocab": ["w", "x", "y", "z"], "max_seq_len": 5, "numeric": True},
}

# ACDC's ground-truth circuits, in this package's edge names (separate tok/pos writers).
CANONICAL_CIRCUITS = {
    "reverse": [
        "tok->a0.h0<v>", "a0.h0->m0", "tok->m0", "m0->m1", "pos->m1", "tok->m1", "m1->m2",
        "m2->a3.h0<q>", "pos->a3.h0<k>", "tok->a3.h0<v>", "a3.h0->logits",
    ],
    "xproportion": [
        "tok->m0", "m0->a1.h0<v>", "pos->a1.h0<q>", "pos->a1.h0<k>", "a1.h0->logits", "tok->a1.h0<q>", "tok->a1.h0<k>",
    ],
}
# Edge Pruning settings that recover the ground truth here (zero ablation, every input); see docs/method.md.
EDGE_PRUNING_SETTINGS = {
    "reverse": dict(target_sparsity=1.02, steps=6000, sparsity_warmup=5900, lr_warmup=1500, lr=0.03,
                    lambda_lr=0.001, batch_size=16, ablation="zero", objective="kl", seed=0),
    "xproportion": dict(target_sparsity=0.92, steps=1500, sparsity_warmup=1200, lr_warmup=100, lr=0.1,
                        lambda_lr=0.01, batch_size=16, ablation="zero", objective="mse", seed=0),
}

# The edges xproportion needs to compute its output; the other two carry only tracr's BOS default.
XPROPORTION_FUNCTIONAL = ["tok->m0", "m0->a1.h0<v>", "pos->a1.h0<q>", "pos->a1.h0<k>", "a1.h0->logits"]


def compile_tracr(name: str) -> dict:
    """Compile a task with tracr (needs the [tracr] extra) and convert it to our weight payload."""
    try:
        from tracr.compiler import compiling, lib
        from tracr.rasp import rasp
    except ImportError as exc:
        raise EdgePruneError("compiling Tracr models needs the optional extra: pip install 'tl_edgeprune[tracr]'") from exc
    task = _task(name)
    program = lib.make_reverse(rasp.tokens) if name == "reverse" else lib.make_frac_prevs(rasp.tokens == "x")
    assembled = compiling.compile_rasp_to_model(
        program, vocab=set(task["vocab"]), max_seq_len=task["max_seq_len"], compiler_bos="BOS"
    )
    return assembled_to_payload(assembled, program.label, name)


def assembled_to_payload(assembled: Any, output_label: str, name: str) -> dict:
    """Weights in TransformerLens layout. The unembedding is tracr's own residual→output projection."""
    import numpy as np

    cfg = assembled.model_config
    p = {k: {kk: np.asarray(vv) for kk, vv in v.items()} for k, v in assembled.params.items()}
    d_model = p["token_embed"]["embeddings"].shape[1]
    H, d_head = cfg.num_heads, cfg.key_size
    labels = list(assembled.residual_labels)
    numeric = assembled.output_encoder is None or not hasattr(assembled.output_encoder, "encoding_map")
    if numeric:
        out_dirs = [labels.index(output_label)]
        output_encoding = None
    else:
        output_encoding = dict(assembled.output_encoder.encoding_map)
        out_dirs = [labels.index(f"{output_label}:{v}") for v, _ in sorted(output_encoding.items(), key=lambda kv: kv[1])]
    W_U = np.zeros((d_model, len(out_dirs)), dtype=np.float32)
    for j, i in enumerate(out_dirs):
        W_U[i, j] = 1.0

    def t(x):
        return torch.tensor(np.asarray(x), dtype=torch.float32)

    state = {"W_E": t(p["token_embed"]["embeddings"]), "W_pos": t(p["pos_embed"]["embeddings"]), "W_U": t(W_U)}
    for layer in range(cfg.num_layers):
        pre = f"transformer/layer_{layer}"
        for k, key in (("Q", "query"), ("K", "key"), ("V", "value")):
            w = p[f"{pre}/attn/{key}"]["w"].reshape(d_model, H, d_head).transpose(1, 0, 2)
            state[f"{layer}.W_{k}"] = t(w)
            state[f"{layer}.b_{k}"] = t(p[f"{pre}/attn/{key}"]["b"].reshape(H, d_head))
        state[f"{layer}.W_O"] = t(p[f"{pre}/attn/linear"]["w"].reshape(H, d_head, d_model))
        state[f"{layer}.b_O"] = t(p[f"{pre}/attn/linear"]["b"])
        state[f"{layer}.W_in"] = t(p[f"{pre}/mlp/linear_1"]["w"])
        state[f"{layer}.b_in"] = t(p[f"{pre}/mlp/linear_1"]["b"])
        state[f"{layer}.W_out"] = t(p[f"{pre}/mlp/linear_2"]["w"])
        state[f"{layer}.b_out"] = t(p[f"{pre}/mlp/linear_2"]["b"])
    shape = dict(
        n_layers=cfg.num_layers, d_model=d_model, n_heads=H, d_head=d_head,
        d_mlp=p["transformer/layer_0/mlp/linear_1"]["w"].shape[1], d_vocab=p["token_embed"]["embeddings"].shape[0],
        d_vocab_out=len(out_dirs), n_ctx=p["pos_embed"]["embeddings"].shape[0],
    )
    input_encoding = {str(k): int(v) for k, v in assembled.input_encoder.encoding_map.items()}
    return {
        "name": name, "shape": shape, "state": state, "input_encoding": input_encoding,
        "output_encoding": None if output_encoding is None else {str(k): int(v) for k, v in output_encoding.items()},
        "numeric": numeric,
    }


def shipped_payload(name: str) -> dict:
    _task(name)
    with gzip.open(os.path.join(DATA_DIR, f"tracr_{name}.pt.gz"), "rb") as f:
        return torch.load(io.BytesIO(f.read()), weights_only=True)  # tensors and plain types: never runs code


def save_payload(payload: dict, folder: str = DATA_DIR) -> str:
    path = os.path.join(folder, f"tracr_{payload['name']}.pt.gz")
    buf = io.BytesIO()
    torch.save(payload, buf)
    with gzip.open(path, "wb", compresslevel=9) as f:
        f.write(buf.getvalue())
    return path


def model_from_payload(payload: dict, backend: str = "auto"):
    """A HookedTransformer (transformer-lens ≤ 3) or, where it was removed, the hook-compatible ToyTransformer."""
    HookedTransformer = hooked_transformer_class()
    if backend == "auto":
        backend = "hooked" if HookedTransformer is not None else "toy"
    shape = payload["shape"]
    if backend == "hooked":
        if HookedTransformer is None:
            raise EdgePruneError("backend='hooked' needs transformer-lens < 4 (HookedTransformer); use backend='toy'")
        from transformer_lens import HookedTransformerConfig

        cfg = HookedTransformerConfig(
            **shape, act_fn="relu", normalization_type=None, attention_dir="bidirectional",
            positional_embedding_type="standard", original_architecture=f"tracr-{payload['name']}", default_prepend_bos=False,
        )
        model = HookedTransformer(cfg)
    elif backend == "toy":
        from .toy_transformer import ToyTransformer

        model = ToyTransformer(**shape, name=f"tracr-{payload['name']}")
    else:
        raise EdgePruneError(f"backend must be 'auto', 'hooked' or 'toy', got {backend!r}")
    _load_state(model, payload["state"], shape["n_layers"])
    return model.eval()


def _load_state(model, state: dict, n_layers: int) -> None:
    with torch.no_grad():
        model.embed.W_E.copy_(state["W_E"])
        model.pos_embed.W_pos.copy_(state["W_pos"])
        model.unembed.W_U.copy_(state["W_U"])
        model.unembed.b_U.zero_()
        for layer in range(n_layers):
            attn, mlp = model.blocks[layer].attn, model.blocks[layer].mlp
            for key in ("W_Q", "W_K", "W_V", "W_O", "b_Q", "b_K", "b_V", "b_O"):
                getattr(attn, key).copy_(state[f"{layer}.{key}"])
            for key in ("W_in", "b_in", "W_out", "b_out"):
                getattr(mlp, key).copy_(state[f"{layer}.{key}"])


@dataclass
class TracrTask:
    """A compiled Tracr program as a model, plus everything to run circuit discovery on it."""

    name: str
    model: Any
    input_encoding: dict[str, int]
    output_encoding: dict[str, int] | None
    numeric: bool

    @property
    def bos(self) -> int:
        return self.input_encoding["BOS"]

    def encode(self, inputs: list) -> torch.Tensor:
        """Token ids [n, 1 + len] for a list of input sequences (BOS prepended)."""
        return torch.tensor([[self.bos] + [self.input_encoding[str(x)] for x in seq] for seq in inputs])

    def inputs(self, length: int | None = None) -> list[tuple]:
        """Every input sequence of one length (default: the longest)."""
        task = TASKS[self.name]
        length = length or task["max_seq_len"]
        return list(itertools.product(task["vocab"], repeat=length))

    def decode(self, logits: torch.Tensor) -> list:
        """The program's outputs at non-BOS positions."""
        if self.numeric:
            return logits[:, 1:, 0].tolist()
        values = {str(v): v for v in TASKS[self.name]["vocab"]}  # encodings are stored with string keys
        inverse = {i: values[k] for k, i in self.output_encoding.items()}
        return [[inverse[int(i)] for i in row] for row in logits[:, 1:].argmax(-1)]

    def data(self, length: int | None = None) -> PairedData | ShardedData:
        """Every input (of one length if given, else of every length 1..max, one shard each), scored at every
        non-BOS position. Meant for zero ablation, so corrupted = clean."""
        lengths = [length] if length else range(1, TASKS[self.name]["max_seq_len"] + 1)
        shards = []
        for n in lengths:
            tokens = self.encode(self.inputs(n))
            shards.append(paired_data(tokens, tokens.clone(), positions="all"))
        return shards[0] if length else ShardedData(shards)

    @property
    def objective(self) -> str:
        return "mse" if self.numeric else "kl"

    @property
    def canonical_circuit(self) -> list[str]:
        return list(CANONICAL_CIRCUITS[self.name])


def load_tracr(name: str, backend: str = "auto") -> TracrTask:
    """``load_tracr("reverse")``: the shipped compiled model (no jax needed)."""
    payload = shipped_payload(name)
    return TracrTask(name, model_from_payload(payload, backend), payload["input_encoding"], payload["output_encoding"],
                     payload["numeric"])


def _task(name: str) -> dict:
    if name not in TASKS:
        raise EdgePruneError(f"unknown Tracr task {name!r}; choose one of {sorted(TASKS)}")
    return TASKS[name]
