"""Positional circuits: one copy of every reader per position class, against plain TransformerLens.

Each positional edge off must equal patching that edge with TL hooks at that class's positions only; all masks 1 the
clean logits, all 0 the corrupted ones; the gradient at 1 the per-position EAP formula. Tolerance 1e-5 absolute on
float32 logits (observed: 0 for single edges, ~1e-6 for gradients of O(5) scores).
"""

import json

import pytest
import torch

import tl_edgeprune as tep
from tl_edgeprune.errors import EdgePruneError
from tl_edgeprune.plots import plot_positional_circuit

from .conftest import DEFAULT_ID, MODEL_IDS, make_model, model_ids
from .reference import patch_one_edge_at, positional_eap_scores
from .test_engine_exact import counterfactual_outputs, engine_counterfactual

ATOL = 1e-5
NAMES = ("A", "B", "END")


def problem(model, seed=0, batch=3, width=6):
    g = torch.Generator().manual_seed(seed)
    clean = torch.randint(0, model.cfg.d_vocab, (batch, width), generator=g)
    corrupted = torch.randint(0, model.cfg.d_vocab, (batch, width), generator=g)
    classes = torch.randint(0, 2, (batch, width), generator=g)
    classes[:, -1] = 2
    return clean, corrupted, classes


def sampled_edges(graph, n=48):
    names = graph.edge_names()
    return names[:: max(1, len(names) // n)] + [names[-1]]


# ---------------------------------------------------------------- graph
def test_positional_graph_names_and_sizes():
    spec = tep.GraphSpec(n_layers=2, n_heads=4, n_kv_heads=2, d_model=8)
    base, pos = tep.Graph.from_spec(spec), tep.Graph.from_spec(spec, position_classes=NAMES)
    assert pos.n_readers == 3 * base.n_readers and pos.n_edges == 3 * base.n_edges
    assert pos.readers[: base.n_readers] == tuple(f"{r}@A" for r in base.readers)
    assert pos.readers[-1] == "logits@END" and pos.n_classes == 3 and pos.positional and not base.positional
    w, r = pos.edge_index("a0.h1->a1.h3<q>@B")
    assert pos.reader_class(r) == 1 and pos.edge_name(w, r) == "a0.h1->a1.h3<q>@B"
    assert pos.reader_targets(r) == [pos.writer_index("a1.h3")]
    assert [pos.readers[i] for i in pos.readers_of_node("a1.h3")] == [
        f"{x}@{c}" for c in NAMES for x in ("a1.h3<q>", "a1.kv1<k>", "a1.kv1<v>")]
    assert pos.reader_node("a1.kv1<k>@END") == "a1.kv1"
    valid = pos.valid_mask().view(pos.n_writers, 3, -1)
    for c in range(3):  # every class has the ordinary graph's edges, no more
        assert torch.equal(valid[:, c], base.valid_mask())
    with pytest.raises(KeyError, match="not upstream"):
        pos.edge_index("a1.h0->a0.h1<q>@A")
    with pytest.raises(KeyError, match="no reader"):
        pos.edge_index("a0.h1->a1.h3<q>")  # positional graphs name the class


@pytest.mark.parametrize("bad", [["A", "A"], ["A"], ["A@B", "C"], ["", "C"], "AB", ["A", "x>"]])
def test_position_class_names_are_checked(bad):
    spec = tep.GraphSpec(n_layers=1, n_heads=1, n_kv_heads=1, d_model=4)
    with pytest.raises(EdgePruneError, match="position.class"):
        tep.Graph.from_spec(spec, position_classes=bad)


# ---------------------------------------------------------------- engine exactness
@pytest.mark.parametrize("model_id", MODEL_IDS)
def test_all_ones_clean_all_zeros_corrupted(model_id):
    model = make_model(model_id)
    clean, corrupted, classes = problem(model)
    with tep.masked(model, position_classes=NAMES) as mm:
        cf = mm.interchange(corrupted)
        ones = mm(clean, cf, mm.graph.ones(), position_classes=classes)
        zeros = mm(clean, cf, mm.graph.zeros(), position_classes=classes)
    torch.testing.assert_close(ones, model(clean), atol=ATOL, rtol=0)
    torch.testing.assert_close(zeros, model(corrupted), atol=ATOL, rtol=0)


@pytest.mark.parametrize("model_id", MODEL_IDS)
def test_each_positional_edge_matches_patching_at_its_positions(model_id):
    model = make_model(model_id)
    clean, corrupted, classes = problem(model)
    ref_cf = counterfactual_outputs(model, "interchange", corrupted)
    with tep.masked(model, position_classes=NAMES) as mm:
        cf, graph = mm.interchange(corrupted), mm.graph
        ours = {}
        for name in sampled_edges(graph):
            z = graph.ones()
            z[graph.edge_index(name)] = 0
            ours[name] = mm(clean, cf, z, position_classes=classes)
    changed = 0
    for name, logits in ours.items():
        edge, cls = name.rsplit("@", 1)
        expected = patch_one_edge_at(model, clean, ref_cf, edge, classes == NAMES.index(cls))
        torch.testing.assert_close(logits, expected, atol=ATOL, rtol=0, msg=lambda m: f"edge {name}: {m}")
        # patching at every position instead would differ: the class restriction is what is tested
        changed += not torch.allclose(patch_one_edge_at(model, clean, ref_cf, edge, torch.ones_like(classes, dtype=torch.bool)),
                                      expected, atol=1e-4)
    assert changed > len(ours) // 2


@pytest.mark.parametrize("model_id", model_ids(["gpt2", "llama"], ["gpt2"]))
@pytest.mark.parametrize("kind", ["mean", "zero"])
def test_positional_edges_under_mean_and_zero_ablation(model_id, kind):
    model = make_model(model_id)
    clean, corrupted, classes = problem(model)
    ref_cf = counterfactual_outputs(model, kind, corrupted)
    with tep.masked(model, position_classes=NAMES) as mm:
        cf, graph = engine_counterfactual(mm, kind, corrupted), mm.graph
        for name in sampled_edges(graph, 16):
            z = graph.ones()
            z[graph.edge_index(name)] = 0
            edge, cls = name.rsplit("@", 1)
            torch.testing.assert_close(mm(clean, cf, z, position_classes=classes),
                                       patch_one_edge_at(model, clean, ref_cf, edge, classes == NAMES.index(cls)),
                                       atol=ATOL, rtol=0)


@pytest.mark.parametrize("model_id", MODEL_IDS)
def test_every_class_off_is_the_ordinary_edge_off(model_id):
    """An edge removed in all classes is the ordinary graph's edge removed (same logits, same gradient sums)."""
    model = make_model(model_id)
    clean, corrupted, classes = problem(model)
    with tep.masked(model) as mm:
        cf, base = mm.interchange(corrupted), mm.graph
        names = sampled_edges(base, 12)
        expected = {}
        for name in names:
            z = base.ones()
            z[base.edge_index(name)] = 0
            expected[name] = mm(clean, cf, z)
    with tep.masked(model, position_classes=NAMES) as mm:
        cf, graph = mm.interchange(corrupted), mm.graph
        for name in names:
            z = graph.ones()
            for c in NAMES:
                z[graph.edge_index(f"{name}@{c}")] = 0
            torch.testing.assert_close(mm(clean, cf, z, position_classes=classes), expected[name], atol=ATOL, rtol=0)


@pytest.mark.parametrize("model_id", MODEL_IDS)
@pytest.mark.parametrize("kind", ["interchange", "mean"])
def test_gradient_at_one_is_the_per_position_eap_formula(model_id, kind):
    model = make_model(model_id)
    clean, corrupted, classes = problem(model, seed=3)
    weights = torch.randn(model.cfg.d_vocab, generator=torch.Generator().manual_seed(7))

    def metric(logits):
        return (logits[:, -1] * weights).sum() + logits[:, 2, 3].sum()

    with tep.masked(model, position_classes=NAMES) as mm:
        cf = engine_counterfactual(mm, kind, corrupted)
        z = mm.graph.ones().requires_grad_(True)
        metric(mm(clean, cf, z, position_classes=classes)).backward()
        graph, valid = mm.graph, mm.graph.valid_mask()
    expected = positional_eap_scores(model, graph, clean, counterfactual_outputs(model, kind, corrupted), metric, classes)
    torch.testing.assert_close(z.grad[valid].double(), expected[valid], atol=ATOL, rtol=1e-4)
    assert torch.all(z.grad[~valid] == 0)


def test_gradient_at_fractional_masks_and_with_a_class_absent_from_the_batch():
    """Away from 1 the deltas get gradients too (float64 finite differences); a class with no position in the batch
    gets zero gradient and changes nothing."""
    model = make_model(DEFAULT_ID, dtype=torch.float64)
    clean, corrupted, classes = problem(model, seed=5)
    classes[classes == 1] = 0  # class B absent
    g = torch.Generator().manual_seed(1)
    with tep.masked(model, position_classes=NAMES) as mm:
        cf, graph = mm.interchange(corrupted), mm.graph
        z0 = torch.rand(graph.shape, generator=g, dtype=torch.float64)
        z = z0.clone().requires_grad_(True)
        mm(clean, cf, z, position_classes=classes)[:, -1].sum().backward()
        absent = torch.zeros(graph.shape, dtype=torch.bool)
        absent[:, [r for r in range(graph.n_readers) if graph.reader_class(r) == 1]] = True
        assert torch.all(z.grad[absent] == 0)
        for name in ["tok->a0.h1<k>@A", "a0.h2->m0@A", "m0->logits@END", "a0.h0->a1.h3<v>@END"]:
            w, r = graph.edge_index(name)
            eps = 1e-6
            hi, lo = z0.clone(), z0.clone()
            hi[w, r] += eps
            lo[w, r] -= eps
            numeric = (mm(clean, cf, hi, position_classes=classes)[:, -1].sum()
                       - mm(clean, cf, lo, position_classes=classes)[:, -1].sum()) / (2 * eps)
            assert abs(float(numeric) - float(z.grad[w, r])) < 1e-6 * max(1.0, abs(float(numeric))), name


def test_node_masks_and_padding_on_a_positional_graph():
    model = make_model(DEFAULT_ID)
    clean, corrupted, classes = problem(model)
    mask = torch.ones_like(clean)
    mask[0, -2:] = 0
    corrupted[0, -2:] = clean[0, -2:]
    with tep.masked(model, position_classes=NAMES) as mm:
        cf, graph = mm.interchange(corrupted, mask), mm.graph
        nodes = torch.ones(graph.n_writers)
        nodes[graph.writer_index("a0.h2")] = 0
        by_node = mm(clean, cf, node_mask=nodes, attention_mask=mask, position_classes=classes)
        z = graph.ones()
        z[graph.writer_index("a0.h2")] = 0
        by_edges = mm(clean, cf, z, attention_mask=mask, position_classes=classes)
        ones = mm(clean, cf, graph.ones(), attention_mask=mask, position_classes=classes)
    torch.testing.assert_close(by_node, by_edges, atol=0, rtol=0)
    torch.testing.assert_close(ones, model(clean, attention_mask=mask), atol=ATOL, rtol=0)


def test_position_classes_are_required_and_checked():
    model = make_model(DEFAULT_ID)
    clean, corrupted, classes = problem(model)
    with tep.masked(model, position_classes=NAMES) as mm:
        cf = mm.interchange(corrupted)
        with pytest.raises(EdgePruneError, match="pass position_classes"):
            mm(clean, cf)
        with pytest.raises(EdgePruneError, match="tokens' shape"):
            mm(clean, cf, position_classes=classes[:, :2])
        with pytest.raises(EdgePruneError, match=r"indices in \[1, 3\] but the graph has 3"):
            mm(clean, cf, position_classes=classes + 1)
    with tep.masked(model) as mm:
        with pytest.raises(EdgePruneError, match="graph has none"):
            mm(clean, mm.interchange(corrupted), position_classes=classes)


# ---------------------------------------------------------------- methods
def positional_data(model, n=16, width=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    clean = torch.randint(0, model.cfg.d_vocab, (n, width), generator=g)
    corrupted = torch.randint(0, model.cfg.d_vocab, (n, width), generator=g)
    classes = torch.randint(0, 2, (n, width), generator=g)
    classes[:, -1] = 2
    return tep.paired_data(clean, corrupted, answers=clean[:, 0], distractors=corrupted[:, 0],
                           position_classes=classes, position_names=NAMES)


@pytest.mark.parametrize("ig_steps", [None, 3])
def test_positional_eap_sums_to_the_ordinary_scores(ig_steps):
    """Summed over classes, per-position EAP (and EAP-IG) is the ordinary score: the positions partition the sum."""
    model = make_model(DEFAULT_ID)
    data = positional_data(model)
    pos = tep.eap(model, data, positional=True, ig_steps=ig_steps, batch_size=6, progress=False)
    flat = tep.eap(model, data, ig_steps=ig_steps, batch_size=6, progress=False)
    g = pos.graph
    assert g.position_classes == NAMES and pos.scores.shape == g.shape
    summed = pos.scores.view(g.n_writers, g.n_classes, -1).sum(1)
    torch.testing.assert_close(summed, flat.scores, atol=1e-6, rtol=1e-5)
    assert float(pos.scores.abs().max()) > 1e-3


def test_by_position_makes_each_position_a_class():
    model = make_model(DEFAULT_ID)
    clean, corrupted, _ = problem(model, batch=4)
    data = tep.by_position(tep.paired_data(clean, corrupted))
    assert data.position_names == tuple(f"p{i}" for i in range(6))
    assert torch.equal(data.position_classes[2], torch.arange(6))
    scores = tep.eap(model, data, positional=True, progress=False)
    g = scores.graph
    assert "a0.h1->a1.h0<q>@p3" in g.edge_names()
    # the logits are read at the last position only: every logits edge of another position scores 0
    logits = torch.tensor([graph_reader.startswith("logits@") and graph_reader != "logits@p5" for graph_reader in g.readers])
    assert torch.all(scores.scores[:, logits] == 0) and float(scores.scores[:, g.reader_index("logits@p5")].abs().max()) > 0
    corrupted[:, -1] = clean[:, -1]
    padded = tep.paired_data(clean, corrupted, attention_mask=torch.tensor([[1] * 5 + [0]] * 4))
    with pytest.raises(EdgePruneError, match="one length"):
        tep.by_position(padded)


def test_positional_edge_pruning_trains_saves_and_resumes(tmp_path):
    model = make_model(DEFAULT_ID)
    data = positional_data(model)
    kw = dict(steps=40, batch_size=8, init_log_alpha=3.0, progress=False, positional=True)
    result = tep.edge_pruning(model, data, 0.9, **kw)
    circuit = result.circuit()
    assert circuit.graph.positional and result.edge_log_alpha.shape == circuit.graph.shape
    assert abs(circuit.sparsity - result.history["circuit_sparsity"][-1]) < 1e-9
    assert 0.5 < circuit.sparsity < 1
    assert all("@" in name for name in circuit.edge_names())
    # resumed from a checkpoint halfway: the same masks as the unbroken run
    path = str(tmp_path / "run.pt")
    tep.edge_pruning(model, data, 0.9, **(kw | {"steps": 40}), checkpoint_path=path, checkpoint_every=20)
    partial = tep.EdgePruningResult.from_checkpoint(path)
    assert partial.graph.position_classes == NAMES
    # a resume of a finished run returns the same masks
    again = tep.edge_pruning(model, data, 0.9, **kw, checkpoint_path=path, resume=True)
    torch.testing.assert_close(again.edge_log_alpha, result.edge_log_alpha, atol=0, rtol=0)
    with pytest.raises(EdgePruneError, match="positional=True needs data with position classes"):
        tep.edge_pruning(model, tep.paired_data(data.clean, data.corrupted), 0.9, **kw)


def test_positional_circuits_read_out_select_prune_and_round_trip(tmp_path):
    model = make_model(DEFAULT_ID)
    data = positional_data(model)
    scores = tep.eap(model, data, positional=True, progress=False)
    top = scores.circuit(k=25)
    greedy = scores.greedy_circuit(25)
    assert top.n_edges == greedy.n_edges == 25
    assert any(name.startswith(("m1->logits@", "a1.")) or "->logits@" in name for name in greedy.edge_names())
    pruned = top.prune_dangling()
    assert pruned.n_edges <= top.n_edges
    for suffix in (".json", ".json.gz", ".pt"):
        path = str(tmp_path / f"c{suffix}")
        top.save(path)
        back = tep.Circuit.load(path)
        assert back.graph.position_classes == NAMES and torch.equal(back.edges, top.edges)
    with open(tmp_path / "c.json") as f:
        saved = json.load(f)
    assert saved["cfg"]["position_classes"] == list(NAMES)
    assert all(name.rsplit("@", 1)[1] in NAMES for name in saved["edges"])
    del saved["cfg"]["position_classes"]
    with pytest.raises(EdgePruneError, match="no position_classes"):
        tep.Circuit.from_dict(saved)
    # evaluation through the engine, against the same masks by hand
    result = top.evaluate(model, data)
    with tep.masked(model, top.graph) as mm:
        cf = mm.interchange(data.corrupted)
        logits = mm(data.clean, cf, top.mask(), position_classes=data.position_classes)
    full = model(data.clean)
    kl = torch.nn.functional.kl_div(logits[:, -1].log_softmax(-1), full[:, -1].log_softmax(-1), log_target=True,
                                    reduction="batchmean")
    assert abs(result["kl"] - float(kl)) < 1e-5
    other = tep.paired_data(data.clean, data.corrupted, position_classes=data.position_classes,
                            position_names=("X", "Y", "Z"))
    with pytest.raises(EdgePruneError, match="not the graph's"):
        top.evaluate(model, other)


def test_positional_acdc_keeps_what_matters_per_class():
    model = make_model(model_ids(["attn_only"])[0])
    data = positional_data(model, n=4, width=4)
    strict = tep.acdc(model, data, 0.0, positional=True, progress=False)
    loose = tep.acdc(model, data, 1e9, positional=True, progress=False)
    assert strict.graph.positional and loose.n_edges == 0
    assert strict.n_edges > 0 and all("@" in n for n in strict.edge_names())


def test_positional_figure(tmp_path):
    model = make_model(DEFAULT_ID)
    data = positional_data(model)
    circuit = tep.eap(model, data, positional=True, progress=False).circuit(k=40)
    tokens = [f"t{i}" for i in range(data.clean.shape[1])]
    fig = plot_positional_circuit(circuit, data=data, tokens=tokens)
    labels = list(fig.layout.yaxis.ticktext)
    assert len(labels) == 3 and labels[2] == "END: 't5'" and labels[0].startswith("A: ")
    hover = [t for trace in fig.data if trace.text is not None for t in trace.text]
    assert len(hover) == 40 and all("@" in t for t in hover)
    ys = [y for trace in fig.data if trace.mode == "lines" for y in trace.y if y is not None]
    assert min(ys) >= -0.5 and max(ys) <= 2.5  # every edge inside its class's row
    with pytest.raises(EdgePruneError, match="positional"):
        plot_positional_circuit(tep.eap(model, data, progress=False).circuit(k=5))


def test_positional_hap_preselects_positional_edges():
    model = make_model(DEFAULT_ID)
    data = positional_data(model)
    result = tep.hap(model, data, 0.95, keep=0.2, positional=True, steps=20, batch_size=8, progress=False)
    assert result.graph.positional and int(result.trainable.sum()) == round(0.2 * result.graph.n_edges)
    circuit = result.circuit()
    assert bool((circuit.edges <= result.trainable).all())
