"""A/B of one engine change, switched on and off on one warm model, interleaved, one thread by default:

    python benchmarks/change_ab.py --change C [--model gpt2-shape|smollm2] [--rounds 4]

- ``discarded-qkv``: TransformerLens's own q/k/v projection, which the fused path replaces, handed zero positions
  (engine.MaskedModel._discarded_input_hook) or the whole normed residual;
- ``write-heads``: each layer's per-head outputs y_h = z_h·W_O[h] computed straight into the delta buffer
  (mixing.write_heads) or, as before, into a fresh [head, batch, pos, d_model] tensor and then written;
- ``grad-into``: the fused q/k/v backwards write each head reader's gradient into the mixing's gathering block
  (fused_qkv ``grad_into``) or, as before, into a fresh tensor that the mixing then copies there;
- ``gathered-logits``: the scored positions' logits handed to the objective as rows (``gathered=True``), or, as
  before, placed in a [batch, pos, vocab] tensor of zeros (and its gradient) that the objective then reads back;
- ``recompute-inputs``: ``recompute_inputs=True`` (an option, off by default: "off" is the library's default here)
  rebuilds each head reader's input in backward instead of keeping it (memory: benchmarks/engine.py);
- ``direct-inputs``: a forward without gradients writes each reader's input once from the residual and adds the
  sparse coefficients' rows to it (engine._direct_input), or, as before, mixes a part through its window that the
  reader then adds to the residual;
- ``own-unembedding``: with ``logits_at``, the final norm and unembedding of the scored rows applied by the adapter
  (adapter.ModelAdapter.unembeds_rows), or, as before, by the model's forward (TL 3's Unembed copies W_Uᵀ per call);
- ``eap-resid-grad``: at every mask 1 (EAP) the residual's gradient through q/k/v is the head readers' sum, which
  the fused backward (fused_qkv._SharedInput) has, with TL's own q/k/v detached; or, as before, TL's own q/k/v
  backward gives it (the readers' gradients then serve the masks alone);
- ``eap-dhead-backward``: that backward's norm terms in d_head space (its variance term from the model's own q/k/v,
  LayerNorm's mean term folded into the GEMM's weights), or, as the fourteenth session left it, from the
  d_model-sized gradient the GEMM wrote (a row dot with x into a fresh tensor, a row sum, a scaling, two adds);
- ``row-dots``: the masks' gradient GEMM as flat·rowsᵀ where a window has more writers than readers
  (mixing._row_dots), or, as before, always rows·flatᵀ;
- ``sparse-grad-mixing``: a forward with gradients mixes the windows whose coefficients are mostly 0 or mostly −1
  sparsely (mixing.SparseMixing, as forwards without gradients did), and their backward gives the deltas' gradient
  the same way (DeltaBuffer.accumulate_planned), or, as before, every such forward takes the dense GEMMs. With
  ``--log-alpha FILE`` (SmolLM2) the EP step is timed at each of a real run's saved masks, with the loop's gradient
  support, instead of at the reference start (log α = 10, almost every sample 1);
(``ln-folds``, the LayerNorm mean as one more GEMM column and its gradient as one more GEMM row, was measured at
1.01x on the EP step and reverted: its switch lives at commit 5d49703. ``kept-inputs``, each head reader group's
kept inputs formed in storage pooled with the delta buffer instead of a fresh tensor per step, was measured at
1.00x on the EP step, with 67 MiB more peak memory, and reverted: its switch lives at commit 01f4bca.)

Timed: the Edge Pruning core step (batch 32 × 20, as benchmarks/engine.py) and the frozen forward+backward; one
EAP batch (tep.eap on the same batch); an ACDC candidate from layer L/2 (96 × 16, 3.4 % kept after it, as
benchmarks/acdc_candidates.py) and a plain forward of the same data. "on" is the library's default. Each step
runs once untimed right before its timed run (``--settle``), so it is timed in the allocator state its own kind
of step leaves, as in a loop of it: without that, the first of each pair paid for the switch (a no-gradient
ACDC candidate, which ``grad-into`` cannot touch, came out 0.86x "faster" with the change on).
"""
from __future__ import annotations

import argparse
import copy
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import tl_edgeprune as tep  # noqa: E402
import tl_edgeprune.engine as E  # noqa: E402
import tl_edgeprune.fused_qkv as fused_qkv  # noqa: E402
import tl_edgeprune.mixing as mixing  # noqa: E402
from tl_edgeprune.eap import eap  # noqa: E402
from tl_edgeprune.edge_pruning import frozen_parameters  # noqa: E402

from benchmarks.common import allocator_env, fmt_stats, timed_interleaved  # noqa: E402
from benchmarks.engine import edge_pruning_step, load_model, make_batch, real_log_alpha, residual_grad_step  # noqa: E402

ON = {"on": True}


def switch_discarded_qkv():
    original = E.MaskedModel._discarded_input_hook

    def switchable(self, layer):
        inner = original(self, layer)
        return lambda x, hook: inner(x, hook) if ON["on"] else None

    E.MaskedModel._discarded_input_hook = switchable


def switch_write_heads():
    new = E.write_heads

    def old(z, W_O, cf, buffer, start, stop):  # the heads' outputs in a fresh tensor, then written
        return mixing.write(torch.einsum("bphe,hed->hbpd", z, W_O), cf, buffer, start, stop)

    E.write_heads = lambda *args: (new if ON["on"] else old)(*args)


def switch_grad_into():
    destination = fused_qkv._destination

    def switchable(ctx, part_shape):
        out = destination(ctx, part_shape)
        return out if ON["on"] else None  # off: a fresh gradient tensor, which the mixing copies into its block

    fused_qkv._destination = switchable


def switch_gathered_logits():
    new = E.MaskedModel._forward_at

    def switchable(self, tokens, attention_mask, at, start=None, gathered=False):
        if ON["on"] or not gathered:
            return new(self, tokens, attention_mask, at, start, gathered)
        return new(self, tokens, attention_mask, at, start, False)[at]  # off: zeros around the rows, then read back

    E.MaskedModel._forward_at = switchable


def switch_recompute_inputs():
    fused_input = E.MaskedModel._fused_input

    def switchable(self, *args):
        self.recompute_inputs = ON["on"]
        return fused_input(self, *args)

    E.MaskedModel._fused_input = switchable


def switch_direct_inputs():
    goes_direct = E.MaskedModel._goes_direct

    def switchable(self, run, group_index):
        return goes_direct(self, run, group_index) if ON["on"] else False  # off: every group through its window

    E.MaskedModel._goes_direct = switchable


def switch_own_unembedding():
    from tl_edgeprune.adapter import ModelAdapter

    original = ModelAdapter.unembeds_rows
    ModelAdapter.unembeds_rows = lambda self: ON["on"] and original(self)


def switch_eap_resid_grad():
    original = fused_qkv.unmixed_projection_gradient

    def before(activation, part, resid, norm, W, b, grad_into=None):  # the residual held; TL's path gives its gradient
        n, batch, pos, d = part.shape
        x = fused_qkv.centred_residual(resid.detach().reshape(batch * pos, d), norm)
        Wg, const = fused_qkv._folded(norm, W, b)
        out = fused_qkv._SharedInput.apply(part, x, Wg.detach(), const.detach(), activation.detach(), norm.kind,
                                           norm.eps, grad_into)
        return activation + out.view(n, batch, pos, -1).permute(1, 2, 0, 3)

    E.unmixed_projection_gradient = lambda *args: (original if ON["on"] else before)(*args)


class _SharedInputInDModel(torch.autograd.Function):
    """fused_qkv._SharedInput as the fourteenth session left it (for ``eap-dhead-backward``): the norm's terms in
    d_model space, from the gradient the GEMM wrote (a row dot with x, a row sum, a scaling and two adds)."""

    @staticmethod
    def forward(ctx, part, x, Wg, const, activation, kind, eps, grad_into):
        n, batch, pos, d = part.shape
        ctx.kind, ctx.part_shape, ctx.grad_into = kind, part.shape, grad_into
        rstd = mean = None
        if kind != "none":
            var = torch.linalg.vector_norm(x, dim=-1).square_().div_(d)
            if kind == "ln":
                mean = x.mean(-1)
                var.sub_(mean.square())
            rstd = torch.rsqrt(var.add_(eps))
        ctx.save_for_backward(x, Wg, rstd, mean)
        return part.new_zeros((n, batch * pos, Wg.shape[-1]))

    @staticmethod
    def backward(ctx, grad_out):
        x, Wg, rstd, mean = ctx.saved_tensors
        u = torch.bmm(grad_out.contiguous(), Wg.transpose(1, 2), out=fused_qkv._destination(ctx, ctx.part_shape))
        if ctx.kind != "none":
            d = x.shape[-1]
            g_var = torch.linalg.vecdot(u, x).mul_(rstd.pow(3)).mul_(-0.5)
            if ctx.kind == "ln":
                g_mean = u.sum(-1).mul_(rstd).add_(2 * mean * g_var).neg_()
            u.mul_(rstd[..., None])
            u.addcmul_(x.expand_as(u), (g_var * (2.0 / d))[..., None])
            if ctx.kind == "ln":
                u.add_((g_mean / d)[..., None])
        grad_x = u.sum(0) if ctx.needs_input_grad[1] else None
        return u.view(ctx.part_shape), grad_x, None, None, None, None, None, None


def switch_eap_dhead_backward():
    new = fused_qkv._SharedInput

    class Switched(torch.autograd.Function):
        @staticmethod
        def apply(*args):
            return (new if ON["on"] else _SharedInputInDModel).apply(*args)

    fused_qkv._SharedInput = Switched


def switch_row_dots():
    original = mixing._row_dots
    mixing._row_dots = lambda rows, flat: original(rows, flat) if ON["on"] else rows.mm(flat.t())


def switch_sparse_grad_mixing():
    ensure = E.MaskedModel._ensure_buffer

    def switchable(self, run, like, shape):
        fresh = run.buffer is None
        ensure(self, run, like, shape)
        if fresh and not ON["on"] and torch.is_grad_enabled() and run.buffer is not None:
            run.buffer.sparse = None  # off: the dense GEMMs, as every forward with gradients took them before

    E.MaskedModel._ensure_buffer = switchable


CHANGES = {"discarded-qkv": switch_discarded_qkv, "write-heads": switch_write_heads, "grad-into": switch_grad_into,
           "gathered-logits": switch_gathered_logits, "recompute-inputs": switch_recompute_inputs,
           "direct-inputs": switch_direct_inputs, "own-unembedding": switch_own_unembedding,
           "eap-resid-grad": switch_eap_resid_grad, "eap-dhead-backward": switch_eap_dhead_backward,
           "row-dots": switch_row_dots, "sparse-grad-mixing": switch_sparse_grad_mixing}


def ratio(s: dict) -> str:
    return f"median {s['median']:.2f}x (min {s['min']:.2f}, max {s['max']:.2f})"


def switched(on: bool, step):
    def run():
        ON["on"] = on
        try:
            return step()
        finally:
            ON["on"] = True
    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="gpt2-shape", choices=["gpt2-shape", "smollm2"])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch", type=int, default=32, help="of the EP step, the frozen step and the EAP batch")
    ap.add_argument("--settle", type=int, default=1, help="untimed runs of each step right before its timed one")
    ap.add_argument("--change", required=True, choices=sorted(CHANGES))
    ap.add_argument("--log-alpha", help="a real run's saved log α (benchmarks/mask_activity.py): the EP step at each")
    args = ap.parse_args()
    CHANGES[args.change]()
    model = load_model(args.model)
    eap_model = copy.deepcopy(model)  # EAP enters its own MaskedModel: a second model, the same weights
    clean, corrupted = make_batch(model, args.batch, 20)
    eap_data = tep.paired_data(clean, corrupted, positions="last")
    a_clean, a_corrupted = make_batch(model, 96, 16)
    a_data = tep.paired_data(a_clean, a_corrupted, positions="last")
    print(f"{args.model}, change {args.change}, batch {args.batch}, {torch.get_num_threads()} torch thread(s), "
          f"{allocator_env()}, torch {torch.__version__}, {args.rounds} rounds, settle {args.settle}")
    with frozen_parameters(model):
        frozen = residual_grad_step(model, clean)
        with tep.masked(model) as mm:
            step = edge_pruning_step(mm, clean, corrupted)
            layer = mm.graph.spec.n_layers // 2
            with torch.no_grad():
                cf = mm.interchange(a_corrupted)
                starts = mm.clean_starts(a_clean)
                gen = torch.Generator().manual_seed(0)
                mask = (torch.rand(mm.graph.shape, generator=gen) < 0.034).float() * mm.graph.valid_mask().float()
                mask[:, mm.graph.reader_columns_before(layer)] = 1.0

            def candidate():
                with torch.no_grad():
                    mm(a_clean, cf, mask, logits_at=a_data.positions, start=starts.at(layer), gathered=True)

            def plain():
                with torch.no_grad():
                    mm.full_logits(a_clean)

            def eap_batch():
                eap(eap_model, eap_data, batch_size=args.batch, progress=False)

            pairs = {"EP step": step, "EAP batch": eap_batch, f"ACDC candidate from layer {layer}": candidate}
            if args.log_alpha:
                for k, log_alpha in real_log_alpha(args.log_alpha, mm.graph).items():
                    pairs[f"EP step at step {k}'s masks"] = edge_pruning_step(mm, clean, corrupted, support=True,
                                                                             log_alpha=log_alpha)
            steps = {"frozen fwd+bwd": frozen, "plain forward (96x16)": plain}
            for name, fn in pairs.items():
                steps[f"{name}, off"] = switched(False, fn)
                steps[f"{name}, on"] = fn
            stats = timed_interleaved(steps, args.rounds, settle=args.settle)
    for name in steps:
        print(f"  {name:45s} {fmt_stats(stats[name])}")
    for name in pairs:
        print(f"  {name}, on ÷ off: {ratio(stats[f'{name}, on/{name}, off'])}")
    for name in [n for n in pairs if n.startswith("EP step")] + ["EAP batch"]:
        for which in ("off", "on"):
            print(f"  {name}, {which} ÷ frozen: {ratio(stats[f'{name}, {which}/frozen fwd+bwd'])}")
    for which in ("off", "on"):
        key = f"ACDC candidate from layer {layer}, {which}"
        print(f"  {key} ÷ plain forward: {ratio(stats[f'{key}/plain forward (96x16)'])}")


if __name__ == "__main__":
    main()
