"""Edge Pruning's pieces: hard-concrete gates, the loop, checkpoints, the read-out and bad input."""

import math
import os  # noqa: F401

import pytest
import torch

import tl_edgeprune as tep
from tl_edgeprune.circuit import binary_search_threshold
from tl_edgeprune.edge_pruning import lr_factor
from tl_edgeprune.hard_concrete import BETA, LEFT, RIGHT

from .conftest import assert_same_run, small_problem


def test_hard_concrete_matches_its_definition():
    gate = tep.HardConcrete((4000,), torch.Generator().manual_seed(0))
    la = gate.log_alpha.detach()
    assert abs(float(la.mean()) - 10) < 0.01 and abs(float(la.std()) - 0.01) < 0.002
    with torch.no_grad():
        gate.log_alpha.fill_(0.3)
    z = gate.sample(torch.Generator().manual_seed(1))
    assert z.min() >= 0 and z.max() <= 1
    # P(z = 0) from samples agrees with the closed form 1 − σ(log α − β log(−l/r)).
    p0 = 1 - torch.sigmoid(torch.tensor(0.3 - BETA * math.log(-LEFT / RIGHT)))
    assert abs(float((z == 0).float().mean()) - float(p0)) < 0.03
    det = gate.deterministic()
    assert int((det == 0).sum()) == round(float(4000 * p0))


def test_binary_search_threshold_keeps_the_soft_mass():
    graph = tep.Graph.from_spec(tep.GraphSpec(1, 1, 1, 4), "merged")
    assert graph.n_edges == 8
    values = torch.tensor([0.9, 0.8, 0.1, 0.6, 0.05, 0.0, 0.3, 0.2])  # Σ = 2.95: 3 edges
    soft = torch.zeros(graph.shape)
    soft[graph.valid_mask()] = values
    kept = soft.double() >= binary_search_threshold(soft.double(), graph.valid_mask())
    assert int(kept.sum()) == 3 == round(float(values.sum()))
    assert tep.Circuit.from_soft_mask(graph, soft).n_edges == 3
    assert sorted(soft[kept].tolist()) == pytest.approx([0.6, 0.8, 0.9])


def test_lr_schedule():
    assert lr_factor(0, 10, 100) == 0.1 and lr_factor(9, 10, 100) == 1.0
    assert lr_factor(55, 10, 100) == pytest.approx(0.5) and lr_factor(99, 10, 100) == pytest.approx(1 / 90)


def test_training_reduces_edges_and_history_is_recorded():
    model, data = small_problem()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    grads = [p.requires_grad for p in model.parameters()]
    res = tep.edge_pruning(model, data, 0.6, steps=60, sparsity_warmup=30, lr_warmup=5, batch_size=8,
                           sparsity_from="expected", progress=False)
    assert len(res.history["sparsity"]) == 60 and res.history["target"][-1] == pytest.approx(0.6)
    circuit = res.circuit()
    # A random model's KL barely resists, so the sparsity term drives this run: it must have pruned.
    assert circuit.n_edges < 0.7 * circuit.graph.n_edges
    assert res.history["sparsity"][0] < 0.01 and res.history["sparsity"][-1] > 0.3
    # What the user sees while it trains is the sparsity of the circuit the read-out would give at that step.
    assert res.history["circuit_sparsity"][-1] == pytest.approx(circuit.sparsity, abs=1e-12)
    assert res.history["circuit_sparsity"][0] == 0.0 and len(res.history["circuit_sparsity"]) == 60
    # The model's weights and requires_grad flags are untouched.
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert [p.requires_grad for p in model.parameters()] == grads


def test_checkpoint_resume_gives_identical_masks(tmp_path):
    model, data = small_problem()
    opts = dict(steps=40, sparsity_warmup=20, lr_warmup=4, batch_size=8, progress=False, seed=3)
    straight = tep.edge_pruning(model, data, 0.5, **opts)
    path = str(tmp_path / "ck.pt")
    # Stop early by running a shorter job that checkpoints every 10 steps, then resume the full one.
    with pytest.raises(KeyboardInterrupt):
        def stop(step, row):
            if step == 24:
                raise KeyboardInterrupt
        tep.edge_pruning(model, data, 0.5, checkpoint_path=path, checkpoint_every=10, callback=stop, **opts)
    assert torch.load(path, weights_only=True)["step"] == 20
    resumed = tep.edge_pruning(model, data, 0.5, checkpoint_path=path, checkpoint_every=10, resume=True, **opts)
    assert torch.equal(straight.edge_log_alpha, resumed.edge_log_alpha)
    assert torch.equal(straight.node_log_alpha, resumed.node_log_alpha)
    assert straight.history == resumed.history
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp")]  # nothing half-written


def test_resume_with_other_settings_is_refused(tmp_path):
    model, data = small_problem()
    path = str(tmp_path / "ck.pt")
    tep.edge_pruning(model, data, 0.5, steps=4, batch_size=8, checkpoint_path=path, checkpoint_every=2, progress=False)
    with pytest.raises(tep.EdgePruneError, match="other settings"):
        tep.edge_pruning(model, data, 0.7, steps=4, batch_size=8, checkpoint_path=path, resume=True, progress=False)


@pytest.mark.parametrize("bad, match", [
    (dict(target_sparsity=0.0), r"\(0, 2\]"),
    (dict(target_sparsity=2.5), r"\(0, 2\]"),
    (dict(steps=0), "steps"),
    (dict(checkpoint_every=5), "checkpoint_path"),
    (dict(objective="cross_entropy"), "objective"),
    (dict(sparsity_from="l1"), "sparsity_from"),
])
def test_bad_settings(bad, match):
    model, data = small_problem()
    kw = dict(target_sparsity=0.5, steps=2, progress=False) | bad
    with pytest.raises(tep.EdgePruneError, match=match):
        tep.edge_pruning(model, data, **kw)


def test_bad_data():
    model, data = small_problem()
    with pytest.raises(tep.EdgePruneError, match="empty"):
        tep.paired_data(torch.zeros(0, 5, dtype=torch.long), torch.zeros(0, 5, dtype=torch.long))
    mask = torch.ones(4, 5, dtype=torch.long)
    mask[2, 1:] = 0
    with pytest.raises(tep.EdgePruneError, match=r"examples \[2\] have no valid position"):
        tep.paired_data(torch.zeros(4, 5, dtype=torch.long), torch.zeros(4, 5, dtype=torch.long),
                        positions=torch.tensor([4, 4, 4, 4]), attention_mask=mask)
    with pytest.raises(tep.EdgePruneError, match="PairedData"):
        tep.edge_pruning(model, (data.clean, data.corrupted), 0.5, steps=2, progress=False)


def test_nan_loss_stops_with_a_checkpoint(tmp_path):
    model, data = small_problem()
    path = str(tmp_path / "nan.pt")

    def nan_objective(circuit_logits, full_logits, batch):
        return circuit_logits.sum() * float("nan")

    with pytest.raises(tep.EdgePruneError, match=r"step 0: the objective \(nan\) is not finite.*saved at .*failed-step0"):
        tep.edge_pruning(model, data, 0.5, steps=5, objective=nan_objective, checkpoint_path=path, progress=False)
    assert not os.path.exists(path)  # the failure dump goes beside the checkpoint, never over it
    assert torch.load(str(tmp_path / "nan.failed-step0.pt"), weights_only=True)["step"] == 0


def test_a_dataloader_of_dict_batches_is_accepted():
    model, data = small_problem(n=16)
    loader = torch.utils.data.DataLoader(
        [{"clean": c, "corrupted": x} for c, x in zip(data.clean, data.corrupted)], batch_size=8)
    from_loader = tep.edge_pruning(model, loader, 0.5, steps=6, batch_size=8, progress=False)
    from_tensors = tep.edge_pruning(model, data, 0.5, steps=6, batch_size=8, progress=False)
    assert len(from_loader.history["objective"]) == 6
    with pytest.raises(tep.EdgePruneError, match="dict with 'clean'"):
        tep.edge_pruning(model, [data.clean], 0.5, steps=2, progress=False)
    assert from_tensors.edge_log_alpha.shape == from_loader.edge_log_alpha.shape


def test_circuits_round_trip_and_refuse_other_shapes(tmp_path):
    model, data = small_problem()
    graph = tep.Graph.from_model(model)
    scores = torch.randn(graph.shape, generator=torch.Generator().manual_seed(0))
    circuit = tep.Circuit.top_k(graph, scores, k=30, method="eap")
    for name in ("c.json", "c.pt"):
        circuit.save(str(tmp_path / name))
        loaded = tep.Circuit.load(str(tmp_path / name))
        assert loaded.edge_names() == circuit.edge_names() and loaded.method == "eap"
        torch.testing.assert_close(loaded.scores[graph.valid_mask()], circuit.scores[graph.valid_mask()])
    mib = __import__("json").load(open(tmp_path / "c.json"))
    assert set(mib) >= {"cfg", "nodes", "edges"} and len(mib["edges"]) == graph.n_edges
    assert sum(e["in_graph"] for e in mib["edges"].values()) == 30 and mib["nodes"]["logits"]["in_graph"] in (True, False)
    metrics = circuit.evaluate(model, data)
    assert {"kl", "mse", "exact_match", "edges", "sparsity"} <= set(metrics) and metrics["edges"] == 30
    assert 0 <= metrics["exact_match"] <= 1 and metrics["kl"] >= 0
    other = tep.Graph.from_spec(tep.GraphSpec(3, 4, 4, 32))
    wrong = tep.Circuit.top_k(other, torch.ones(other.shape), k=5)
    with pytest.raises(tep.EdgePruneError, match="same shape"):
        wrong.evaluate(model, data)


def test_init_log_alpha_sets_where_the_gates_start():
    """A scalar moves every gate's start; a [writer, reader] tensor (hap.attribution_init) sets each edge's."""
    from tl_edgeprune.eap import eap
    from tl_edgeprune.hap import attribution_init

    model, data = small_problem()
    opts = dict(steps=1, lr=1e-6, lambda_lr=1e-6, lr_warmup=0, progress=False)
    low = tep.edge_pruning(model, data, 0.5, init_log_alpha=3.0, **opts)
    assert abs(float(low.edge_log_alpha[low.trainable].mean()) - 3.0) < 0.01
    scores = eap(model, data, progress=False)
    start = attribution_init(scores, keep=0.1, high=2.0, low=-2.0)
    res = tep.edge_pruning(model, data, 0.5, init_log_alpha=start, **opts)
    top = scores.circuit(fraction=0.1).edges
    assert abs(float(res.edge_log_alpha[top].mean()) - 2.0) < 0.01
    assert abs(float(res.edge_log_alpha[~top & res.trainable].mean()) + 2.0) < 0.01
    circuit = res.circuit().edges
    assert bool(circuit[top].all()) and circuit.sum() < 2 * top.sum()  # it starts at EAP's circuit, plus a few
    with pytest.raises(tep.EdgePruneError, match="graph's shape"):
        tep.edge_pruning(model, data, 0.5, init_log_alpha=start[:, :3], **opts)


def test_recompute_inputs_gives_the_same_run():
    """recompute_inputs=True rebuilds each head reader's input in backward instead of keeping it: the same run up
    to float rounding (the engine-level test compares it with TL's split path); a non-bool is refused first."""
    model, data = small_problem()
    opts = dict(steps=8, batch_size=8, init_log_alpha=0.0, lr=0.3, progress=False)  # masks far from 1
    kept = tep.edge_pruning(model, data, 0.6, **opts)
    rebuilt = tep.edge_pruning(model, data, 0.6, recompute_inputs=True, **opts)
    assert_same_run(kept, rebuilt)
    with pytest.raises(tep.EdgePruneError, match="recompute_inputs must be True or False"):
        tep.edge_pruning(model, data, 0.6, recompute_inputs="yes", **opts)
    with pytest.raises(tep.EdgePruneError, match="recompute_inputs must be True or False"):
        tep.masked(model, recompute_inputs=1)
