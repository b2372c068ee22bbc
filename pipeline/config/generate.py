"""Section ``generate``: a teacher-written corpus (sequence-level KD) from a set of prompts."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from kdcache.config.base import check

OUTPUT_KIND = "generated"
"""The kind in the generate output's marker (``kdcache.outputs``); here so that the stage can claim its
output without importing torch when ``enabled`` is false."""


@dataclass(frozen=True)
class GenerateConfig:
    """The teacher writes continuations of prompts; the result is a corpus ``prepare`` reads (section ``generate``)."""

    enabled: bool = False
    """DVC switch: the generate stage writes a corpus only when true; otherwise it leaves an output directory
    holding nothing but a marker (prepare consumes the corpus only where corpus.paths points at it)."""
    prompts: tuple[str, ...] = ()
    """Prompt documents: files or globs read as corpus.paths reads them (a text file is one document, a
    jsonl/parquet row is one, column prompt_field). Empty: the running Python's standard library .py files."""
    prompt_field: str = "text"
    """Column holding the prompt text in jsonl/parquet prompt files."""
    prompt_tokens: int = 32
    """Each document's first N tokens (after the tokenizer's own leading special tokens) are its prompt;
    0 = the whole document is the prompt (for a file of real prompts)."""
    max_prompts: int = 0
    """Use at most this many prompts, taken in the order of the sha256 of their text (a deterministic sample
    spread over the corpus); 0 = all."""
    val_fraction: float = 0.05
    """Documents that prepare's split rule (content hash < val_fraction) puts in val are never prompts: keep it
    equal to corpus.val_fraction so that generated text never starts from a val document."""
    errors: Literal["strict", "replace"] = "strict"
    """Non-UTF-8 bytes in prompt files: ``strict`` fails naming the file, ``replace`` substitutes U+FFFD."""
    max_new_tokens: int = 224
    """Tokens the teacher writes per prompt at most (it stops earlier at EOS)."""
    temperature: float = 1.0
    """Sampling temperature (> 0): logits are divided by it before top_k / top_p."""
    top_k: int = 0
    """Sample among the k most likely tokens only; 0 = off."""
    top_p: float = 1.0
    """Nucleus sampling: the smallest set of tokens whose probability reaches top_p; 1.0 = off."""
    seed: int = 0
    """Every prompt draws its Gumbel noise from its own stream, seeded by (seed, the prompt's index): batch size
    and composition change no noise, only the logits' rounding, which flips < 1e-6 of the draws (demo teacher)."""
    batch_size: int = 64
    """Prompts per generate call; each finished batch is one part file (the unit of resume)."""
    threads: int = 0
    """CPU threads torch uses while generating (restored after); 0 = leave torch's setting (one per core).
    Decoding a small teacher is many tiny steps: on a CPU shared with other jobs use 1 (the demo teacher on 2
    busy cores: 150 new tokens/s with 1 thread, 15 with 2). Part of the plan: a resume must keep it."""
    kv_cache: Literal["static", "dynamic"] = "static"
    """Hugging Face KV cache of generate: ``static`` preallocates one buffer per batch (faster: no copy of the
    whole cache at every step); ``dynamic`` grows it, for models whose attention has no static cache."""

    def __post_init__(self) -> None:
        s = "generate"
        check(bool(self.prompt_field), s, "prompt_field", "must name a column")
        check(self.prompt_tokens >= 0, s, "prompt_tokens", "must be >= 0 (0 = the whole document)")
        check(self.max_prompts >= 0, s, "max_prompts", "must be >= 0 (0 = all)")
        check(0.0 < self.val_fraction < 1.0, s, "val_fraction", f"must be in (0, 1), got {self.val_fraction}")
        check(self.errors in ("strict", "replace"), s, "errors", f"must be 'strict' or 'replace', got {self.errors!r}")
        check(self.max_new_tokens > 0, s, "max_new_tokens", "must be > 0")
        check(self.temperature > 0, s, "temperature", f"must be > 0, got {self.temperature}")
        check(self.top_k >= 0, s, "top_k", "must be >= 0 (0 = off)")
        check(0.0 < self.top_p <= 1.0, s, "top_p", f"must be in (0, 1] (1 = off), got {self.top_p}")
        check(self.batch_size > 0, s, "batch_size", "must be > 0")
        check(self.threads >= 0, s, "threads", "must be >= 0 (0 = torch's default)")
        check(self.kv_cache in ("static", "dynamic"), s, "kv_cache", f"must be static|dynamic, got {self.kv_cache!r}")
