"""``verify_cache``: every problem in a cache, each naming its file (what ``kdcache verify`` runs)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from kdcache.cache.format import CacheFormatError, Manifest
from kdcache.cache.shards import check_shard_file, content_problems, decode_shard, read_shard


def verify_cache(path: str | Path, *, progress: bool = False) -> list[str]:
    """Every problem found in a cache, human-readable and naming its file; empty means OK.

    Checks the manifest, each shard's size, sha256, Parquet structure and blob sizes, row and token
    counts, that ``seq_index`` is increasing from the shard's ``first_seq`` and unique across shards,
    ids < vocab_size and strictly ascending within a position (gap coding wraps on corrupt gaps),
    lengths within [1, top_k] (adaptive) / [1, samples], and sample counts >= 1 summing to ``samples``.
    Top-k values need no check: every code and tail code decodes to a finite, normalized distribution.
    """
    root = Path(path)
    try:
        meta = Manifest.load(root)
    except CacheFormatError as e:
        return [str(e)]
    layout, problems, seen = meta.layout, [], []
    shards = meta.shards
    if progress:
        from tqdm.auto import tqdm

        shards = tqdm(shards, desc="verify", unit="shard")
    for info in shards:
        try:
            file = check_shard_file(root, info)
            staged = decode_shard(read_shard(file, info, layout), layout, where=str(file))
        except CacheFormatError as e:
            problems.append(str(e))
            continue
        problems += [f"{file}: {p}" for p in content_problems(staged, layout, info, meta.corpus.get("num_sequences"))]
        seen.append(staged.seq_index)
    if seen and len(np.unique(all_seq := np.concatenate(seen))) != len(all_seq):
        problems.append(f"{root / 'manifest.json'}: some seq_index values appear more than once")
    return problems
