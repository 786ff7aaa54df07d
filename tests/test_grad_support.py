"""``grad_support``: the masks' gradient computed only where the caller reads it (Edge Pruning's unclamped samples).

Where the support holds, the gradient must equal the one computed everywhere (1e-5 absolute, float32: the sub-GEMMs
only regroup the same dot products; observed ~1e-7), 0 elsewhere; the logits and node gradients are untouched.
"""

import pytest
import torch

import tl_edgeprune as tep
from tl_edgeprune import hard_concrete, mixing
from tl_edgeprune.engine import MaskedModel

from .conftest import DEFAULT_ID, assert_same_run, make_model, model_ids, small_problem
from .test_engine_exact import PLANS
from .test_positional import NAMES, problem

ATOL = 1e-5


def supports(graph, gen):
    """Patterns the GEMM takes differently: none, all, scattered entries (writer spans), few writers (gathered rows),
    whole readers, one entry, one writer's row."""
    valid = graph.valid_mask()
    readers = torch.rand(graph.n_readers, generator=gen) < 0.3
    one = torch.zeros(graph.shape, dtype=torch.bool)
    one[graph.edge_index(graph.edge_names()[len(graph.edge_names()) // 2])] = True
    row = torch.zeros(graph.shape, dtype=torch.bool)
    row[3] = True
    few_writers = (torch.rand(graph.n_writers, generator=gen) < 0.2)[:, None]
    return {"none": torch.zeros(graph.shape, dtype=torch.bool), "all": valid.clone(),
            "scattered": (torch.rand(graph.shape, generator=gen) < 0.05) & valid,
            "few writers (gathered)": few_writers & (torch.rand(graph.shape, generator=gen) < 0.5) & valid,
            "whole readers": valid & readers[None, :], "one edge": one, "a writer's row": row & valid}


@pytest.mark.parametrize("model_id", model_ids(["gpt2", "neox", "llama"], ["gpt2"]))
def test_gradient_on_the_support_equals_the_full_gradient(model_id, tokens, monkeypatch):
    """Every window plan; with the default plan, writers also gathered one row at a time (not a window's worth)."""
    model = make_model(model_id)
    clean, corrupted = tokens
    gen = torch.Generator().manual_seed(5)
    with tep.masked(model) as mm:
        cf = mm.interchange(corrupted)
        z0 = torch.rand(mm.graph.shape, generator=gen)
        nodes0 = torch.rand(mm.graph.n_writers, generator=gen)

        def grads(support):
            z, nodes = z0.clone().requires_grad_(True), nodes0.clone().requires_grad_(True)
            logits = mm(clean, cf, z, nodes, grad_support=support)
            (logits[:, :, 5].sum() + logits[:, -1].logsumexp(-1).sum()).backward()  # O(1) gradients
            return logits.detach(), z.grad, nodes.grad

        for plan_name, plan in PLANS.items():
            mm._plan_mixing(**plan)
            logits, z_grad, node_grad = grads(None)
            assert z_grad[mm.graph.valid_mask()].abs().max() > 1e-2
            for name, support in supports(mm.graph, gen).items():
                for rows in (mixing.GATHERED_ROWS, 1) if plan_name == "default" else (mixing.GATHERED_ROWS,):
                    monkeypatch.setattr(mixing, "GATHERED_ROWS", rows)
                    got_logits, got_z, got_nodes = grads(support)
                    msg = f"{plan_name}, {name}, {rows} rows gathered at a time"
                    torch.testing.assert_close(got_logits, logits, atol=0, rtol=0, msg=msg)
                    torch.testing.assert_close(got_z, torch.where(support, z_grad, 0.0), atol=ATOL, rtol=0, msg=msg)
                    if name in ("all", "a writer's row"):  # the node's gradient reads every edge out of it
                        torch.testing.assert_close(got_nodes[3], node_grad[3], atol=ATOL, rtol=0, msg=msg)


def test_a_positional_graph_computes_the_gradient_everywhere():
    """Positional graphs do not split the GEMM: the support is accepted and the whole gradient comes back."""
    model = make_model(DEFAULT_ID)
    clean, corrupted, classes = problem(model)
    with tep.masked(model, position_classes=NAMES) as mm:
        cf = mm.interchange(corrupted)
        z0 = torch.rand(mm.graph.shape, generator=torch.Generator().manual_seed(2))
        out = []
        for support in (None, torch.zeros(mm.graph.shape, dtype=torch.bool)):
            z = z0.clone().requires_grad_(True)
            mm(clean, cf, z, position_classes=classes, grad_support=support)[:, -1].logsumexp(-1).sum().backward()
            out.append(z.grad)
    torch.testing.assert_close(out[1], out[0], atol=0, rtol=0)
    assert out[0].abs().max() > 1e-4


def test_grad_support_must_be_a_bool_mask_of_the_masks_shape(tokens):
    clean, corrupted = tokens
    with tep.masked(make_model(DEFAULT_ID)) as mm:
        cf = mm.interchange(corrupted)
        with pytest.raises(tep.EdgePruneError, match="grad_support must be a bool tensor"):
            mm(clean, cf, mm.graph.ones(), grad_support=mm.graph.ones())
        with pytest.raises(tep.EdgePruneError, match="grad_support has shape"):
            mm(clean, cf, mm.graph.ones(), grad_support=torch.ones(2, 2, dtype=torch.bool))


def test_sample_with_support_is_where_log_alpha_gets_a_gradient():
    """The support is where the clamp passes a gradient; the sample is the one ``sample`` draws."""
    gate = hard_concrete.HardConcrete((400,), generator=torch.Generator().manual_seed(0), init_mean=0.0)
    with torch.no_grad():
        gate.log_alpha.mul_(0).add_(torch.linspace(-6, 6, 400))
    z, passes = gate.sample_with_support(torch.Generator().manual_seed(1))
    z.sum().backward()
    assert torch.equal(gate.log_alpha.grad != 0, passes)
    assert 0 < int(passes.sum()) < 400 and bool((z[~passes] == 0).logical_or(z[~passes] == 1).all())
    torch.testing.assert_close(gate.sample(torch.Generator().manual_seed(1)), z.detach(), atol=0, rtol=0)


@pytest.mark.parametrize("node_masks", [True, False])
def test_edge_pruning_with_the_support_is_the_same_run(monkeypatch, node_masks):
    """Edge Pruning passes its unclamped samples as the support: the same run as computing every gradient, up to
    float rounding, with masks that leave many samples unclamped (log α 0) and some clamped. In float64: Adam turns
    a gradient's float32 rounding (~1e-9 where the true one is ~0) into steps of ~lr/10 (test_sparse_grad_mixing)."""
    model, data = small_problem()
    model.to(torch.float64)
    opts = dict(steps=8, batch_size=8, init_log_alpha=0.0, lr=0.3, node_masks=node_masks, progress=False)
    seen = []
    call = MaskedModel.__call__

    def recording(self, *args, grad_support=None, **kwargs):
        seen.append(grad_support)
        return call(self, *args, grad_support=grad_support, **kwargs)

    monkeypatch.setattr(MaskedModel, "__call__", recording)
    supported = tep.edge_pruning(model, data, 0.6, **opts)
    assert len(seen) == 8 and all(s is not None for s in seen)
    fraction = sum(float(s.float().mean()) for s in seen) / len(seen)
    assert 0.05 < fraction < 0.95  # some gradient skipped, some computed

    def everywhere(self, *args, grad_support=None, **kwargs):
        return call(self, *args, **kwargs)

    monkeypatch.setattr(MaskedModel, "__call__", everywhere)
    full = tep.edge_pruning(model, data, 0.6, **opts)
    assert_same_run(supported, full)
