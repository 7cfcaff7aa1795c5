"""What loading a model says when it cannot: the out-of-memory message (a smaller GPT-2 size that fits,
never the same or a bigger one), a weights file this user may not read."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from collapse_tui import modeling
from collapse_tui.errors import UserError
from collapse_tui.modeling import load_model, out_of_memory_error


@pytest.fixture
def gpu_of_40_gib(monkeypatch: pytest.MonkeyPatch) -> None:
    card = SimpleNamespace(total_memory=40 * 2**30)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: card)


@pytest.mark.parametrize(
    ("model", "hint"),
    [
        # 40 GiB holds gpt2-xl's ~34 GiB by the rule of thumb, so gpt2-xl itself needs a smaller one
        ("gpt2-xl", "try --model gpt2-large"),
        ("openai-community/gpt2-xl", "try --model gpt2-large"),  # named with its hub owner
        ("openai-community/gpt2-medium", "try --model gpt2"),
        ("gpt2", None),  # nothing smaller
        ("HuggingFaceTB/SmolLM2-135M", None),  # another family: a GPT-2 that fits may be no smaller
    ],
)
def test_the_hint_names_a_smaller_gpt2_that_fits(gpu_of_40_gib, model: str, hint: str | None) -> None:
    message = str(out_of_memory_error(model, torch.device("cuda", 0)))
    assert message.startswith(f"out of GPU memory running {model!r}")
    if hint:
        assert f"; on this 40 GiB GPU {hint} (or free the GPU" in message
    else:
        assert "try --model" not in message


def test_on_the_cpu_there_is_no_gpu_to_size(gpu_of_40_gib) -> None:
    assert "try --model" not in str(out_of_memory_error("gpt2-xl", torch.device("cpu")))


def test_a_tokenizer_that_cannot_be_built_is_one_whole_line(tiny_model_dir, monkeypatch) -> None:
    """transformers' message stops at "from one of:" on its first line; the line said no more."""
    import transformers

    from collapse_tui.errors import UserError
    from collapse_tui.modeling import load_model

    def refuse(*args, **kwargs):
        raise ValueError(
            "Couldn't instantiate the backend tokenizer from one of: \n(1) a `tokenizers` library "
            "serialization file, \n(2) a slow tokenizer instance to convert"
        )

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", refuse)
    with pytest.raises(UserError) as caught:
        load_model(str(tiny_model_dir), torch.device("cpu"))
    assert str(caught.value).endswith(
        "Couldn't instantiate the backend tokenizer from one of (are its tokenizer files missing?)"
    )


def test_a_hub_model_not_cached_yet_is_said_to_be_downloaded(tiny_model_dir, monkeypatch) -> None:
    """A first run of gpt2-xl downloads 6 GB while the screen said only "loading model gpt2-xl"."""
    import huggingface_hub

    from collapse_tui.modeling import needs_download

    cache: dict[str, object] = {"gpt2": "/cache/models--gpt2/snapshots/x/config.json"}
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda repo, name: cache.get(repo))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    assert needs_download("gpt2-xl")
    assert not needs_download("gpt2")  # cached
    assert not needs_download(str(tiny_model_dir))  # a folder
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    assert not needs_download("gpt2-xl")  # offline: loading says it is not cached, in its own words


def test_a_weights_file_this_user_may_not_read_is_said_so_not_said_missing(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """safetensors reports a file it may not open as "No such file or directory" (a colleague's model
    folder, saved 0600). Tests run as root, who may read anything: the refusal is played by both."""
    import transformers

    weights = tiny_model_dir / "model.safetensors"
    real_access = os.access
    monkeypatch.setattr(
        modeling.os, "access", lambda path, mode: Path(path) != weights and real_access(path, mode)
    )

    def refused(*args, **kwargs):  # safetensors' own words for the file it was not let open
        raise FileNotFoundError(f"No such file or directory: {weights}")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refused)
    with pytest.raises(UserError) as caught:
        load_model(str(tiny_model_dir), torch.device("cpu"))
    assert str(caught.value) == (
        f"cannot load model from folder {tiny_model_dir}: {weights} cannot be read (permission denied)"
    )
