"""Another teacher's token data from the lead teacher's, row by row (several teachers of different tokenizers,
``kdcache.crossmulti``): each lead row's text -- its bytes and special tokens, through
:class:`kdcache.crosstok.Aligner` -- in the other teacher's tokens, so the two caches hold the same text
in the same rows and the same order, which two ``kdcache prepare`` runs (rows cut by token counts) would not.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kdcache.crosstok import Aligner, student_row_length
from kdcache.fingerprint import tokenizer_fingerprint
from kdcache.packing import packing_of, pad_id_for, valid_lengths
from kdcache.token_data import open_tokens, write_tokens
from kdcache.tokenizer import tokenizer_vocab_size

__all__ = ["retokenize_rows", "retokenize_split"]


def retokenize_rows(
    rows: np.ndarray, *, packing: dict[str, Any], aligner: Aligner, seq_len: int, pad_id: int
) -> tuple[np.ndarray, dict[str, int]]:
    """Lead rows (N, T) -> the other teacher's rows (N, ``seq_len``) int64: each row's real tokens' text in
    the other tokenizer (``aligner``: lead -> other), padded with ``pad_id``. Returns the rows and what
    was cut: ``tokens_cut`` (beyond ``seq_len``), ``lost_bytes`` (broken characters at row edges, cut tokens)."""
    lengths = valid_lengths(torch.from_numpy(np.asarray(rows, np.int64)), packing).tolist()  # (N,)
    aligned = aligner.align_rows(
        [np.asarray(r[:n], np.int64) for r, n in zip(rows, lengths, strict=True)], max_len=seq_len
    )
    out = np.full((len(aligned), seq_len), pad_id, np.int64)  # (N, seq_len)
    for b, a in enumerate(aligned):
        out[b, : len(a.student_ids)] = a.student_ids
    counts = {
        "tokens_cut": sum(a.student_tokens_cut for a in aligned),
        "lost_bytes": sum(a.lost_bytes for a in aligned),
    }
    return out, counts


def retokenize_split(
    tokens_dir: str | Path,
    *,
    lead_tokenizer: Any,
    tokenizer: Any,
    out_dir: str | Path,
    splits: Sequence[str] = ("train", "val"),
    seq_len: int = 0,
) -> dict[str, Any]:
    """Token data for another teacher: every split of the lead's token data in ``tokens_dir`` re-tokenized
    row by row by ``tokenizer`` (:func:`retokenize_rows`), written to ``out_dir`` (``documents`` packing
    with the tokenizer's pad id; ``retokenized_from`` names the lead's splits). ``seq_len`` 0: the longest
    of the first 256 train rows + 5% (``kdcache.crosstok.student_row_length``). Returns the manifest."""
    lead = {name: open_tokens(tokens_dir, name) for name in splits}
    made_by = next(iter(lead.values())).tokenizer_fingerprint
    if tokenizer_fingerprint(lead_tokenizer) != made_by:
        raise ValueError(
            f"{tokens_dir}: this token data was not made by the given lead tokenizer (fingerprint "
            f"{made_by[:12]}…, the lead tokenizer's {tokenizer_fingerprint(lead_tokenizer)[:12]}…); pass the "
            "tokenizer of the teacher whose cache the rows come from (the one `kdcache prepare` used)"
        )
    aligner = Aligner(lead_tokenizer, tokenizer)
    packing = packing_of(next(iter(lead.values())).manifest)
    if not seq_len:
        first = np.asarray(lead[splits[0]].ids[:256], np.int64)
        lengths = valid_lengths(torch.from_numpy(first), packing).tolist()
        seq_len = student_row_length(aligner, [r[:n] for r, n in zip(first, lengths, strict=True)])
    pad = pad_id_for(tokenizer)
    rows = {
        name: retokenize_rows(
            np.asarray(t.ids, np.int64), packing=packing, aligner=aligner, seq_len=seq_len, pad_id=pad
        )
        for name, t in lead.items()
    }
    meta = {
        "packing": {
            "mode": "documents",
            "eos_id": int(tokenizer.eos_token_id),
            "pad_id": pad,
            "prefix": [],
            "suffix": [],
        },
        "retokenized_from": {
            "path": str(tokens_dir),
            "tokenizer_fingerprint": made_by,
            "splits": {name: t.fingerprint for name, t in lead.items()},
            "cut": {name: counts for name, (_, counts) in rows.items()},
        },
    }
    return write_tokens(
        out_dir,
        {name: ids for name, (ids, _) in rows.items()},
        vocab_size=tokenizer_vocab_size(tokenizer),
        tokenizer_fingerprint=tokenizer_fingerprint(tokenizer),
        meta=meta,
    )
