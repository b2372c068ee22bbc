"""kdcache: offline teacher-logit caching and sparse knowledge distillation for causal LMs.

``kdcache.open_cache(path)`` is the public entry point for reading a cache, and
``kdcache.to_hf_dataset(path)`` its decoded ``datasets`` view (``kdcache.interop``); both are
resolved lazily (PEP 562) so that importing any submodule does not import the reader or
``datasets``, which keeps each DVC stage's code dependencies exact.
"""

from typing import Any

__version__ = "0.1.0"
__all__ = ["open_cache", "to_hf_dataset", "__version__"]


def __getattr__(name: str) -> Any:
    if name == "open_cache":
        from kdcache.cache.reader import open_cache

        return open_cache
    if name == "to_hf_dataset":
        from kdcache.interop.hf_view import to_hf_dataset

        return to_hf_dataset
    raise AttributeError(f"module 'kdcache' has no attribute {name!r}")
