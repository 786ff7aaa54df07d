"""Keyword checks for the public methods: a misspelt option fails at once with the nearest real name.

Python's own message ("unexpected keyword argument 'learning_rate'") names no alternative; researchers arrive with
other libraries' names, so the common ones are mapped explicitly and the rest matched by spelling.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, Callable, TypeVar

from .errors import EdgePruneError, nearest_name

F = TypeVar("F", bound=Callable[..., Any])

# Names other libraries (and the reference code) use for our options.
ALIASES = {
    "learning_rate": "lr", "lr_log_alpha": "lr", "mask_lr": "lr", "reg_lr": "lambda_lr", "lambda_learning_rate": "lambda_lr",
    "num_steps": "steps", "n_steps": "steps", "max_steps": "steps", "iterations": "steps", "epochs": "steps",
    "target": "target_sparsity", "sparsity": "target_sparsity", "sparsity_target": "target_sparsity",
    "warmup": "sparsity_warmup", "sparsity_warmup_steps": "sparsity_warmup", "warmup_steps": "lr_warmup",
    "batch": "batch_size", "bs": "batch_size", "per_device_train_batch_size": "batch_size",
    "init": "init_log_alpha", "log_alpha_init": "init_log_alpha", "ablation_type": "ablation", "loss": "objective",
    "verbose": "progress", "checkpoint": "checkpoint_path", "save_path": "checkpoint_path", "topk": "keep", "k": "keep",
    "integrated_gradients": "ig_steps", "ig": "ig_steps", "tau": "threshold",
}


class OptionError(EdgePruneError, TypeError):
    """An option the function does not have (a TypeError too, as Python's own would be)."""


def option_names(fn: Callable) -> list[str]:
    """The keyword names ``fn`` accepts (its own, plus those of the functions it forwards ``**options`` to)."""
    params = inspect.signature(fn).parameters.values()
    names = [p.name for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)]
    for target in getattr(fn, "__forwards_options_to__", ()):
        names += [n for n in option_names(target) if n not in names]
    return names


def suggestion(name: str, names: list[str]) -> str | None:
    if ALIASES.get(name) in names:
        return ALIASES[name]
    return nearest_name(name, names)


def checked_options(*forwards_to: Callable) -> Callable[[F], F]:
    """Refuse unknown keywords with a suggestion, before any work; ``forwards_to``: where ``**options`` go."""

    def decorate(fn: F) -> F:
        fn.__forwards_options_to__ = forwards_to  # type: ignore[attr-defined]

        names = option_names(fn)

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            unknown = [k for k in kwargs if k not in names]
            if unknown:
                hints = []
                for k in unknown:
                    near = suggestion(k, names)
                    hints.append(f"{k!r}" + (f" (did you mean {near!r}?)" if near else ""))
                public = ", ".join(n for n in names if n not in ("model", "data"))
                raise OptionError(f"{fn.__name__}() has no option {', '.join(hints)}. Its options: {public}; "
                                  f"see help(tl_edgeprune.{fn.__name__}).")
            return fn(*args, **kwargs)

        return wrapper  # type: ignore[return-value]

    return decorate
