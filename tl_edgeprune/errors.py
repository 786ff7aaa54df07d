"""Error types, so notebooks can catch ours and not TransformerLens's."""


class EdgePruneError(ValueError):
    """Bad input to tl_edgeprune: the message says what is wrong and how to fix it."""


class UnsupportedModelError(EdgePruneError):
    """The model's type or architecture cannot be masked edge by edge."""


class UnknownNameError(EdgePruneError, KeyError):
    """A node or edge name the graph does not have (a KeyError too, for code that catches those)."""

    __str__ = Exception.__str__  # KeyError's would print the message in quotes


class HookFiringError(RuntimeError):
    """A hook fired a wrong number of times: the model's forward did not go where the graph says."""


def nearest_name(name: str, names) -> str | None:
    """The closest of ``names`` to a misspelt ``name`` (for "did you mean ...?"), or None."""
    import difflib

    close = difflib.get_close_matches(name, list(names), n=1, cutoff=0.6)
    return close[0] if close else None


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message, without terminal escapes (torch's load errors carry some)."""
    import re

    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip()
    return (text.splitlines() or [""])[0][:160]
