"""Train a byte-level BPE tokenizer (the demo teacher's) and load a teacher's tokenizer from disk.

Both return Hugging Face fast tokenizers, so ``save_pretrained`` / ``AutoTokenizer.from_pretrained``
round-trip offline and every later stage treats the demo tokenizer exactly like a real teacher's.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

log = logging.getLogger(__name__)

EOS_TOKEN = "<|endoftext|>"
"""Separates documents; also the BOS and UNK token (byte-level BPE never needs UNK)."""
PAD_TOKEN = "<|pad|>"
"""Padding only. Kept apart from EOS so that masking padding never hides a document boundary."""
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


class TokenizerError(ValueError):
    """A tokenizer directory is missing, incomplete or unusable for packing documents."""


def train_bpe_tokenizer(texts: Iterable[str], *, vocab_size: int) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer of at most ``vocab_size`` tokens (specials included).

    Deterministic for the same texts in the same order. A small corpus may stop short of
    ``vocab_size`` when it runs out of pairs to merge; ``len(tokenizer)`` is the real size.
    """
    specials = [EOS_TOKEN, PAD_TOKEN]
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + len(specials):
        raise TokenizerError(
            f"vocab_size={vocab_size} is smaller than the 256 byte tokens + "
            f"{len(specials)} special tokens; raise demo_teacher.vocab_size"
        )
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=alphabet, show_progress=False
    )
    backend.train_from_iterator(texts, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token=EOS_TOKEN, bos_token=EOS_TOKEN, unk_token=EOS_TOKEN, pad_token=PAD_TOKEN
    )
    log.info("trained byte-level BPE tokenizer: %d tokens (asked for %d)", len(tokenizer), vocab_size)
    return tokenizer


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    """Load the tokenizer saved in a local model directory (never the Hub).

    Raises ``TokenizerError`` naming the directory when it is missing, holds no tokenizer files,
    or the tokenizer has no EOS token (needed to separate packed documents).
    """
    root = Path(path)
    if not root.is_dir():
        raise TokenizerError(
            f"{root}: tokenizer directory not found — set teacher.path to a local "
            "Hugging Face model directory (or run the demo_teacher stage first)"
        )
    if not any((root / name).is_file() for name in TOKENIZER_FILES):
        raise TokenizerError(
            f"{root} has no tokenizer files ({'/'.join(TOKENIZER_FILES)}); "
            "point teacher.path at a Hugging Face model directory"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(root), local_files_only=True)
    except (OSError, ValueError) as e:
        raise TokenizerError(
            f"{root}: cannot load tokenizer ({e}) — is it a complete Hugging Face model directory?"
        ) from e
    if tokenizer.eos_token_id is None:
        raise TokenizerError(
            f"{root}: tokenizer has no EOS token, which prepare needs to separate documents; "
            "set eos_token in its tokenizer_config.json"
        )
    return tokenizer


def tokenizer_vocab_size(tokenizer: Any) -> int:
    """Size of the tokenizer's id space: ``len(tokenizer)``, or 1 + the largest id if ids have gaps."""
    return max(len(tokenizer), 1 + max(tokenizer.get_vocab().values(), default=-1))
