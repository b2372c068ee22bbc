"""Interoperability: kdcache caches as plain native-typed rows, other tools' KD datasets, and back.

- ``rows``: a cache's targets decoded into Parquet-native list columns (one schema, used by all below).
- ``hf_view``: ``to_hf_dataset`` -- a lazily decoded ``datasets.Dataset`` over a cache's shards.
- ``export``: write a cache as Axolotl KD rows, NeMo-Aligner KD JSONL, or plain list columns.
- ``ingest``: turn an Axolotl or NeMo-Aligner KD dataset into a verified kdcache cache.
- ``commands``: the ``kdcache export`` / ``kdcache import`` subcommands.

Nothing here is imported by ``kdcache`` itself (``kdcache.to_hf_dataset`` resolves lazily), so the
stages' code dependencies stay exact and importing ``kdcache`` stays cheap.
"""

EXPORT_FORMATS = ("axolotl", "nemo", "lists")
"""``kdcache export --to`` choices (``export.export_cache``)."""
IMPORT_FORMATS = ("axolotl", "nemo")
"""``kdcache import --from`` choices (``ingest.import_cache``)."""
