"""Running the model forward without gradients: generation and evaluation.

``Inference`` is the seam between the engine's loop and how fast that loop
runs. ``EagerInference`` is the reference: plain Hugging Face forwards, any
causal LM, any device. On CUDA the engine picks a faster implementation with
the same semantics (``collapse_tui.fast``) when the model supports it.

The semantics (DESIGN section 1): the model sees at most ``block`` tokens of
context; once the sequence is longer it sees only the last ``block`` tokens,
with positions restarting at 0 for that window.
"""

from __future__ import annotations

import contextlib
import inspect
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F

from collapse_tui.errors import RunInterrupted
from collapse_tui.sampling import sample_next

#: How often (in tokens) generation checks whether a stop was requested.
STOP_CHECK_EVERY = 16


class Inference(ABC):
    """Generation and evaluation of the current weights θ_i."""

    #: what ``prepare`` does, for the status line while loading; ``None`` when it does nothing
    preparing: str | None = None

    def __init__(self, block: int, temperature: float, top_k: int | None) -> None:
        self.block = block
        self.temperature = temperature
        self.top_k = top_k

    @abstractmethod
    def generate(
        self,
        prompt_ids: list[int],
        gen_tokens: int,
        generator: torch.Generator,
        should_stop: Callable[[], bool] = lambda: False,
    ) -> list[int]:
        """Return prompt + ``gen_tokens`` sampled tokens; raise ``RunInterrupted`` on a stop."""

    @abstractmethod
    def loss_sum(self, windows: torch.Tensor) -> tuple[float, int]:
        """Summed next-token cross-entropy over windows ``[n, L+1]``, and the number of targets."""

    def prepare(self, prompt_len: int, gen_tokens: int) -> None:  # noqa: B027 - optional hook
        """Build what generating samples of this size needs (compiled kernels, captured graphs) now.

        The engine calls it while loading, under a status line, so that the
        first iteration is not the one that waits for it. A no-op for eager
        forwards, which build nothing.
        """

    def weights_changed(self) -> None:  # noqa: B027 - optional hook, a no-op for eager forwards
        """Called after every optimizer step: implementations that keep copies refresh them here."""

    def mean_losses(self, sets: list[list[torch.Tensor]]) -> list[float]:
        """``mean_loss`` of each set; an implementation may evaluate them all in one batch."""
        return [self.mean_loss(windows) for windows in sets]

    def mean_loss(self, windows: list[torch.Tensor]) -> float:
        """Mean token cross-entropy over groups of equal-length windows."""
        total, count = 0.0, 0
        for group in windows:
            if group.numel():
                s, n = self.loss_sum(group)
                total, count = total + s, count + n
        return total / count if count else float("nan")


def full_context(total: int, block: int) -> bool:
    """Whether a sample of ``total`` tokens (prompt and new) never outgrows the block.

    The last token is never fed, so the longest context is ``total - 1``:
    then every position is the token's own, and a KV cache is exact
    (ordinary full-context decoding, DESIGN section 1).
    """
    return total - 1 <= block


def as_text_reads(tokenizer: Any, ids: list[int], start: int = 0) -> list[int]:
    """The sample as its text reads to the tokenizer: decoded, then tokenized again (``--train-on text``).

    Why: the paper's code saves the sample as text and trains (and measures
    its "train" loss) on that text encoded again, not on the ids it drew.
    The two differ where the model drew a token sequence the tokenizer would
    not make ("\n" then "\n" reads back as "\n\n"), and at an end-of-text
    token, which reads back as the literal string (the paper's
    ``encode_ordinary``): ``split_special_tokens``. A text that reads back
    as fewer than two tokens (nothing to predict) keeps the ids.

    ``start``: how many of the first ids stay ids: the special tokens the run
    started from (an empty ``--prompt`` starts from end-of-text), which the
    model did not draw. Read back as their seven characters, they would be
    scored and trained on as text the model never saw, and its first drawn
    token scored after them rather than after the token it was drawn after.
    """
    head, ids = list(ids[:start]), list(ids[start:])
    text = tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    again = tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    return head + (list(again) if len(head) + len(again) >= 2 else ids)


def sequence_windows(ids: list[int], block: int) -> list[torch.Tensor]:
    """Cut a sequence into consecutive windows of ``block`` inputs (+1 target each).

    The last window may be shorter; it is returned as a group of its own so
    every group stacks into one tensor.
    """
    seq = torch.tensor(ids, dtype=torch.long)
    full = (len(ids) - 1) // block
    groups = []
    if full:
        groups.append(seq[: full * block + 1].unfold(0, block + 1, block))
    rest = len(ids) - 1 - full * block
    if rest > 0:
        groups.append(seq[full * block :].unsqueeze(0))
    return groups


def autocast_context(
    device: torch.device, dtype: torch.dtype | None, cache_casts: bool = True
) -> contextlib.AbstractContextManager:
    """bf16 autocast (fp32 master weights) when asked for, else nothing.

    ``cache_casts=False`` for code captured in a CUDA graph, which must not
    keep autocast's cast copies of the weights from one capture to the next.
    """
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype, cache_enabled=cache_casts)


class EagerInference(Inference):
    """Plain forwards of a Hugging Face causal LM: the reference semantics, any device."""

    def __init__(
        self,
        model: torch.nn.Module,
        block: int,
        temperature: float,
        top_k: int | None,
        autocast_dtype: torch.dtype | None = None,
        eval_batch: int = 16,
    ) -> None:
        super().__init__(block, temperature, top_k)
        self.model = model
        self.device = next(model.parameters()).device
        self.autocast_dtype = autocast_dtype
        self.eval_batch = eval_batch
        forward_parameters = inspect.signature(model.forward).parameters
        self._keep_last_only = "logits_to_keep" in forward_parameters
        # transformers 5.24 renamed the KV-cache argument; older releases know only the old name.
        self._cache_argument = "cache" if "cache" in forward_parameters else "past_key_values"

    @torch.no_grad()
    def generate(
        self,
        prompt_ids: list[int],
        gen_tokens: int,
        generator: torch.Generator,
        should_stop: Callable[[], bool] = lambda: False,
    ) -> list[int]:
        prompt_len = len(prompt_ids)
        seq = torch.empty(prompt_len + gen_tokens, dtype=torch.long, device=self.device)
        seq[:prompt_len] = torch.tensor(prompt_ids, dtype=torch.long)
        keep_last = {"logits_to_keep": 1} if self._keep_last_only else {}
        cache = None
        with autocast_context(self.device, self.autocast_dtype):
            for t in range(prompt_len, prompt_len + gen_tokens):
                if (t - prompt_len) % STOP_CHECK_EVERY == 0 and should_stop():
                    raise RunInterrupted
                if t <= self.block:
                    # The whole sequence is the context, positions 0..t-1: extending a
                    # KV cache computes exactly what re-running the prefix would.
                    new = seq[:t] if cache is None else seq[t - 1 : t]
                    past = {self._cache_argument: cache}
                    out = self.model(new.unsqueeze(0), use_cache=True, **past, **keep_last)
                    cache = getattr(out, self._cache_argument, None)
                    if cache is None:  # custom model code whose output keeps the old name
                        cache = out.past_key_values
                else:
                    # The window slides and its positions restart at 0, so every
                    # hidden state changes: re-run the last `block` tokens.
                    cache = None
                    out = self.model(seq[t - self.block : t].unsqueeze(0), use_cache=False, **keep_last)
                seq[t] = sample_next(out.logits[:, -1], self.temperature, self.top_k, generator)[0]
        return seq.tolist()

    def _batches(self, windows: torch.Tensor) -> Iterator[torch.Tensor]:
        yield from windows.split(self.eval_batch)

    def window_logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits of a batch of evaluation windows ``[n, L]``, under ``loss_sum``'s autocast.

        (One autocast around all batches, so that it casts the weights once,
        not once a batch.)
        """
        return self.model(tokens, use_cache=False).logits

    @torch.no_grad()
    def loss_sum(self, windows: torch.Tensor) -> tuple[float, int]:
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        with autocast_context(self.device, self.autocast_dtype):
            for batch in self._batches(windows.to(self.device)):
                logits = self.window_logits(batch[:, :-1])
                total += F.cross_entropy(
                    logits.float().flatten(0, 1), batch[:, 1:].flatten(), reduction="sum"
                ).double()
        return float(total), windows.size(0) * (windows.size(1) - 1)
