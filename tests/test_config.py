"""Configuration: the paper preset, user options winning over it, validation."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from collapse_tui.config import (
    PAPER_PRESET,
    RunConfig,
    claim_default_run_dir,
    claim_folder,
    eval_set_name,
    resolve_config,
)
from collapse_tui.controls import RunControls
from collapse_tui.engine import Engine
from collapse_tui.errors import UserError
from collapse_tui.follow import serving_watchers


def test_paper_preset_sets_the_papers_values() -> None:
    """DESIGN §1's preset, the values of the paper's config/finetune_collapse.py, written out here."""
    config = resolve_config({"preset": "paper"})
    paper = {"model": "gpt2", "lr": 4e-5, "block": 100, "gen_tokens": 1024, "top_k": 200,
             "temperature": 1.0, "prompt": "\n", "seed": 1337, "evals": ["wikitext-2-v1"]}  # fmt: skip
    assert {key: getattr(config, key) for key in paper} == paper
    assert PAPER_PRESET.keys() <= paper.keys()  # the preset sets nothing the paper did not


def test_an_option_given_wins_over_the_preset() -> None:
    config = resolve_config({"preset": "paper", "lr": 1e-3, "evals": ["ptb"]})
    assert config.lr == 1e-3
    assert config.evals == ["ptb"]
    assert config.block == 100


def test_eval_tokens_all_means_whole_split() -> None:
    assert resolve_config({"eval_tokens": "all"}).eval_tokens is None
    assert resolve_config({"eval_tokens": "640"}).eval_tokens == 640


@pytest.mark.parametrize(
    ("options", "fragment"),
    [
        ({"lr": 0.0}, "--lr"),
        ({"lr": -1.0}, "--lr"),
        ({"block": 1}, "--block"),
        ({"block": 100, "gen_tokens": 50}, "--gen-tokens"),
        ({"top_k": 0}, "--top-k"),
        ({"seed": -(2**63) - 1}, "--seed"),
        ({"seed": 2**64}, "--seed"),  # torch's generators overflowed: "the run crashed"
        ({"temperature": 0.0}, "--temperature"),
        ({"temperature": 1e-45}, "--temperature"),  # the logits would overflow to inf
        ({"eval_tokens": "lots"}, "--eval-tokens"),
        ({"max_iters": 0}, "--max-iters"),
        ({"collapse_threshold": 1.5}, "--collapse-threshold"),
        ({"collapse_threshold": 1.0}, r"rep4 never reaches 1"),  # it could never trigger
        ({"gen_tokens": 10**11}, "--gen-tokens must be at most"),  # "the run crashed": 800 GB asked for
        ({"temperature": 1e39}, "--temperature must be at most"),  # past float32: top-k kept every token
        ({"temperature": float("inf")}, "--temperature must be at most"),  # not "at least 0.001"
        ({"temperature": float("nan")}, "--temperature must be at least"),
        # bytes that are not UTF-8, as a shell passes them ($'ab\xffcd'): "the run crashed" at config.json
        ({"prompt": "ab\udcffcd"}, r"--prompt ab\\xffcd holds bytes that are not UTF-8"),
        ({"evals": ["ev\udcff.txt"]}, r"--eval ev\\xff.txt holds bytes that are not UTF-8"),
        ({"out": "runs/\udcff"}, "--out .* holds bytes that are not UTF-8"),
        ({"dtype": "float8"}, "--dtype"),
        ({"preset": "nope"}, "preset"),
    ],
)
def test_out_of_range_values_are_refused_with_the_option_named(options: dict, fragment: str) -> None:
    with pytest.raises(UserError, match=fragment):
        resolve_config(options)


@pytest.mark.parametrize("seed", [-(2**63), -1, 0, 2**64 - 1])
def test_every_seed_torch_takes_is_accepted(seed: int) -> None:
    import torch

    assert resolve_config({"seed": seed}).seed == seed
    torch.Generator().manual_seed(seed)


def test_config_round_trips_and_ignores_unknown_keys() -> None:
    config = RunConfig(lr=2e-5, evals=["a.txt", "ptb"])
    assert RunConfig.from_dict({**config.to_dict(), "from_the_future": 1}) == config


def test_runs_started_in_the_same_second_get_folders_of_their_own(tmp_path, monkeypatch) -> None:
    """A sweep's runs with the same model and lr, no --out: each claims its own folder."""
    monkeypatch.setattr(time, "strftime", lambda _format: "20261128-120000")
    config = RunConfig(model="models/gpt2", lr=4e-5)
    folders = [claim_default_run_dir(config, tmp_path) for _ in range(3)]
    names = [folder.name for folder in folders]
    assert names == [
        "20261128-120000-gpt2-lr4e-05",
        "20261128-120000-gpt2-lr4e-05-2",
        "20261128-120000-gpt2-lr4e-05-3",
    ]
    assert all(folder.is_dir() for folder in folders)


def test_a_broken_link_on_the_path_is_named_not_taken_for_a_thousand_names(tmp_path: Path) -> None:
    (tmp_path / "runs").symlink_to(tmp_path / "nowhere")
    with pytest.raises(UserError, match=r"a folder on its path is in the way \(a broken link\?\)"):
        claim_folder(tmp_path / "runs" / "sweep-1", "sweep folder")


def test_a_failed_default_start_leaves_no_folder_behind(tmp_path, monkeypatch) -> None:
    """The folder a default-named run claimed goes again if the run never writes its config."""
    monkeypatch.chdir(tmp_path)
    config = RunConfig(model="models/gpt2", lr=4e-5, evals=[str(tmp_path / "text.txt")], device="cpu")
    (tmp_path / "text.txt").write_text("some text")
    engine = Engine(config)
    assert engine.run_dir.is_dir() and engine.made_dirs
    with serving_watchers(engine.run_dir, engine.controls, made=engine.made_dirs):
        pass  # the model did not load, say
    assert not engine.run_dir.exists()
    assert not (tmp_path / "runs").exists()  # made for it, and empty: gone too


def test_a_default_name_too_long_for_the_filesystem_leaves_no_runs_folder(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "text.txt").write_text("some text")
    config = RunConfig(model="org/" + "m" * 300, evals=[str(tmp_path / "text.txt")], device="cpu")
    with pytest.raises(UserError, match="cannot create run folder"):
        Engine(config)
    assert not (tmp_path / "runs").exists()


def test_a_failed_start_into_new_nested_out_folders_removes_them(tmp_path) -> None:
    """``--out a/b/run`` made ``a/`` and ``a/b/``: a start that fails leaves neither behind."""
    (tmp_path / "keep").mkdir()
    config = RunConfig(out=str(tmp_path / "keep" / "a" / "b" / "run"), device="cpu")
    with serving_watchers(Path(config.out), RunControls()):
        assert (tmp_path / "keep" / "a" / "b" / "run").is_dir()
    assert list((tmp_path / "keep").iterdir()) == []


def test_a_failed_default_start_keeps_a_runs_folder_that_was_there(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    config = RunConfig(model="models/gpt2", lr=4e-5, evals=[str(tmp_path / "text.txt")], device="cpu")
    (tmp_path / "text.txt").write_text("some text")
    engine = Engine(config)
    with serving_watchers(engine.run_dir, engine.controls, made=engine.made_dirs):
        pass
    assert (tmp_path / "runs").is_dir() and list((tmp_path / "runs").iterdir()) == []


def test_train_on_defaults_to_the_text_and_runs_from_before_it_keep_their_ids() -> None:
    from collapse_tui.config import RunConfig, resolve_config

    assert resolve_config({}).train_on == "text"
    assert resolve_config({"train_on": "ids"}).train_on == "ids"
    old = RunConfig().to_dict()
    del old["train_on"]  # a config.json written before the option existed
    assert RunConfig.from_dict(old).train_on == "ids"
    assert RunConfig.from_dict(RunConfig().to_dict()).train_on == "text"
    with pytest.raises(UserError, match="--train-on must be one of text, ids"):
        resolve_config({"train_on": "tokens"})


def test_an_eval_file_given_through_a_link_is_named_as_typed(tmp_path: Path) -> None:
    store = tmp_path / "store" / "9f86d081884c"  # a hub cache's blob, say
    store.parent.mkdir()
    store.write_text("some held-out text\n")
    (tmp_path / "wiki.txt").symlink_to(store)
    spec = resolve_config({"evals": [str(tmp_path / "wiki.txt")]}).evals[0]
    assert spec == str(tmp_path / "wiki.txt") and eval_set_name(spec) == "wiki"
