"""Loading the model and tokenizer, and choosing device and precision.

Every way loading can fail because of what the user typed (an unknown id, a
model not cached while offline, a config that is not a causal LM, a device
that is not there) becomes a one-line ``UserError``.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from collapse_tui.errors import UserError


def resolve_device(name: str) -> torch.device:
    """``auto`` means CUDA when there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise UserError(f"--device {name!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {name}: no CUDA device is available here; use --device cpu")
        index = device.index or 0
        if index >= torch.cuda.device_count():
            raise UserError(
                f"--device {name}: there is no such CUDA device (this machine has {torch.cuda.device_count()})"
            )
    elif device.type != "cpu":
        raise UserError(f"--device {name!r} is not supported; use auto, cpu, cuda or cuda:N")
    return device


def on_device(device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """Make ``device`` the calling thread's current CUDA device while a run works on it.

    Why: Triton kernels, CUDA graph captures and the cluster kernel launch on
    the thread's current device, and every thread starts on cuda:0. A run given
    ``--device cuda:1`` crashed at its first Triton launch ("cannot be accessed
    from Triton"), in the TUI's worker thread and in headless's main thread alike.
    """
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def resolve_autocast(dtype: str, device: torch.device) -> torch.dtype | None:
    """The autocast precision: bf16 on CUDA for ``auto``, none (fp32) on the CPU.

    Master weights and the optimizer always stay in fp32: one small AdamW step
    at lr 4e-5 would be lost to bf16 rounding of the weights.
    """
    if dtype == "float32" or (dtype == "auto" and device.type != "cuda"):
        return None
    return torch.bfloat16


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    #: The longest context the model's position embeddings allow, if it says.
    max_positions: int | None


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")


def _unreadable_files(folder: Path) -> list[Path]:
    """The files of a model folder this process may not read (a colleague's, saved 0600)."""
    try:
        return sorted(path for path in folder.iterdir() if path.is_file() and not os.access(path, os.R_OK))
    except OSError:
        return []


def _explain_load_error(model_id: str, error: Exception) -> UserError:
    """Turn the many ways from_pretrained fails into one line a user can act on."""
    text = str(error)
    local = Path(model_id).exists()
    if "Unrecognized configuration class" in text or "does not support" in text.lower():
        return UserError(
            f"model {model_id!r} is not a causal language model (it has no LM head to generate with)"
        )
    if local:
        unreadable = _unreadable_files(Path(model_id)) if isinstance(error, OSError) else []
        if unreadable:  # safetensors says "No such file or directory" of a file it may not read
            return UserError(
                f"cannot load model from folder {model_id}: {unreadable[0]} cannot be read (permission denied)"
            )
        first = text.strip().splitlines()[0] if text.strip() else type(error).__name__
        return UserError(f"cannot load model from folder {model_id}: {first}")
    if _offline() or "offline" in text.lower() or "connect" in text.lower() or "cache" in text.lower():
        return UserError(
            f"model {model_id!r} is not a local folder and is not in the Hugging Face cache, "
            "and the hub cannot be reached; download it first or give a model folder"
        )
    return UserError(
        f"model {model_id!r} was not found: not a local folder nor a model id on the Hugging Face hub"
    )


def load_causal_lm_config(model_id: str) -> object:
    """The model's config, if it names a causal LM: the cheap part of loading, which finds most
    mistakes (a mistyped hub id, a model not cached while offline, a folder of something else).

    ``load_model`` starts with it; a sweep calls it for the model of every run it will start, before
    the first, so that a mistyped id in a grid of models costs one line at once, not a failed run
    hours in.
    """
    from transformers import AutoConfig

    if Path(model_id).exists() and not (Path(model_id) / "config.json").exists():
        raise UserError(f"{model_id} is not a model folder: it has no config.json")
    try:
        config = AutoConfig.from_pretrained(model_id)
    except Exception as error:  # transformers raises OSError, ValueError, hub errors...
        raise _explain_load_error(model_id, error) from None
    if not _is_causal_lm(config):
        raise UserError(
            f"model {model_id!r} is not a causal language model (a {type(config).__name__}"
            f"{_why_not_causal(config)}); give a causal LM such as gpt2"
        )
    return config


def load_tokenizer(model_id: str) -> Any:
    """The model's tokenizer, or one line saying why there is none."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(model_id)
    except Exception as error:
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        # transformers' "Couldn't instantiate the backend tokenizer from one of:" lists what it looked for
        hint = " (are its tokenizer files missing?)" if first.rstrip().endswith(":") else ""
        raise UserError(
            f"cannot load the tokenizer of {model_id!r}: {first.rstrip().rstrip(':')}{hint}"
        ) from None
    if not tokenizer("The tower").input_ids:  # transformers builds an empty one where the files are missing
        raise UserError(f"model {model_id!r} has no usable tokenizer (are its tokenizer files missing?)")
    return tokenizer


def needs_download(model_id: str) -> bool:
    """Whether loading ``model_id`` fetches it from the hub: an id whose config.json is not cached yet.

    Why: a first run of gpt2-xl downloads 6 GB while the screen said only
    "loading model gpt2-xl"; told that it is a download, a researcher waits
    instead of wondering whether it hangs.
    """
    if Path(model_id).expanduser().exists():
        return False
    try:
        from huggingface_hub import constants, try_to_load_from_cache

        if constants.HF_HUB_OFFLINE:
            return False
        return not isinstance(try_to_load_from_cache(model_id, "config.json"), str)
    except Exception:  # not an id the hub takes: loading says so in its own words
        return False


def load_model(model_id: str, device: torch.device) -> LoadedModel:
    """Load a causal LM in fp32 on ``device``, with its tokenizer, dropout off."""
    from transformers import AutoModelForCausalLM

    config = load_causal_lm_config(model_id)
    tokenizer = load_tokenizer(model_id)
    try:
        try:
            model = AutoModelForCausalLM.from_pretrained(model_id, dtype=torch.float32)
        except TypeError:  # transformers < 4.56 spells it torch_dtype
            model = AutoModelForCausalLM.from_pretrained(model_id, torch_dtype=torch.float32)
    except Exception as error:
        raise _explain_load_error(model_id, error) from None
    try:
        model.to(device)
    except torch.cuda.OutOfMemoryError:
        raise out_of_memory_error(model_id, device) from None
    model.eval()  # dropout off, for generation and for the training step alike
    return LoadedModel(model=model, tokenizer=tokenizer, max_positions=context_length(config))


def context_length(config: object) -> int | None:
    """The most positions the model takes (GPT-2's ``n_positions``, most others'
    ``max_position_embeddings``); None where its config does not say."""
    return getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)


def _is_causal_lm(config: object) -> bool:
    """Whether this config is a causal LM's: transformers knows a causal-LM head for it (remote code:
    assume yes), and it is neither a seq2seq model nor an encoder (``_why_not_causal``)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    if getattr(config, "auto_map", None):
        return True
    return type(config) in MODEL_FOR_CAUSAL_LM_MAPPING and not _why_not_causal(config)


def _why_not_causal(config: object) -> str:
    """What makes a config with a causal-LM head in transformers no causal LM, or "".

    Why: BERT, RoBERTa, ELECTRA, … have a "causal LM" class for their
    decoder variants, and a masked-LM checkpoint loads into it without an
    error. Its attention then sees the tokens after each position (the
    losses and the training step would read the answer), and the numbers a
    run gives would mean nothing. A seq2seq model's decoder (BART) was
    trained beside an encoder it would not have.
    """
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING

    if getattr(config, "is_encoder_decoder", False):
        return ", an encoder-decoder model"
    if type(config) in MODEL_FOR_MASKED_LM_MAPPING and not getattr(config, "is_decoder", False):
        return ", an encoder: each position sees the tokens after it"
    return ""


#: GPT-2 sizes by parameter count, for suggesting one that fits.
GPT2_SIZES = [("gpt2", 124e6), ("gpt2-medium", 355e6), ("gpt2-large", 774e6), ("gpt2-xl", 1558e6)]

#: Bytes a parameter costs during a run: fp32 weight, gradient, two AdamW
#: moments, a bf16 copy for fast generation, and headroom for activations.
BYTES_PER_PARAMETER = 4 + 4 + 8 + 2 + 4


def out_of_memory_error(model_id: str, device: torch.device) -> UserError:
    """Say that the GPU is too small and, for a GPT-2 size, which smaller one would fit.

    Only a GPT-2 size by name (``gpt2-xl``, ``openai-community/gpt2-xl``)
    gets a suggestion: for any other model a GPT-2 that fits might be no
    smaller than the model that did not.
    """
    hint = ""
    sizes = [name for name, _ in GPT2_SIZES]
    name = model_id.rstrip("/").rsplit("/", 1)[-1]
    if device.type == "cuda" and name in sizes:
        total = torch.cuda.get_device_properties(device).total_memory
        fitting = [
            size for size, params in GPT2_SIZES[: sizes.index(name)] if params * BYTES_PER_PARAMETER < total
        ]
        if fitting:
            hint = f"; on this {total / 2**30:.0f} GiB GPU try --model {fitting[-1]}"
    return UserError(f"out of GPU memory running {model_id!r}{hint} (or free the GPU, or use --device cpu)")
