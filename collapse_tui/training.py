"""The training step of DESIGN section 1: one AdamW step on a window of the model's own sample.

Two implementations of one call, ``step(window) -> loss``; ``make_train_step``
picks:

- ``TrainStep``, eager, on any device: forward (under autocast where the run
  asks for it), cross-entropy, backward, gradient clipping to norm 1, the
  AdamW step. A non-finite loss takes no step: the weights stay as they were.
- ``GraphedTrainStep``, on CUDA: the same kernels, captured once in two CUDA
  graphs and replayed. Eagerly, a step of gpt2-medium on 100 tokens is
  ~2,400 kernels launched from Python, 62 ms of which the GPU needs 14
  (benchmarks/profile_phases.py, H200): the host is the bottleneck. Graph
  one zeroes the gradients, runs forward, loss, backward and the clip; the
  loss comes back to the host (one sync, as in the eager step) and, when it
  is finite, graph two runs the fused AdamW step.

Graphs replay fixed addresses, so ``GraphedTrainStep`` keeps what they read
and write alive and in place: the window buffer, the gradients, the
optimizer's state (captured only once it exists, i.e. after a first eager
step, and captured again whenever it is replaced, as by resuming from a
snapshot) and the learning rate, held in a tensor per parameter group into
which a new rate (``group["lr"] = x``, as the engine sets it) is copied
before each replay. If capturing fails, it says so once and stays eager.
A replayed step calls no ``optimizer.step()``, so no optimizer hook sees it:
whoever keeps copies of the weights must be told (the engine calls
``Inference.weights_changed()`` after every step, graphed or not).
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F

from collapse_tui.capture import capturing
from collapse_tui.inference import autocast_context

log = logging.getLogger(__name__)

#: Gradients are clipped to this global norm before every step, as in nanoGPT.
GRAD_CLIP = 1.0


def build_optimizer(model: torch.nn.Module, lr: float, device: torch.device) -> torch.optim.AdamW:
    """AdamW as in nanoGPT: weight decay 0.1 on matrices and embeddings, none on biases and norms.

    On CUDA the fused kernel, capturable so that ``GraphedTrainStep`` can
    replay it (it then also keeps its step counts on the GPU).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    cuda = device.type == "cuda"
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), fused=cuda, capturable=cuda)


class TrainStep:
    """Eager: every kernel launched from Python, any device."""

    def __init__(
        self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, autocast_dtype: torch.dtype | None
    ) -> None:
        self.model = model
        self.optimizer = optimizer
        self.autocast_dtype = autocast_dtype
        self.params = [p for p in model.parameters() if p.requires_grad]

    def step(self, window: torch.Tensor) -> float:
        """Learn ``window[1:]`` from ``window[:-1]`` (one sequence); the loss before the step.

        A non-finite loss takes no step.
        """
        self.optimizer.zero_grad(set_to_none=True)
        loss = self._loss(window, cache_casts=True)
        value = float(loss.detach())
        if not math.isfinite(value):
            return value
        self._backward(loss)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return value

    def _loss(self, window: torch.Tensor, cache_casts: bool) -> torch.Tensor:
        """The mean cross-entropy of predicting ``window[1:]`` (``cache_casts``: see ``autocast_context``)."""
        with autocast_context(window.device, self.autocast_dtype, cache_casts):
            logits = self.model(window[None, :-1], use_cache=False).logits
        return F.cross_entropy(logits.float().flatten(0, 1), window[1:])

    def _backward(self, loss: torch.Tensor) -> None:
        """Gradients of ``loss``, clipped to ``GRAD_CLIP``."""
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, GRAD_CLIP)

    def _loss_and_grads(self, window: torch.Tensor) -> torch.Tensor:
        """What a graph captures: the loss and its clipped gradients."""
        loss = self._loss(window, cache_casts=False)
        self._backward(loss)
        return loss


class GraphedTrainStep(TrainStep):
    """CUDA: forward + backward + clip in one graph, the optimizer step in another (module docstring)."""

    def __init__(
        self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, autocast_dtype: torch.dtype | None
    ) -> None:
        super().__init__(model, optimizer, autocast_dtype)
        self.failed = False
        self.grads_graph: torch.cuda.CUDAGraph | None = None
        self.step_graph: torch.cuda.CUDAGraph | None = None
        self._window: torch.Tensor | None = None
        self._captured_loss: torch.Tensor | None = None
        self._grads: list[torch.Tensor] = []
        self._lrs: list[torch.Tensor] = []
        self._state: list[torch.Tensor] = []
        #: how many times the graphs were captured (once, and again after a new optimizer state)
        self.captures = 0

    def step(self, window: torch.Tensor) -> float:
        if self.failed or not self.optimizer.state:  # the first step creates the state: eagerly
            return super().step(window)
        if (
            self._window is not None
            and self._window.shape != window.shape
            and self._captured_for(self._window)
        ):
            # a window of another length (a sample whose text reads back shorter than a block): eagerly,
            # keeping the graphs for the usual length instead of capturing anew for each odd one
            return super().step(window)
        if not self._captured_for(window):
            try:
                self._capture(window)
            except Exception as error:  # any failure to capture means: stay eager
                log.warning("training step not captured in a CUDA graph (%s): it runs eagerly", error)
                self.failed = True
                self.grads_graph = self.step_graph = None
                return super().step(window)
        assert self.grads_graph is not None and self.step_graph is not None
        assert self._window is not None and self._captured_loss is not None
        self._window.copy_(window)
        self._take_new_lr()
        self.grads_graph.replay()
        value = float(self._captured_loss)
        if math.isfinite(value):
            self.step_graph.replay()
        return value

    def _optimizer_state(self) -> list[torch.Tensor]:
        """The optimizer's state tensors: new ones (a loaded state) need new graphs."""
        return [value for state in self.optimizer.state.values() for value in state.values()]

    def _captured_for(self, window: torch.Tensor) -> bool:
        return (
            self.grads_graph is not None
            and self._window is not None
            and self._window.shape == window.shape
            and len(self._state) == len(current := self._optimizer_state())
            and all(a is b for a, b in zip(self._state, current, strict=True))
        )

    def _take_new_lr(self) -> None:
        """Copy a learning rate set as a number since the last step into the tensor the graph reads."""
        for group, lr in zip(self.optimizer.param_groups, self._lrs, strict=True):
            if group["lr"] is not lr:
                lr.fill_(float(group["lr"]))
                group["lr"] = lr

    def _capture(self, window: torch.Tensor) -> None:
        device = window.device
        self._window = window.clone()
        self._lrs = []
        for group in self.optimizer.param_groups:
            group["capturable"] = True  # a state loaded from a snapshot may say otherwise
            group["lr"] = torch.tensor(float(group["lr"]), dtype=torch.float32, device=device)
            self._lrs.append(group["lr"])
        # warm up on a side stream (cuBLAS handles, autograd's buffers): gradients only, no step
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            self.optimizer.zero_grad(set_to_none=True)
            self._loss_and_grads(self._window)
        torch.cuda.current_stream(device).wait_stream(side)
        # the graphs write and read these gradients: keep them alive whatever happens to .grad
        self._grads = [p.grad for p in self.params if p.grad is not None]
        grads_graph, step_graph = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
        # thread_local: CUDA calls of another thread (a TUI) cannot break the capture
        with capturing(grads_graph, capture_error_mode="thread_local"):
            self.optimizer.zero_grad(set_to_none=False)
            # detached: holding the autograd graph would keep the capture's nodes alive past it
            self._captured_loss = self._loss_and_grads(self._window).detach()
        with capturing(step_graph, pool=grads_graph.pool(), capture_error_mode="thread_local"):
            self.optimizer.step()
        self.grads_graph, self.step_graph = grads_graph, step_graph
        self.captures += 1
        self._state = self._optimizer_state()  # held: the step graph writes them


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """``optimizer.load_state_dict(state)``, keeping how this optimizer was built.

    A snapshot records ``fused`` and ``capturable`` as the device it was
    taken on wanted them; a resume on another device needs its own.
    """
    built = [{key: group.get(key) for key in ("fused", "capturable")} for group in optimizer.param_groups]
    optimizer.load_state_dict(state)
    for group, flags in zip(optimizer.param_groups, built, strict=True):
        group.update(flags)


def make_train_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    autocast_dtype: torch.dtype | None,
) -> TrainStep:
    """Graphed on CUDA, eager elsewhere."""
    if device.type == "cuda":
        return GraphedTrainStep(model, optimizer, autocast_dtype)
    return TrainStep(model, optimizer, autocast_dtype)
