"""kdcache: offline teacher-logit caching and sparse knowledge distillation for causal LMs.

``kdcache.open_cache(path)`` is the public entry point for reading a cache; it is resolved
lazily (PEP 562) so that importing any submodule does not import the reader, which keeps each
DVC stage's code dependencies exact.
"""

from typing import Any

__version__ = "0.1.0"
__all__ = ["open_cache", "__version__"]


def __getattr__(name: str) -> Any:
    if name == "open_cache":
        from kdcache.cache.reader import open_cache

        return open_cache
    raise AttributeError(f"module 'kdcache' has no attribute {name!r}")
