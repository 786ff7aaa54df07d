"""Issue 14 (trust): one test per defect, named d01..d15 after the issue's list. Each failed before its fix."""

import copy
import json
import os
import pathlib
import stat
import threading

import pytest
import torch

import tl_edgeprune as tep
from tl_edgeprune.edge_pruning import DEFAULT_CHECKPOINT_EVERY
from tl_edgeprune.metrics import OBJECTIVES
from tl_edgeprune.adapter import ModelAdapter
from tl_edgeprune.eap import eap
from tl_edgeprune.acdc import acdc

from .conftest import DEFAULT_ID, HAS_HOOKED, make_model, needs_hooked, small_problem
from .models import hooked_model

# Written by EAP-IG's own Graph.to_json (copied unmodified from ../shared/fixtures; its README says how).
FIXTURE = pathlib.Path(__file__).resolve().parent / "fixtures" / "eapig_neox_top60.json"
FAST = dict(steps=12, sparsity_warmup=6, lr_warmup=2, batch_size=8, progress=False)


def sqrt_at_zero_objective(trigger_step: int):
    """KL plus sqrt(|0·logits|): the value stays finite, the gradient is NaN (0·inf) at one step only."""
    calls = {"n": 0}

    def objective(circuit_logits, full_logits, batch):
        kl = OBJECTIVES["kl"](circuit_logits, full_logits, batch)
        step, calls["n"] = calls["n"], calls["n"] + 1
        if step == trigger_step:
            return kl + (circuit_logits[..., 0] * 0).abs().sqrt().sum()
        return kl

    return objective


# ------------------------------------------------------------------------------------------- lost or corrupted runs
def test_d01_nonfinite_gradient_never_overwrites_the_last_good_checkpoint(tmp_path):
    """The issue's case: a finite loss with a NaN gradient, late enough that gates are off their clamp (at log α ≈ 10
    every gate is clamped at 1 and no gradient, NaN or not, reaches log α)."""
    model, data = small_problem()
    path = str(tmp_path / "ck.pt")
    opts = FAST | dict(steps=40, sparsity_warmup=10)
    objective = sqrt_at_zero_objective(trigger_step=31)
    with pytest.raises(tep.EdgePruneError, match=r"step 31: the gradient of the edge log α .*not finite.*not applied"):
        tep.edge_pruning(model, data, 0.5, checkpoint_path=path, checkpoint_every=3, objective=objective, **opts)
    good = torch.load(path, weights_only=True)
    assert good["step"] == 30 and torch.isfinite(good["edge_log_alpha"]).all()  # the periodic one, untouched
    dump = torch.load(str(tmp_path / "ck.failed-step31.pt"), weights_only=True)
    assert dump["step"] == 31 and torch.isfinite(dump["edge_log_alpha"]).all()
    # The dump resumes the failing step itself (the objective's one-off fault is past) and finishes the run.
    done = tep.edge_pruning(model, data, 0.5, checkpoint_path=str(tmp_path / "ck.failed-step31.pt"), resume=True,
                            objective=objective, **opts)
    assert len(done.history["loss"]) == opts["steps"] and torch.isfinite(done.edge_log_alpha).all()
    # Without a checkpoint_path, failure dumps go to a folder of the run's own, never one shared name.
    paths = []
    for _ in range(2):
        with pytest.raises(tep.EdgePruneError) as info:
            tep.edge_pruning(model, data, 0.5, objective=lambda c, f, b: c.sum() * float("nan"), **FAST)
        paths.append(str(info.value).split("saved at ")[1].split(" (resume")[0])
    assert paths[0] != paths[1] and all(os.path.exists(p) for p in paths)


@pytest.mark.parametrize("bad", [dict(lr=float("nan")), dict(lambda_lr=float("inf")), dict(lr=-1.0)])
def test_d01_nonfinite_learning_rates_are_refused_up_front(bad):
    model, data = small_problem()
    with pytest.raises(tep.EdgePruneError, match="must be finite|must lie in"):
        tep.edge_pruning(model, data, 0.5, **(FAST | bad), callback=lambda s, r: pytest.fail("trained"))


def test_d02_checkpoint_path_alone_writes_periodically_and_at_the_end(tmp_path):
    model, data = small_problem()
    path = str(tmp_path / "ck.pt")
    tep.edge_pruning(model, data, 0.5, checkpoint_path=path, **FAST)
    assert torch.load(path, weights_only=True)["step"] == FAST["steps"]  # at the end

    def stop(step, row):
        if step == 57:
            raise KeyboardInterrupt

    path2 = str(tmp_path / "ck2.pt")
    with pytest.raises(KeyboardInterrupt):
        tep.edge_pruning(model, data, 0.5, checkpoint_path=path2, callback=stop, **(FAST | dict(steps=80)))
    assert torch.load(path2, weights_only=True)["step"] == DEFAULT_CHECKPOINT_EVERY


@pytest.fixture
def made_checkpoint(tmp_path):
    model, data = small_problem()
    path = str(tmp_path / "ck.pt")
    tep.edge_pruning(model, data, 0.5, checkpoint_path=path, checkpoint_every=2, **(FAST | dict(steps=4)))
    return model, data, path


@pytest.mark.parametrize("change, named", [
    (lambda m, d: dict(objective="mse"), "objective"),
    (lambda m, d: dict(ablation="zero"), "ablation"),
    (lambda m, d: dict(data=small_problem(seed=5)[1]), "data.sha256"),
    (lambda m, d: dict(model=small_model_with_other_weights()), "model.weights_sha256"),
    (lambda m, d: dict(input_nodes="merged"), "input_nodes"),
    (lambda m, d: dict(trainable_edges=~torch.eye(*tep.Graph.from_model(m).shape, dtype=torch.bool)), "trainable_edges"),
])
def test_d03_resume_refuses_another_run_by_name(made_checkpoint, change, named):
    model, data, path = made_checkpoint
    kw = FAST | dict(steps=4) | change(model, data)
    model, data = kw.pop("model", model), kw.pop("data", data)
    with pytest.raises(tep.EdgePruneError, match=rf"other settings.*{named}"):
        tep.edge_pruning(model, data, 0.5, checkpoint_path=path, resume=True, **kw)


def small_model_with_other_weights():
    model = small_problem()[0]
    with torch.no_grad():
        next(model.parameters()).add_(0.01)
    return model


@pytest.mark.parametrize("kind, match", [
    ("truncated", "cannot be read"), ("random", "cannot be read"), ("empty", "cannot be read"),
    ("directory", "is a folder"), ("circuit", "not an Edge Pruning checkpoint"),
])
def test_d03_resume_from_a_bad_file_says_what_it_is(made_checkpoint, tmp_path, kind, match):
    model, data, path = made_checkpoint
    bad = str(tmp_path / f"bad-{kind}.pt")
    if kind == "truncated":
        pathlib.Path(bad).write_bytes(pathlib.Path(path).read_bytes()[: os.path.getsize(path) // 2])
    elif kind == "random":
        for seed in range(20):  # many byte patterns: torch's unpickler fails on each in its own way
            pathlib.Path(bad).write_bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(seed),
                                                        dtype=torch.uint8).numpy().tobytes())
            with pytest.raises(tep.EdgePruneError, match=match):
                tep.edge_pruning(model, data, 0.5, checkpoint_path=bad, resume=True, **(FAST | dict(steps=4)))
            pathlib.Path(bad).write_bytes(b"PK\x03\x04" + bytes(range(256)) * 4)  # a zip header, then junk
    elif kind == "empty":
        pathlib.Path(bad).write_bytes(b"")
    elif kind == "directory":
        os.mkdir(bad)
    else:
        tep.Circuit(tep.Graph.from_model(model), torch.ones(tep.Graph.from_model(model).shape, dtype=torch.bool)).save(bad)
    with pytest.raises(tep.EdgePruneError, match=match):
        tep.edge_pruning(model, data, 0.5, checkpoint_path=bad, resume=True, **(FAST | dict(steps=4)))


def test_d04_resume_mid_epoch_is_bit_identical_with_the_example_cache(tmp_path):
    """The issue's case: 24 pairs, batch 8 (3 batches an epoch), stopped deep into training, mid-epoch."""
    model, data = small_problem(n=24)
    opts = dict(steps=160, sparsity_warmup=100, lr_warmup=10, batch_size=8, progress=False, seed=2, cache_gib=1.0)
    straight = tep.edge_pruning(model, data, 0.5, **opts)
    assert straight.info["example_cache"].startswith("on")
    path = str(tmp_path / "ck.pt")

    def stop(step, row):
        if step == 152:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        tep.edge_pruning(model, data, 0.5, checkpoint_path=path, checkpoint_every=4, callback=stop, **opts)
    assert torch.load(path, weights_only=True)["step"] == 152 and 152 % 3 != 0  # mid-epoch
    resumed = tep.edge_pruning(model, data, 0.5, checkpoint_path=path, checkpoint_every=4, resume=True, **opts)
    assert torch.equal(straight.edge_log_alpha, resumed.edge_log_alpha)
    assert torch.equal(straight.node_log_alpha, resumed.node_log_alpha)
    assert straight.history == resumed.history


# ------------------------------------------------------------------------------------------- silent wrong answers
def test_d05_a_second_masked_model_on_one_model_is_refused_and_flags_come_back(tokens):
    model = make_model(DEFAULT_ID)
    clean, corrupted = tokens
    flags = ModelAdapter(model).flag_state()
    with tep.masked(model) as first:
        with pytest.raises(tep.EdgePruneError, match="another MaskedModel is already active on this model"):
            with tep.masked(model):
                pass
        with pytest.raises(tep.EdgePruneError, match="already active"):  # a method run from the same cell
            eap(model, tep.paired_data(clean, corrupted), progress=False)
        first(clean, first.interchange(corrupted))  # the first still works: its hooks were not touched
    assert ModelAdapter(model).flag_state() == flags
    with tep.masked(model):  # and after it, a new one may start
        pass
    assert ModelAdapter(model).flag_state() == flags


def test_d05_a_forward_from_another_thread_is_refused_clearly(tokens):
    model = make_model(DEFAULT_ID)
    clean, corrupted = tokens
    reference = model(clean)
    errors, busy = [], threading.Event()

    def other_thread():
        try:
            model(clean)
        except Exception as exc:  # noqa: BLE001 - the test records what the thread got
            errors.append(exc)

    def spawn_mid_forward(x, hook):  # runs inside the masked forward of the main thread
        if threading.current_thread() is threading.main_thread() and not busy.is_set():
            busy.set()
            t = threading.Thread(target=other_thread, name="plotting-thread")
            t.start()
            t.join()
        return None

    with model.hooks(fwd_hooks=[("blocks.1.hook_resid_pre", spawn_mid_forward)]), tep.masked(model) as mm:
        out = mm(clean, mm.interchange(corrupted))
        t = threading.Thread(target=other_thread)  # and while no forward runs
        t.start()
        t.join()
    assert len(errors) == 2 and all(type(e) is tep.EdgePruneError for e in errors), errors
    assert "in use by a MaskedModel" in str(errors[0]) and "MainThread" in str(errors[0])
    torch.testing.assert_close(out, reference, atol=1e-5, rtol=0)  # the main thread's forward was not disturbed


@pytest.mark.parametrize("call, match", [
    (lambda m, d: tep.edge_pruning(m, d, 0.5, **(FAST | dict(grad_clip=0))), "grad_clip"),
    (lambda m, d: tep.edge_pruning(m, d, 0.5, **(FAST | dict(grad_clip=-1.0))), "grad_clip"),
    (lambda m, d: tep.edge_pruning(m, d, 0.5, **(FAST | dict(steps=2.5))), "steps must be an integer"),
    (lambda m, d: acdc(m, d, threshold=float("nan"), progress=False), "threshold must be finite"),
    (lambda m, d: eap(m, d, batch_size=-1, progress=False), "batch_size must be at least 1"),
    (lambda m, d: eap(m, d, batch_size=0, progress=False), "batch_size must be at least 1"),
    (lambda m, d: tep.Circuit.top_k(tep.Graph.from_model(m), torch.ones(tep.Graph.from_model(m).shape), k=3)
     .evaluate(m, d, batch_size=-2), "batch_size must be at least 1"),
    (lambda m, d: tep.paired_data(torch.zeros(3, 0, dtype=torch.long), torch.zeros(3, 0, dtype=torch.long)),
     "no tokens"),
])
def test_d06_settings_that_would_disable_or_reverse_the_method_are_refused(call, match):
    model, data = small_problem()
    with pytest.raises(tep.EdgePruneError, match=match):
        call(model, data)


def test_d06_grad_clip_none_means_no_clipping():
    model, data = small_problem()
    res = tep.edge_pruning(model, data, 0.5, **(FAST | dict(grad_clip=None)))
    assert (res.edge_log_alpha - 10).abs().max() > 0.1


def test_d07_answer_ids_are_validated():
    model, data = small_problem(n=8)
    answers = torch.full((8,), 3)
    with pytest.raises(tep.EdgePruneError, match=r"answers\[2\] is -1.*>= 0"):
        tep.paired_data(data.clean, data.corrupted, answers=torch.tensor([3, 3, -1, 3, 3, 3, 3, 3]))
    with pytest.raises(tep.EdgePruneError, match="integer token ids.*truncated"):
        tep.paired_data(data.clean, data.corrupted, answers=answers.float())
    with pytest.raises(tep.EdgePruneError, match="positions as a tensor of indices must be integers.*truncated"):
        tep.paired_data(data.clean, data.corrupted, positions=torch.full((8,), 2.0))
    too_big = answers.clone()
    too_big[5] = 10_000
    bad = tep.paired_data(data.clean, data.corrupted, answers=too_big, distractors=answers)
    with pytest.raises(tep.EdgePruneError, match=r"example 5 .*answers \[10000\] lie outside the model's output vocabulary"):
        eap(model, bad, progress=False)
    subset = tep.paired_data(data.clean, data.corrupted, token_subset=[1, 2, 999])
    with pytest.raises(tep.EdgePruneError, match=r"token_subset holds ids outside.*\[999\]"):
        tep.edge_pruning(model, subset, 0.5, **FAST)


def test_d08_tokens_are_checked_for_the_whole_dataset_before_the_first_forward():
    model, data = small_problem(n=12)
    clean = data.clean.clone()
    clean[9, 2] = 4000
    bad = tep.paired_data(clean, data.corrupted)
    steps = []
    with pytest.raises(tep.EdgePruneError, match=r"example 9 .*clean tokens \[4000\] lie outside"):
        tep.edge_pruning(model, bad, 0.5, **(FAST | dict(batch_size=4)), callback=lambda s, r: steps.append(s))
    assert steps == []


def test_d09_mask_values_are_checked(tokens):
    model = make_model(DEFAULT_ID)
    clean, corrupted = tokens
    with tep.masked(model) as mm:
        cf = mm.interchange(corrupted)
        for value in (float("nan"), 1.5, -0.1):
            z = mm.graph.ones()
            z[3, 5] = value
            with pytest.raises(tep.EdgePruneError, match=r"values in \[0, 1\].*entry \[3, 5\]"):
                mm(clean, cf, z)
        nodes = torch.ones(mm.graph.n_writers)
        nodes[1] = float("nan")
        with pytest.raises(tep.EdgePruneError, match="node_mask must hold values"):
            mm(clean, cf, node_mask=nodes)
    _, data = small_problem()
    readers = torch.ones(tep.Graph.from_model(model).n_readers, dtype=torch.bool)
    with pytest.raises(tep.EdgePruneError, match="trainable_edges must be a bool tensor of the graph's shape"):
        tep.edge_pruning(model, data, 0.5, trainable_edges=readers, **FAST)


def test_d10_a_circuit_is_matched_to_its_model_by_fingerprint(tmp_path):
    task = tep.load_tracr("reverse")
    data = task.data()
    circuit = eap(task.model, data, ablation="zero", progress=False).circuit(k=11)
    other = copy.deepcopy(task.model)  # same shape, other weights
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(0), dtype=p.dtype))
    for loaded in (circuit, tep.Circuit.from_json(_saved(circuit, tmp_path / "c.json")),
                   tep.Circuit.load(_saved(circuit, tmp_path / "c.json.gz")),
                   tep.Circuit.load(_saved(circuit, tmp_path / "c.pt"))):
        assert loaded.model == circuit.model and len(circuit.model["weights_sha256"]) == 64
        loaded.evaluate(task.model, data, ablation="zero")  # its own model: fine
        with pytest.raises(tep.EdgePruneError, match="found on another model.*weights_sha256.*allow_other_model=True"):
            loaded.evaluate(other, data, ablation="zero")
        loaded.evaluate(other, data, ablation="zero", allow_other_model=True)  # the explicit override
    renamed = copy.deepcopy(task.model)  # the same weights under another name (loaded from another folder): fine
    renamed.cfg.model_name = "loaded-elsewhere"
    circuit.evaluate(renamed, data, ablation="zero")
    # Edge Pruning's circuits and checkpoints carry it too.
    res = tep.edge_pruning(task.model, data, 0.5, **(FAST | dict(ablation="zero")))
    assert res.circuit().model == circuit.model


def _saved(circuit, path):
    circuit.save(path)
    return path


def test_d11_one_corrupted_batch_is_never_silently_reused_or_mispaired():
    model, data = small_problem()
    with tep.masked(model) as mm:
        cf = mm.interchange(data.corrupted[:8])
    for call in (lambda: tep.edge_pruning(model, data, 0.5, **(FAST | dict(ablation=cf))),
                 lambda: eap(model, data, ablation=cf, progress=False),
                 lambda: tep.Circuit.top_k(tep.Graph.from_model(model), torch.ones(tep.Graph.from_model(model).shape),
                                           k=5).evaluate(model, data, ablation=cf)):
        with pytest.raises(tep.EdgePruneError, match="paired with every batch"):
            call()
    clean, corrupted = data.clean[:4].clone(), data.corrupted[:4].clone()
    mask = torch.ones_like(clean)
    mask[1, 4:] = 0  # example 1's clean prompt is 4 tokens long
    clean[1, 4:] = 0
    corrupted[1, 4:] = 0
    tep.paired_data(clean, corrupted, attention_mask=mask)  # both padded alike: fine
    longer = corrupted.clone()
    longer[1, 4] = 7  # the corrupted prompt goes on where the clean one is padding
    with pytest.raises(tep.EdgePruneError, match=r"examples \[1\]: the corrupted prompt has tokens where the clean"):
        tep.paired_data(clean, longer, attention_mask=mask)
    shorter = mask.clone()
    shorter[2, 3:] = 0
    with pytest.raises(tep.EdgePruneError, match=r"examples \[2\]: the clean and corrupted prompts have different"):
        tep.paired_data(clean, corrupted, attention_mask=mask, corrupted_attention_mask=shorter)


def test_d12_a_users_hook_is_named_not_blamed_on_the_architecture(tokens):
    model = make_model(DEFAULT_ID)
    clean, corrupted = tokens
    model.add_hook("blocks.1.hook_resid_pre", lambda x, hook: 2.0 * x, is_permanent=True)
    with pytest.raises(tep.EdgePruneError, match=r"hooks of its own at \['blocks\.1\.hook_(resid_pre|in)'\]") as info:
        with tep.masked(model):
            pass
    assert not isinstance(info.value, tep.UnsupportedModelError) and "norm after" not in str(info.value)
    model.reset_hooks(including_permanent=True)
    with tep.masked(model) as mm:  # a hook added mid-context at a writer's hook point: refused at the next forward
        cf = mm.interchange(corrupted)
        with model.hooks(fwd_hooks=[("blocks.0.hook_mlp_out", lambda x, hook: 0 * x)]):
            with pytest.raises(tep.EdgePruneError, match=r"a hook was added at .*mlp.*while this MaskedModel is active"):
                mm(clean, cf)
        mm(clean, cf)  # gone again: fine


# ------------------------------------------------------------------------------------------- files of other tools
def eapig_names(cfg):
    """EAP-IG's node and edge names for a cfg, built as its Graph.from_model does (written here independently)."""
    L, H, parallel = cfg["n_layers"], cfg["n_heads"], cfg["parallel_attn_mlp"]
    nodes, edges, upstream = ["input"], set(), ["input"]
    for layer in range(L):
        heads = [f"a{layer}.h{h}" for h in range(H)]
        nodes += heads + [f"m{layer}"]
        edges |= {f"{u}->{a}<{x}>" for u in upstream for a in heads for x in "qkv"}
        if parallel:
            edges |= {f"{u}->m{layer}" for u in upstream}
            upstream = upstream + heads + [f"m{layer}"]
        else:
            upstream = upstream + heads
            edges |= {f"{u}->m{layer}" for u in upstream}
            upstream = upstream + [f"m{layer}"]
    edges |= {f"{u}->logits" for u in upstream}
    return set(nodes) | {"logits"}, edges


def test_d13_an_unmodified_eapig_file_loads_exactly_and_round_trips():
    original = json.loads(FIXTURE.read_text())
    circuit = tep.Circuit.from_json(FIXTURE)
    assert circuit.graph.input_nodes == "merged" and circuit.graph.spec.parallel_attn_mlp
    assert circuit.graph.n_edges == len(original["edges"]) == 250
    assert circuit.n_edges == sum(e["in_graph"] for e in original["edges"].values()) == 15
    written = circuit.to_dict()
    nodes, edges = eapig_names(written["cfg"])  # what EAP-IG's Graph.from_json will look up
    assert set(written["edges"]) == edges == set(original["edges"]) and set(written["nodes"]) <= nodes
    for name, entry in original["edges"].items():
        assert written["edges"][name]["in_graph"] == entry["in_graph"]
        assert written["edges"][name]["score"] == pytest.approx(entry["score"], rel=1e-6)
    for name, entry in original["nodes"].items():
        assert written["nodes"][name]["in_graph"] == entry["in_graph"], name
    assert all(type(e["in_graph"]) is bool and isinstance(e["score"], float) for e in written["edges"].values())


def test_d13_the_eapig_fixture_evaluates_on_its_model():
    """EAP-IG's file (a 3-layer parallel-attention rotary model) evaluates on a model of that architecture: a
    HookedTransformer where TL has one, else the transformers GPT-NeoX twin as a TransformerBridge."""
    if HAS_HOOKED:
        from transformer_lens import HookedTransformer, HookedTransformerConfig

        cfg = HookedTransformerConfig(n_layers=3, d_model=128, n_heads=4, d_head=32, d_mlp=512, act_fn="gelu",
                                      normalization_type="LN", positional_embedding_type="rotary", rotary_dim=16,
                                      parallel_attn_mlp=True, n_ctx=32, d_vocab=200, seed=0)
        model = HookedTransformer(cfg)
    else:
        import transformers
        from transformer_lens.model_bridge import TransformerBridge

        from .models import word_tokenizer

        torch.manual_seed(0)
        hf = transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(
            num_hidden_layers=3, hidden_size=128, num_attention_heads=4, intermediate_size=512, rotary_pct=0.5,
            use_parallel_residual=True, vocab_size=200, max_position_embeddings=32)).eval()
        model = TransformerBridge.boot_transformers("EleutherAI/pythia-70m", hf_model=hf, tokenizer=word_tokenizer(200))
    circuit = tep.Circuit.from_json(FIXTURE)
    gen = torch.Generator().manual_seed(0)
    data = tep.paired_data(torch.randint(0, 200, (8, 10), generator=gen), torch.randint(0, 200, (8, 10), generator=gen))
    metrics = circuit.evaluate(model, data)
    assert metrics["edges"] == 15 and metrics["kl"] > 0
    full = tep.Circuit(circuit.graph, circuit.graph.valid_mask()).evaluate(model, data)
    assert full["kl"] == pytest.approx(0, abs=1e-5)


@pytest.mark.parametrize("edit, match", [
    (lambda d: d["edges"].__setitem__("input->a0.h0<q>", {"score": 1.0, "in_graph": "false"}), "in_graph must be true or false"),
    (lambda d: d.__setitem__("edges", list(d["edges"])), "a circuit file is a JSON object"),
    (lambda d: d.__setitem__("nodes", ["input"]), "'nodes' must be an object"),
    (lambda d: d["edges"].__setitem__("a2.h0->a0.h1<q>", {"score": 0.0, "in_graph": True}), "not an edge of"),
    (lambda d: d["cfg"].pop("n_heads"), "lacks"),
    (lambda d: d["nodes"].__setitem__("a0.h0", {"in_graph": False}), "contradicts itself"),
])
def test_d13_malformed_circuit_files_are_refused(tmp_path, edit, match):
    data = json.loads(FIXTURE.read_text())
    edit(data)
    path = tmp_path / "edited.json"
    path.write_text(json.dumps(data))
    with pytest.raises(tep.EdgePruneError, match=match):
        tep.Circuit.from_json(path)


def test_d13_node_masks_survive_json_and_files_follow_the_umask(tmp_path):
    graph = tep.Graph.from_spec(tep.GraphSpec(2, 2, 2, 8))
    nodes = torch.ones(graph.n_writers, dtype=torch.bool)
    nodes[3] = False
    circuit = tep.Circuit(graph, graph.valid_mask(), nodes=nodes)
    old = os.umask(0o022)
    try:
        circuit.to_json(tmp_path / "a.json")
        circuit.save(tmp_path / "a.pt")
        os.umask(0o077)
        circuit.to_json(tmp_path / "b.json")
    finally:
        os.umask(old)
    assert torch.equal(tep.Circuit.from_json(tmp_path / "a.json").nodes, nodes)
    assert torch.equal(tep.Circuit.load(tmp_path / "a.pt").nodes, nodes)
    assert stat.S_IMODE(os.stat(tmp_path / "a.json").st_mode) == 0o644
    assert stat.S_IMODE(os.stat(tmp_path / "a.pt").st_mode) == 0o644
    assert stat.S_IMODE(os.stat(tmp_path / "b.json").st_mode) == 0o600


class _RunsCode:
    """Unpickling this would create a file: a stand-in for code execution."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def test_d14_loading_never_runs_code_from_the_file(tmp_path):
    marker = tmp_path / "code-ran"
    evil = tmp_path / "evil.pt"
    torch.save({"format": "tl_edgeprune/circuit", "payload": _RunsCode(str(marker))}, evil)
    with pytest.raises(tep.EdgePruneError, match="weights_only=True"):
        tep.Circuit.load(evil)
    model, data = small_problem()
    with pytest.raises(tep.EdgePruneError, match="cannot be read.*run code"):
        tep.edge_pruning(model, data, 0.5, checkpoint_path=str(evil), resume=True, **FAST)
    assert not marker.exists()
    torch.load(evil, weights_only=False)  # the file really would have run code (the test can fail)
    assert marker.exists()


def test_d15_exactness_is_claimed_for_float32_and_low_precision_is_documented(tokens):
    """bf16: the masked forward still equals TL's split-q/k/v forward bit for bit, but TL's split path differs from
    its plain forward there; the README says so where it makes the claim."""
    model = make_model(DEFAULT_ID, dtype=torch.bfloat16)
    clean, corrupted = tokens
    with tep.masked(model) as mm:
        masked = mm(clean, mm.interchange(corrupted), mm.graph.ones())
        split = mm.adapter.forward(clean)  # the engine's flags are on: TL's split-q/k/v forward, hooks inert
    assert torch.equal(masked, split)
    readme = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert "float32/float64" in readme and "bfloat16/float16" in readme


def test_a_checkpoint_reads_out_the_circuit_of_its_run(tmp_path):
    """EdgePruningResult.from_checkpoint: the masks and circuit of a run still going or killed (issue 15, item 3)."""
    model, data = small_problem()
    path = str(tmp_path / "ck.pt")
    res = tep.edge_pruning(model, data, 0.5, checkpoint_path=path, **(FAST | dict(steps=20)))
    read = tep.EdgePruningResult.from_checkpoint(path)
    assert torch.equal(read.edge_log_alpha, res.edge_log_alpha) and read.history == res.history
    assert torch.equal(read.circuit().edges, res.circuit().edges)
    assert read.circuit().model["weights_sha256"] == res.circuit().model["weights_sha256"]
    with pytest.raises(tep.EdgePruneError, match="is a folder"):
        tep.EdgePruningResult.from_checkpoint(str(tmp_path))
