"""The model is left exactly as it was, and bad input fails early with a message that says what to do."""

import contextlib
import pytest
import torch
from torch import nn

import tl_edgeprune as tep
from tl_edgeprune.adapter import ModelAdapter

from .conftest import DEFAULT_ID, HAS_HOOKED, make_model, model_ids, needs_hooked
from .models import bridge_model, hooked_model


def snapshot(model, clean):
    adapter = ModelAdapter(model)
    return model(clean).detach(), adapter.hook_counts(), adapter.flag_state()


def assert_untouched(model, clean, before):
    logits, hooks, flags = snapshot(model, clean)
    assert torch.equal(logits, before[0])
    assert hooks == before[1]
    assert flags == before[2]


def test_model_is_restored_after_use(any_model, tokens):
    clean, corrupted = tokens
    before = snapshot(any_model, clean)
    with tep.masked(any_model) as mm:
        z = mm.graph.zeros()
        mm(clean, mm.interchange(corrupted), z)
        # Inside the context, a plain call is not masked (hooks are inert outside mm(...)).
        torch.testing.assert_close(any_model(clean), before[0], atol=1e-5, rtol=0)
    assert_untouched(any_model, clean, before)


def test_model_is_restored_when_an_exception_escapes(any_model, tokens):
    clean, corrupted = tokens
    before = snapshot(any_model, clean)
    with pytest.raises(ZeroDivisionError):
        with tep.masked(any_model) as mm:
            mm(clean, mm.interchange(corrupted), mm.graph.zeros())
            1 / 0
    assert_untouched(any_model, clean, before)


def test_model_is_restored_when_the_forward_itself_fails(any_model, tokens):
    clean, corrupted = tokens
    before = snapshot(any_model, clean)

    def boom(x, hook):
        raise RuntimeError("user hook failed")

    with tep.masked(any_model) as mm:
        cf = mm.interchange(corrupted)
        with pytest.raises(RuntimeError, match="user hook failed"):
            with any_model.hooks(fwd_hooks=[("blocks.1.hook_resid_pre", boom)]):
                mm(clean, cf, mm.graph.zeros())
        # The engine recovers: the next masked forward works.
        torch.testing.assert_close(mm(clean, cf), before[0], atol=1e-5, rtol=0)
    assert_untouched(any_model, clean, before)


def test_user_hooks_survive(tokens):
    model = make_model(DEFAULT_ID)
    clean, corrupted = tokens
    calls = []
    model.add_hook("blocks.0.hook_resid_pre", lambda x, hook: calls.append(1), is_permanent=True)
    before = snapshot(model, clean)
    with tep.masked(model) as mm:
        mm(clean, mm.interchange(corrupted))
    assert_untouched(model, clean, before)
    assert len(calls) >= 3


# ---------------------------------------------------------------------------------------- refusals
@needs_hooked
def test_post_attention_norm_config_is_refused_before_any_forward():
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = HookedTransformerConfig(
        n_layers=2, d_model=16, n_heads=2, d_head=8, d_mlp=32, d_vocab=20, n_ctx=8, act_fn="gelu",
        normalization_type="RMS", use_normalization_before_and_after=True,
    )
    with pytest.raises(tep.UnsupportedModelError, match="per-head edges do not exist"):
        tep.masked(HookedTransformer(cfg))


def test_post_attention_norm_bridge_is_refused_before_a_wrong_circuit(tokens):
    """The bridge twin of the refusal above: a Gemma-2 TransformerBridge (norm after attention) is caught by the
    numerical additivity check at its first masked forward, naming the cause."""
    import transformers
    from transformer_lens.model_bridge import TransformerBridge

    from .models import D_VOCAB, N_CTX, word_tokenizer

    torch.manual_seed(0)
    hf = transformers.Gemma2ForCausalLM(transformers.Gemma2Config(
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, hidden_size=32, intermediate_size=64,
        head_dim=8, vocab_size=D_VOCAB, max_position_embeddings=N_CTX)).eval()
    model = TransformerBridge.boot_transformers("google/gemma-2-2b", hf_model=hf, tokenizer=word_tokenizer())
    clean, corrupted = tokens
    with pytest.raises(tep.UnsupportedModelError, match="applies a norm to the attention/MLP output"):
        with tep.masked(model) as mm:
            mm(clean, mm.interchange(corrupted), mm.graph.ones())


class _Rescale(torch.nn.Module):
    """Stands in for a norm after attention (Gemma-2 style): the attention output is rescaled in the model's code."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(1.7 * x)


def test_non_additive_outputs_are_detected_numerically(tokens):
    """A model whose attention output is rescaled before the residual add fails the attach-time identity check."""
    model = make_model(DEFAULT_ID)
    clean, _ = tokens
    block = model.blocks[0]
    if HAS_HOOKED:
        block.hook_attn_out = _Rescale(block.hook_attn_out)
    else:  # the bridge's attention output hook point lives on the attention module
        block.attn.hook_out = _Rescale(block.attn.hook_out)
    with pytest.raises(tep.UnsupportedModelError, match="differs from the sum of its upstream writers"):
        with tep.masked(model):
            pass


class _RescaleAfter(nn.Module):
    """The MLP's output rescaled after its hook point (which records the writer's output) and before the add."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return 1.7 * self.inner(x)


def test_non_additive_last_writer_is_detected_at_the_final_read(tokens):
    """The attach-time check unembeds one position only; the final read (logits) still sees the whole residual,
    so a rescaled last MLP output (which only the final read reads) is caught there."""
    model = make_model(DEFAULT_ID)
    block = model.blocks[-1]
    if HAS_HOOKED:
        block.hook_mlp_out = _RescaleAfter(block.hook_mlp_out)
    else:
        block.mlp.hook_out = _RescaleAfter(block.mlp.hook_out)
    with pytest.raises(tep.UnsupportedModelError, match="at logits the residual stream differs"):
        with tep.masked(model):
            pass


def test_unsupported_model_types():
    with pytest.raises(tep.UnsupportedModelError, match="got Linear"):
        tep.masked(nn.Linear(3, 3))
    with pytest.raises(tep.UnsupportedModelError, match="got str"):
        tep.masked("gpt2")
    model = make_model(DEFAULT_ID)
    with pytest.raises(tep.UnsupportedModelError, match=r"torch.compile.*_orig_mod"):
        tep.masked(torch.compile(model))  # wrapping only: dynamo compiles on the first call, which never comes


def test_graph_of_another_model_is_refused():
    twin = hooked_model if HAS_HOOKED else bridge_model
    model = twin("gpt2")
    other = tep.Graph.from_model(twin("gpt2", n_layers=3))
    with pytest.raises(tep.EdgePruneError, match="Graph.from_model"):
        tep.masked(model, other)


# ---------------------------------------------------------------------------------------- bad input
@pytest.fixture
def active(tokens):
    """An active MaskedModel whose forward counts calls, to prove errors come before any forward."""
    model = make_model(DEFAULT_ID)
    with tep.masked(model) as mm:
        calls = []
        original = mm.adapter.forward
        mm.adapter.forward = lambda *a, **k: (calls.append(1), original(*a, **k))[1]
        yield mm, calls, tokens


def expect_error(active, fn, match):
    mm, calls, _ = active
    calls.clear()
    with pytest.raises(tep.EdgePruneError, match=match):
        fn()
    assert calls == [], "the error must come before any forward pass"


def test_clean_and_corrupted_of_different_shapes(active):
    mm, _, (clean, corrupted) = active
    cf = mm.interchange(corrupted[:, :5])
    expect_error(active, lambda: mm(clean, cf), r"clean batch is \[3, 7\].*corrupted batch was \[3, 5\]")
    cf = mm.interchange(corrupted[:2])
    expect_error(active, lambda: mm(clean, cf), "pair up one to one")


def test_bad_masks(active):
    mm, _, (clean, corrupted) = active
    cf = mm.interchange(corrupted)
    g = mm.graph
    expect_error(active, lambda: mm(clean, cf, torch.ones(3, 3)), r"shape \[3, 3\].*graph.ones\(\)")
    expect_error(active, lambda: mm(clean, cf, g.ones().long()), "float .* or bool")
    expect_error(active, lambda: mm(clean, cf, g.ones().to("meta")), "is on meta")
    expect_error(active, lambda: mm(clean, cf, g.ones(), torch.ones(2)), r"node_mask has shape \[2\]")
    expect_error(active, lambda: mm(clean, cf, g.ones().numpy()), "must be a torch tensor")


def test_bad_tokens(active):
    mm, _, (clean, corrupted) = active
    cf = mm.interchange(corrupted)
    expect_error(active, lambda: mm("hello", cf), "not text")
    expect_error(active, lambda: mm(clean.float(), cf), "integer tensor")
    expect_error(active, lambda: mm(clean[0], cf), r"\[batch, pos\]")
    expect_error(active, lambda: mm(clean + 1000, cf), "outside the vocabulary")
    expect_error(active, lambda: mm(torch.zeros(1, 99, dtype=torch.long), mm.zero()), "n_ctx")
    expect_error(active, lambda: mm(clean, "corrupted"), "mm.interchange")
    expect_error(active, lambda: mm(clean, cf, attention_mask=torch.ones(2, 2)), "attention_mask")


def test_mean_ablation_of_the_wrong_width(active):
    mm, _, (clean, corrupted) = active
    cf = mm.mean(torch.randint(0, 30, (5, 4)), per_position=True)
    expect_error(active, lambda: mm(clean, cf), "mean-ablation dataset has width 4 .* per_position=False")
    expect_error(active, lambda: mm.mean(torch.zeros(0, 7, dtype=torch.long)), "empty")
    expect_error(
        active,
        lambda: mm.mean([torch.zeros(2, 7, dtype=torch.long), torch.zeros(2, 5, dtype=torch.long)]),
        "widths 7 and 5",
    )
    with pytest.raises(tep.EdgePruneError, match="d_model"):
        tep.Counterfactual("mean", torch.zeros(mm.graph.n_writers, 1, 1, 5), mm.graph.n_writers, 32)
    # Means over all positions broadcast to any width.
    flat = mm.mean(torch.randint(0, 30, (5, 4)), per_position=False)
    assert flat.values.shape == (mm.graph.n_writers, 1, 1, mm.graph.spec.d_model)
    assert mm(clean, flat, mm.graph.zeros()).shape == (3, 7, mm.model.cfg.d_vocab)


def test_use_outside_the_context_is_an_error(tokens):
    model = make_model(DEFAULT_ID)
    mm = tep.masked(model)
    with pytest.raises(tep.EdgePruneError, match="inside `with"):
        mm(tokens[0], mm.zero())


def test_buffer_storage_is_reused_only_once_its_graph_is_gone(tokens):
    """The pooled writer buffer: the next step reuses it after backward, but a live graph keeps its own copy,
    and its gradients stay right when another forward runs before its backward."""
    model = make_model(DEFAULT_ID)
    clean, corrupted = tokens
    with tep.masked(model) as mm:
        cf = mm.interchange(corrupted)
        z = torch.full(mm.graph.shape, 0.7, requires_grad=True)

        def grad_alone():
            z.grad = None
            mm(clean, cf, z).square().mean().backward()
            return z.grad.clone()

        reference = grad_alone()
        slots = lambda: [entry[0][0].data_ptr() for entry in mm._pool._slots.values()]  # noqa: E731
        first = slots()
        torch.testing.assert_close(grad_alone(), reference, atol=0, rtol=0)
        assert slots() == first  # reused after the graph was freed
        z.grad = None
        held = mm(clean, cf, z).square().mean()  # graph alive: its buffer is still in use
        other = mm(clean, cf, z.detach() * 0.5).square().mean()  # must get fresh storage
        assert slots() != first
        held.backward()
        torch.testing.assert_close(z.grad, reference, atol=0, rtol=0)
        assert float(other) != float(held)
        out = mm(clean, cf, z).square().mean()
        out.backward(retain_graph=True)
        with pytest.raises(RuntimeError, match="one backward pass"):
            out.backward()


@pytest.mark.parametrize("model_id", model_ids(["gpt2", "llama"], ["gpt2"]))
@pytest.mark.parametrize("frozen", [True, False], ids=["frozen", "weights-with-grad"])
def test_single_use_counterfactual_keeps_only_the_differences(model_id, frozen, tokens):
    """interchange(single_use=True): the masked forward writes y − ỹ over ỹ's storage (one writer-sized tensor,
    not two) with logits and mask gradients bit-identical to the reusable counterfactual; a second use fails.
    Frozen weights write the heads' outputs straight into the buffer (mixing.write_heads), the others through y."""
    from tl_edgeprune.edge_pruning import frozen_parameters

    model = make_model(model_id)
    clean, corrupted = tokens
    with frozen_parameters(model) if frozen else contextlib.nullcontext(), tep.masked(model) as mm:
        z = torch.full(mm.graph.shape, 0.6, requires_grad=True)

        def logits_and_grad(cf):
            z.grad = None
            logits = mm(clean, cf, z)
            logits.square().mean().backward()
            return logits.detach(), z.grad.clone()

        single = mm.interchange(corrupted, single_use=True)
        storage = single.values.data_ptr()
        single_logits, single_grad = logits_and_grad(single)  # first forward of this context: a fresh pool
        assert single.spent and single.values.data_ptr() == storage
        (slot, _), = mm._pool._slots.values()
        assert slot[0] is None and slot[1] is not None  # only the gradient twin was allocated
        reusable_logits, reusable_grad = logits_and_grad(mm.interchange(corrupted))
        torch.testing.assert_close(single_logits, reusable_logits, atol=0, rtol=0)
        torch.testing.assert_close(single_grad, reusable_grad, atol=0, rtol=0)
        torch.testing.assert_close(single.values, slot[0], atol=0, rtol=0)  # both hold this forward's y − ỹ
        with pytest.raises(tep.EdgePruneError, match="already consumed"):
            mm(clean, single, z)
