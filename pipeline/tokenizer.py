"""Train a byte-level BPE tokenizer (the demo teacher's) and load a teacher's tokenizer from disk.

Both return Hugging Face fast tokenizers, so ``save_pretrained`` / ``AutoTokenizer.from_pretrained``
round-trip offline and every later stage treats the demo tokenizer exactly like a real teacher's.
"""

from __future__ import annotations

import functools
import json
import logging
import re
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


def load_tokenizer(
    path: str | Path, *, field: str | None = None, spells_bytes: bool = False
) -> PreTrainedTokenizerBase:
    """Load the tokenizer saved in a local model directory (never the Hub).

    Raises ``TokenizerError`` naming the directory when it is missing, holds no tokenizer files,
    or the tokenizer has no EOS token (needed to separate packed documents); with ``spells_bytes``,
    ``UnsupportedTokenizerError`` when its tokens do not spell the text's bytes (``token_bytes``).
    ``field``: the setting that named the directory (e.g. ``train.student_tokenizer``): every message
    then starts ``{field}={path}: `` and its fix names that setting; None: the teacher's (``teacher.path``).
    """
    root = Path(path)
    where = f"{root}: " if field is None else f"{field}={root}: "
    if not root.is_dir():
        raise TokenizerError(
            f"{where}tokenizer directory not found — set teacher.path to a local Hugging Face model directory "
            "(or run the demo_teacher stage first)"
            if field is None
            else f"{where}not a directory; save the tokenizer there with save_pretrained, or point {field} at "
            "a local model directory"
        )
    if not any((root / name).is_file() for name in TOKENIZER_FILES):
        raise TokenizerError(
            f"{root} has no tokenizer files ({'/'.join(TOKENIZER_FILES)}); point teacher.path at a Hugging "
            "Face model directory"
            if field is None
            else f"{where}no tokenizer files ({'/'.join(TOKENIZER_FILES)}); save the tokenizer there with "
            "save_pretrained"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(root), local_files_only=True)
    except (OSError, ValueError) as e:
        raise TokenizerError(
            f"{where}cannot load tokenizer ({e}) — is it a complete Hugging Face model directory?"
        ) from e
    if tokenizer.eos_token_id is None:
        raise TokenizerError(
            f"{where}tokenizer has no EOS token, which "
            + ("prepare needs to separate documents" if field is None else "stands for document boundaries")
            + "; set eos_token in its tokenizer_config.json"
        )
    if spells_bytes:
        try:
            token_bytes(tokenizer)
        except UnsupportedTokenizerError as e:
            raise UnsupportedTokenizerError(f"{where}{e}") from e
    return tokenizer


def tokenizer_vocab_size(tokenizer: Any) -> int:
    """Size of the tokenizer's id space: ``len(tokenizer)``, or 1 + the largest id if ids have gaps."""
    return max(len(tokenizer), 1 + max(tokenizer.get_vocab().values(), default=-1))


class UnsupportedTokenizerError(TokenizerError):
    """A tokenizer whose tokens do not spell out the text's bytes (word-level, WordPiece, char BPE)."""


_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def token_bytes(tokenizer: Any) -> list[bytes]:
    """The exact UTF-8 bytes each token id contributes to the text (index = id, ``tokenizer_vocab_size`` long).

    Special and control tokens (EOS, BOS, PAD, chat markers: every added token marked special, and
    ids no token holds) contribute ``b""``. Supported kinds:

    - byte-level BPE (GPT-2, Llama-3, Qwen): each character of a token maps back through the
      inverse of the ByteLevel byte-to-unicode alphabet, so a token may hold part of a UTF-8 character;
    - SentencePiece / Metaspace (Llama-2, Mistral, Gemma; BPE or Unigram): the replacement
      character (``▁``) is a space, and with ``byte_fallback`` a ``<0xNN>`` token is the one byte NN.

    For any text, ``b"".join(token_bytes[i] for i in ids)`` equals the *normalized* text's bytes
    (``text_normalization`` says which normalizer ran, ``"none"`` for most byte-level tokenizers),
    with one exception, the dummy prefix: a tokenizer for which ``prefix_space`` is true (Metaspace
    ``prepend_scheme: always|first``, a ``Prepend("▁")`` normalizer, ``ByteLevel(add_prefix_space)``)
    spells ``b" " + text`` — always for ``Prepend``, and for the others when the text does not
    already start with a space. Non-special added tokens spell their content.

    Raises ``UnsupportedTokenizerError`` naming the model, pre-tokenizer and decoder types for any
    other kind: word-level and WordPiece tokenizers drop whitespace, so their tokens cannot spell text.
    """
    spec = _backend_spec(tokenizer)
    kind = _spelling(spec)
    model = spec.get("model") or {}
    byte_fallback = bool(model.get("byte_fallback"))
    replacement = _replacement(spec)
    decode_char = {c: b for b, c in _byte_to_unicode().items()}
    added = {t["id"]: t for t in spec.get("added_tokens") or []}
    specials = set(getattr(tokenizer, "all_special_ids", None) or [])
    out = [b""] * tokenizer_vocab_size(tokenizer)
    for token, i in _full_vocab(tokenizer).items():
        fallback = _BYTE_FALLBACK.fullmatch(token) if byte_fallback else None
        if fallback:
            out[i] = bytes([int(fallback.group(1), 16)])
        elif i in specials or added.get(i, {}).get("special"):
            out[i] = b""
        elif i in added:
            out[i] = token.encode()
        elif kind == "byte_level":
            try:
                out[i] = bytes(decode_char[c] for c in token)
            except KeyError as e:
                raise UnsupportedTokenizerError(
                    f"token {token!r} (id {i}) has a character outside the ByteLevel alphabet: "
                    "is this really a byte-level BPE tokenizer?"
                ) from e
        else:
            out[i] = token.replace(replacement, " ").encode()
    return out


def prefix_space(tokenizer: Any) -> bool:
    """Whether encoding adds a dummy space before the text (SentencePiece ``add_dummy_prefix``).

    True for a Metaspace pre-tokenizer with ``prepend_scheme`` ``always``/``first`` (or the legacy
    ``add_prefix_space: true``), a ``Prepend`` normalizer, or ``ByteLevel(add_prefix_space=True)``.
    """
    spec = _backend_spec(tokenizer)
    for part in _parts(spec.get("pre_tokenizer")):
        legacy = "always" if part.get("add_prefix_space", True) else "never"
        if part.get("type") == "Metaspace" and part.get("prepend_scheme", legacy) != "never":
            return True
        if part.get("type") == "ByteLevel" and part.get("add_prefix_space"):
            return True
    return any(part.get("type") == "Prepend" for part in _parts(spec.get("normalizer")))


def text_normalization(tokenizer: Any) -> str:
    """A short description of the tokenizer's normalizer: ``"none"``, ``"NFC"``, ``"NFKC+lowercase"``...

    Recorded in cache manifests: the text a cache's token bytes spell is the normalized text.
    """
    parts = [_describe_normalizer(part) for part in _parts(_backend_spec(tokenizer).get("normalizer"))]
    return "+".join(parts) or "none"


def _describe_normalizer(part: dict) -> str:
    kind = part.get("type", "?")
    if kind in ("NFC", "NFD", "NFKC", "NFKD"):
        return kind
    if kind == "Replace":
        pattern = part.get("pattern") or {}
        return f"replace({next(iter(pattern.values()), '?')!r}->{part.get('content')!r})"
    if kind == "Prepend":
        return f"prepend({part.get('prepend')!r})"
    if kind == "BertNormalizer":
        return f"bert(lowercase={part.get('lowercase')}, strip_accents={part.get('strip_accents')})"
    if kind == "Precompiled":
        return "precompiled(sentencepiece charsmap)"
    return kind.lower()


def _backend_spec(tokenizer: Any) -> dict:
    backend = tokenizer if isinstance(tokenizer, Tokenizer) else getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise UnsupportedTokenizerError(
            f"{type(tokenizer).__name__} is a slow tokenizer: token bytes need a fast tokenizer "
            "(a tokenizer.json; AutoTokenizer.from_pretrained(..., use_fast=True))"
        )
    return json.loads(backend.to_str())


def _full_vocab(tokenizer: Any) -> dict[str, int]:
    if isinstance(tokenizer, Tokenizer):
        return tokenizer.get_vocab(with_added_tokens=True)
    return tokenizer.get_vocab()


def _parts(component: dict | None) -> list[dict]:
    """A normalizer / pre-tokenizer / decoder flattened through ``Sequence`` nesting."""
    if not component:
        return []
    if component.get("type") == "Sequence":
        inner = next((v for k, v in component.items() if k != "type" and isinstance(v, list)), [])
        return [p for c in inner for p in _parts(c)]
    return [component]


def _spelling(spec: dict) -> str:
    """``"byte_level"`` or ``"metaspace"``: how a token string spells bytes."""
    parts = {
        name: [p.get("type") for p in _parts(spec.get(name))] for name in ("normalizer", "pre_tokenizer", "decoder")
    }
    model = (spec.get("model") or {}).get("type")
    if "ByteLevel" in parts["pre_tokenizer"] or "ByteLevel" in parts["decoder"]:
        return "byte_level"
    metaspace = "Metaspace" in parts["pre_tokenizer"] or "Metaspace" in parts["decoder"]
    if model in ("BPE", "Unigram") and (metaspace or _replaces_space(spec.get("normalizer"))):
        return "metaspace"
    raise UnsupportedTokenizerError(
        f"token bytes need a byte-level BPE or SentencePiece/Metaspace tokenizer, not model={model}, "
        f"pre_tokenizer={parts['pre_tokenizer'] or None}, decoder={parts['decoder'] or None} "
        "(word-level and WordPiece tokens drop whitespace, so they cannot spell the text's bytes)"
    )


def _replacement(spec: dict) -> str:
    for part in _parts(spec.get("pre_tokenizer")) + _parts(spec.get("decoder")):
        if part.get("type") == "Metaspace":
            return part.get("replacement", "▁")
    return "▁"


def _replaces_space(normalizer: dict | None) -> bool:
    return any(
        p.get("type") == "Replace" and (p.get("pattern") or {}).get("String") == " " and p.get("content") == "▁"
        for p in _parts(normalizer)
    )


@functools.cache
def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's ByteLevel alphabet: printable bytes map to themselves, the rest to chr(256 + n)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table
