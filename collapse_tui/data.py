"""Evaluation sets: held-out human text, tokenized once, cut into fixed windows.

An ``--eval`` value is either a known hub set (loaded through ``datasets``) or
a path to a local text file, named by its stem. The windows are chosen once
and evaluated every iteration, so the validation curves are smooth and
comparable across iterations and runs (DESIGN section 1).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from collapse_tui.config import HUB_SETS, eval_set_name
from collapse_tui.errors import UserError


@dataclass
class EvalSet:
    name: str
    #: ``[n_windows, block + 1]`` token ids: inputs and shifted targets together.
    windows: torch.Tensor
    #: Tokens in the whole split, for the record.
    split_tokens: int
    #: SHA-256 of the split's text: a resume checks it is evaluating the very same text.
    text_sha256: str = ""


def load_eval_text(spec: str) -> str:
    """The raw text of an evaluation set."""
    if spec in HUB_SETS:
        return _load_hub_text(spec)
    path = Path(spec)
    if not path.exists():
        known = ", ".join(HUB_SETS)
        raise UserError(f"evaluation set {spec!r} is neither a known set ({known}) nor an existing file")
    if path.is_dir():
        raise UserError(f"evaluation file {spec} is a folder; give a text file")
    key = _file_identity(path)
    if key in _READ_ONCE:
        return _READ_ONCE[key]
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"evaluation file {spec} is not UTF-8 text") from None
    except OSError as error:  # no permission, an I/O error, a stale network mount
        raise UserError(f"cannot read evaluation file {spec}: {error.strerror or error}") from None
    if not text.strip():
        raise UserError(f"evaluation file {spec} is empty")
    if (
        not path.is_file() and key is not None
    ):  # a pipe (--eval <(…)): its text comes once, and is asked for twice
        _READ_ONCE[key] = text
    return text


#: The text of evaluation "files" that can be read only once (pipes), by the pipe (``_file_identity``).
_READ_ONCE: dict[tuple[int, int], str] = {}


def _file_identity(path: Path) -> tuple[int, int] | None:
    """(device, inode): a pipe's own, where its ``/dev/fd/N`` name may be reused by another."""
    try:
        stat = path.stat()
    except OSError:
        return None
    return stat.st_dev, stat.st_ino


def _load_hub_text(spec: str) -> str:
    dataset_id, config, column, layout = HUB_SETS[spec]
    try:
        import datasets

        try:
            split = datasets.load_dataset(dataset_id, config, split="validation")
        except RuntimeError as error:
            if "scripts are no longer supported" not in str(error):
                raise
            # A script-based hub set (ptb_text_only): datasets >= 4 reads the hub's Parquet conversion.
            split = datasets.load_dataset(
                dataset_id, config, split="validation", revision="refs/convert/parquet"
            )
    except Exception as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserError(
            f"cannot load evaluation set {spec!r} ({dataset_id}) from the Hugging Face hub: {first}; "
            "give a local text file with --eval PATH instead"
        ) from None
    return file_text(split[column], layout)


def file_text(rows: list[str], layout: str) -> str:
    """The text of the set's original file, from the rows the hub keeps.

    The paper evaluated on the original files (Wikitext-2's and Mikolov's
    PTB validation text). The hub keeps Wikitext's lines with their newline
    but its blank lines (a space and a newline) as "", and PTB's lines
    stripped (" a b c" and " " and a newline kept as "a b c"); rebuilt, the
    text is the paper's to the byte (258,659 and 92,830 GPT-2 tokens; joined
    as they come, 256,061 and 89,843).
    """
    if layout == "wikitext":
        return "".join(row or " \n" for row in rows)
    if layout == "ptb":
        return "".join(f" {row} \n" for row in rows)
    raise ValueError(f"unknown layout {layout!r}")


def tokenize(tokenizer: object, text: str, *, specials_as_text: bool = True) -> list[int]:
    """Token ids of a long text, without special tokens and without length warnings.

    A special token's text in the file (``<|endoftext|>`` written out) is read
    as ordinary text, as the paper's code read its data (tiktoken's
    ``encode_ordinary``): an evaluation file is human text, and a marker in it
    must not become a token the model never sees in the middle of prose.
    (``specials_as_text`` False: as runs of earlier versions read it, which
    go on so when resumed.)
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:  # fast tokenizers: no model_max_length warning, much quicker
        before = backend.encode_special_tokens  # the model's tokenizer shares it: put it back
        backend.encode_special_tokens = specials_as_text
        try:
            return list(backend.encode(text, add_special_tokens=False).ids)
        finally:
            backend.encode_special_tokens = before
    return list(
        tokenizer(text, add_special_tokens=False, split_special_tokens=specials_as_text, verbose=False)[
            "input_ids"
        ]  # type: ignore[operator]
    )


def puts_bos_first(tokenizer: Any) -> bool:
    """Whether ``tokenizer`` itself puts its begin-of-text token before a text (Llama-2's, Gemma's do;
    GPT-2's does not): a prompt starts with it then (``Engine._encode_prompt``)."""
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer("a")["input_ids"][:1] == [bos]


def eval_windows(ids: list[int], block: int, eval_tokens: int | None, name: str = "") -> torch.Tensor:
    """Fixed ``block``-token windows spread evenly over the split.

    ``eval_tokens`` is the budget of target tokens; ``None`` (``all``) takes
    every consecutive window of the split.
    """
    available = (len(ids) - 1) // block
    if available < 1:
        raise UserError(
            f"evaluation set {name or '?'} has {len(ids)} tokens; it needs at least {block + 1} "
            f"(--block {block} + 1)"
        )
    seq = torch.tensor(ids, dtype=torch.long)
    wanted = available if eval_tokens is None else min(available, -(-eval_tokens // block))
    if wanted == available:
        starts = torch.arange(available) * block
    else:
        last_start = len(ids) - block - 1
        # float32 as before (runs of earlier versions keep their windows) where it holds every start;
        # past 2**24 it does not: the last start rounded up past the end, and its window fell short
        exact = torch.float32 if last_start < 2**24 else torch.float64
        starts = torch.linspace(0, last_start, wanted, dtype=exact).round().long()
    return torch.stack([seq[s : s + block + 1] for s in starts.tolist()])


def text_digest(text: str) -> str:
    """What a run's config.json keeps of each evaluation text (``eval_sets``), so that a resume, or
    a sweep going on, can tell the same text from another."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def load_eval_set(
    spec: str, tokenizer: object, block: int, eval_tokens: int | None, *, specials_as_text: bool = True
) -> EvalSet:
    name = eval_set_name(spec)
    text = load_eval_text(spec)
    ids = tokenize(tokenizer, text, specials_as_text=specials_as_text)
    return EvalSet(
        name=name,
        windows=eval_windows(ids, block, eval_tokens, name),
        split_tokens=len(ids),
        text_sha256=text_digest(text),
    )


def check_eval_specs(specs: list[str]) -> None:
    """Fail early, before loading a model, on an evaluation file that is not there or empty."""
    names = [eval_set_name(s) for s in specs]
    if len(set(names)) != len(names):
        raise UserError(f"two evaluation sets share a name ({', '.join(names)}); rename one file")
    for spec in specs:
        if spec not in HUB_SETS:
            load_eval_text(spec)
