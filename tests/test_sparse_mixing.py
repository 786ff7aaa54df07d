"""Forwards without gradients (ACDC's candidates, circuit evaluation) mix only the coefficients a mask leaves nonzero,
or start from the sum of every delta and add back the kept edges (mixing.SparseMixing). Checked against plain
TransformerLens patching and against the dense path (the same forward with gradients on). Float32, 1e-5 absolute
on O(1) logits, as the rest of the exactness suite."""

import pytest
import torch

import tl_edgeprune as tep

from .conftest import MODEL_IDS, make_model
from .reference import patch_edges, patch_one_edge
from .test_engine_exact import counterfactual_outputs

ATOL = 1e-5


def binary_mask(graph, keep: float, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return ((torch.rand(graph.shape, generator=gen) < keep) & graph.valid_mask()).float()


@pytest.mark.parametrize("model_id", MODEL_IDS)
@pytest.mark.parametrize("forced", [False, True], ids=["default-threshold", "sparse-forms-forced"])
def test_no_grad_forwards_equal_plain_patching_and_the_dense_path(model_id, forced, tokens, monkeypatch):
    """Sparse masks take the direct inputs wherever q/k/v are fused and a window's coefficients are sparse enough
    (each reader's input written once from the residual, engine._direct_input: counted): every edge off always;
    the small test models' windows are too small for 3 % or 97 % kept to pass the 8 % threshold, so the sparse
    forms are also forced (threshold 50 %), where those masks take them everywhere. 50 % kept takes the GEMMs at
    the default threshold, and a forward with gradients always does."""
    from tl_edgeprune.engine import MaskedModel
    from tl_edgeprune.mixing import SparseMixing

    if forced:
        monkeypatch.setattr(SparseMixing.__init__, "__defaults__", (0.5,))

    direct = {"calls": 0}
    original = MaskedModel._direct_input

    def counting(self, *args):
        direct["calls"] += 1
        return original(self, *args)

    monkeypatch.setattr(MaskedModel, "_direct_input", counting)
    model = make_model(model_id)
    clean, corrupted = tokens
    ref_cf = counterfactual_outputs(model, "interchange", corrupted)
    with tep.masked(model) as mm:
        cf = mm.interchange(corrupted)
        graph = mm.graph
        with torch.no_grad():
            zeros = mm(clean, cf, graph.zeros())  # every coefficient −1: the sum of the deltas alone
            names = graph.edge_names()
            singles = {name: None for name in names[:: max(1, len(names) // 12)]}  # one coefficient nonzero
            for name in singles:
                z = graph.ones()
                z[graph.edge_index(name)] = 0
                singles[name] = mm(clean, cf, z)
            sparse = {}
            hooks_per_forward = sum(len(mm._reader_parts(group)) for group in graph.reader_groups)
            for keep in (0.03, 0.5, 0.97):
                before = direct["calls"]
                sparse[keep] = mm(clean, cf, binary_mask(graph, keep, 1))
                if keep == 0.5 and not forced:
                    assert direct["calls"] == before
                elif keep != 0.5 and forced:
                    assert direct["calls"] - before == (hooks_per_forward if mm.fused_qkv else 0)
            before = direct["calls"]
            mm(clean, cf, graph.zeros())  # every coefficient −1: every window direct
            assert direct["calls"] - before == (hooks_per_forward if mm.fused_qkv else 0)
        calls = direct["calls"]
        dense = {keep: mm(clean, cf, binary_mask(graph, keep, 1)).detach() for keep in sparse}  # grad on: dense GEMMs
        assert direct["calls"] == calls
    torch.testing.assert_close(zeros, model(corrupted), atol=ATOL, rtol=0)
    for name, logits in singles.items():
        torch.testing.assert_close(logits, patch_one_edge(model, clean, ref_cf, name), atol=ATOL, rtol=0,
                                   msg=lambda m: f"edge {name}: {m}")
    for keep in sparse:
        torch.testing.assert_close(sparse[keep], dense[keep], atol=ATOL, rtol=0, msg=lambda m: f"keep {keep}: {m}")
    removed = [n for n, on in zip(graph.edge_names(), binary_mask(graph, 0.97, 1)[graph.valid_mask()]) if not on]
    torch.testing.assert_close(sparse[0.97], patch_edges(model, clean, ref_cf, removed), atol=ATOL, rtol=0)
    assert (sparse[0.97] - model(clean)).abs().max() > 1e-3  # the masks change the output: the checks can fail


def test_sparse_products_pick_each_form():
    """The forms of SparseMixing's product on a hand-made window (few nonzero coefficients, mostly −1), each equal to
    the plain GEMM, for the shared prefix and for the rows written after it; dense coefficients are left to the
    caller's plain GEMM. The prefix sums the complement form starts from are formed when first asked for, in any
    order."""
    from types import SimpleNamespace

    from tl_edgeprune.mixing import SparseMixing

    gen = torch.Generator().manual_seed(0)
    rows = torch.randn(10, 7, generator=gen, dtype=torch.float64)
    buffer = SimpleNamespace(rows=lambda a, b: rows[a:b])
    few_nonzero = torch.zeros(10, 3, dtype=torch.float64).index_fill_(0, torch.tensor([4]), -1.0)
    mostly_minus_one = -torch.ones(10, 3, dtype=torch.float64).index_fill_(0, torch.tensor([2, 8]), 0.0)
    dense = -torch.rand(10, 3, generator=gen, dtype=torch.float64)
    for coef, name in ((few_nonzero, "sparse"), (mostly_minus_one, "complement"), (dense, "dense")):
        sparse = SparseMixing(rows, sparse_below=0.5)  # small window: force the sparse forms
        out = torch.empty(3, 7, dtype=torch.float64)
        plan = sparse.product(coef[:6], buffer, 0, 6, out, accumulate=False)
        assert (plan is None) == (name == "dense") and (plan is None or plan[0] == (name == "complement"))
        if plan is None:  # the caller's plain GEMM
            torch.mm(coef[:6].t(), rows[:6], out=out)
        torch.testing.assert_close(out, coef[:6].t() @ rows[:6], atol=1e-12, rtol=0)
        assert (sparse.product(coef[6:], buffer, 6, 10, out, accumulate=True) is None) == (name == "dense")
        if name == "dense":
            out.addmm_(coef[6:].t(), rows[6:])
        torch.testing.assert_close(out, coef.t() @ rows, atol=1e-12, rtol=0)
    sparse = SparseMixing(rows)
    for stop in (7, 3, 10, 5, 0):
        torch.testing.assert_close(sparse.prefix_sum(stop), rows[:stop].sum(0), atol=1e-12, rtol=0)
    assert sorted(sparse.prefix_sums) == [0, 3, 5, 7, 10]


def test_sparse_inputs_are_base_plus_the_product():
    """SparseMixing.inputs writes base + coefᵀ·rows once and adds sparsely (few nonzero coefficients), or starts from
    base − Σ rows (mostly −1), by the plan made for them; dense coefficients get no plan."""
    from types import SimpleNamespace

    from tl_edgeprune.mixing import SparseMixing

    gen = torch.Generator().manual_seed(1)
    rows = torch.randn(10, 7, generator=gen, dtype=torch.float64)
    base = torch.randn(7, generator=gen, dtype=torch.float64)
    buffer = SimpleNamespace(rows=lambda a, b: rows[a:b])
    few_nonzero = torch.zeros(10, 3, dtype=torch.float64).index_fill_(0, torch.tensor([4]), -1.0)
    mostly_minus_one = -torch.ones(10, 3, dtype=torch.float64).index_fill_(0, torch.tensor([2, 8]), 0.0)
    every_minus_one = -torch.ones(10, 3, dtype=torch.float64)
    dense = -torch.rand(10, 3, generator=gen, dtype=torch.float64)
    for coef, handled in ((few_nonzero, True), (mostly_minus_one, True), (every_minus_one, True), (dense, False)):
        sparse = SparseMixing(rows, sparse_below=0.5)
        plan = sparse.plan(coef, 0, 10)
        assert (plan is not None) == handled
        if handled:
            out = torch.full((3, 7), 7.0, dtype=torch.float64)
            sparse.inputs(plan, buffer, 10, base, out)
            torch.testing.assert_close(out, base + coef.t() @ rows, atol=1e-12, rtol=0)
