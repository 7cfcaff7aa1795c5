"""Evaluation text from the hub: rebuilt to the original files the paper evaluated on."""

from __future__ import annotations

import pytest

from collapse_tui import data

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
