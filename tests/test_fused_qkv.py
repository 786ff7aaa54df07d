"""The engine's own per-head q/k/v (fused_qkv.py) against TransformerLens's split-q/k/v path, on every architecture
that has it: same logits and mask gradients at random fractional masks, ordinary and positional graphs. 1e-5 in
float32 (the engine's other tests compare both paths with plain TL hooks)."""

import contextlib

import pytest
import torch

import tl_edgeprune as tep
from tl_edgeprune.errors import UnsupportedModelError

from .conftest import HAS_BRIDGE, MODEL_IDS, make_model

ATOL = 1e-5
HOOKED = [m for m in MODEL_IDS if m.startswith("hooked")]


def masked_run(model, fused, clean, corrupted, classes=None, seed=0, recompute=False):
    names = ("A", "B") if classes is not None else ()
    with tep.masked(model, fused_qkv=fused, position_classes=names, recompute_inputs=recompute) as mm:
        gen = torch.Generator().manual_seed(seed)
        z = torch.rand(mm.graph.shape, generator=gen).requires_grad_(True)
        nodes = torch.rand(mm.graph.n_writers, generator=gen).requires_grad_(True)
        logits = mm(clean, mm.interchange(corrupted), z, nodes, position_classes=classes)
        (logits[:, -1].log_softmax(-1)[:, :5].sum() + logits.square().mean()).backward()
        used = mm.fused_qkv
    return logits.detach(), z.grad, nodes.grad, used


@pytest.mark.parametrize("model_id", HOOKED)
@pytest.mark.parametrize("positional", [False, True])
@pytest.mark.parametrize("frozen", [True, False], ids=["frozen", "weights-with-grad"])
def test_fused_qkv_equals_tl_split_path(model_id, positional, frozen, tokens):
    """Frozen weights (every method's case) take the written-out backward (fused_qkv._NormProject); weights that
    need gradients take autograd's own path."""
    from tl_edgeprune.edge_pruning import frozen_parameters

    model = make_model(model_id)
    clean, corrupted = tokens
    classes = torch.randint(0, 2, clean.shape, generator=torch.Generator().manual_seed(1)) if positional else None
    with frozen_parameters(model) if frozen else contextlib.nullcontext():
        fused = masked_run(model, None, clean, corrupted, classes)
        split = masked_run(model, False, clean, corrupted, classes)
    assert fused[3] == ("shortformer" not in model_id) and not split[3]
    for a, b, what in zip(fused[:3], split[:3], ("logits", "edge-mask gradient", "node-mask gradient")):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=0, msg=what)
    assert fused[1].abs().max() > 1e-4


@pytest.mark.skipif(not HAS_BRIDGE, reason="no TransformerBridge in this transformer-lens")
def test_fused_qkv_refused_where_the_engine_cannot(tokens):
    model = make_model("bridge-gpt2")
    with pytest.raises(UnsupportedModelError, match="fused_qkv=True"):
        tep.masked(model, fused_qkv=True)
    with tep.masked(model) as mm:
        assert not mm.fused_qkv


@pytest.mark.parametrize("model_id", [m for m in HOOKED if "shortformer" not in m][:1])
def test_fused_qkv_in_bfloat16_falls_back_to_tl(model_id):
    model = make_model(model_id, dtype=torch.bfloat16)
    with tep.masked(model) as mm:
        assert not mm.fused_qkv  # TL's norms compute in float32 there; the split path keeps that


@pytest.mark.parametrize("model_id", [m for m in HOOKED if "shortformer" not in m])
def test_tl_own_qkv_projection_skipped_only_where_unread(model_id, tokens):
    """Under the fused path TL's own q/k/v of the normed residual are replaced, so the engine hands that projection
    zero positions; EAP's every-mask-1 forward reads them (full width), and so does a user's observer hook there.
    The logits stay TL's split path's either way (1e-5, float32)."""
    model = make_model(model_id)
    clean, corrupted = tokens
    widths = []

    def width(module, args, kwargs):
        widths.append(kwargs["query_input"].shape[1])

    handles = [block.attn.register_forward_pre_hook(width, with_kwargs=True) for block in model.blocks]
    z = torch.rand(tep.Graph.from_model(model).shape, generator=torch.Generator().manual_seed(0))
    try:
        with tep.masked(model, fused_qkv=False) as mm:
            reference = mm(clean, mm.interchange(corrupted), z)
        with tep.masked(model) as mm:
            assert mm.fused_qkv
            cf = mm.interchange(corrupted)  # the model's own forward: full width
            widths.clear()
            logits = mm(clean, cf, z)
            assert widths == [0] * model.cfg.n_layers
            torch.testing.assert_close(logits, reference, atol=ATOL, rtol=0)
            cf = mm.interchange(corrupted)
            widths.clear()
            mm(clean, cf)  # every mask 1
            assert widths == [clean.shape[1]] * model.cfg.n_layers
            seen, cf = [], mm.interchange(corrupted)
            with model.hooks([("blocks.0.ln1.hook_normalized", lambda x, hook: seen.append(x.shape[1]))]):
                widths.clear()
                logits = mm(clean, cf, z)
            assert seen == [clean.shape[1]] * 3 and widths[0] == clean.shape[1] and widths[1:] == [0] * (len(widths) - 1)
            torch.testing.assert_close(logits, reference, atol=ATOL, rtol=0)
    finally:
        for handle in handles:
            handle.remove()


@pytest.mark.parametrize("model_id", [m for m in HOOKED if "shortformer" not in m][:2])
@pytest.mark.parametrize("every_mask_one", [False, True], ids=["fractional", "eap"])
def test_fused_backward_writes_the_parts_gradient_where_the_mixing_gathers_it(model_id, every_mask_one, tokens,
                                                                              monkeypatch):
    """With frozen weights the fused backwards (_NormProject, and _SharedInput at every mask 1) write each head
    reader's gradient into its rows of the window's gathering block, so the mixing copies only the MLP and logits
    readers' gradients. The values are checked against TL's split path by the tests above."""
    import tl_edgeprune.mixing as mixing
    from tl_edgeprune.edge_pruning import frozen_parameters

    model = make_model(model_id)
    clean, corrupted = tokens
    seen = {"in place": 0, "copied": 0}
    gather = mixing._gather

    def counting(part_grads, into, split_sizes):
        for g, dst in zip(part_grads, into.split(tuple(split_sizes))):
            if g is not None:
                same = g.data_ptr() == dst.data_ptr() and g.stride() == dst.stride()
                seen["in place" if same else "copied"] += 1
        return gather(part_grads, into, split_sizes)

    monkeypatch.setattr(mixing, "_gather", counting)
    with frozen_parameters(model), tep.masked(model) as mm:
        z = (mm.graph.ones() if every_mask_one else torch.rand(mm.graph.shape)).requires_grad_(True)
        mm(clean, mm.interchange(corrupted), z).square().mean().backward()
    n_layers = model.cfg.n_layers
    assert seen == {"in place": 3 * n_layers, "copied": n_layers + 1}


@pytest.mark.parametrize("model_id", [m for m in HOOKED if "shortformer" not in m])
@pytest.mark.parametrize("positional", [False, True])
@pytest.mark.parametrize("frozen", [True, False], ids=["frozen", "weights-with-grad"])
def test_recomputed_inputs_equal_tl_split_path(model_id, positional, frozen, tokens):
    """recompute_inputs=True: each head reader's input is rebuilt in backward from the delta buffer and the residual,
    not kept. Logits and mask gradients equal TL's split path (1e-5) and the logits the default path's bit for bit;
    with frozen weights nothing of a head reader's input size is kept for backward (counted by saved-tensor hooks:
    at least Σ (readers − 1)·batch·pos·d_model less), with weights that take gradients autograd's path keeps them."""
    from tl_edgeprune.edge_pruning import frozen_parameters

    model = make_model(model_id)
    clean, corrupted = tokens
    classes = torch.randint(0, 2, clean.shape, generator=torch.Generator().manual_seed(1)) if positional else None
    saved = {}

    def counted(recompute):
        total = [0]

        def pack(t):
            total[0] += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = masked_run(model, None, clean, corrupted, classes, recompute=recompute)
        saved[recompute] = total[0]
        return out

    with frozen_parameters(model) if frozen else contextlib.nullcontext():
        rebuilt, default = counted(True), counted(False)
        split = masked_run(model, False, clean, corrupted, classes)
    assert rebuilt[3]
    torch.testing.assert_close(rebuilt[0], default[0], atol=0, rtol=0, msg="logits")
    for a, b, what in zip(rebuilt[:3], split[:3], ("logits", "edge-mask gradient", "node-mask gradient")):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=0, msg=what)
    assert rebuilt[1].abs().max() > 1e-4
    cfg = model.cfg
    n_kv = cfg.n_key_value_heads or cfg.n_heads
    per_layer = (cfg.n_heads - 1) + 2 * (n_kv - 1)  # q, k and v parts: each keeps its residual only, not n inputs
    least = cfg.n_layers * per_layer * clean.numel() * cfg.d_model * 4
    if frozen:
        assert saved[False] - saved[True] >= least, (saved, least)
    else:
        assert saved[False] == saved[True]
