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
def test_no_grad_forwards_equal_plain_patching_and_the_dense_path(model_id, tokens):
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
            sparse = {keep: mm(clean, cf, binary_mask(graph, keep, 1)) for keep in (0.03, 0.5, 0.97)}
        dense = {keep: mm(clean, cf, binary_mask(graph, keep, 1)).detach() for keep in sparse}  # grad on: dense GEMMs
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
    the plain GEMM, for the shared prefix and for the rows written after it; dense coefficients, and writers that
    arrived out of order (no prefix sums) where −1 dominates, are left to the caller's plain GEMM."""
    from types import SimpleNamespace

    from tl_edgeprune.mixing import SparseMixing

    gen = torch.Generator().manual_seed(0)
    rows = torch.randn(10, 7, generator=gen, dtype=torch.float64)
    buffer = SimpleNamespace(rows=lambda a, b: rows[a:b])
    few_nonzero = torch.zeros(10, 3, dtype=torch.float64).index_fill_(0, torch.tensor([4]), -1.0)
    mostly_minus_one = -torch.ones(10, 3, dtype=torch.float64).index_fill_(0, torch.tensor([2, 8]), 0.0)
    dense = -torch.rand(10, 3, generator=gen, dtype=torch.float64)
    for coef, name in ((few_nonzero, "sparse"), (mostly_minus_one, "complement"), (dense, "dense")):
        for in_order in (True, False):
            sparse = SparseMixing(rows[0], sparse_below=0.5)  # small window: force the sparse forms
            sparse.add(0, 6, rows[:6]) if in_order else sparse.add(2, 6, rows[2:6])
            handled = name == "sparse" or (name == "complement" and in_order)
            out = torch.empty(3, 7, dtype=torch.float64)
            assert sparse.product(coef[:6], buffer, 0, 6, out, accumulate=False) == handled
            if not handled:  # the caller's plain GEMM
                torch.mm(coef[:6].t(), rows[:6], out=out)
            torch.testing.assert_close(out, coef[:6].t() @ rows[:6], atol=1e-12, rtol=0)
            sparse.add(6, 10, rows[6:])
            assert sparse.product(coef[6:], buffer, 6, 10, out, accumulate=True) == handled
            if not handled:
                out.addmm_(coef[6:].t(), rows[6:])
            torch.testing.assert_close(out, coef.t() @ rows, atol=1e-12, rtol=0)
