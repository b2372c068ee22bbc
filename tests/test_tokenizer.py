"""Byte-level BPE training, save/load round trips, tokenizer fingerprints and token bytes."""

from __future__ import annotations

import json
import random

import pytest
import sp_tokenizers
from conftest import WORDS, word_tokenizer
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from kdcache.fingerprint import tokenizer_fingerprint
from kdcache.tokenizer import (
    EOS_TOKEN,
    PAD_TOKEN,
    TokenizerError,
    UnsupportedTokenizerError,
    load_tokenizer,
    prefix_space,
    text_normalization,
    token_bytes,
    train_bpe_tokenizer,
)


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


ADVERSARIAL = [
    "héllo wörld",
    "  leading spaces, trailing   ",
    "tabs\t\tand\r\nnewlines\n\n\n    indented",
    "世界你好，こんにちは 안녕하세요",
    "emoji 🎉🎉 flags 🇫🇷 zwj 👩‍👩‍👧 e\u0301 combining",
    "nbsp\u00a0here ÿ \x00 ctrl \x7f",
    "def f(x):\r\n    return 'héllo ✓ 🎉'\t\n\n",
]
"""Multi-byte UTF-8 split across tokens, unseen characters (byte fallback), whitespace runs, controls."""


def sp_corpus() -> list[str]:
    return tiny_texts(seed=3, n=60) + ["héllo wörld the cat", "hello world  again"]


def spelled(tokenizer, text: str) -> bytes:
    table = token_bytes(tokenizer)
    return b"".join(table[i] for i in tokenizer(text, add_special_tokens=False)["input_ids"])


@pytest.mark.parametrize("text", ADVERSARIAL)
def test_token_bytes_spell_any_text_for_byte_level_bpe(tok, text):
    assert spelled(tok, text) == text.encode()


@pytest.mark.parametrize("text", ADVERSARIAL)
def test_token_bytes_spell_any_text_for_a_llama3_style_split_then_bytelevel_pretokenizer(text):
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(r"\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+|\s+"), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(
        tiny_texts() + ADVERSARIAL[:2],
        trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False),
    )
    assert spelled(PreTrainedTokenizerFast(tokenizer_object=backend), text) == text.encode()


@pytest.mark.parametrize("builder", [sp_tokenizers.metaspace_bpe, sp_tokenizers.metaspace_unigram])
@pytest.mark.parametrize("text", ADVERSARIAL)
def test_token_bytes_spell_text_with_the_dummy_prefix_for_metaspace_tokenizers(builder, text):
    sp = sp_cached(builder)
    assert prefix_space(sp)
    expected = text.encode() if text.startswith(" ") else b" " + text.encode()
    assert spelled(sp, text) == expected


@pytest.mark.parametrize("text", ADVERSARIAL)
def test_token_bytes_spell_text_with_an_unconditional_prefix_for_llama2_normalizers(text):
    sp = sp_cached(sp_tokenizers.llama2_bpe)
    assert prefix_space(sp)
    assert spelled(sp, text) == b" " + text.encode()


def test_metaspace_without_prepend_has_no_dummy_prefix():
    sp = sp_tokenizers.metaspace_bpe(sp_corpus(), 300, prepend_scheme="never")
    assert not prefix_space(sp)
    assert spelled(sp, "héllo 🎉") == "héllo 🎉".encode()


def test_byte_fallback_pieces_are_one_byte_and_unseen_characters_use_them():
    sp = sp_cached(sp_tokenizers.metaspace_bpe)
    table = token_bytes(sp)
    vocab = sp.get_vocab()
    assert all(table[vocab[f"<0x{b:02X}>"]] == bytes([b]) for b in range(256))
    ids = sp("🎉", add_special_tokens=False)["input_ids"]
    assert [table[i] for i in ids][-4:] == [bytes([b]) for b in "🎉".encode()]


def test_special_tokens_spell_nothing_and_added_tokens_spell_their_content(tok):
    added = train_bpe_tokenizer(tiny_texts(), vocab_size=320)
    added.add_tokens(["héllo wörld"])
    added.add_special_tokens({"additional_special_tokens": ["<|im_start|>"]})
    table = token_bytes(added)
    assert len(table) == len(added)
    assert table[added.eos_token_id] == table[added.pad_token_id] == b""
    assert table[added.convert_tokens_to_ids("<|im_start|>")] == b""
    assert table[added.convert_tokens_to_ids("héllo wörld")] == "héllo wörld".encode()
    assert spelled(added, "a héllo wörld 🎉") == "a héllo wörld 🎉".encode()
    sp = sp_cached(sp_tokenizers.metaspace_bpe)
    assert [token_bytes(sp)[sp.convert_tokens_to_ids(t)] for t in sp_tokenizers.SPECIALS] == [b"", b"", b""]


def test_token_bytes_refuse_word_level_and_wordpiece_naming_the_kind():
    with pytest.raises(UnsupportedTokenizerError, match=r"model=WordLevel, pre_tokenizer=\['WhitespaceSplit'\]"):
        token_bytes(word_tokenizer(10))
    backend = Tokenizer(models.WordPiece({"[UNK]": 0, "a": 1, "##b": 2}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.decoder = decoders.WordPiece()
    with pytest.raises(UnsupportedTokenizerError, match=r"model=WordPiece.*decoder=\['WordPiece'\].*drop whitespace"):
        token_bytes(PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]"))


def test_text_normalization_names_the_normalizer(tok):
    assert text_normalization(tok) == "none"
    assert text_normalization(sp_cached(sp_tokenizers.metaspace_bpe)) == "none"
    assert text_normalization(sp_cached(sp_tokenizers.llama2_bpe)) == "prepend('▁')+replace(' '->'▁')"
    backend = Tokenizer(models.BPE())
    backend.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    assert text_normalization(backend) == "NFKC+lowercase"


_SP: dict = {}


def sp_cached(builder):
    if builder not in _SP:
        _SP[builder] = builder(sp_corpus(), 300)
    return _SP[builder]


def test_byte_level_with_add_prefix_space_spells_the_dummy_space():
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(
        tiny_texts(),
        trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False),
    )
    tok = PreTrainedTokenizerFast(tokenizer_object=backend)
    assert prefix_space(tok)
    assert spelled(tok, "héllo 🎉") == " héllo 🎉".encode()
    assert spelled(tok, " already") == b" already"
