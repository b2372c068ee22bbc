"""Byte-level BPE training, save/load round trips and tokenizer fingerprints."""

from __future__ import annotations

import json
import random

import pytest
from conftest import WORDS
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from kdcache.fingerprint import tokenizer_fingerprint
from kdcache.tokenizer import EOS_TOKEN, PAD_TOKEN, TokenizerError, load_tokenizer, train_bpe_tokenizer


def tiny_texts(seed: int = 0, n: int = 40) -> list[str]:
    rng = random.Random(seed)
    return [
        "\n".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 9))) for _ in range(rng.randint(2, 8)))
        for _ in range(n)
    ]


@pytest.fixture(scope="module")
def tok() -> PreTrainedTokenizerFast:
    return train_bpe_tokenizer(tiny_texts(), vocab_size=320)


def test_trained_tokenizer_has_eos_and_a_separate_pad(tok):
    assert tok.eos_token == EOS_TOKEN and tok.pad_token == PAD_TOKEN
    assert tok.eos_token_id != tok.pad_token_id
    assert tok.bos_token_id == tok.eos_token_id
    assert 258 < len(tok) <= 320


def test_byte_level_round_trip_preserves_any_text(tok):
    text = "def f(x):\r\n    return 'héllo ✓ 🎉'\t\n\n"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text


def test_save_pretrained_round_trips_offline_through_autotokenizer(tok, tmp_path):
    tok.save_pretrained(tmp_path)
    loaded = load_tokenizer(tmp_path)
    auto = AutoTokenizer.from_pretrained(str(tmp_path), local_files_only=True)
    text = tiny_texts(seed=5, n=1)[0]
    expected = tok(text, add_special_tokens=False)["input_ids"]
    assert loaded(text, add_special_tokens=False)["input_ids"] == expected
    assert auto(text, add_special_tokens=False)["input_ids"] == expected
    assert loaded.eos_token_id == tok.eos_token_id and loaded.pad_token_id == tok.pad_token_id
    assert tokenizer_fingerprint(loaded) == tokenizer_fingerprint(tok) == tokenizer_fingerprint(auto)


def test_training_is_deterministic_for_the_same_texts(tok):
    again = train_bpe_tokenizer(tiny_texts(), vocab_size=320)
    assert again.get_vocab() == tok.get_vocab()
    assert tokenizer_fingerprint(again) == tokenizer_fingerprint(tok)


def test_same_vocab_size_different_corpus_gives_a_different_fingerprint(tok):
    other = train_bpe_tokenizer([t.upper() for t in tiny_texts()], vocab_size=320)
    assert len(other) == len(tok)
    assert tokenizer_fingerprint(other) != tokenizer_fingerprint(tok)


def test_vocab_smaller_than_the_byte_alphabet_is_refused():
    with pytest.raises(TokenizerError, match="vocab_size=100"):
        train_bpe_tokenizer(["abc"], vocab_size=100)


def test_load_tokenizer_names_a_missing_directory(tmp_path):
    with pytest.raises(TokenizerError, match=r"nope: tokenizer directory not found"):
        load_tokenizer(tmp_path / "nope")


def test_load_tokenizer_names_a_directory_without_tokenizer_files(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(TokenizerError, match=r"has no tokenizer files .*point teacher.path at a Hugging Face model"):
        load_tokenizer(tmp_path)


def test_load_tokenizer_refuses_a_tokenizer_without_eos(tmp_path):
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.train_from_iterator(
        tiny_texts(),
        trainer=trainers.BpeTrainer(
            vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
        ),
    )
    PreTrainedTokenizerFast(tokenizer_object=backend).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config.get("eos_token") is None
    with pytest.raises(TokenizerError, match=r"no EOS token"):
        load_tokenizer(tmp_path)
