"""Task generators: IOI, Greater-Than, Gendered Pronoun and the user's own JSONL, for any tokenizer.

Each returns a ``Task``: the prompts, a ``PairedData`` (clean/corrupted ids, scored positions, answers and
distractors) and the task's metric ``metric(logits, batch) -> scalar`` for EAP and faithfulness curves.
Names and answers must be single tokens for the tokenizer given: that is checked, never assumed.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from typing import Any, Callable

import torch

from .data import SHARED_FIELDS, PairedData, paired_data
from . import validation
from .errors import EdgePruneError

NAMES = ["Mary", "John", "Tom", "James", "Dan", "Sid", "Martin", "Amy", "Paul", "Kate", "Anna", "Mike", "Lisa",
         "Ben", "Sam", "Emma", "Jack", "Alex", "Rose", "David", "Sarah", "Peter", "Jane", "Mark", "Laura", "Chris"]
MALE = ["John", "Tom", "James", "Dan", "Martin", "Paul", "Mike", "Ben", "Jack", "David", "Peter", "Mark", "Chris"]
FEMALE = ["Mary", "Amy", "Kate", "Anna", "Lisa", "Emma", "Rose", "Sarah", "Jane", "Laura", "Susan", "Linda"]
PLACES = ["store", "park", "school", "office", "station", "garden"]
OBJECTS = ["drink", "book", "ring", "bag", "letter", "ball"]
IOI_TEMPLATES = {
    "ABBA": "When {A} and {B} went to the {place}, {B} gave a {obj} to",
    "BABA": "When {B} and {A} went to the {place}, {B} gave a {obj} to",
}


@dataclass
class Task:
    name: str
    clean_prompts: list[str]
    corrupted_prompts: list[str]
    data: PairedData
    metric: Callable[[torch.Tensor, PairedData], torch.Tensor]
    held_out: PairedData | None = None  # the last ``held_out`` examples, kept apart to judge circuits on

    def split(self, held_out: int) -> "Task":
        """The same task with its last ``held_out`` examples moved from ``data`` to ``held_out``."""
        data = self.data if self.held_out is None else _concat(self.data, self.held_out)
        n = len(data)
        if not 0 < held_out < n:
            raise EdgePruneError(f"held_out must lie in (0, {n}) examples, got {held_out}")
        return Task(self.name, self.clean_prompts, self.corrupted_prompts, data.select(slice(0, n - held_out)),
                    self.metric, data.select(slice(n - held_out, n)))


def _concat(a: PairedData, b: PairedData) -> PairedData:
    from dataclasses import fields

    kw = {}
    for f in fields(a):
        x, y = getattr(a, f.name), getattr(b, f.name)
        kw[f.name] = x if (x is None or f.name in SHARED_FIELDS) else torch.cat([x, y])
    return PairedData(**kw)


def _with_held_out(held_out: int, task: Task) -> Task:
    if held_out != 0:
        return task.split(validation.integer("held_out", held_out, minimum=1))
    return task


# BOS tokens that are really chat-template markers: prepending one puts the model in "chat" mode (on SmolLM2,
# <|im_start|> lowers IOI's logit difference from 5.12 to 4.51), so generators do not prepend them by default.
CHAT_MARKERS = ("<|im_start|>", "<|start_header_id|>", "<start_of_turn>", "<|im_end|>")


def default_prepend_bos(tokenizer: Any) -> bool:
    """Prepend the tokenizer's BOS if it has one that is a plain document start (GPT-2's <|endoftext|>, Llama's <s>),
    not a chat-template marker."""
    bos = getattr(tokenizer, "bos_token", None)
    return bos is not None and getattr(tokenizer, "bos_token_id", None) is not None and bos not in CHAT_MARKERS


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def single_token(tokenizer: Any, word: str) -> int | None:
    """The id of ``word`` if it is exactly one token (and decodes back to itself), else None."""
    ids = _encode(tokenizer, word)
    if len(ids) == 1 and tokenizer.decode(ids).strip() == word.strip():
        return ids[0]
    return None


def _bos(tokenizer: Any, prepend_bos: bool | None) -> list[int]:
    if prepend_bos is None:
        prepend_bos = default_prepend_bos(tokenizer)
    return [tokenizer.bos_token_id] if prepend_bos and tokenizer.bos_token_id is not None else []


def _tokenise_pairs(tokenizer: Any, clean: list[str], corrupted: list[str], prepend_bos: bool | None) -> tuple[list, list]:
    """Token ids per prompt; each clean/corrupted pair must have the same length so positions align."""
    bos = _bos(tokenizer, prepend_bos)
    rows_c, rows_x = [], []
    for i, (c, x) in enumerate(zip(clean, corrupted)):
        ci, xi = bos + _encode(tokenizer, c), bos + _encode(tokenizer, x)
        if len(ci) != len(xi):
            raise EdgePruneError(
                f"example {i}: clean and corrupted prompts have {len(ci)} and {len(xi)} tokens; positions must align "
                f"({c!r} vs {x!r})"
            )
        rows_c.append(ci)
        rows_x.append(xi)
    return rows_c, rows_x


def _bundle(tokenizer, clean, corrupted, answers, distractors, prepend_bos, token_subset=None) -> PairedData:
    rows_c, rows_x = _tokenise_pairs(tokenizer, clean, corrupted, prepend_bos)
    width = max(len(r) for r in rows_c)
    mask = None
    if any(len(r) != width for r in rows_c):  # right-pad to one width; the attention mask marks real tokens
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows_c])
        rows_c = [r + [pad] * (width - len(r)) for r in rows_c]
        rows_x = [r + [pad] * (width - len(r)) for r in rows_x]
    return paired_data(torch.tensor(rows_c), torch.tensor(rows_x), positions="last", attention_mask=mask,
                       answers=None if answers is None else torch.tensor(answers),
                       distractors=None if distractors is None else torch.tensor(distractors), token_subset=token_subset)


def _with_position_classes(data: PairedData, named: dict[str, torch.Tensor]) -> PairedData:
    """Name classes of positions from [n, pos] bool masks (in order; "other" for every remaining position) for
    positional circuits. Each named class must mark exactly one position per example, and no position twice."""
    from dataclasses import replace

    n, width = data.clean.shape
    classes = torch.full((n, width), len(named), dtype=torch.long)
    for index, (name, where) in enumerate(named.items()):
        counts = where.sum(1)
        if bool((counts != 1).any()):
            row = int((counts != 1).nonzero()[0])
            raise EdgePruneError(f"example {row}: position class {name!r} marks {int(counts[row])} positions, not one")
        if bool((classes[where] != len(named)).any()):
            raise EdgePruneError(f"position class {name!r} overlaps an earlier class")
        classes[where] = index
    return replace(data, position_classes=classes, position_names=(*named, "other"))


def _nth(mask: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th True (0-based) of each row of a [n, pos] bool mask, as a one-hot mask."""
    rank = mask.long().cumsum(1)
    return mask & (rank == k + 1)


def logit_difference(logits: torch.Tensor, batch: PairedData) -> torch.Tensor:
    from .eap import default_metric

    return default_metric(logits, batch)


def _single_token_names(tokenizer: Any, names: list[str], need: int, what: str) -> dict[str, int]:
    ok = {n: i for n in names if (i := single_token(tokenizer, " " + n)) is not None}
    if len(ok) < need:
        raise EdgePruneError(f"only {len(ok)} of the {what} are single tokens for this tokenizer ({sorted(ok)}); "
                             f"need at least {need}. Pass names=[...] that are.")
    return ok


def ioi(tokenizer: Any, n: int = 100, seed: int = 0, names: list[str] | None = None, prepend_bos: bool | None = None, held_out: int = 0) -> Task:
    """Indirect object identification (ABBA and BABA alternating). Corruption replaces every name with another
    single-token name, so clean and corrupted prompts have the same tokens up to the names."""
    rng = random.Random(seed)
    pool = _single_token_names(tokenizer, names or NAMES, 4, "IOI names")
    names_ok = sorted(pool)
    clean, corrupted, answers, distractors = [], [], [], []
    for i in range(n):
        template = IOI_TEMPLATES["ABBA" if i % 2 == 0 else "BABA"]
        a, b, c, d = rng.sample(names_ok, 4)
        place, obj = rng.choice(PLACES), rng.choice(OBJECTS)
        clean.append(template.format(A=a, B=b, place=place, obj=obj))
        corrupted.append(template.format(A=c, B=d, place=place, obj=obj))
        answers.append(pool[a])
        distractors.append(pool[b])
    data = _bundle(tokenizer, clean, corrupted, answers, distractors, prepend_bos)
    # Position classes for positional circuits: the indirect object, both subject mentions and the final token.
    io, s = data.clean == data.answers[:, None], data.clean == data.distractors[:, None]
    data = _with_position_classes(data, {"IO": _nth(io, 0), "S1": _nth(s, 0), "S2": _nth(s, 1), "END": data.positions})
    return _with_held_out(held_out, Task("ioi", clean, corrupted, data, logit_difference))


def greater_than(tokenizer: Any, n: int = 100, seed: int = 0, prepend_bos: bool | None = None, held_out: int = 0) -> Task:
    """"The war lasted from the year 17YY to the year 17" → a year above YY; corrupted with YY = 01.
    Scored over the tokens "00".."99" (renormalised): metric = P(> YY) − P(≤ YY)."""
    digits = [single_token(tokenizer, f"{y:02d}") for y in range(100)]
    if any(d is None for d in digits):
        bad = [f"{y:02d}" for y, d in enumerate(digits) if d is None][:5]
        raise EdgePruneError(f"Greater-Than needs '00'..'99' to be single tokens; not so for {bad} with this tokenizer")
    if single_token(tokenizer, " 17") is None and single_token(tokenizer, "17") is None:
        raise EdgePruneError("Greater-Than needs '17' to be a single token")
    rng = random.Random(seed)
    years = [rng.randint(2, 98) for _ in range(n)]
    clean = [f"The war lasted from the year 17{y:02d} to the year 17" for y in years]
    corrupted = ["The war lasted from the year 1701 to the year 17" for _ in years]
    data = _bundle(tokenizer, clean, corrupted, None, None, prepend_bos, token_subset=digits)
    data.answers = torch.tensor(years)  # the threshold year YY, used by the metric below
    # The year token YY (the one the corruption changes) and the final token.
    data = _with_position_classes(data, {"YY": _nth(data.clean != data.corrupted, 0), "END": data.positions})

    def prob_diff(logits: torch.Tensor, batch: PairedData) -> torch.Tensor:
        from .metrics import _last_scored

        rows = torch.arange(len(batch), device=logits.device)
        at = _last_scored(batch).to(logits.device)
        probs = logits[rows, at][:, batch.token_subset.to(logits.device)].softmax(-1)
        above = torch.arange(100, device=logits.device)[None] > batch.answers.to(logits.device)[:, None]
        return ((probs * above).sum(-1) - (probs * ~above).sum(-1)).mean()

    return _with_held_out(held_out, Task("greater_than", clean, corrupted, data, prob_diff))


def gendered_pronoun(tokenizer: Any, n: int = 100, seed: int = 0, prepend_bos: bool | None = None, held_out: int = 0) -> Task:
    """"So {name} is a really great friend, isn't" → " he"/" she"; corrupted with an opposite-gender name."""
    male = _single_token_names(tokenizer, MALE, 1, "male names")
    female = _single_token_names(tokenizer, FEMALE, 1, "female names")
    he, she = single_token(tokenizer, " he"), single_token(tokenizer, " she")
    if he is None or she is None:
        raise EdgePruneError("Gendered Pronoun needs ' he' and ' she' to be single tokens")
    rng = random.Random(seed)
    clean, corrupted, answers, distractors = [], [], [], []
    for i in range(n):
        is_male = i % 2 == 0
        name = rng.choice(sorted(male if is_male else female))
        other = rng.choice(sorted(female if is_male else male))
        clean.append(f"So {name} is a really great friend, isn't")
        corrupted.append(f"So {other} is a really great friend, isn't")
        answers.append(he if is_male else she)
        distractors.append(she if is_male else he)
    data = _bundle(tokenizer, clean, corrupted, answers, distractors, prepend_bos)
    # The name (the one token the corruption changes) and the final token.
    data = _with_position_classes(data, {"NAME": _nth(data.clean != data.corrupted, 0), "END": data.positions})
    return _with_held_out(held_out, Task("gendered_pronoun", clean, corrupted, data, logit_difference))


def from_jsonl(tokenizer: Any, path: str, prepend_bos: bool | None = None, held_out: int = 0) -> Task:
    """Lines of ``{"clean", "corrupted", "answer", "distractor"}``; answers are read at the last token.

    An optional ``"positions": {"IO": 2, "END": -1}`` per line names classes of positions for positional circuits:
    token indices into the prompt's tokens (BOS not counted; negative counts from the last token). Every line must
    name the same classes; the remaining positions are class "other"."""
    clean, corrupted, answers, distractors, named = [], [], [], [], []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise EdgePruneError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
            missing = [k for k in ("clean", "corrupted", "answer", "distractor") if k not in row]
            if missing:
                raise EdgePruneError(f"{path}:{lineno}: missing field(s) {missing}; each line needs clean, corrupted, "
                                     "answer and distractor")
            ids = {}
            for key in ("answer", "distractor"):
                ids[key] = single_token(tokenizer, row[key])
                if ids[key] is None:
                    raise EdgePruneError(f"{path}:{lineno}: {key} {row[key]!r} is not a single token for this tokenizer "
                                         f"(it is {_encode(tokenizer, row[key])}); mind the leading space")
            positions = row.get("positions")
            if positions is not None and (not isinstance(positions, dict) or not all(
                    isinstance(v, int) and not isinstance(v, bool) for v in positions.values())):
                raise EdgePruneError(f"{path}:{lineno}: positions must map class names to token indices, "
                                     f'e.g. {{"IO": 2, "END": -1}}; got {positions!r}')
            if named and (positions is None) != (named[0][1] is None) or (
                    positions is not None and named and list(positions) != list(named[0][1])):
                raise EdgePruneError(f"{path}:{lineno}: every line must name the same position classes (line "
                                     f"{named[0][0]} names {None if named[0][1] is None else list(named[0][1])})")
            named.append((lineno, positions))
            clean.append(row["clean"])
            corrupted.append(row["corrupted"])
            answers.append(ids["answer"])
            distractors.append(ids["distractor"])
    if not clean:
        raise EdgePruneError(f"{path}: no examples")
    data = _bundle(tokenizer, clean, corrupted, answers, distractors, prepend_bos)
    if named[0][1] is not None:
        data = _with_position_classes(data, _jsonl_classes(data, named, len(_bos(tokenizer, prepend_bos)), path))
    return _with_held_out(held_out, Task("jsonl", clean, corrupted, data, logit_difference))


def _jsonl_classes(data: PairedData, named: list, n_bos: int, path: str) -> dict[str, torch.Tensor]:
    """One-hot masks of the JSONL lines' named positions (token indices without BOS; negative from the end)."""
    n, width = data.clean.shape
    lengths = data.positions.long().argmax(1) + 1  # the last real token is the scored one
    masks = {name: torch.zeros((n, width), dtype=torch.bool) for name in named[0][1]}
    for row, (lineno, positions) in enumerate(named):
        for name, index in positions.items():
            at = int(lengths[row]) + index if index < 0 else n_bos + index
            if not n_bos <= at < int(lengths[row]):
                raise EdgePruneError(f"{path}:{lineno}: position {name!r} = {index} lies outside the prompt's "
                                     f"{int(lengths[row]) - n_bos} tokens")
            masks[name][row, at] = True
    return masks
