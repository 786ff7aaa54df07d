"""A forward with gradients mixes the windows whose coefficients are mostly 0 or mostly −1 sparsely, and its backward
gives the deltas' gradient the same way (mixing.SparseMixing, DeltaBuffer.accumulate_planned): the logits and the
masks' and nodes' gradients equal those of the dense path (``sparse_mixing=False``, itself checked against plain
TransformerLens by test_engine_exact) to 1e-5 absolute in float32 (observed ~1e-6: the same sums, regrouped)."""

import pytest
import torch

import tl_edgeprune as tep
from tl_edgeprune import mixing
from tl_edgeprune.engine import MaskedModel

from .conftest import DEFAULT_ID, MODEL_IDS, assert_same_run, make_model, small_problem
from .test_engine_exact import PLANS

ATOL = 1e-5


def regimes(graph, gen):
    """Edge and node masks the sparse forms take differently: mostly 1 with a few unclamped (Edge Pruning's
    reference start: coefficients mostly 0), mostly 0 with a few kept or unclamped (late in a run: mostly −1,
    the complement form), binary (ACDC-like), and unclamped everywhere (the dense GEMMs)."""
    shape, n = graph.shape, graph.n_writers

    def rand(p):
        return torch.rand(shape, generator=gen) < p

    frac = torch.rand(shape, generator=gen)
    nodes = torch.where(torch.rand(n, generator=gen) < 0.2, torch.rand(n, generator=gen), torch.ones(n))
    return {
        "mostly 1": (torch.where(rand(0.05), frac, 1.0), nodes),
        "mostly 0": (torch.where(rand(0.04), 1.0, torch.where(rand(0.04), frac, 0.0)), nodes),
        "binary": (rand(0.5).float(), torch.ones(n)),
        "dense": (frac, nodes),
    }


def gradients(mm, clean, cf, z0, nodes0, support=None):
    z, nodes = z0.clone().requires_grad_(True), nodes0.clone().requires_grad_(True)
    logits = mm(clean, cf, z, nodes, grad_support=support)
    (logits[:, :, 5].sum() + logits[:, -1].logsumexp(-1).sum()).backward()  # O(1) gradients
    return logits.detach(), z.grad, nodes.grad


def counting_plans(monkeypatch) -> list[bool]:
    """The forms the sparse backwards take: one entry per call, True where it starts from −Σ rows."""
    forms = []
    original = mixing.DeltaBuffer.accumulate_planned

    def counting(self, start, stop, plan, grad_out):
        forms.append(plan[0])
        return original(self, start, stop, plan, grad_out)

    monkeypatch.setattr(mixing.DeltaBuffer, "accumulate_planned", counting)
    return forms


def assert_equal(got, want, msg):
    for name, a, b in zip(("logits", "edge gradient", "node gradient"), got, want):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=0, msg=lambda m: f"{msg}, {name}: {m}")


@pytest.mark.parametrize("model_id", MODEL_IDS)
def test_sparse_forms_with_gradients_equal_the_dense_path(model_id, tokens, monkeypatch):
    """The small models' windows are too small for the default 8 % threshold, so the sparse forms are forced (50 %);
    each regime must take the forms it is meant to (counted), and the dense regime none."""
    monkeypatch.setattr(mixing.SparseMixing.__init__, "__defaults__", (0.5,))
    forms = counting_plans(monkeypatch)
    model = make_model(model_id)
    clean, corrupted = tokens
    gen = torch.Generator().manual_seed(3)
    with tep.masked(model) as mm:
        cf = mm.interchange(corrupted)
        for name, (z, nodes) in regimes(mm.graph, gen).items():
            mm.sparse_mixing = False
            want = gradients(mm, clean, cf, z, nodes)
            mm.sparse_mixing = True
            forms.clear()
            got = gradients(mm, clean, cf, z, nodes)
            assert_equal(got, want, f"{model_id}, {name}")
            assert want[1][mm.graph.valid_mask()].abs().max() > 1e-3
            if name == "dense":
                assert not forms
            else:
                assert forms, name
            if name == "mostly 1":
                assert not all(forms)
            if name == "mostly 0":
                assert any(forms)


@pytest.mark.parametrize("recompute", [False, True], ids=["kept-inputs", "recompute-inputs"])
def test_every_window_plan_support_and_recomputed_input(tokens, monkeypatch, recompute):
    """Every way of grouping readers into windows, with and without a gradient support, with the inputs kept or
    rebuilt in backward (which must take the forward's sparse form again: the same bits)."""
    monkeypatch.setattr(mixing.SparseMixing.__init__, "__defaults__", (0.5,))
    forms = counting_plans(monkeypatch)
    model = make_model(DEFAULT_ID)
    clean, corrupted = tokens
    gen = torch.Generator().manual_seed(4)
    with tep.masked(model, recompute_inputs=recompute) as mm:
        cf = mm.interchange(corrupted)
        masks = regimes(mm.graph, gen)
        for plan_name, plan in PLANS.items():
            mm._plan_mixing(**plan)
            for name in ("mostly 1", "mostly 0"):
                z, nodes = masks[name]
                support = (z > 0) & (z < 1) & mm.graph.valid_mask()
                for s in (None, support):
                    mm.sparse_mixing = False
                    want = gradients(mm, clean, cf, z, nodes, s)
                    mm.sparse_mixing = True
                    forms.clear()
                    got = gradients(mm, clean, cf, z, nodes, s)
                    assert forms
                    assert_equal(got, want, f"{plan_name}, {name}, support {s is not None}")


def test_default_threshold_on_a_wider_model(monkeypatch):
    """At the default threshold (8 %) a model with wider windows takes the sparse forms by itself: the gradients
    still equal the dense path's."""
    forms = counting_plans(monkeypatch)
    model = make_model(DEFAULT_ID)
    gen = torch.Generator().manual_seed(5)
    clean = torch.randint(0, 39, (2, 5), generator=gen)
    corrupted = torch.randint(0, 39, (2, 5), generator=gen)
    with tep.masked(model) as mm:
        cf = mm.interchange(corrupted)
        mm._plan_mixing(growth=float("inf"), max_readers=10**9)  # one window: every reader, every writer
        z = torch.ones(mm.graph.shape)
        z[mm.graph.edge_index(mm.graph.edge_names()[-1])] = 0.5  # one unclamped entry
        nodes = torch.ones(mm.graph.n_writers)
        mm.sparse_mixing = False
        want = gradients(mm, clean, cf, z, nodes)
        mm.sparse_mixing = True
        got = gradients(mm, clean, cf, z, nodes)
    assert forms == [False] * len(forms) and forms
    assert_equal(got, want, "one window, one entry")


def test_edge_pruning_run_is_the_same_with_sparse_mixing(monkeypatch):
    """A whole run from log α around 0 (many samples clamped at 0 or 1, some not) equals the same run on the dense
    GEMMs, with the sparse forms forced so that every window can take them. In float64: Adam turns a gradient's
    float32 rounding (~1e-9 where the true one is ~0) into steps of ~lr/10, which no tolerance on log α survives."""
    monkeypatch.setattr(mixing.SparseMixing.__init__, "__defaults__", (0.5,))
    forms = counting_plans(monkeypatch)
    model, data = small_problem()
    model.to(torch.float64)
    opts = dict(steps=8, batch_size=8, init_log_alpha=0.0, lr=0.3, progress=False)
    sparse = tep.edge_pruning(model, data, 0.6, **opts)
    assert forms
    ensure = MaskedModel._ensure_buffer

    def dense(self, run, like, shape):
        fresh = run.buffer is None
        ensure(self, run, like, shape)
        if fresh and torch.is_grad_enabled():
            run.buffer.sparse = None

    monkeypatch.setattr(MaskedModel, "_ensure_buffer", dense)
    forms.clear()
    full = tep.edge_pruning(model, data, 0.6, **opts)
    assert not forms
    assert_same_run(sparse, full)
