"""The benchmarks' floor computes the objective every ratio is taken against: the same loss as the model's own
forward, with only the scored (last) position unembedded, and the same gradient into the embeddings."""

import pytest
import torch

from .conftest import needs_hooked
from .models import hooked_model


@needs_hooked  # the benchmarks time HookedTransformers (transformer-lens 3)
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_last_position_floor_matches_the_models_own_loss_and_gradient(arch):
    from benchmarks.engine import last_position_logits, loss_of, residual_grad_step

    model = hooked_model(arch)
    tokens = torch.randint(0, model.cfg.d_vocab, (3, 7), generator=torch.Generator().manual_seed(0))
    every, last = model(tokens), last_position_logits(model, tokens)
    assert last.shape == (3, 1, model.cfg.d_vocab)
    torch.testing.assert_close(loss_of(last), loss_of(every), atol=1e-5, rtol=1e-5)  # float32
    grads = []
    for every_position in (True, False):
        seen = []

        def keep_grad(resid, hook):
            resid.register_hook(lambda g: seen.append(g.clone()))  # the gradient into the residual stream

        with model.hooks(fwd_hooks=[("blocks.0.hook_resid_pre", keep_grad)]):
            residual_grad_step(model, tokens, every_position=every_position)()
        grads.append(seen[0])
    torch.testing.assert_close(grads[1], grads[0], atol=1e-6, rtol=1e-5)
