"""Evaluation text: from the hub, rebuilt to the original files the paper evaluated on; or from a file."""

from __future__ import annotations

from pathlib import Path

import pytest

from collapse_tui import data
from collapse_tui.data import eval_windows, load_eval_text
from collapse_tui.errors import UserError

#: The start of each original validation file, in its own layout.
WIKITEXT = " \n = Homarus gammarus = \n \n Homarus gammarus , known as the European lobster . \n \n = = Description = = \n"
PTB = " consumers may want to move their telephones \n <unk> <unk> watching abc 's monday night football \n"


def hub_rows_of_wikitext(text: str) -> list[str]:
    """The rows the hub keeps: each line with its newline, a blank line as ""."""
    return [line if line.strip() else "" for line in text.splitlines(keepends=True)]


def hub_rows_of_ptb(text: str) -> list[str]:
    """The rows the hub keeps: each line stripped."""
    return [line.strip() for line in text.splitlines()]


def test_the_hubs_rows_give_back_the_original_files() -> None:
    assert data.file_text(hub_rows_of_wikitext(WIKITEXT), "wikitext") == WIKITEXT
    assert data.file_text(hub_rows_of_ptb(PTB), "ptb") == PTB


@pytest.mark.parametrize(("spec", "rows", "original"), [
    ("wikitext-2-v1", hub_rows_of_wikitext(WIKITEXT), WIKITEXT),
    ("ptb", hub_rows_of_ptb(PTB), PTB),
])  # fmt: skip
def test_a_hub_set_is_evaluated_on_its_original_text(monkeypatch, spec, rows, original) -> None:
    import datasets

    column = data.HUB_SETS[spec][2]
    monkeypatch.setattr(datasets, "load_dataset", lambda *args, **kwargs: {column: rows})
    assert data._load_hub_text(spec) == original


def test_an_evaluation_file_that_cannot_be_read_is_one_clear_error(tmp_path: Path, monkeypatch) -> None:
    # as root a chmod 000 file stays readable: make the read itself fail, as it does for another user
    text_file = tmp_path / "valid.txt"
    text_file.write_text("some text\n")

    def denied(self: Path, *args: object, **kwargs: object) -> str:
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_text", denied)
    with pytest.raises(UserError, match=r"^cannot read evaluation file .*valid\.txt: Permission denied$"):
        load_eval_text(str(text_file))


def test_the_windows_of_a_split_longer_than_float32_can_count_all_fit_inside_it() -> None:
    ids = list(range(100)) * (2**25 // 100 + 12)  # 33,555,600 tokens: past 2**24, float32 skips starts
    windows = eval_windows(ids, 100, 12800)
    assert windows.shape == (128, 101)
    assert windows[-1, -1].item() == ids[-1]  # the last window ends on the last token


def test_evaluation_windows_are_worked_out_by_hand() -> None:
    ids = list(range(101))  # 101 tokens: 10 consecutive windows of block 10 (+1 target each)
    windows = eval_windows(ids, 10, eval_tokens=25, name="held")
    # 25 target tokens round up to 3 whole windows, spread evenly: starts 0, 45, 90
    assert [row[0] for row in windows.tolist()] == [0, 45, 90]
    assert windows.tolist()[-1] == list(range(90, 101))
    everything = eval_windows(ids, 10, eval_tokens=None)
    assert [row[0] for row in everything.tolist()] == list(range(0, 100, 10))
    assert eval_windows(ids, 10, eval_tokens=10_000).tolist() == everything.tolist()  # at most the split
    with pytest.raises(UserError, match="evaluation set held has 10 tokens; it needs at least 11"):
        eval_windows(ids[:10], 10, eval_tokens=None, name="held")


@pytest.mark.skipif(not Path("/dev/fd").is_dir(), reason="needs /dev/fd, as bash's <(…) does")
def test_an_evaluation_set_from_a_pipe_is_read_once_and_kept() -> None:
    import os

    read_end, write_end = os.pipe()  # what --eval <(cat held.txt) gives: /dev/fd/N, text once
    os.write(write_end, b"held-out text, once\n")
    os.close(write_end)
    try:
        spec = f"/dev/fd/{read_end}"
        data.check_eval_specs([spec])  # the engine's early look reads it...
        assert load_eval_text(spec) == "held-out text, once\n"  # ...and loading gets the same text
    finally:
        os.close(read_end)


def test_a_special_tokens_text_in_an_evaluation_file_is_read_as_text(tiny_model_dir: Path) -> None:
    """As the paper's ``encode_ordinary``: ``<|endoftext|>`` written in a file is characters, not the token."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    end = tokenizer.eos_token_id
    ids = data.tokenize(tokenizer, "a story<|endoftext|>another")
    assert end not in ids
    assert tokenizer.decode(ids) == "a story<|endoftext|>another"
    # the model's tokenizer is shared with the prompt's encoding, where the token stays a token
    assert end in tokenizer("<|endoftext|>", add_special_tokens=False)["input_ids"]
    assert end in tokenizer.backend_tokenizer.encode("<|endoftext|>", add_special_tokens=False).ids
