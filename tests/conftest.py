"""Shared fixtures and builders for the test suite.

The suite runs on the CPU even on a GPU box (CUDA is hidden before torch is imported), so its
fp32 references hold everywhere. On a GPU box, ``KDCACHE_TEST_GPU=1 python -m pytest tests/test_gpu.py``
keeps CUDA visible for the GPU-only tests (bf16 tolerances); without a GPU they skip.

Builders (import them: ``from conftest import make_world``): tiny random-weight Llama teachers
saved as ordinary Hugging Face directories, word-level tokenizers whose ids are known, and
packed token data made with them.
"""

from __future__ import annotations

import os

if not os.environ.get("KDCACHE_TEST_GPU"):
    os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before torch is imported anywhere: the suite is CPU-only

from collections.abc import Iterator  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast  # noqa: E402

from kdcache.fingerprint import tokenizer_fingerprint  # noqa: E402
from kdcache.token_data import write_tokens  # noqa: E402

WORDS = [
    "def",
    "return",
    "self",
    "value",
    "import",
    "class",
    "for",
    "in",
    "range",
    "if",
    "else",
    "None",
    "print",
    "data",
    "items",
    "key",
    "lambda",
    "yield",
    "with",
    "open",
]
"""Python-ish words for tiny synthetic corpora."""


@pytest.fixture
def staging_one_thread(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A per-test staging directory and one torch thread (tiny models: faster and steady on a loaded machine).

    Use it module-wide: ``pytestmark = pytest.mark.usefixtures("staging_one_thread")``."""
    monkeypatch.setenv("KDCACHE_STAGING_DIR", str(tmp_path / "staging"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


STUDENT = {"hidden_size": 16, "num_layers": 1, "num_heads": 2, "intermediate_size": 32}
"""A tiny student (``train.student`` sizes) for tests that train."""


def word_tokenizer(vocab_size: int, *, prefix: str = "w") -> PreTrainedTokenizerFast:
    """Word-level tokenizer: ``<eos>`` = 0, ``<pad>`` = 1, then ``{prefix}2`` ... ``{prefix}{vocab_size - 1}``."""
    words = {"<eos>": 0, "<pad>": 1, **{f"{prefix}{i}": i for i in range(2, vocab_size)}}
    tok = Tokenizer(models.WordLevel(words, unk_token="<eos>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>", unk_token="<eos>")


def tiny_llama(vocab_size: int, *, max_positions: int = 64, seed: int = 0, **overrides) -> LlamaForCausalLM:
    """A 1-layer, 32-wide random Llama (seeded), the tests' stand-in for a teacher."""
    torch.manual_seed(seed)
    sizes = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    return LlamaForCausalLM(
        LlamaConfig(vocab_size=vocab_size, max_position_embeddings=max_positions, **{**sizes, **overrides})
    )


def make_world(root: Path, *, vocab_size: int = 48, n: int = 12, seq: int = 16, val: int = 2, seed: int = 0):
    """A teacher dir (tiny Llama + word-level tokenizer) and packed tokens made with it: ``n`` train and
    ``val`` val sequences of ``seq`` random word ids. Returns {"root", "teacher", "tokens"} paths."""
    teacher, tokens = root / "teacher", root / "tokens"
    tiny_llama(vocab_size, max_positions=seq, seed=seed).save_pretrained(teacher)
    tok = word_tokenizer(vocab_size)
    tok.save_pretrained(teacher)
    ids = np.random.default_rng(seed).integers(2, vocab_size, size=(n + val, seq))
    write_tokens(
        tokens,
        {"train": ids[:n], "val": ids[n:]},
        vocab_size=vocab_size,
        tokenizer_fingerprint=tokenizer_fingerprint(tok),
    )
    return {"root": root, "teacher": teacher, "tokens": tokens}


def bpe_tokenizer(lines: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on ``lines`` with one special token, ``<eos>``."""
    from tokenizers import decoders, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<eos>"],
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(lines, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


@pytest.fixture(scope="session")
def ddp_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A 2-rank DDP training run under torchrun and its cache (``test_distributed.ddp_world``), built once for
    tests/test_distributed.py and tests/test_fsdp.py: read only (copy it before changing it)."""
    from test_distributed import ddp_world

    return ddp_world(tmp_path_factory.mktemp("ddp-run"))
