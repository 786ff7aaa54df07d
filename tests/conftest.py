import pytest
import torch

from tl_edgeprune.adapter import hooked_transformer_class, transformer_bridge_class

from .models import HOOKED_ARCHS, bridge_model, hooked_model

HAS_HOOKED = hooked_transformer_class() is not None
HAS_BRIDGE = transformer_bridge_class() is not None

# HookedTransformer exists in transformer-lens 2.x/3.x only; CI runs the suite under 3.x and 4.x,
# so every architecture below is exercised in one of the two runs (see .ci/run).
needs_hooked = pytest.mark.skipif(not HAS_HOOKED, reason="HookedTransformer was removed in transformer-lens 4")

MODEL_IDS = [f"hooked-{a}" for a in HOOKED_ARCHS] + ["bridge-gpt2", "bridge-llama"]


def make_model(model_id: str, dtype=torch.float32):
    family, arch = model_id.split("-", 1)
    if family == "hooked":
        if not HAS_HOOKED:
            pytest.skip("HookedTransformer was removed in transformer-lens 4 (tested in the 3.x CI venv)")
        return hooked_model(arch, dtype=dtype)
    return bridge_model(arch).to(dtype)


def small_problem(n=24, seq=6, seed=0):
    """A small GPT-2-style model (hooked where TL has it) and n random clean/corrupted pairs scored at the last
    position: the problem the training-loop tests share."""
    import tl_edgeprune as tep

    model = make_model("hooked-gpt2" if HAS_HOOKED else "bridge-gpt2")
    gen = torch.Generator().manual_seed(seed)
    clean = torch.randint(0, 39, (n, seq), generator=gen)
    corrupted = torch.randint(0, 39, (n, seq), generator=gen)
    return model, tep.paired_data(clean, corrupted, positions="last")


@pytest.fixture(params=MODEL_IDS)
def any_model(request):
    return make_model(request.param)


@pytest.fixture
def tokens():
    gen = torch.Generator().manual_seed(1234)
    clean = torch.randint(0, 39, (3, 7), generator=gen)
    corrupted = torch.randint(0, 39, (3, 7), generator=gen)
    return clean, corrupted
