"""The training step (collapse_tui/training.py): eager on any device, replayed from CUDA graphs on a GPU.

The graphed step must take exactly the eager step: the same loss, the same
weights after it, a learning rate set between steps applied from the next
one, no step on a non-finite loss, and new graphs when the optimizer's
state is replaced (a resumed snapshot).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from collapse_tui.training import GraphedTrainStep, TrainStep, build_optimizer, make_train_step

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def small_model(device: str) -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=97, n_positions=64, n_layer=2, n_head=2, n_embd=64)
    with torch.device(device):
        return GPT2LMHeadModel(config).eval()


def windows(count: int, length: int, device: str) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return [torch.randint(0, 97, (length + 1,), generator=gen).to(device) for _ in range(count)]


def weights(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def test_an_eager_step_changes_the_weights_and_a_nan_loss_changes_nothing() -> None:
    model = small_model("cpu")
    trainer = make_train_step(
        model, build_optimizer(model, 1e-3, torch.device("cpu")), torch.device("cpu"), None
    )
    assert type(trainer) is TrainStep
    before = weights(model)
    window = windows(1, 16, "cpu")[0]
    loss = trainer.step(window)
    assert loss > 0
    assert all(not torch.equal(a, b) for a, b in zip(before, weights(model), strict=True) if a.dim() >= 2)
    with torch.no_grad():
        model.transformer.ln_f.weight[0] = float("nan")
    before = weights(model)
    assert math.isnan(trainer.step(window))
    after = weights(model)
    assert all(torch.equal(a, b) or a.isnan().any() for a, b in zip(before, after, strict=True))


def design_steps(model: torch.nn.Module, batch: list[torch.Tensor], lr: float, *, clip: bool) -> None:
    """DESIGN section 1's training step written out: AdamW, betas (0.9, 0.95), weight decay 0.1 on
    parameters of 2 or more dimensions only, gradients clipped to norm 1.0 (or not, to show it matters)."""
    params = list(model.parameters())
    optimizer = torch.optim.AdamW(
        [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ],
        lr=lr,
        betas=(0.9, 0.95),
    )
    for window in batch:
        logits = model(window[None, :-1]).logits
        torch.nn.functional.cross_entropy(logits[0], window[1:]).backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad()


def test_the_training_steps_are_designs_adamw_with_its_decay_betas_and_clipping() -> None:
    model = small_model("cpu")
    expected, unclipped = copy.deepcopy(model), copy.deepcopy(model)
    batch = windows(3, 16, "cpu")
    batch[0] = batch[0].flip(0)  # another gradient norm for the first step than for the others
    trainer = TrainStep(model, build_optimizer(model, 1e-2, torch.device("cpu")), None)
    for window in batch:
        trainer.step(window)
    design_steps(expected, batch, 1e-2, clip=True)
    design_steps(unclipped, batch, 1e-2, clip=False)
    for mine, theirs in zip(model.parameters(), expected.parameters(), strict=True):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-6)
    # the clipping is seen in the weights: without it they would have come out elsewhere
    assert any(
        not torch.allclose(a, b) for a, b in zip(expected.parameters(), unclipped.parameters(), strict=True)
    )


def twins(lr: float) -> tuple[TrainStep, GraphedTrainStep]:
    """An eager and a graphed step over two copies of one model, in bf16 autocast as the engine runs."""
    device = torch.device("cuda")
    eager_model = small_model("cuda")
    graphed_model = copy.deepcopy(eager_model)
    eager = TrainStep(eager_model, build_optimizer(eager_model, lr, device), torch.bfloat16)
    graphed = GraphedTrainStep(graphed_model, build_optimizer(graphed_model, lr, device), torch.bfloat16)
    return eager, graphed


def assert_same_weights(a: TrainStep, b: TrainStep) -> None:
    for p, q in zip(a.model.parameters(), b.model.parameters(), strict=True):
        assert torch.allclose(p, q, rtol=1e-5, atol=1e-6), (p - q).abs().max()


@pytest.mark.gpu
@needs_cuda
def test_the_graphed_step_takes_the_eager_step_with_a_new_learning_rate_from_the_next_step() -> None:
    eager, graphed = twins(1e-3)
    for i, window in enumerate(windows(6, 32, "cuda")):
        if i == 3:  # as the engine sets a new rate: a number, between steps
            for trainer in (eager, graphed):
                for group in trainer.optimizer.param_groups:
                    group["lr"] = 3e-3
        assert graphed.step(window) == pytest.approx(eager.step(window), rel=1e-5)
        assert_same_weights(eager, graphed)
    assert graphed.captures == 1 and not graphed.failed  # the first step eager, then replays
    assert float(graphed.optimizer.param_groups[0]["lr"]) == pytest.approx(3e-3)


@pytest.mark.gpu
@needs_cuda
def test_a_window_of_another_length_runs_eagerly_and_keeps_the_graphs() -> None:
    eager, graphed = twins(1e-3)
    usual, odd = windows(4, 32, "cuda"), windows(1, 20, "cuda")
    for window in [usual[0], usual[1], odd[0], usual[2], usual[3]]:
        assert graphed.step(window) == pytest.approx(eager.step(window), rel=1e-5)
        assert_same_weights(eager, graphed)
    assert graphed.captures == 1 and not graphed.failed


@pytest.mark.gpu
@needs_cuda
def test_a_nan_loss_takes_no_graphed_step() -> None:
    _, graphed = twins(1e-3)
    first, second = windows(2, 32, "cuda")
    graphed.step(first)
    graphed.step(first)  # captured and replayed
    with torch.no_grad():
        graphed.model.transformer.ln_f.weight[0] = float("nan")
    before = weights(graphed.model)
    assert math.isnan(graphed.step(second))
    assert all(
        torch.equal(a, b) for a, b in zip(before, weights(graphed.model), strict=True) if not a.isnan().any()
    )


@pytest.mark.gpu
@needs_cuda
def test_a_loaded_optimizer_state_is_captured_anew() -> None:
    """As a resume loads ``optimizer.pt``: the next steps use the loaded moments, not the captured ones."""
    eager, graphed = twins(1e-3)
    data = windows(5, 32, "cuda")
    for window in data[:3]:
        eager.step(window)
        graphed.step(window)
    saved = copy.deepcopy(eager.optimizer.state_dict())
    model_state = copy.deepcopy(eager.model.state_dict())
    eager.step(data[3])
    graphed.step(data[3])
    for trainer in (eager, graphed):  # back to the state after three steps, as a resume would be
        trainer.model.load_state_dict(model_state)
        trainer.optimizer.load_state_dict(copy.deepcopy(saved))
        for group in trainer.optimizer.param_groups:
            group["lr"] = 1e-3
    assert graphed.step(data[4]) == pytest.approx(eager.step(data[4]), rel=1e-5)
    assert_same_weights(eager, graphed)
    assert graphed.captures == 2
