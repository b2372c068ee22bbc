"""``to_hf_dataset``: a kdcache cache as a ``datasets.Dataset`` of decoded, native-typed rows.

The raw shards are loaded with ``datasets.load_dataset("parquet", ...)`` (after their sha256 is
checked against the manifest) and decoded lazily, batch by batch, by a ``with_transform``: nothing
decoded is ever materialized on disk, and the dataset pickles (DataLoader workers) like any other.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa

from kdcache.cache.format import CacheFormatError, TargetLayout
from kdcache.cache.rows import stage_rows
from kdcache.cache.shards import CacheError
from kdcache.interop.rows import decode_staged, decoded_schema, to_arrow, to_padded, verified_shard_files

log = logging.getLogger(__name__)


def to_hf_dataset(
    cache: str | Path,
    *,
    padded: bool = False,
    verify: Literal["size", "full"] = "full",
    hf_cache_dir: str | Path | None = None,
) -> Any:
    """A ``datasets.Dataset`` over a cache whose rows are decoded on access (``with_transform``).

    Rows (``kdcache.interop.rows``): ``seq_index``, ``input_ids`` list<int32>, and where the cache has
    them ``topk_ids`` list<list<int32>>, ``topk_logprobs`` list<list<float32>>, ``topk_log_tail``
    list<float32> (per position), ``sample_ids`` / ``sample_counts`` list<list<int32>> -- the values
    of ``kdcache.open_cache(cache)[i]`` without padding. With ``padded=True`` rows are numpy arrays of
    fixed shape instead, (T,), (T, top_k) and (T, samples), padded with id 0 / log-prob -inf / count 0,
    so ``torch.utils.data.DataLoader``'s default collate stacks them. ``verify``: ``"full"`` checks
    every shard's sha256 before loading, ``"size"`` only sizes. ``hf_cache_dir``: where ``datasets``
    keeps its Arrow copy of the raw shards (default: its own cache). The dataset's ``features`` describe
    the stored (raw) columns; ``decoded_features(...)`` gives the decoded ones.
    """
    import datasets

    manifest, files = verified_shard_files(cache, verify=verify)
    layout = manifest.layout
    raw = datasets.load_dataset(
        "parquet",
        data_files=[str(f) for f in files],
        split="train",
        cache_dir=None if hf_cache_dir is None else str(hf_cache_dir),
    )
    if raw.num_rows != manifest.num_rows or list(raw.column_names) != layout.columns():
        raise CacheError(
            f"{Path(cache) / 'manifest.json'}: datasets loaded {raw.num_rows} rows with columns {raw.column_names}, "
            f"the manifest says {manifest.num_rows} rows of {layout.columns()}; verify the cache (kdcache verify)"
        )
    spans = {"bytes": manifest.tokenizer["bytes"]} if "bytes" in manifest.tokenizer else {}
    return raw.with_transform(RowDecoder(layout.to_dict(), padded=padded, where=str(cache), tokenizer=spans))


def decoded_features(cache: str | Path) -> Any:
    """The ``datasets.Features`` of ``to_hf_dataset(cache)``'s decoded rows."""
    import datasets

    from kdcache.cache.format import Manifest

    return datasets.Features.from_arrow_schema(decoded_schema(Manifest.load(cache).layout))


class RowDecoder:
    """The transform: a batch of raw columns (lists of ``bytes``) -> decoded rows. Pickles as plain data."""

    def __init__(
        self, layout: dict[str, Any], *, padded: bool, where: str, tokenizer: dict[str, Any] | None = None
    ) -> None:
        self.layout_dict, self.padded, self.where, self.tokenizer = layout, padded, where, tokenizer or {}
        self.layout = TargetLayout.from_dict(layout, tokenizer=self.tokenizer)  # tokenizer.bytes: byte_lengths

    def __getstate__(self) -> dict[str, Any]:
        return {"layout": self.layout_dict, "padded": self.padded, "where": self.where, "tokenizer": self.tokenizer}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["layout"], padded=state["padded"], where=state["where"], tokenizer=state.get("tokenizer"))

    def __call__(self, batch: dict[str, list]) -> dict[str, Any]:
        layout = self.layout
        try:
            schema = layout.schema()
            table = pa.Table.from_arrays([pa.array(batch[f.name], f.type) for f in schema], schema=schema)
            rows = decode_staged(layout, stage_rows(layout, table, where=self.where))
        except (KeyError, pa.ArrowException, CacheFormatError) as e:
            raise CacheError(
                f"{self.where}: a row does not follow the cache format ({e}); run `kdcache verify {self.where}`"
            ) from e
        if self.padded:
            return {name: list(values) for name, values in to_padded(rows).items()}
        return to_arrow(rows).to_pydict()
