"""Tiny models and text the tests build themselves: no network, no ../shared.

A byte-level BPE tokenizer trained in a second on generated English-like text,
and a randomly initialised GPT-2 of two layers, saved as an ordinary model
folder so every code path (``from_pretrained``, ``save_pretrained``) is real.
"""

from __future__ import annotations

import random
from pathlib import Path

WORDS = (
    "the of and to in is was for on as with by at from his her that it an were which are this be "
    "river city king army music film song game season team church school island village bridge "
    "north south east west early late first second new old great small long high red green"
).split()


def make_text(sentences: int, seed: int = 0) -> str:
    """Deterministic English-like text: sentences of random words, a paragraph every 8."""
    rng = random.Random(seed)
    lines = []
    for i in range(sentences):
        words = [rng.choice(WORDS) for _ in range(rng.randint(6, 16))]
        lines.append(" ".join(words).capitalize() + " .")
        if i % 8 == 7:
            lines.append("\n")
    return " ".join(lines).replace(" \n ", "\n")


def make_tokenizer(folder: Path, vocab_size: int = 300):
    """A GPT-2-style byte-level BPE tokenizer, saved in ``folder``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator([make_text(400, seed=1)], trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<|endoftext|>", eos_token="<|endoftext|>"
    )
    fast.save_pretrained(folder)
    return fast


def make_model_folder(folder: Path, n_layer: int = 2, n_embd: int = 32, n_positions: int = 128) -> Path:
    """Save a random tiny GPT-2 with its tokenizer into ``folder``; return it."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = make_tokenizer(folder)
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=n_positions,
        n_layer=n_layer,
        n_head=2,
        n_embd=n_embd,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    GPT2LMHeadModel(config).save_pretrained(folder)
    return folder
