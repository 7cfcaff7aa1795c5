"""Shared fixtures: a tiny model folder and evaluation text, built offline."""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# Without a GPU, Triton kernels can only run in Triton's interpreter, which must be
# chosen before triton is first imported (tests/test_persistent.py runs under it).
if not any(Path("/dev").glob("nvidia[0-9]*")):
    os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, str(Path(__file__).parent))

from tiny import make_model_folder, make_text


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 2-layer GPT-2 with a byte-level BPE tokenizer, as a model folder."""
    return make_model_folder(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def eval_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A held-out text file of a few thousand tokens."""
    path = tmp_path_factory.mktemp("data") / "heldout.txt"
    path.write_text(make_text(120, seed=7), encoding="utf-8")
    return path


@pytest.fixture
def tiny_config(tiny_model_dir: Path, eval_file: Path, tmp_path: Path):
    """A small, fast run configuration on the tiny model (CPU, fp32)."""
    from collapse_tui.config import RunConfig

    return RunConfig(
        model=str(tiny_model_dir),
        evals=[str(eval_file)],
        lr=1e-3,
        max_iters=3,
        gen_tokens=40,
        block=16,
        top_k=50,
        eval_tokens=160,
        seed=1,
        device="cpu",
        out=str(tmp_path / "run"),
    )


@pytest.fixture(autouse=True)
def stop_signal_handlers_restored() -> Iterator[None]:
    """Each test starts with the handlers it found: a run in this process (headless, the TUI) installs
    its own for Ctrl-C, kill and a hang-up, which the real process keeps to its end."""
    names = [name for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name)]
    saved = {name: signal.getsignal(getattr(signal, name)) for name in names}
    yield
    for name, handler in saved.items():
        if handler is not None:
            signal.signal(getattr(signal, name), handler)
