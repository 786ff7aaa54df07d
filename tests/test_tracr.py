"""Tracr's compiled programs: shipped weights compute the programs; the engine is exact on them; the
slow checks recompile with tracr (the [tracr] extra) and recover the ground-truth circuits."""

import importlib.util

import pytest
import torch

import tl_edgeprune as tep
from tl_edgeprune.tracr_models import CANONICAL_CIRCUITS, EDGE_PRUNING_SETTINGS, TASKS, XPROPORTION_FUNCTIONAL, load_tracr

from .conftest import HAS_HOOKED
from .reference import patch_one_edge, writer_cache_names, writer_output

BACKENDS = ["toy"] + (["hooked"] if HAS_HOOKED else [])
HAS_TRACR = importlib.util.find_spec("tracr") is not None


def expected_output(name, seq):
    if name == "reverse":
        return list(seq[::-1])
    return [sum(x == "x" for x in seq[: i + 1]) / (i + 1) for i in range(len(seq))]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", sorted(TASKS))
def test_shipped_models_compute_their_programs_on_every_input(name, backend):
    task = load_tracr(name, backend)
    n = 0
    for length in range(1, TASKS[name]["max_seq_len"] + 1):
        inputs = task.inputs(length)
        outputs = task.decode(task.model(task.encode(inputs)))
        for seq, out in zip(inputs, outputs):
            if task.numeric:
                assert max(abs(a - b) for a, b in zip(out, expected_output(name, seq))) < 1e-5
            else:
                assert out == expected_output(name, seq)
            n += 1
    assert n == {"reverse": 363, "xproportion": 1364}[name]


@pytest.mark.skipif(not HAS_HOOKED, reason="HookedTransformer was removed in transformer-lens 4")
@pytest.mark.parametrize("name", sorted(TASKS))
def test_toy_backend_equals_hooked_transformer(name):
    toy, hooked = load_tracr(name, "toy"), load_tracr(name, "hooked")
    tokens = toy.encode(toy.inputs())
    torch.testing.assert_close(toy.model(tokens), hooked.model(tokens), atol=1e-5, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_engine_is_exact_on_tracr_reverse(backend):
    task = load_tracr("reverse", backend)
    model = task.model
    clean = task.encode(task.inputs()[:40])
    corrupted = task.encode(task.inputs()[-40:])
    names = writer_cache_names(model)
    _, cache = model.run_with_cache(corrupted, names_filter=lambda n: n in names)
    with tep.masked(model) as mm:
        cf = mm.interchange(corrupted)
        torch.testing.assert_close(mm(clean, cf, mm.graph.zeros()), model(corrupted), atol=1e-4, rtol=0)
        for edge in task.canonical_circuit:
            z = mm.graph.ones()
            z[mm.graph.edge_index(edge)] = 0
            expected = patch_one_edge(model, clean, lambda w: writer_output(model, cache, w), edge)
            torch.testing.assert_close(mm(clean, cf, z), expected, atol=1e-4, rtol=0)


def test_canonical_circuits_are_faithful_under_zero_ablation():
    """The ground truth is exact: keeping only its edges reproduces the program on every input."""
    for name in sorted(TASKS):
        task = load_tracr(name)
        circuit = tep.Circuit.from_names(tep.Graph.from_model(task.model), task.canonical_circuit)
        metrics = circuit.evaluate(task.model, task.data(), ablation="zero")
        assert metrics["exact_match"] == 1.0 if name == "reverse" else metrics["mse"] < 1e-8
        assert circuit.graph.n_edges == {"reverse": 94, "xproportion": 32}[name]


@pytest.mark.slow
@pytest.mark.skipif(not HAS_TRACR, reason="needs the [tracr] extra (installed in CI's slow step)")
@pytest.mark.parametrize("name", sorted(TASKS))
def test_recompiled_tracr_matches_shipped_weights_and_tracr_itself(name):
    import numpy as np
    from tracr.compiler import compiling, lib
    from tracr.rasp import rasp

    from tl_edgeprune.tracr_models import compile_tracr, shipped_payload

    fresh, shipped = compile_tracr(name), shipped_payload(name)
    assert fresh["shape"] == shipped["shape"] and fresh["input_encoding"] == shipped["input_encoding"]
    for key, value in shipped["state"].items():
        assert torch.equal(fresh["state"][key], value), key
    program = lib.make_reverse(rasp.tokens) if name == "reverse" else lib.make_frac_prevs(rasp.tokens == "x")
    assembled = compiling.compile_rasp_to_model(program, vocab=set(TASKS[name]["vocab"]),
                                                max_seq_len=TASKS[name]["max_seq_len"], compiler_bos="BOS")
    task = load_tracr(name)
    for length in range(1, TASKS[name]["max_seq_len"] + 1):
        for seq in task.inputs(length):
            ours = task.model(task.encode([seq]))[0].detach()
            theirs = np.asarray(assembled.apply(["BOS", *seq]).unembedded[0])
            if task.numeric:
                np.testing.assert_allclose(ours[1:, 0].numpy(), theirs[1:], atol=1e-5)
            else:
                assert ours[1:].argmax(-1).tolist() == theirs[1:].tolist()


# The reverse recovery (REVERSE_SETTINGS, seed 0) runs as the README's "Find a circuit" example: test_readme.py.


@pytest.mark.parametrize("seed", [0, 1])
def test_edge_pruning_recovers_xproportion(seed):
    task = load_tracr("xproportion")
    settings = {**EDGE_PRUNING_SETTINGS["xproportion"], "seed": seed}
    circuit = tep.edge_pruning(task.model, task.data(), progress=False, **settings).circuit()
    edges = set(circuit.edge_names())
    assert set(XPROPORTION_FUNCTIONAL) <= edges <= set(CANONICAL_CIRCUITS["xproportion"])
    assert circuit.evaluate(task.model, task.data(), ablation="zero")["mse"] < 1e-8
