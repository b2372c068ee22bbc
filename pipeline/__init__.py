"""kdcache: offline teacher-logit caching and sparse knowledge distillation for causal LMs."""

__version__ = "0.1.0"
