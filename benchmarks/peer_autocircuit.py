"""auto-circuit's learned-mask step on the GPT-2-small-shaped random model (run by benchmarks/peers.py).

Runs inside its own venv (auto-circuit + transformer-lens 3.9), never imported by tl_edgeprune. The step is
auto-circuit's own mask training: ``patchable_model`` (factorized, separate q/k/v), hard-concrete masks
(``mask_fn_mode``), ``patch_mode`` with resample ablations of the corrupted batch, forward, the same loss as
our step, backward, Adam. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys
import types

import torch


def shim_transformer_lens() -> None:
    """auto-circuit 1.0.1 imports names that transformer-lens 3.x moved; alias them before importing it."""
    import transformer_lens
    from transformer_lens.cache import key_value_cache

    module = types.ModuleType("transformer_lens.past_key_value_caching")
    module.HookedTransformerKeyValueCache = key_value_cache.TransformerLensKeyValueCache
    sys.modules["transformer_lens.past_key_value_caching"] = module
    transformer_lens.HookedTransformerKeyValueCache = key_value_cache.TransformerLensKeyValueCache


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--only", choices=["plain", "step"], default=None, help="measure one thing (for peak memory)")
    args = ap.parse_args()
    shim_transformer_lens()
    sys.path.insert(0, __file__.rsplit("/", 1)[0])
    from common import gpt2_hooked_transformer, peak_rss_bytes, reset_peak_rss, timed

    from auto_circuit.utils.ablation_activations import src_ablations
    from auto_circuit.types import AblationType
    from auto_circuit.utils.graph_utils import mask_fn_mode, patch_mode, patchable_model, train_mask_mode

    torch.manual_seed(0)
    model = gpt2_hooked_transformer()
    gen = torch.Generator().manual_seed(0)
    clean = torch.randint(0, model.cfg.d_vocab, (args.batch, args.seq), generator=gen)
    corrupted = torch.randint(0, model.cfg.d_vocab, (args.batch, args.seq), generator=gen)

    def plain():
        model.zero_grad(set_to_none=True)
        loss = -model(clean)[:, -1].log_softmax(-1).mean()
        loss.backward()

    out: dict = {"torch": torch.__version__, "threads": torch.get_num_threads()}
    if args.only != "step":
        base = reset_peak_rss()
        out["plain"] = timed(plain, args.repeats)
        out["plain_peak_bytes"] = peak_rss_bytes() - base
    if args.only == "plain":
        print(json.dumps(out))
        return

    model.set_use_attn_result(True)
    model.set_use_split_qkv_input(True)
    model.set_use_hook_mlp_in(True)
    for p in model.parameters():
        p.requires_grad_(False)
    pmodel = patchable_model(model, factorized=True, slice_output="last_seq", separate_qkv=True, device=torch.device("cpu"))
    out["edges"] = len(pmodel.edges)
    patch_src_outs = src_ablations(pmodel, corrupted, AblationType.RESAMPLE)
    with train_mask_mode(pmodel) as masks, mask_fn_mode(pmodel, "hard_concrete"):
        for m in masks.values():  # start near "keep": auto-circuit's mask 0 means clean (it patches at 1)
            torch.nn.init.constant_(m, -3.0)
        optimizer = torch.optim.Adam(list(masks.values()), lr=0.01)

        def step():
            optimizer.zero_grad(set_to_none=True)
            # patch_mode per step, as auto-circuit's own loops do: its shared curr_src_outs joins each step's graph
            with patch_mode(pmodel, patch_src_outs):
                logits = pmodel(clean)[pmodel.out_slice]
                loss = -logits.log_softmax(-1).mean() + 1e-4 * sum(torch.sigmoid(m).sum() for m in masks.values())
                loss.backward()
            optimizer.step()

        base = reset_peak_rss()
        out["step"] = timed(step, args.repeats)
        out["step_peak_bytes"] = peak_rss_bytes() - base
    print(json.dumps(out))


if __name__ == "__main__":
    main()
