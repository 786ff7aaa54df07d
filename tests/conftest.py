import pytest
import torch

from tl_edgeprune.adapter import hooked_transformer_class, transformer_bridge_class

from .models import HOOKED_ARCHS, bridge_model, hooked_model

HAS_HOOKED = hooked_transformer_class() is not None
HAS_BRIDGE = transformer_bridge_class() is not None

# HookedTransformer exists in transformer-lens 2.x/3.x only. Under 4.x every test written for a HookedTransformer
# architecture runs on its TransformerBridge twin (a random `transformers` model of the same architecture, booted
# offline), so the default install tests everything a bridge can run. These have no bridge twin:
NO_BRIDGE_TWIN = {
    "attn_only": "no transformers architecture is attention-only",
    "alibi": "TL's bridge of the transformers ALiBi model (Bloom) never fires hook_mlp_in, so its MLP inputs cannot be masked",
    "shortformer": "no transformers architecture adds positions to queries and keys only (shortformer)",
}
needs_hooked = pytest.mark.skipif(not HAS_HOOKED, reason="HookedTransformer was removed in transformer-lens 4")


def model_ids(hooked=(), bridges=()) -> list[str]:
    """Parametrize ids: each hooked architecture (its bridge twin where TL has no HookedTransformer), then the
    bridges, without running one model twice."""
    out = []
    for arch in hooked:
        out.append(f"hooked-{arch}" if HAS_HOOKED or arch in NO_BRIDGE_TWIN else f"bridge-{arch}")
    return out + [f"bridge-{arch}" for arch in bridges if f"bridge-{arch}" not in out]


MODEL_IDS = model_ids(HOOKED_ARCHS, ("gpt2", "neox", "llama"))
DEFAULT_ID = model_ids(["gpt2"])[0]  # the GPT-2-shaped model of the tests that need just one


def pytest_addoption(parser):
    parser.addoption("--device", default="cpu",
                     help="the torch device the suite's models run on (benchmarks/gpu_check.sh passes cuda)")


DEVICE = torch.device("cpu")


def pytest_configure(config):
    global DEVICE
    DEVICE = torch.device(config.getoption("--device"))


def make_model(model_id: str, dtype=torch.float32):
    """A model of the suite, on the --device of the run."""
    family, arch = model_id.split("-", 1)
    if family == "hooked" and not HAS_HOOKED and arch in NO_BRIDGE_TWIN:
        pytest.skip(f"HookedTransformer was removed in transformer-lens 4 and {NO_BRIDGE_TWIN[arch]}")
    hooked = family == "hooked" and HAS_HOOKED  # else the bridge twin
    return (hooked_model(arch, dtype=dtype) if hooked else bridge_model(arch, dtype=dtype)).to(DEVICE)


def small_problem(n=24, seq=6, seed=0):
    """A small GPT-2-style model (hooked where TL has it) and n random clean/corrupted pairs scored at the last
    position: the problem the training-loop tests share."""
    import tl_edgeprune as tep

    model = make_model(DEFAULT_ID)
    gen = torch.Generator().manual_seed(seed)
    clean = torch.randint(0, 39, (n, seq), generator=gen)
    corrupted = torch.randint(0, 39, (n, seq), generator=gen)
    return model, tep.paired_data(clean, corrupted, positions="last")


def assert_same_run(a, b):
    """Two Edge Pruning runs that must agree up to float rounding, where the masks moved (the KL is not ~0)."""
    assert max(a.history["objective"]) > 1e-3
    torch.testing.assert_close(torch.tensor(a.history["objective"]), torch.tensor(b.history["objective"]),
                               atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(a.edge_log_alpha, b.edge_log_alpha, atol=1e-5, rtol=1e-4)


@pytest.fixture(params=MODEL_IDS)
def any_model(request):
    return make_model(request.param)


@pytest.fixture
def tokens():
    gen = torch.Generator().manual_seed(1234)
    clean = torch.randint(0, 39, (3, 7), generator=gen)
    corrupted = torch.randint(0, 39, (3, 7), generator=gen)
    return clean, corrupted
