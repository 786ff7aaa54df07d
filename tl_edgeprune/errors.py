"""Error types, so notebooks can catch ours and not TransformerLens's."""


class EdgePruneError(ValueError):
    """Bad input to tl_edgeprune: the message says what is wrong and how to fix it."""


class UnsupportedModelError(EdgePruneError):
    """The model's type or architecture cannot be masked edge by edge."""


class HookFiringError(RuntimeError):
    """A hook fired a wrong number of times: the model's forward did not go where the graph says."""
