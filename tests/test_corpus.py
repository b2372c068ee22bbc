"""Corpus reading (txt/jsonl/parquet/default), splitting by content, packing and the prepare stage."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import WORDS

from kdcache.config.corpus import CorpusConfig
from kdcache.config.prepare import PrepareConfig
from kdcache.corpus import (
    prepare_tokens,
    read_documents,
    split_documents,
    tokenize_and_pack,
)
from kdcache.corpus_files import STDLIB_SKIP_DIRS, CorpusError, default_corpus_files
from kdcache.fingerprint import tokenizer_fingerprint
from kdcache.token_data import open_tokens, verify_tokens
from kdcache.tokenizer import train_bpe_tokenizer


def doc(seed: int, lines: int = 6) -> str:
    rng = random.Random(seed)
    return "\n".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 9))) for _ in range(lines)) + "\n"


def write_txt_corpus(root: Path, n: int = 30, lines: int = 6) -> list[Path]:
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        path = root / f"doc{i:03d}.txt"
        path.write_text(doc(i, lines), encoding="utf-8")
        paths.append(path)
    return paths


def cfg_for(*paths, **kw) -> CorpusConfig:
    return CorpusConfig(paths=tuple(str(p) for p in paths), **kw)


@pytest.fixture(scope="module")
def tok():
    return train_bpe_tokenizer([doc(i) for i in range(40)], vocab_size=320)


@pytest.fixture(scope="module")
def tok_dir(tok, tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    tok.save_pretrained(path)
    return path


# --- reading ------------------------------------------------------------------------------------


def test_text_files_give_one_document_per_file_with_source_and_empty_files_dropped(tmp_path):
    paths = write_txt_corpus(tmp_path, n=3)
    (tmp_path / "empty.txt").write_text("  \n")
    ds = read_documents(cfg_for(tmp_path / "*.txt"))
    assert ds["text"] == [p.read_text() for p in paths]
    assert ds["source"] == [str(p) for p in paths]


def test_jsonl_rows_are_documents_taken_from_text_field(tmp_path):
    path = tmp_path / "c.jsonl"
    rows = [{"content": "alpha beta", "id": 1}, {"content": "", "id": 2}, {"content": "gamma\ndelta", "id": 3}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    ds = read_documents(cfg_for(path, text_field="content"))
    assert ds["text"] == ["alpha beta", "gamma\ndelta"]
    assert ds["source"] == [str(path)] * 2


def test_parquet_rows_are_documents_taken_from_text_field(tmp_path):
    path = tmp_path / "c.parquet"
    pq.write_table(pa.table({"body": ["one two", "three", None], "n": [1, 2, 3]}), path)
    ds = read_documents(cfg_for(path, text_field="body"))
    assert ds["text"] == ["one two", "three"]


def test_mixed_files_are_read_in_sorted_path_order(tmp_path):
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "from jsonl"}) + "\n")
    (tmp_path / "a.txt").write_text("from a")
    (tmp_path / "c.txt").write_text("from c")
    pq.write_table(pa.table({"text": ["from parquet"]}), tmp_path / "d.parquet")
    ds = read_documents(cfg_for(tmp_path / "d.parquet", tmp_path / "*.txt", tmp_path / "b.jsonl"))
    assert ds["text"] == ["from a", "from jsonl", "from c", "from parquet"]


def test_recursive_glob_expands_sorted_and_max_documents_caps(tmp_path):
    write_txt_corpus(tmp_path / "x" / "y", n=4)
    write_txt_corpus(tmp_path / "a", n=2)
    ds = read_documents(cfg_for(f"{tmp_path}/**/*.txt"))
    assert [Path(s).relative_to(tmp_path).parts[0] for s in ds["source"]] == ["a"] * 2 + ["x"] * 4
    assert len(read_documents(cfg_for(f"{tmp_path}/**/*.txt", max_documents=3))) == 3


def test_default_corpus_is_the_sorted_stdlib_without_tests_or_third_party_code():
    files = default_corpus_files()
    assert len(files) > 100 and files == default_corpus_files()
    assert all(f.suffix == ".py" for f in files)
    assert not any(set(f.parts) & STDLIB_SKIP_DIRS for f in files)
    assert any(f.name == "argparse.py" for f in files)
    docs = read_documents(CorpusConfig(max_documents=5))
    assert len(docs) == 5 and docs["source"] == [str(f) for f in files if f.read_text(encoding="utf-8").strip()][:5]


# --- reading errors -------------------------------------------------------------------------------


def test_missing_path_is_named(tmp_path):
    with pytest.raises(CorpusError, match=r"corpus.paths: .*missing.txt not found"):
        read_documents(cfg_for(tmp_path / "missing.txt"))


def test_glob_without_matches_is_named(tmp_path):
    with pytest.raises(CorpusError, match=r"no files matched the glob .*\*\.md"):
        read_documents(cfg_for(tmp_path / "*.md"))


@pytest.mark.parametrize("suffix", ["jsonl", "parquet"])
def test_missing_text_field_names_the_key_columns_and_file(tmp_path, suffix):
    path = tmp_path / f"c.{suffix}"
    if suffix == "jsonl":
        path.write_text(json.dumps({"body": "x"}) + "\n")
    else:
        pq.write_table(pa.table({"body": ["x"]}), path)
    with pytest.raises(CorpusError, match=rf"corpus.text_field='text' not in columns \['body'\] of .*c\.{suffix}"):
        read_documents(cfg_for(path))


def test_malformed_jsonl_is_named(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"text": "a"}\n{"text": oops\n')
    with pytest.raises(CorpusError, match=r"broken\.jsonl: cannot read as json"):
        read_documents(cfg_for(path))


def test_non_utf8_text_file_fails_under_strict_naming_file_and_byte(tmp_path):
    write_txt_corpus(tmp_path, n=2)
    (tmp_path / "bad.txt").write_bytes("ok é ".encode() + b"\xff rest")
    with pytest.raises(
        CorpusError, match=r"bad\.txt: not UTF-8 at byte 6 — fix the file or set corpus.errors: replace"
    ):
        read_documents(cfg_for(tmp_path / "*.txt"))


def test_non_utf8_jsonl_fails_under_strict_naming_file_and_byte(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(CorpusError, match=r"bad\.jsonl: not UTF-8 at byte 30"):
        read_documents(cfg_for(path))


def test_errors_replace_substitutes_the_replacement_character(tmp_path):
    (tmp_path / "bad.txt").write_bytes(b"abc\xffdef")
    (tmp_path / "bad.jsonl").write_bytes(b'{"text": "caf\xe9"}\n')
    ds = read_documents(cfg_for(tmp_path / "bad.txt", tmp_path / "bad.jsonl", errors="replace"))
    assert ds["text"] == ["caf\ufffd", "abc\ufffddef"]


def test_all_empty_documents_is_an_error(tmp_path):
    (tmp_path / "a.txt").write_text("")
    (tmp_path / "b.txt").write_text("\n\n")
    (tmp_path / "c.jsonl").write_text("")
    with pytest.raises(CorpusError, match=r"all 3 files are empty"):
        read_documents(cfg_for(tmp_path / "*.txt", tmp_path / "c.jsonl"))


def test_file_names_with_glob_characters_are_read_literally(tmp_path):
    (tmp_path / "notes[1].txt").write_text("bracketed")
    (tmp_path / "star*.txt").write_text("starred")
    ds = read_documents(cfg_for(tmp_path / "*.txt"))
    assert sorted(ds["text"]) == ["bracketed", "starred"]


# --- splitting ----------------------------------------------------------------------------------


def test_split_depends_on_content_not_position(tmp_path):
    write_txt_corpus(tmp_path, n=40)
    ds = read_documents(cfg_for(tmp_path / "*.txt"))
    first = split_documents(ds, val_fraction=0.2)
    again = split_documents(ds, val_fraction=0.2)
    reordered = split_documents(ds.select(list(reversed(range(len(ds))))), val_fraction=0.2)
    assert first["val"]["text"] == again["val"]["text"]
    assert sorted(first["val"]["text"]) == sorted(reordered["val"]["text"])
    assert len(first["train"]) + len(first["val"]) == 40 and 0 < len(first["val"]) < 40
    assert not set(first["train"]["text"]) & set(first["val"]["text"])


def test_adding_documents_moves_no_existing_document_between_splits(tmp_path):
    write_txt_corpus(tmp_path, n=40)
    small = split_documents(read_documents(cfg_for(tmp_path / "*.txt", max_documents=20)), val_fraction=0.3)
    large = split_documents(read_documents(cfg_for(tmp_path / "*.txt")), val_fraction=0.3)
    assert set(small["val"]["text"]) <= set(large["val"]["text"])
    assert set(small["train"]["text"]) <= set(large["train"]["text"])


def test_both_splits_are_non_empty_even_at_extreme_fractions(tmp_path):
    write_txt_corpus(tmp_path, n=5)
    ds = read_documents(cfg_for(tmp_path / "*.txt"))
    assert len(split_documents(ds, val_fraction=1e-9)["val"]) == 1
    assert len(split_documents(ds, val_fraction=1 - 1e-9)["train"]) == 1


def test_a_single_document_cannot_be_split(tmp_path):
    write_txt_corpus(tmp_path, n=1)
    with pytest.raises(CorpusError, match="at least 2"):
        split_documents(read_documents(cfg_for(tmp_path / "*.txt")), val_fraction=0.5)


# --- packing ------------------------------------------------------------------------------------


def test_packing_appends_eos_after_every_document_and_drops_the_remainder(tmp_path, tok):
    write_txt_corpus(tmp_path, n=12)
    ds = read_documents(cfg_for(tmp_path / "*.txt"))
    stream = [t for text in ds["text"] for t in (*tok(text, add_special_tokens=False)["input_ids"], tok.eos_token_id)]
    ids = tokenize_and_pack(ds, tok, seq_len=16, packing="stream")
    assert ids.dtype == np.int32 and ids.shape == (len(stream) // 16, 16)
    assert ids.reshape(-1).tolist() == stream[: ids.size]
    assert tokenize_and_pack(ds, tok, seq_len=16, packing="stream", max_sequences=3).tolist() == ids[:3].tolist()


def test_packing_streams_in_batches_with_the_same_result(tmp_path, tok, monkeypatch):
    write_txt_corpus(tmp_path, n=12)
    ds = read_documents(cfg_for(tmp_path / "*.txt"))
    whole = tokenize_and_pack(ds, tok, seq_len=16, packing="stream")
    monkeypatch.setattr("kdcache.corpus._TOKENIZE_CHARS", 50)
    assert np.array_equal(tokenize_and_pack(ds, tok, seq_len=16, packing="stream"), whole)


def test_one_huge_document_is_tokenized_in_bounded_pieces_with_the_whole_documents_ids(tmp_path, tok, monkeypatch):
    text = "".join(doc(i, lines=40) + ("    indented\n\n" if i % 3 else "") for i in range(60))  # ~78k chars, one file
    text += "x" * 2500 + "\n"  # and one line longer than a piece
    (tmp_path / "huge.txt").write_text(text)
    (tmp_path / "small.txt").write_text(doc(99))
    ds = read_documents(cfg_for(tmp_path / "*.txt"))
    monkeypatch.setattr("kdcache.corpus._TOKENIZE_CHARS", 1000)
    calls: list[list[str]] = []

    class Recording:  # the real tokenizer, recording what each call is given
        eos_token_id = tok.eos_token_id

        def __call__(self, texts, **kwargs):
            calls.append(list(texts))
            return tok(texts, **kwargs)

    ids = tokenize_and_pack(ds, Recording(), seq_len=16, packing="stream")
    assert max(len(t) for batch in calls for t in batch) <= 1000  # pieces, and so calls, stay small
    assert max(sum(map(len, batch)) for batch in calls) < 2000
    whole = [t for d in ds["text"] for t in (*tok(d, add_special_tokens=False)["input_ids"], tok.eos_token_id)]
    assert ids.reshape(-1).tolist() == whole[: ids.size]  # EOS after each document only, same ids as in one call


def test_corpus_smaller_than_one_sequence_is_an_error_unless_allowed(tmp_path, tok):
    (tmp_path / "a.txt").write_text("def f")
    ds = read_documents(cfg_for(tmp_path / "a.txt"))
    with pytest.raises(
        CorpusError, match=r"corpus yields \d+ tokens, fewer than prepare.seq_len=512; add text or lower seq_len"
    ):
        tokenize_and_pack(ds, tok, seq_len=512, packing="stream")
    assert tokenize_and_pack(ds, tok, seq_len=512, packing="stream", allow_empty=True).shape == (0, 512)


# --- prepare ------------------------------------------------------------------------------------


def test_prepare_tokens_writes_train_and_val_token_data(tmp_path, tok, tok_dir):
    write_txt_corpus(tmp_path / "c", n=30, lines=20)
    corpus_cfg = cfg_for(tmp_path / "c" / "*.txt", val_fraction=0.3)
    manifest = prepare_tokens(
        corpus_cfg,
        PrepareConfig(seq_len=32, max_train_sequences=20),
        tokenizer_dir=tok_dir,
        out_dir=tmp_path / "tokens",
    )
    train, val = open_tokens(tmp_path / "tokens", "train"), open_tokens(tmp_path / "tokens", "val")
    verify_tokens(train)
    assert train.ids.shape == (20, 32) and len(val) > 0
    assert train.vocab_size == len(tok) and train.tokenizer_fingerprint == tokenizer_fingerprint(tok)
    docs = manifest["corpus"]["num_documents"]
    assert docs["train"] + docs["val"] == 30 and manifest["tokenizer_dir"] == str(tok_dir)
    assert manifest["corpus"]["config"]["val_fraction"] == 0.3 and manifest["prepare"]["seq_len"] == 32
    assert manifest["packing"] == {"mode": "documents", "eos_id": tok.eos_token_id, "prefix": [], "suffix": []} | {
        "pad_id": tok.pad_token_id
    }
    splits = split_documents(read_documents(corpus_cfg), val_fraction=0.3)
    assert val.ids.tolist() == tokenize_and_pack(splits["val"], tok, seq_len=32, packing="documents").tolist()


def test_prepare_fails_when_val_has_no_full_sequence(tmp_path, tok_dir):
    write_txt_corpus(tmp_path / "c", n=20)
    with pytest.raises(CorpusError, match=r"val split .* has no full sequence.*raise corpus.val_fraction"):
        prepare_tokens(
            cfg_for(tmp_path / "c" / "*.txt", val_fraction=1e-6),
            PrepareConfig(seq_len=128, packing="stream"),
            tokenizer_dir=tok_dir,
            out_dir=tmp_path / "tokens",
        )
    assert not (tmp_path / "tokens" / "manifest.json").exists()


# --- special tokens and document packing ----------------------------------------------------------


def word_tokenizer(*, bos: bool = True, pad: bool = True, eos_suffix: bool = False):
    """A word-level tokenizer over WORDS; Llama-3-style BOS template, optional pad and EOS-appending template."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<bos>", "<eos>", "<pad>"]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(specials + WORDS)}, unk_token="<eos>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    template = ("<bos> " if bos else "") + "$A" + (" <eos>" if eos_suffix else "")
    backend.post_processor = processors.TemplateProcessing(single=template, special_tokens=[("<bos>", 0), ("<eos>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>" if pad else None
    )


def _documents(ds, tok) -> list[list[int]]:
    return [tok(text)["input_ids"] + ([] if tok(text)["input_ids"][-1] == 1 else [1]) for text in ds["text"]]


@pytest.mark.parametrize("packing", ["documents", "stream"])
def test_every_document_starts_with_the_tokenizers_bos(tmp_path, packing):
    write_txt_corpus(tmp_path, n=12, lines=4)
    ds = read_documents(cfg_for(tmp_path / "*.txt"))
    tok = word_tokenizer()
    ids = tokenize_and_pack(ds, tok, seq_len=16, packing=packing)
    docs = _documents(ds, tok)
    assert all(d[0] == 0 and d.count(0) == 1 for d in docs)
    if packing == "stream":
        stream = [t for d in docs for t in d]
        assert ids.reshape(-1).tolist() == stream[: ids.size] and (ids == 0).sum() >= len(docs) - 1
    else:
        assert (ids == 0).sum() == len(docs)  # one BOS per document, each at the start of a row
        assert set(np.flatnonzero(ids == 0) % 16) == {0}


def test_document_packing_starts_rows_at_documents_and_pads_their_last_row(tmp_path):
    from kdcache.packing import target_mask, token_mask, valid_lengths

    write_txt_corpus(tmp_path, n=9, lines=5)
    ds = read_documents(cfg_for(tmp_path / "*.txt"))
    tok = word_tokenizer()
    ids = tokenize_and_pack(ds, tok, seq_len=16, packing="documents")
    record = {"mode": "documents", "pad_id": 2, "eos_id": 1}
    mask = token_mask(torch.from_numpy(ids), record).numpy()
    expected = []
    for d in _documents(ds, tok):
        rows = [d[i : i + 16] for i in range(0, len(d), 16)]
        expected += [r + [2] * (16 - len(r)) for r in rows if len(r) >= 2]
    assert ids.tolist() == expected
    assert [row[m].tolist() for row, m in zip(ids, mask, strict=True)] == [[t for t in r if t != 2] for r in expected]
    assert all(row[m][-1] == 1 or m.all() for row, m in zip(ids, mask, strict=True))  # a partial row ends with EOS
    assert (valid_lengths(torch.from_numpy(ids), {"mode": "stream"}) == 16).all()
    assert target_mask(torch.from_numpy(ids), record).shape == (len(ids), 15)
    assert tokenize_and_pack(ds, tok, seq_len=16, packing="documents", max_sequences=3).tolist() == expected[:3]


def test_padding_with_eos_keeps_the_documents_own_eos(tmp_path):
    from kdcache.packing import pad_id_for, token_mask

    write_txt_corpus(tmp_path, n=6, lines=3)
    ds = read_documents(cfg_for(tmp_path / "*.txt"))
    tok = word_tokenizer(pad=False)
    assert pad_id_for(tok) == tok.eos_token_id == 1
    ids = tokenize_and_pack(ds, tok, seq_len=16, packing="documents")
    mask = token_mask(torch.from_numpy(ids), {"mode": "documents", "pad_id": 1, "eos_id": 1}).numpy()
    real = [row[m].tolist() for row, m in zip(ids, mask, strict=True)]
    kept = [d[i : i + 16] for d in _documents(ds, tok) for i in range(0, len(d), 16) if len(d) - i >= 2]
    assert real == kept  # every document's EOS kept (unless alone in a last row), no padding
    assert sum(r[-1] == 1 for r in real) >= len(ds) - 1


def test_a_tokenizer_that_appends_eos_gets_no_second_eos(tmp_path):
    write_txt_corpus(tmp_path, n=4)
    ds = read_documents(cfg_for(tmp_path / "*.txt"))
    tok = word_tokenizer(eos_suffix=True)
    ids = tokenize_and_pack(ds, tok, seq_len=8, packing="stream")
    assert ids.reshape(-1).tolist() == [t for text in ds["text"] for t in tok(text)["input_ids"]][: ids.size]


def test_long_documents_cut_into_pieces_get_bos_once(tmp_path, monkeypatch):
    (tmp_path / "long.txt").write_text("".join(doc(i, lines=30) for i in range(20)))
    (tmp_path / "short.txt").write_text(doc(7))
    ds = read_documents(cfg_for(tmp_path / "*.txt"))
    tok = word_tokenizer()
    whole = tokenize_and_pack(ds, tok, seq_len=16, packing="documents")
    monkeypatch.setattr("kdcache.corpus._TOKENIZE_CHARS", 300)
    assert np.array_equal(tokenize_and_pack(ds, tok, seq_len=16, packing="documents"), whole)
    assert (whole == 0).sum() == 2


def test_unknown_packing_is_refused():
    from kdcache.config.base import ConfigError, load_section
    from kdcache.packing import PackingError, row_packer

    with pytest.raises(ConfigError, match=r"prepare.packing: must be one of documents\|stream"):
        load_section(PrepareConfig, {"packing": "rows"}, section="prepare")
    with pytest.raises(PackingError, match="prepare.packing must be one of"):
        row_packer("rows", seq_len=4, pad_id=0)


def test_a_gemma_tokenizer_that_adds_no_bos_is_refused_before_anything_is_written(tmp_path):
    from kdcache.packing import PackingError

    write_txt_corpus(tmp_path / "c", n=6)
    model_dir = tmp_path / "gemma"
    word_tokenizer(bos=False).save_pretrained(model_dir)
    (model_dir / "config.json").write_text(json.dumps({"model_type": "gemma2"}))
    with pytest.raises(PackingError, match=r"config.json: model_type 'gemma2' needs BOS .* adds none"):
        prepare_tokens(
            cfg_for(tmp_path / "c" / "*.txt"),
            PrepareConfig(seq_len=16),
            tokenizer_dir=model_dir,
            out_dir=tmp_path / "t",
        )
    assert not (tmp_path / "t").exists()
    word_tokenizer(bos=True).save_pretrained(model_dir)
    manifest = prepare_tokens(
        cfg_for(tmp_path / "c" / "*.txt"), PrepareConfig(seq_len=16), tokenizer_dir=model_dir, out_dir=tmp_path / "t"
    )
    assert manifest["packing"]["prefix"] == [0]


def test_a_glob_through_a_symlink_loop_reads_each_file_once(tmp_path, caplog):
    from kdcache.corpus_files import expand_paths

    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.txt").write_text("alpha\n")
    (tmp_path / "docs" / "loop").symlink_to(tmp_path / "docs")  # docs/loop/loop/... is docs again
    (tmp_path / "docs" / "b.txt").symlink_to(tmp_path / "docs" / "a.txt")  # the same file under another name
    with caplog.at_level("WARNING"):
        files = expand_paths([str(tmp_path / "docs" / "**" / "*.txt")])
    assert files == [tmp_path / "docs" / "a.txt"]
    assert "is the same file as" in caplog.text


def test_a_huge_document_that_hashes_into_val_is_named_in_a_warning(caplog):
    import datasets

    from kdcache.corpus import _warn_if_lopsided

    ds = datasets.Dataset.from_dict({"text": ["x" * 10_000, "short one", "short two"], "source": ["big.txt", "a", "b"]})
    with caplog.at_level("WARNING"):
        _warn_if_lopsided(ds, np.array([True, False, False]), val_fraction=0.05)
    assert "val split holds 99.8% of the text" in caplog.text and "big.txt alone is 99.8%" in caplog.text
    caplog.clear()
    even = datasets.Dataset.from_dict({"text": ["same size"] * 20, "source": [f"d{i}" for i in range(20)]})
    with caplog.at_level("WARNING"):
        _warn_if_lopsided(even, np.arange(20) == 3, val_fraction=0.05)
    assert caplog.text == ""  # 5% of the text in val, as asked: nothing to say
