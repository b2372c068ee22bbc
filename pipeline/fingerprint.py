"""Content fingerprints (sha256) of files, arrays, tokenizers and model directories.

A fingerprint names *content*, never a path or a timestamp, so two teams that hold the same
teacher, tokenizer or token data compute the same strings.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import weakref
from pathlib import Path
from typing import Any

import numpy as np

_CHUNK = 1 << 20
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
MODEL_META_FILES = ("config.json", "generation_config.json")


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def sha256_json(obj: Any) -> str:
    """Hex sha256 of a canonical JSON rendering (sorted keys, no whitespace)."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def array_fingerprint(*arrays: np.ndarray) -> str:
    """Hex sha256 over dtype, shape and little-endian bytes of each array, in order."""
    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(f"{a.dtype.newbyteorder('<').str}{a.shape}".encode())
        h.update(a.astype(a.dtype.newbyteorder("<"), copy=False).tobytes())
    return h.hexdigest()


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """sha256 of a tokenizer's normalized vocabulary, merges and special tokens.

    Two tokenizers with the same ``vocab_size`` but different token strings get different
    fingerprints (checking the size alone is a known trap). Remembered per tokenizer object, size
    and special tokens (~2 s at a 262k vocabulary; a pipeline run asks about ten times).
    """
    try:
        known = _TOKENIZER_FINGERPRINTS.get(tokenizer)
    except TypeError:  # not weak-referenceable
        known = None
    shape = (len(tokenizer), tuple(getattr(tokenizer, "all_special_tokens", ())))
    if known is not None and known[0] == shape:
        return known[1]
    digest = _tokenizer_digest(tokenizer)
    with contextlib.suppress(TypeError):
        _TOKENIZER_FINGERPRINTS[tokenizer] = (shape, digest)
    return digest


_TOKENIZER_FINGERPRINTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _tokenizer_digest(tokenizer: Any) -> str:
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    merges: list[Any] = []
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        model = json.loads(backend.to_str()).get("model", {})
        merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    specials = sorted(str(t) for t in getattr(tokenizer, "all_special_tokens", []))
    return sha256_json({"vocab": vocab, "merges": merges, "special_tokens": specials})


def model_dir_fingerprint(path: str | Path) -> dict[str, Any]:
    """sha256 of a model directory's config and weight files, and one digest over all of them.

    Returns ``{"sha256": <digest>, "files": {name: sha256}}``. Raises ``FileNotFoundError``
    naming the directory when it holds no weight files.
    """
    root = Path(path)
    names = sorted(
        p.name
        for p in root.iterdir()
        if p.is_file() and (p.name in MODEL_META_FILES or p.name.endswith(WEIGHT_SUFFIXES))
    )
    if not any(n.endswith(WEIGHT_SUFFIXES) for n in names):
        raise FileNotFoundError(f"{root}: no weight files ({', '.join(WEIGHT_SUFFIXES)}) — is this a model directory?")
    files = {n: sha256_file(root / n) for n in names}
    return {"sha256": sha256_json(files), "files": files}
