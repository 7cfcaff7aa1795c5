"""The configuration of one run: defaults, the paper preset, validation.

One ``RunConfig`` describes everything that decides what a run computes. The
command line builds it (``resolve_config``), the engine consumes it, and the
run folder stores it as ``config.json`` so a run can be read, compared or
resumed later.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from collapse_tui.errors import UserError

#: The values of the seed paper's released config (config/finetune_collapse.py
#: of DavidHerel/collapse-lm-iclr), evaluated on Wikitext-2 v1 as in the paper.
PAPER_PRESET: dict[str, Any] = {
    "model": "gpt2",
    "lr": 4e-5,
    "block": 100,
    "gen_tokens": 1024,
    "top_k": 200,
    "temperature": 1.0,
    "prompt": "\n",
    "seed": 1337,
    "evals": ["wikitext-2-v1"],
}

PRESETS: dict[str, dict[str, Any]] = {"paper": PAPER_PRESET}

DTYPES = ("auto", "float32", "bfloat16")
#: What gen_loss and the training step read (``--train-on``): ``text``, the sample decoded to text and
#: tokenized again, as the paper's code does (it saves the sample as text and encodes that); ``ids``,
#: the sampled token ids themselves (what runs of earlier versions did).
TRAIN_ON = ("text", "ids")

#: ``--eval`` names of hub sets: (dataset, config, column, layout of the original file, for
#: ``data.file_text``: the hub keeps its lines in another form).
HUB_SETS: dict[str, tuple[str, str | None, str, str]] = {
    "wikitext-2": ("wikitext", "wikitext-2-raw-v1", "text", "wikitext"),
    "wikitext-2-v1": ("wikitext", "wikitext-2-v1", "text", "wikitext"),
    "ptb": ("ptb_text_only", None, "sentence", "ptb"),
}


def eval_set_name(spec: str) -> str:
    """A hub set is named by its ``--eval`` value, a file by its stem."""
    return spec if spec in HUB_SETS else Path(spec).stem


def absolute_eval(spec: str) -> str:
    """A file ``--eval`` as an absolute path (hub names and missing paths as given).

    Why: the run's config.json keeps it, and ``--resume`` reads it back
    from wherever the researcher is then.
    """
    # links kept as given: a file is named by its stem as typed, not by what a link points to
    path = Path(spec).expanduser()
    return spec if spec in HUB_SETS or not path.is_file() else str(absolute(path))


def absolute(path: str | Path) -> Path:
    """``path`` from the root, ``..`` folded, symbolic links kept as given."""
    return Path(os.path.abspath(path))


def model_name(model: str) -> str:
    """The model as a person names it: a hub id as is, a local folder by its name (for screens and tables)."""
    return Path(model).name if model.startswith(("/", ".", "~")) else model


def absolute_paths(values: dict[str, Any]) -> dict[str, Any]:
    """``values`` with the run folder, a snapshot and a local model folder as absolute paths.

    Why: config.json, events and the summary write them down, and a path
    relative to where the run was started means nothing read from elsewhere
    (``--resume`` of a relative ``--model ./tiny`` from another folder could
    not find the model). Hub ids stay as they are.
    """
    values = dict(values)
    for key in ("out", "resume"):
        if values.get(key):
            values[key] = str(absolute(values[key]))
    model = values.get("model")
    if model and Path(model).is_dir():
        values["model"] = str(absolute(model))
    return values


@dataclass
class RunConfig:
    """Every knob of a run. Field names match the command-line options."""

    model: str = "gpt2"
    evals: list[str] = field(default_factory=lambda: ["wikitext-2"])
    lr: float = 4e-5
    max_iters: int = 1000
    gen_tokens: int = 1024
    block: int = 100
    top_k: int = 200
    temperature: float = 1.0
    prompt: str = "\n"
    #: Validation tokens per evaluation set; ``None`` means the whole split.
    eval_tokens: int | None = 12_800
    seed: int = 1337
    device: str = "auto"
    dtype: str = "auto"
    out: str | None = None
    collapse_threshold: float = 0.9
    collapse_patience: int = 3
    keep_going: bool = False
    #: A snapshot every this many iterations (0: none on the way), and one when the run ends.
    snapshot_every: int = 0
    final_snapshot: bool = True
    preset: str | None = None
    #: A snapshot folder to continue from (``--resume``), if any.
    resume: str | None = None
    #: ``TRAIN_ON``: the sample as text (the paper) or as the sampled ids.
    train_on: str = "text"
    #: How text becomes tokens; not an option. 3: the prompt starts with the tokenizer's
    #: begin-of-text token where the tokenizer puts one before text (``Engine._encode_prompt``;
    #: Llama-2, Mistral, Gemma; not GPT-2). 2 and up: a written-out ``<|endoftext|>`` in an evaluation
    #: file is text (``data.tokenize``), and the prompt's leading special tokens stay tokens when the
    #: sample is read as text (``Engine.special_start``). 1 and 2: runs of earlier versions, which go on
    #: so when resumed (their prompts, evaluation windows and losses stay what they were).
    text_reading: int = 3

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunConfig:
        """Rebuild a config from ``config.json``, ignoring keys this version lacks."""
        known = {f.name for f in dataclasses.fields(cls)}
        # a run from before --train-on trained on its sampled ids: resumed, it goes on doing so;
        # likewise one from before text_reading
        legacy = {"train_on": "ids", "text_reading": 1}
        return cls(**{**legacy, **{k: v for k, v in data.items() if k in known}})


#: What each kind of field in ``RunConfig`` may hold when read back from a ``config.json``.
_JSON_TYPES: dict[str, tuple[type, ...]] = {
    "str": (str,),
    "float": (int, float),
    "int": (int,),
    "bool": (bool,),
    "list[str]": (list,),
}


def check_config_types(data: Any) -> None:
    """Raise TypeError if ``data`` (a run's ``config.json``) is not an object of the fields' types.

    Why: the file may have been edited or damaged by hand, and a model name of
    5 or an lr of "x" would otherwise fail deep inside a run, as a traceback.
    """
    if not isinstance(data, dict):
        raise TypeError(f"a JSON object was expected, not {type(data).__name__}")
    for item in dataclasses.fields(RunConfig):
        if item.name not in data:
            continue
        value, kind = data[item.name], str(item.type)
        optional = kind.endswith(" | None")
        allowed = _JSON_TYPES.get(kind.removesuffix(" | None"))
        if allowed is None or (optional and value is None):
            continue
        wrong = not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed)
        if wrong or (kind == "list[str]" and not all(isinstance(v, str) for v in value)):
            raise TypeError(f"{item.name} should be {kind}, not {value!r}")


def parse_eval_tokens(value: str | int | None) -> int | None:
    """``--eval-tokens`` takes a positive count or ``all``."""
    if value is None or value == "all":
        return None
    try:
        count = int(value)
    except (TypeError, ValueError):
        raise UserError(f"--eval-tokens must be a positive number or 'all', not {value!r}") from None
    if count < 1:
        raise UserError(f"--eval-tokens must be a positive number or 'all', not {count}")
    return count


#: What a resumed run may do differently from its start; everything else would change what it computes.
RESUME_MAY_CHANGE = {
    "max_iters", "lr", "device", "dtype", "keep_going", "collapse_threshold", "collapse_patience",
    "snapshot_every", "final_snapshot",
}  # fmt: skip


#: The switches' "off" spellings, for messages about a switch given off.
NEGATIVE_FLAGS = {"keep_going": "--stop-at-collapse", "final_snapshot": "--no-final-snapshot"}


def option_flag(key: str, value: Any = None) -> str:
    """The option's flag as typed, for messages (a switch given off by its "off" spelling)."""
    if value is False and key in NEGATIVE_FLAGS:
        return NEGATIVE_FLAGS[key]
    return "--" + ("eval" if key == "evals" else key.replace("_", "-"))


def option_words(options: dict[str, Any]) -> list[str]:
    """``options`` as command-line words again (a list as a repeated option; None left out).

    Why: ``sweep`` starts each run as a ``headless`` process, and says how to go on with itself.
    """
    words: list[str] = []
    for key, value in options.items():
        for one in value if isinstance(value, list) else [value]:
            if one is not None:
                words += [option_flag(key, one)] if isinstance(one, bool) else [option_flag(key), str(one)]
    return words


#: Options naming a path or a model, which an empty value (an unset shell variable) turns into another.
NAMED_BY_PATH = ("out", "model", "evals", "resume")


def refuse_empty(options: dict[str, Any]) -> None:
    """Refuse an empty path or model name: ``--out "$RUN"`` with ``RUN`` unset wrote a run into the
    folder the command was given in, and ``--model ''`` said " is not a model folder"."""
    for key in NAMED_BY_PATH:
        value = options.get(key)
        values = value if isinstance(value, list | tuple) else [value]
        if any(isinstance(one, str | os.PathLike) and not str(one).strip() for one in values):
            raise UserError(f"{option_flag(key)} is empty (an unset shell variable?); give its value")


def resolve_config(options: dict[str, Any]) -> RunConfig:
    """Merge command-line options over a preset over the defaults, then validate.

    Options left at ``None`` were not given, so a preset may fill them; an option
    the user did give always wins over the preset.
    """
    refuse_empty(options)
    preset_name = options.get("preset")
    values: dict[str, Any] = {}
    if preset_name is not None:
        if preset_name not in PRESETS:
            raise UserError(f"unknown preset {preset_name!r}; the presets are: {', '.join(PRESETS)}")
        values.update(PRESETS[preset_name])
    for key, value in options.items():
        if value is None or (key == "evals" and not value):
            continue
        values[key] = value
    if "eval_tokens" in values:
        values["eval_tokens"] = parse_eval_tokens(values["eval_tokens"])
    if "evals" in values:
        values["evals"] = [absolute_eval(str(spec)) for spec in values["evals"]]
    config = RunConfig(**absolute_paths(values))
    validate(config)
    return config


#: The lowest temperature accepted, a cautious floor: logits of ~100 over 1e-3 are 1e5, far from
#: fp32's limit; over ~1e-37 they are inf, the softmax NaN, and every draw token 0 (a "collapse"
#: that is only arithmetic). Lower temperatures sample as greedily as --top-k 1 does anyway.
MIN_TEMPERATURE = 1e-3
#: Above it the scaled logits are all ~0: sampling is uniform over the top k (past float32's range,
#: every logit became 0 and top-k kept them all).
MAX_TEMPERATURE = 1e6
#: Tokens a sample may have: beyond, one iteration's buffers outgrow any machine (a typo's zeros).
MAX_GEN_TOKENS = 1_000_000


def check_collapse_threshold(threshold: float) -> None:
    """A threshold rep4 can reach: a resume given one anew is held to it too (``cli.build_config``)."""
    if not 0 < threshold < 1:
        raise UserError(
            f"--collapse-threshold must be in (0, 1), not {threshold} (rep4 never reaches 1: "
            "a sample's first 4-gram is unique; --keep-going runs on past a collapse)"
        )


def validate(config: RunConfig, *, new_run: bool = True) -> None:
    """Reject numbers out of range with one line that says which and why.

    ``new_run`` False (a resume): the limits added after runs could be started beyond them
    (--gen-tokens, --temperature and --collapse-threshold at their top) are not held against a
    run's own settings.
    """

    def need(ok: bool, message: str) -> None:
        if not ok:
            raise UserError(message)

    need(math.isfinite(config.lr) and config.lr > 0, f"--lr must be a positive number, not {config.lr}")
    need(config.max_iters >= 1, f"--max-iters must be at least 1, not {config.max_iters}")
    need(config.block >= 2, f"--block must be at least 2, not {config.block}")
    need(
        config.gen_tokens <= MAX_GEN_TOKENS or not new_run,
        f"--gen-tokens must be at most {MAX_GEN_TOKENS}, not {config.gen_tokens}",
    )
    need(
        config.gen_tokens >= config.block - 1,
        f"--gen-tokens ({config.gen_tokens}) must be at least --block - 1 ({config.block - 1}), "
        "so that the sample fills one training window",
    )
    need(config.top_k >= 1, f"--top-k must be at least 1, not {config.top_k}")
    # torch's generators take a 64-bit seed, signed or not
    need(-(2**63) <= config.seed < 2**64, f"--seed must be a 64-bit number, not {config.seed}")
    need(
        config.temperature >= MIN_TEMPERATURE,  # NaN fails it too
        f"--temperature must be at least {MIN_TEMPERATURE:g}, not {config.temperature:g} "
        "(far lower ones overflow the scaled logits; --top-k 1 samples greedily)",
    )
    need(
        (config.temperature <= MAX_TEMPERATURE or not new_run) and math.isfinite(config.temperature),
        f"--temperature must be at most {MAX_TEMPERATURE:g}, not {config.temperature:g} "
        "(there sampling is already uniform over the top k)",
    )
    need(config.eval_tokens is None or config.eval_tokens >= 1, "--eval-tokens must be positive or 'all'")
    if not (not new_run and config.collapse_threshold == 1):  # a run of an older version's own setting
        check_collapse_threshold(config.collapse_threshold)
    need(
        config.collapse_patience >= 1,
        f"--collapse-patience must be at least 1, not {config.collapse_patience}",
    )
    need(config.snapshot_every >= 0, f"--snapshot-every must be 0 or more, not {config.snapshot_every}")
    need(config.dtype in DTYPES, f"--dtype must be one of {', '.join(DTYPES)}, not {config.dtype!r}")
    need(
        config.train_on in TRAIN_ON,
        f"--train-on must be one of {', '.join(TRAIN_ON)}, not {config.train_on!r}",
    )
    _need_utf8(config)
    need(len(config.evals) >= 1, "give at least one --eval set")
    need(len(set(config.evals)) == len(config.evals), "each --eval set may be given only once")


def _need_utf8(config: RunConfig) -> None:
    """A text or path given with bytes that are not UTF-8 (``--prompt $'ab\\xff'``): one line, here, not a
    crash where it is first written down (config.json), which left a folder no later start would take."""
    given = [("--prompt", config.prompt), ("--model", config.model), ("--out", config.out or "")]
    given += [("--resume", config.resume or "")] + [("--eval", spec) for spec in config.evals]
    for flag, value in given:
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            try:  # the bytes as the shell gave them
                shown = value.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
            except UnicodeEncodeError:  # a surrogate no byte stands for (a hand-edited config.json)
                shown = ascii(value)
            fix = "give it as UTF-8 text" if flag == "--prompt" else "give a UTF-8 path (a link will do)"
            raise UserError(f"{flag} {shown} holds bytes that are not UTF-8; {fix}") from None


#: Where runs and sweeps given no --out go, and where ``collapse-tui runs`` looks by default.
DEFAULT_RUNS_ROOT = Path("runs")


def default_run_dir(config: RunConfig, root: Path = DEFAULT_RUNS_ROOT) -> Path:
    """``runs/<time>-<model>-lr<lr>/``: sortable by time, readable at a glance."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    model = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(config.model).name or config.model)
    return root / f"{stamp}-{model}-lr{config.lr:g}"


def claim_default_run_dir(config: RunConfig, root: Path = DEFAULT_RUNS_ROOT) -> Path:
    """Create and return a new folder named by ``default_run_dir``, with ``-2``, ``-3``, … if taken.

    Why create it here: runs of a sweep started in the same second with the
    same model and lr get the same name; making the folder (which fails if it
    exists) is what lets exactly one of them have it.
    """
    return claim_folder(default_run_dir(config, root), "run folder")


def missing_folders(path: Path) -> list[Path]:
    """The folders ``path.mkdir(parents=True)`` would create, innermost first: what a start that
    fails must remove again, so that a typo leaves no empty ``runs/`` (or ``--out`` parents) behind."""
    missing = []
    for folder in (path, *path.parents):
        if folder.exists():
            break
        missing.append(folder)
    return missing


def remove_if_empty(folders: Sequence[Path]) -> None:
    """Remove those of ``folders`` (innermost first) that are empty: the ones a failed start made."""
    for folder in folders:
        with contextlib.suppress(OSError):
            folder.rmdir()


def claim_folder(base: Path, what: str) -> Path:
    """Create ``base``, or ``base-2``, ``base-3``, … where it is taken, and return the one made: of
    two processes naming a folder by the same second, exactly one gets each name. One that cannot be
    made leaves none of the folders above it that it made (``runs/``, say) behind."""
    made_above = missing_folders(base.parent)
    try:
        return _claim_folder(base, what)
    except UserError:
        remove_if_empty(made_above)
        raise


def _claim_folder(base: Path, what: str) -> Path:
    for number in range(1, 1000):
        candidate = base if number == 1 else base.with_name(f"{base.name}-{number}")
        try:
            candidate.mkdir(parents=True)
        except FileExistsError:
            if not candidate.exists() and not candidate.is_symlink():  # not the name: a folder above it
                raise UserError(
                    f"cannot create {what} {candidate}: a folder on its path is in the way (a broken link?)"
                ) from None
            continue
        except OSError as error:
            raise UserError(f"cannot create {what} {candidate}: {error.strerror}") from None
        return candidate
    raise UserError(f"no free {what} name beside {base}; give one with --out")
