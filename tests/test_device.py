"""Device propagation without a GPU: the engine's paths on PyTorch's ``meta`` device.

Meta tensors have shapes and a device but no values, and, like CUDA tensors, refuse to meet CPU tensors in an
op. So a tensor that the engine (or a metric) creates on the CPU instead of the model's device raises here as it
would under ``device="cuda"``. The two checks that read values (the token-id range and the attach-time residual
identity) cannot run on meta and are stubbed, and boolean-mask indexing assumes every entry is set (meta cannot
know which are); everything else is the library's own code. The TransformerBridge is not covered: TransformerLens
refuses to read its weights on meta ("cannot read W_O ... on the meta device"); it shares every engine path
below with HookedTransformer except the adapter's weight reads.
"""

import pytest
import torch
import torch.fx.experimental._config as fx_config

import tl_edgeprune as tep
from tl_edgeprune.data import paired_data
from tl_edgeprune.engine import MaskedModel
from tl_edgeprune.hard_concrete import HardConcrete
from tl_edgeprune.metrics import _last_scored, kl_divergence, mean_squared_error

from tl_edgeprune.tracr_models import load_tracr

from .conftest import HAS_HOOKED, HOOKED_ARCHS, make_model

META = torch.device("meta")
# Every HookedTransformer architecture (transformer-lens 3 CI leg) and the Tracr twin model (both legs).
DEVICE_MODELS = [f"hooked-{a}" for a in HOOKED_ARCHS] + ["toy-reverse"]


@pytest.fixture(autouse=True)
def meta_masks():
    with fx_config.patch(meta_nonzero_assume_all_nonzero=True):
        yield


@pytest.fixture
def on_meta(monkeypatch):
    """Stub the value-reading checks (they cannot run on meta tensors); tokens still move to the model's device."""
    monkeypatch.setattr(MaskedModel, "_check_residual_identity", lambda self: None)
    monkeypatch.setattr(MaskedModel, "_check_tokens", lambda self, tokens, what: tokens.to(self.device, torch.long))

    def load(model_id):
        if model_id.startswith("hooked") and not HAS_HOOKED:  # make_model would give the bridge twin
            pytest.skip("HookedTransformer was removed in transformer-lens 4, and TransformerLens cannot read a "
                        "TransformerBridge's weights on the meta device (toy-reverse covers these paths here)")
        model = load_tracr("reverse", "toy").model if model_id == "toy-reverse" else make_model(model_id)
        model.to(META)
        assert all(p.device == META for p in model.parameters())
        return model

    return load


@pytest.mark.parametrize("model_id", DEVICE_MODELS)
def test_masked_step_stays_on_the_model_device(on_meta, model_id, tokens):
    """Sampled edge and node masks, single-use interchange, backward into the masks: nothing touches the CPU."""
    model = on_meta(model_id)
    clean, corrupted = (t % model.cfg.d_vocab for t in tokens)
    with tep.masked(model) as mm:
        assert mm.device == META
        gen = torch.Generator().manual_seed(0)
        edges = HardConcrete(mm.graph.shape, gen, mm.device)
        nodes = HardConcrete((mm.graph.n_writers,), gen, mm.device)
        cf = mm.interchange(corrupted, single_use=True)
        assert cf.values.device == META
        batch = paired_data(clean, corrupted, positions="last").to(mm.device)
        with torch.no_grad():  # the loop's path: only the scored positions are unembedded
            full = mm.full_logits(clean, at=batch.positions)
            assert mm.full_logits(clean).device == META
        logits = mm(clean, cf, edges.sample(gen), nodes.sample(gen), logits_at=batch.positions)
        assert logits.device == META and full.device == META
        kl_divergence(logits, full, batch).backward()
        assert edges.log_alpha.grad.device == META and nodes.log_alpha.grad.device == META
    assert all(p.device == META for p in model.parameters())


@pytest.mark.parametrize("model_id", ["hooked-llama", "toy-reverse"])
def test_zero_mean_and_fixed_delta_paths_stay_on_the_model_device(on_meta, model_id, tokens):
    """Zero ablation, a mean counterfactual's broadcast values, and EAP-IG's fixed deltas, each with a backward."""
    model = on_meta(model_id)
    clean, corrupted = (t % model.cfg.d_vocab for t in tokens)
    with tep.masked(model) as mm:
        z = mm.graph.ones(device=mm.device).requires_grad_(True)
        mm(clean, mm.zero(), z)[:, -1].sum().backward()
        assert z.grad.device == META
        y = mm.writer_outputs(corrupted)
        mean = tep.Counterfactual("mean_per_position", y.mean(1, keepdim=True), mm.graph.n_writers, mm.graph.spec.d_model)
        z.grad = None
        mm(clean, mean, z)[:, -1].sum().backward()
        assert z.grad.device == META
        z.grad = None
        deltas = mm.writer_outputs(clean) - y
        mm(clean, mm.interchange(corrupted), z, fixed_deltas=deltas)[:, -1].sum().backward()
        assert z.grad.device == META


def test_metrics_follow_the_logits_device():
    """The objectives and the answer position index on the logits' device (a CPU arange here failed on GPU)."""
    clean = torch.randint(0, 10, (4, 6))
    batch = paired_data(clean, clean, positions="last").to(META)
    logits = torch.empty(4, 6, 10, device=META)
    assert kl_divergence(logits, logits, batch).device == META
    assert mean_squared_error(logits, logits, batch).device == META
    assert _last_scored(batch).device == META


def test_the_suite_runs_its_models_on_the_device_option(request):
    """`pytest --device cuda` (benchmarks/gpu_check.sh) moves every model of the suite there; CI runs it as cpu."""
    from .conftest import DEFAULT_ID

    device = torch.device(request.config.getoption("--device"))
    model = make_model(DEFAULT_ID)
    assert {p.device.type for p in model.parameters()} == {device.type}
