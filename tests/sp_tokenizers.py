"""SentencePiece-style tokenizers built locally with the ``tokenizers`` library (no Hub, no sentencepiece).

Byte-fallback pieces ``<0x00>`` ... ``<0xFF>`` are ordinary vocabulary entries, as in Llama-2 / Mistral /
Gemma ``tokenizer.json`` files, not added tokens.
"""

from __future__ import annotations

import json

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

SPECIALS = ["<unk>", "<s>", "</s>"]
BYTE_PIECES = [f"<0x{b:02X}>" for b in range(256)]


def _wrap(backend: Tokenizer) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def _with_byte_pieces(backend: Tokenizer) -> Tokenizer:
    """The trained model plus the 256 byte pieces as regular vocabulary, ``byte_fallback`` on."""
    spec = json.loads(backend.to_str())
    model = spec["model"]
    if model["type"] == "BPE":
        for piece in BYTE_PIECES:
            model["vocab"].setdefault(piece, len(model["vocab"]))
    else:
        known = {p for p, _ in model["vocab"]}
        model["vocab"] += [[p, -100.0] for p in BYTE_PIECES if p not in known]
    model["byte_fallback"] = True
    return Tokenizer.from_str(json.dumps(spec))


def metaspace_bpe(lines: list[str], vocab_size: int, *, prepend_scheme: str = "always") -> PreTrainedTokenizerFast:
    """Mistral-style: Metaspace pre-tokenizer (``▁`` for spaces, dummy prefix) + byte-fallback BPE."""
    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme=prepend_scheme)
    backend.decoder = decoders.Metaspace(prepend_scheme=prepend_scheme)
    backend.train_from_iterator(
        lines, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False)
    )
    return _wrap(_with_byte_pieces(backend))


def llama2_bpe(lines: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Llama-2-style: ``Prepend("▁")`` + ``Replace(" ", "▁")`` normalizer, no pre-tokenizer, byte-fallback BPE."""
    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    backend.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    backend.train_from_iterator(
        lines, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False)
    )
    return _wrap(_with_byte_pieces(backend))


def metaspace_unigram(lines: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """T5/Gemma-style: Metaspace pre-tokenizer + byte-fallback Unigram."""
    backend = Tokenizer(models.Unigram())
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Metaspace()
    backend.train_from_iterator(
        lines,
        trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, unk_token="<unk>", show_progress=False),
    )
    return _wrap(_with_byte_pieces(backend))
