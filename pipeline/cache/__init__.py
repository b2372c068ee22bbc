"""The cache: one job per module.

``targets`` (on-device sparsification, pure tensor code), ``codec`` (byte-level codes),
``format`` (schema, layout, manifest, version), ``build`` (``build_cache``: scoring loop, ranks,
resume, identity, naming), ``writer`` (shard I/O), ``staging`` (checked local copies),
``reader`` (``open_cache``) and ``verify`` (``verify_cache``).
"""
