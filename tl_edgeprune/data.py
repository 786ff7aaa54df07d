"""Paired clean/corrupted data: the one input format every method takes.

Token ids (right-padded with an attention mask, or of equal length), the positions the objective
scores, and optionally answer/distractor ids and a token subset for the metrics.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Iterator, Union

import torch
from jaxtyping import Bool, Int

from .errors import EdgePruneError

Positions = Union[str, torch.Tensor]


@dataclass
class PairedData:
    clean: Int[torch.Tensor, "n pos"]
    corrupted: Int[torch.Tensor, "n pos"]
    positions: Bool[torch.Tensor, "n pos"]
    attention_mask: Int[torch.Tensor, "n pos"] | None = None
    answers: Int[torch.Tensor, " n"] | None = None
    distractors: Int[torch.Tensor, " n"] | None = None
    token_subset: Int[torch.Tensor, " k"] | None = None
    position_classes: Int[torch.Tensor, "n pos"] | None = None  # class index of each position (positional graphs)
    position_names: tuple[str, ...] | None = None  # the names of those classes

    def __len__(self) -> int:
        return int(self.clean.shape[0])

    def __repr__(self) -> str:  # the tensors themselves would fill a notebook cell
        parts = [f"{len(self)} examples × {self.clean.shape[1]} positions",
                 f"{int(self.positions.sum())} scored positions"]
        if self.answers is not None:
            parts.append("answers" + (" and distractors" if self.distractors is not None else ""))
        if self.attention_mask is not None:
            parts.append(f"padded ({int((self.attention_mask == 0).sum())} pad tokens)")
        if self.token_subset is not None:
            parts.append(f"{len(self.token_subset)} scored tokens")
        if self.position_names is not None:
            parts.append(f"position classes {list(self.position_names)}")
        return f"PairedData({', '.join(parts)})"

    def select(self, index: torch.Tensor | slice) -> "PairedData":
        """Rows of the dataset (token_subset is shared)."""
        kw = {}
        for f in fields(self):
            value = getattr(self, f.name)
            kw[f.name] = value if (value is None or f.name in SHARED_FIELDS) else value[index]
        return PairedData(**kw)

    def to(self, device) -> "PairedData":
        return replace(self, **{f.name: getattr(self, f.name).to(device) for f in fields(self)
                                if isinstance(getattr(self, f.name), torch.Tensor)})

    def batches(self, batch_size: int, shuffle_seed: int | None = None) -> Iterator["PairedData"]:
        """One epoch of batches; shuffled deterministically from the seed when one is given."""
        for _, rows in self.batch_rows(batch_size, shuffle_seed):
            yield self.select(rows)

    def batch_rows(self, batch_size: int, shuffle_seed: int | None = None) -> Iterator[tuple[int, torch.Tensor]]:
        """(shard 0, row indices) of each batch of ``batches``: what per-example caches are keyed by."""
        n = len(self)
        order = torch.arange(n)
        if shuffle_seed is not None:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(shuffle_seed))
        for start in range(0, n, batch_size):
            yield 0, order[start : start + batch_size]

    @property
    def shards(self) -> list["PairedData"]:
        return [self]


@dataclass
class ShardedData:
    """Several PairedData of different widths (e.g. Tracr inputs of every length): batches never mix
    widths, so no padding is needed (TransformerLens ignores padding masks in bidirectional attention)."""

    shards: list[PairedData]

    def __repr__(self) -> str:
        widths = [s.clean.shape[1] for s in self.shards]
        return (f"ShardedData({sum(len(s) for s in self.shards)} examples in {len(self.shards)} shards of "
                f"{min(widths)}–{max(widths)} positions)")

    def __post_init__(self) -> None:
        if not self.shards or not all(isinstance(s, PairedData) for s in self.shards):
            raise EdgePruneError("ShardedData needs a non-empty list of PairedData")
        names = {s.position_names for s in self.shards}
        if len(names) > 1:
            raise EdgePruneError(f"the shards name different position classes {sorted(map(str, names))}: one graph "
                                 "needs one set of classes (give every shard the same position_names)")

    @property
    def position_names(self) -> tuple[str, ...] | None:
        return self.shards[0].position_names

    def __len__(self) -> int:
        return sum(len(s) for s in self.shards)

    @property
    def corrupted_batches(self) -> list[torch.Tensor]:
        return [s.corrupted for s in self.shards]

    def to(self, device) -> "ShardedData":
        return ShardedData([s.to(device) for s in self.shards])

    def batches(self, batch_size: int, shuffle_seed: int | None = None) -> Iterator[PairedData]:
        """Batches of each shard; with a seed, shuffled within shards and in their order across shards."""
        for shard, rows in self.batch_rows(batch_size, shuffle_seed):
            yield self.shards[shard].select(rows)

    def batch_rows(self, batch_size: int, shuffle_seed: int | None = None) -> Iterator[tuple[int, torch.Tensor]]:
        """(shard, row indices within it) of each batch of ``batches``."""
        seeds = [None if shuffle_seed is None else shuffle_seed * 7919 + i for i in range(len(self.shards))]
        batches = [(i, rows) for i, (shard, seed) in enumerate(zip(self.shards, seeds))
                   for _, rows in shard.batch_rows(batch_size, seed)]
        if shuffle_seed is not None:
            order = torch.randperm(len(batches), generator=torch.Generator().manual_seed(shuffle_seed))
            batches = [batches[i] for i in order]
        yield from batches


def as_data(source) -> PairedData | ShardedData:
    """Accept a PairedData/ShardedData, or any iterable of batches (e.g. a torch DataLoader) yielding dicts with
    ``clean`` and ``corrupted`` (and optionally ``positions``, ``attention_mask``, ``answers``, ``distractors``).
    Batches are collected once, so resumed runs see the same data; widths may differ between batches."""
    if isinstance(source, (PairedData, ShardedData)):
        return source
    if isinstance(source, (str, bytes, dict, torch.Tensor)) or not hasattr(source, "__iter__"):
        raise EdgePruneError(
            f"data must be a PairedData (tl_edgeprune.paired_data(...)) or an iterable of dict batches, "
            f"got {type(source).__name__}"
        )
    shards = []
    for i, batch in enumerate(source):
        if not isinstance(batch, dict) or "clean" not in batch or "corrupted" not in batch:
            raise EdgePruneError(
                f"batch {i} of the data is not a dict with 'clean' and 'corrupted' token ids; pass a PairedData "
                "(tl_edgeprune.paired_data(clean, corrupted)) or a DataLoader of such dicts"
            )
        extra = {k: batch[k] for k in ("positions", "attention_mask", "answers", "distractors", "token_subset",
                                       "position_classes", "position_names") if k in batch}
        shards.append(paired_data(batch["clean"], batch["corrupted"], **extra))
    if not shards:
        raise EdgePruneError("the data loader yielded no batches")
    return shards[0] if len(shards) == 1 else ShardedData(shards)


def paired_data(
    clean: torch.Tensor,
    corrupted: torch.Tensor,
    positions: Positions = "last",
    attention_mask: torch.Tensor | None = None,
    answers: torch.Tensor | None = None,
    distractors: torch.Tensor | None = None,
    token_subset: torch.Tensor | list[int] | None = None,
    corrupted_attention_mask: torch.Tensor | None = None,
    position_classes: torch.Tensor | None = None,
    position_names: list[str] | tuple[str, ...] | None = None,
) -> PairedData:
    """Validate and bundle a dataset. ``positions``: "last" (last real token), "all" (every real token but
    the first, i.e. BOS), "all_with_bos", a LongTensor [n] of per-example positions, or a bool mask [n, pos].

    One ``attention_mask`` serves clean and corrupted prompts, so their real tokens must line up: a
    ``corrupted_attention_mask`` that differs, or corrupted tokens where the clean prompt is padding, is refused.
    Ids are checked against the model's vocabulary when a method starts (``MaskedModel.check_data``).

    ``position_classes`` [n, pos] (class indices) and ``position_names`` (one name per class) make the data usable
    for positional circuits (``positional=True``); the task generators provide them (IOI: IO, S1, S2, END, other),
    and ``by_position(data)`` makes every position of fixed-length data its own class."""
    for name, t in (("clean", clean), ("corrupted", corrupted)):
        if not isinstance(t, torch.Tensor) or t.dtype not in (torch.int64, torch.int32) or t.dim() != 2:
            raise EdgePruneError(f"{name} must be token ids of shape [n, pos] (LongTensor), got {_describe(t)}")
    if len(clean) == 0:
        raise EdgePruneError("the dataset is empty: no clean/corrupted pairs")
    if clean.shape[1] == 0:
        raise EdgePruneError(f"the prompts have no tokens: clean is {list(clean.shape)}; tokenise the prompts first")
    if clean.shape != corrupted.shape:
        raise EdgePruneError(
            f"clean {list(clean.shape)} and corrupted {list(corrupted.shape)} token tensors differ in shape; "
            "pair them one to one and pad to the same length (pass attention_mask)"
        )
    attention_mask = _check_attention_mask(attention_mask, clean, corrupted, corrupted_attention_mask)
    n, width = clean.shape
    real = torch.ones_like(clean, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    if isinstance(positions, str):
        if positions == "last":
            last = real.long().cumsum(1).argmax(1)
            mask = torch.zeros_like(real)
            mask[torch.arange(n), last] = True
        elif positions == "all":
            mask = real.clone()
            mask[:, 0] = False
        elif positions == "all_with_bos":
            mask = real.clone()
        else:
            raise EdgePruneError(f"positions must be 'last', 'all', 'all_with_bos' or a tensor, got {positions!r}")
    elif isinstance(positions, torch.Tensor) and positions.dtype == torch.bool:
        if positions.shape != clean.shape:
            raise EdgePruneError(f"a boolean positions mask must be [n, pos] = {list(clean.shape)}, got {list(positions.shape)}")
        mask = positions.clone()
    elif isinstance(positions, torch.Tensor) and positions.dim() == 1 and positions.shape[0] == n:
        if positions.dtype not in INTEGER_DTYPES:
            raise EdgePruneError(f"positions as a tensor of indices must be integers (a LongTensor [{n}], one scored position per example), got {_describe(positions)}; "
                                 "a float would be truncated")
        if int(positions.min()) < 0 or int(positions.max()) >= width:
            raise EdgePruneError(f"positions (one index per example) must lie in [0, {width}), got [{int(positions.min())}, {int(positions.max())}]")
        mask = torch.zeros_like(real)
        mask[torch.arange(n), positions.long()] = True
    else:
        raise EdgePruneError(f"positions: expected a string, a LongTensor [{n}] or a bool mask [{n}, {width}], got {_describe(positions)}")
    mask = mask & real
    empty = (~mask.any(1)).nonzero().flatten()
    if len(empty):
        raise EdgePruneError(
            f"examples {empty[:5].tolist()} have no valid position to score (positions outside the attention mask?)"
        )
    for name, t in (("answers", answers), ("distractors", distractors)):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor) or t.dim() != 1 or t.shape[0] != n:
            raise EdgePruneError(f"{name} must be one token id per example, shape [{n}], got {_describe(t)}")
        _check_ids(name, t)
    if token_subset is not None:
        token_subset = torch.as_tensor(token_subset)
        if token_subset.dim() != 1 or token_subset.numel() == 0:
            raise EdgePruneError(f"token_subset must be a non-empty list of token ids, got {_describe(token_subset)}")
        _check_ids("token_subset", token_subset)
        token_subset = token_subset.long()
    classes, names = _check_position_classes(position_classes, position_names, clean)
    return PairedData(clean.long(), corrupted.long(), mask, attention_mask, answers if answers is None else answers.long(),
                      distractors if distractors is None else distractors.long(), token_subset, classes, names)


SHARED_FIELDS = ("token_subset", "position_names")  # the same for every example: not indexed by select()


def _check_position_classes(classes, names, clean) -> tuple[torch.Tensor | None, tuple[str, ...] | None]:
    from .graph import check_position_classes

    if classes is None and names is None:
        return None, None
    if classes is None or names is None:
        raise EdgePruneError("position_classes (a class index per position, [n, pos]) and position_names (one name per "
                             "class) go together: pass both")
    names = check_position_classes(names)
    if not names:
        raise EdgePruneError("position_names is empty: name at least two classes")
    if not isinstance(classes, torch.Tensor) or classes.dtype not in INTEGER_DTYPES or classes.shape != clean.shape:
        raise EdgePruneError(f"position_classes must be integer class indices of the tokens' shape {list(clean.shape)}, "
                             f"got {_describe(classes)}")
    lo, hi = int(classes.min()), int(classes.max())
    if lo < 0 or hi >= len(names):
        raise EdgePruneError(f"position_classes hold [{lo}, {hi}] but there are {len(names)} position_names {list(names)}")
    return classes.long(), names


def position_names_for(data: "PairedData | ShardedData", positional: bool) -> tuple[str, ...]:
    """The position classes a method's graph gets: the data's when ``positional``, none otherwise."""
    if not isinstance(positional, bool):
        raise EdgePruneError(f"positional must be True or False, got {positional!r}")
    if not positional:
        return ()
    if data.position_names is None:
        raise EdgePruneError("positional=True needs data with position classes: the task generators provide them "
                             "(tasks.ioi(...).data: IO, S1, S2, END, other), by_position(data) makes each position of "
                             "fixed-length data a class, or pass paired_data(..., position_classes=, position_names=)")
    return tuple(data.position_names)


def by_position(data: PairedData, names: list[str] | None = None) -> PairedData:
    """Fixed-length data with every position its own class (``p0``, ``p1``, … or ``names``): the positional graph of
    auto-circuit and TransformerLens's tool. Prompts must share one length (no padding)."""
    if isinstance(data, ShardedData) or data.attention_mask is not None and not bool(data.attention_mask.bool().all()):
        raise EdgePruneError("by_position needs prompts of one length (no padding, one shard): position i means the "
                             "same thing in every prompt only then. Use named position classes for prompts of "
                             "different lengths (paired_data(..., position_classes=, position_names=)).")
    n, width = data.clean.shape
    names = tuple(names) if names is not None else tuple(f"p{i}" for i in range(width))
    if len(names) != width:
        raise EdgePruneError(f"by_position: {len(names)} names for {width} positions")
    classes = torch.arange(width).expand(n, width).clone()
    return replace(data, position_classes=classes, position_names=_check_position_classes(classes, names, data.clean)[1])


INTEGER_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def _check_ids(name: str, ids: torch.Tensor) -> None:
    """Integer, non-negative token ids (a float is truncated and -1 means the last vocabulary entry: refused)."""
    if ids.dtype not in INTEGER_DTYPES:
        raise EdgePruneError(f"{name} must be integer token ids, got {_describe(ids)}; a float id would be truncated")
    if ids.numel() and int(ids.min()) < 0:
        bad = int((ids < 0).nonzero()[0, 0])
        raise EdgePruneError(f"{name}[{bad}] is {int(ids[bad])}: token ids must be >= 0 (a negative id would silently "
                             "index from the end of the vocabulary)")


def _check_attention_mask(mask, clean, corrupted, corrupted_mask) -> torch.Tensor | None:
    """One mask serves both prompts of a pair, so the corrupted prompt must be real exactly where the clean one is."""
    if corrupted_mask is not None:
        if mask is None or not isinstance(corrupted_mask, torch.Tensor) or corrupted_mask.shape != clean.shape:
            raise EdgePruneError("corrupted_attention_mask needs an attention_mask of the same shape as the tokens")
        rows = (corrupted_mask.bool() != mask.bool()).any(1).nonzero().flatten()
        if len(rows):
            raise EdgePruneError(
                f"examples {rows[:5].tolist()}: the clean and corrupted prompts have different lengths (their attention "
                "masks differ), but one mask serves both and positions must align. Choose corrupted prompts with the "
                "clean prompt's token count (tasks.* do), or drop those pairs."
            )
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor) or mask.shape != clean.shape:
        raise EdgePruneError(f"attention_mask {_describe(mask)} must match the tokens {list(clean.shape)}")
    pad = ~mask.bool()
    rows = (pad & (clean != corrupted)).any(1).nonzero().flatten()
    if len(rows):
        raise EdgePruneError(
            f"examples {rows[:5].tolist()}: the corrupted prompt has tokens where the clean prompt is padding (the "
            "attention mask marks them 0), so the one mask would hide part of the corrupted prompt. Pad both prompts "
            "of a pair to the same real length with the same pad id."
        )
    return mask


def _describe(x) -> str:
    if isinstance(x, torch.Tensor):
        return f"tensor {x.dtype} {list(x.shape)}"
    return type(x).__name__
