"""EAP, EAP-IG, ACDC, HAP and the curves, against brute force and against each other."""

import pytest
import torch

import tl_edgeprune as tep
from tl_edgeprune.acdc import acdc
from tl_edgeprune.eap import default_metric, default_metric_on_rows, eap
from tl_edgeprune.hap import hap
from tl_edgeprune.metrics import kl_divergence
from tl_edgeprune.selection import faithfulness_curve, greedy
from tl_edgeprune.tracr_models import CANONICAL_CIRCUITS, load_tracr

from .conftest import DEFAULT_ID, HAS_HOOKED, assert_same_run, make_model
from .reference import eap_scores, writer_cache_names, writer_output


def tiny_task(n=12, seq=6):
    model = make_model(DEFAULT_ID)
    gen = torch.Generator().manual_seed(5)
    clean = torch.randint(0, 39, (n, seq), generator=gen)
    corrupted = torch.randint(0, 39, (n, seq), generator=gen)
    answers, distractors = torch.randint(0, 39, (n,), generator=gen), torch.randint(0, 39, (n,), generator=gen)
    return model, tep.paired_data(clean, corrupted, positions="last", answers=answers, distractors=distractors)


def test_eap_equals_brute_force_linear_approximation():
    model, data = tiny_task()
    scores = eap(model, data, batch_size=5, progress=False)  # uneven batches: the mean must weight them
    names = writer_cache_names(model)
    _, cache = model.run_with_cache(data.corrupted, names_filter=lambda n: n in names)
    rows = torch.arange(len(data))

    def summed_metric(logits):  # Σ over examples of the logit difference = n · mean
        final = logits[rows, -1]
        return (final[rows, data.answers] - final[rows, data.distractors]).sum()

    brute = eap_scores(model, scores.graph, data.clean, lambda w: writer_output(model, cache, w), summed_metric)
    torch.testing.assert_close(scores.scores.double(), brute / len(data), atol=1e-5, rtol=1e-4)


def test_eap_ig_with_one_step_is_eap_and_with_many_steps_differs():
    model, data = tiny_task()
    plain = eap(model, data, progress=False)
    one = eap(model, data, ig_steps=1, progress=False)
    many = eap(model, data, ig_steps=5, progress=False)
    torch.testing.assert_close(one.scores, plain.scores, atol=1e-5, rtol=1e-4)
    assert (many.scores - plain.scores).abs().max() > 1e-4


def test_eap_ig_matches_a_riemann_sum_by_hand():
    """EAP-IG(inputs): (y − ỹ)·(1/m)Σ_k ∂m/∂reader at embeddings ỹ_emb + k/m·(y_emb − ỹ_emb), by plain hooks."""
    model, data = tiny_task(n=4)
    m = 3
    ours = eap(model, data, ig_steps=m, progress=False, input_nodes="merged")
    names = writer_cache_names(model)
    _, corr = model.run_with_cache(data.corrupted, names_filter=lambda n: n in names)
    _, clean = model.run_with_cache(data.clean, names_filter=lambda n: n in names)
    emb_clean, emb_corr = clean["blocks.0.hook_resid_pre"], corr["blocks.0.hook_resid_pre"]
    total = torch.zeros(ours.graph.shape, dtype=torch.float64)
    for k in range(1, m + 1):
        alpha = k / m
        shift = (alpha - 1) * (emb_clean - emb_corr)
        with model.hooks(fwd_hooks=[("blocks.0.hook_resid_pre", lambda x, hook: x + shift)]):
            grads = _reader_grads(model, ours.graph, data)
        for w, r in ours.graph.valid_mask().nonzero().tolist():
            d = writer_output(model, clean, ours.graph.writers[w]) - writer_output(model, corr, ours.graph.writers[w])
            total[w, r] += (d.double() * grads[r].double()).sum() / m
    torch.testing.assert_close(ours.scores.double(), total / len(data), atol=1e-5, rtol=1e-4)


def _reader_grads(model, graph, data):
    from .reference import reader_hook_point, split_flags

    saved = {}

    def keeper(name):
        def keep(x, hook):
            x = x.clone()
            x.retain_grad()
            saved[name] = x
            return x
        return keep

    names = sorted({reader_hook_point(model, r)[0] for r in graph.readers})
    with split_flags(model, mlp_in=True):
        logits = model.run_with_hooks(data.clean, fwd_hooks=[(n, keeper(n)) for n in names])
    (default_metric(logits, data) * len(data)).backward()
    out = {}
    for r, reader in enumerate(graph.readers):
        name, slot = reader_hook_point(model, reader)
        out[r] = saved[name].grad if slot is None else saved[name].grad[:, :, slot]
    return out


def test_acdc_recovers_the_canonical_reverse_circuit():
    task = load_tracr("reverse")
    circuit = acdc(task.model, task.data(), threshold=0.01, ablation="zero", progress=False)
    assert sorted(circuit.edge_names()) == sorted(CANONICAL_CIRCUITS["reverse"])
    assert circuit.info["seconds"] > 0


def test_greedy_selection_is_connected_to_the_output():
    model, data = tiny_task()
    scores = eap(model, data, progress=False)
    circuit = greedy(scores.graph, scores.scores, 25)
    assert circuit.n_edges == 25
    assert circuit.prune_dangling().n_edges == 25  # nothing dangling: every edge reaches the logits
    top = scores.circuit(k=25)
    assert top.n_edges == 25


def test_faithfulness_curve_normalisation_and_areas():
    model, data = tiny_task()
    scores = eap(model, data, progress=False)
    n = scores.graph.n_edges
    curve = faithfulness_curve(model, data, scores, [0, n // 4, n // 2, n])
    f = curve.faithfulness
    assert f[0] == pytest.approx(0.0, abs=1e-5) and f[-1] == pytest.approx(1.0, abs=1e-5)
    assert curve.fractions == [0.0, (n // 4) / n, (n // 2) / n, 1.0]
    manual = sum((x1 - x0) * (y0 + y1) / 2 for x0, x1, y0, y1 in zip(curve.fractions, curve.fractions[1:], f, f[1:]))
    assert curve.cpr == pytest.approx(manual)
    assert curve.cmd >= 0


def test_hap_trains_only_preselected_edges():
    model, data = tiny_task()
    result = hap(model, data, 0.5, keep=0.2, steps=20, sparsity_warmup=10, batch_size=6, progress=False)
    circuit = result.circuit()
    assert result.info["preselected_edges"] == round(0.2 * circuit.graph.n_edges)
    assert not (circuit.edges & ~result.trainable).any()
    assert result.info["eap_seconds"] > 0


def test_evaluate_circuits_shares_work_and_gives_evaluates_numbers():
    """evaluate_circuits (one ỹ and one full forward per batch for every circuit) equals Circuit.evaluate per
    circuit, and faithfulness_curve reports KL from the same pass (issue 15, item 4)."""
    import tl_edgeprune as tep
    from tl_edgeprune.eap import eap
    from tl_edgeprune.selection import faithfulness_curve

    from .conftest import small_problem

    model, data = small_problem(n=20)
    scores = eap(model, data, progress=False)
    circuits = [scores.circuit(k=k) for k in (5, 40, 120)]
    together = tep.evaluate_circuits(model, circuits, data, batch_size=8)
    for circuit, shared in zip(circuits, together):
        alone = circuit.evaluate(model, data, batch_size=8)
        assert set(alone) == set(shared)
        for key in alone:
            assert shared[key] == pytest.approx(alone[key], abs=1e-5), key
    curve = faithfulness_curve(model, data, scores, [5, 40, 120], batch_size=8)
    assert curve.kl == pytest.approx([r["kl"] for r in together], abs=1e-5)
    assert together[0]["kl"] > together[2]["kl"]  # more edges, closer to the model: the test can fail


def scattered_positions(data, seed=9):
    """0 to 3 scored positions per example, the last always among them (so answers are read where expected)."""
    at = torch.rand(data.positions.shape, generator=torch.Generator().manual_seed(seed)) < 0.4
    at[:, -1] = True
    return at


@pytest.mark.parametrize("answers", ["answers and distractors", "answers", "none"])
def test_default_metric_on_rows_is_default_metric(answers):
    """The gathered form reads each example's last scored row by the running count: same value, bit for bit."""
    model, data = tiny_task()
    data.positions = scattered_positions(data)
    if answers != "answers and distractors":
        data.distractors = None
    if answers == "none":
        data.answers = None
    logits = model(data.clean)
    torch.testing.assert_close(default_metric_on_rows(logits[data.positions], data), default_metric(logits, data),
                               atol=0, rtol=0)


def test_methods_on_gathered_rows_equal_the_all_position_path():
    """The built-in metrics run on the scored rows alone (gathered=True); the same metric passed as a user's
    callable runs on [batch, pos, vocab] logits: EAP scores, ACDC scores and circuit, and an Edge Pruning run agree."""
    model, data = tiny_task()
    data.positions = scattered_positions(data)
    ours = eap(model, data, batch_size=5, progress=False)
    theirs = eap(model, data, batch_size=5, progress=False, metric=lambda logits, batch: default_metric(logits, batch))
    torch.testing.assert_close(ours.scores, theirs.scores, atol=1e-5, rtol=1e-4)
    assert ours.scores.abs().max() > 1e-3
    kl = lambda c, f, b: kl_divergence(c, f, b)  # noqa: E731 (not the built-in object: the all-position path)
    probe = acdc(model, data, threshold=0.0, progress=False)  # each edge's change, to pick a threshold that splits
    changes = probe.scores[probe.graph.valid_mask()]
    threshold = float(changes[changes > 0].median())
    for start_at_layer in (True, False):
        a = acdc(model, data, threshold=threshold, progress=False, start_at_layer=start_at_layer)
        b = acdc(model, data, threshold=threshold, progress=False, metric=kl, start_at_layer=start_at_layer)
        torch.testing.assert_close(a.scores, b.scores, atol=1e-5, rtol=1e-4)
        assert torch.equal(a.mask(), b.mask()) and 0 < a.n_edges < a.graph.n_edges
    opts = dict(steps=6, batch_size=6, init_log_alpha=0.0, lr=0.3, progress=False)  # masks far from 1: KL > 0
    r1 = tep.edge_pruning(model, data, 0.6, **opts)
    r2 = tep.edge_pruning(model, data, 0.6, objective=kl, **opts)
    assert_same_run(r1, r2)
