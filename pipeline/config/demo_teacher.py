"""Section ``demo_teacher``: the small teacher trained locally when no real teacher is available."""

from __future__ import annotations

from dataclasses import dataclass

from kdcache.config.base import check


@dataclass(frozen=True)
class DemoTeacherConfig:
    """The small teacher trained locally when no real teacher is available (section ``demo_teacher``)."""

    vocab_size: int = 4096
    """Byte-level BPE vocabulary size of the demo tokenizer."""
    seq_len: int = 256
    """Training sequence length."""
    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 768
    batch_size: int = 8
    """Sequences per step. 8 beat 16 at equal tokens (val CE 6.08 vs 6.44 after 393k tokens): with a
    CPU budget of ~1M tokens, more optimizer steps matter more than bigger batches."""
    lr: float = 3e-3
    """Peak AdamW learning rate."""
    weight_decay: float = 0.01
    """AdamW weight decay of matrices (norms, biases and embeddings do not decay)."""
    warmup_steps: int = 10
    """Linear warmup steps, then cosine decay to ``lr * min_lr_ratio`` at ``max_steps``."""
    min_lr_ratio: float = 0.1
    """Cosine decay ends at lr * min_lr_ratio."""
    max_steps: int = 450
    """The training budget in optimizer steps (deterministic: ~4.5 minutes on 2 quiet cores)."""
    max_minutes: float = 12.0
    """Safety cap only: stop after this many minutes of wall clock (such a run is not reproducible)."""
    max_train_tokens: int = 4_000_000
    """Tokens of the train split used for training the teacher (0 = all)."""
    seed: int = 0

    def __post_init__(self) -> None:
        s = "demo_teacher"
        for key in (
            "vocab_size",
            "seq_len",
            "hidden_size",
            "num_layers",
            "num_heads",
            "intermediate_size",
            "batch_size",
            "max_steps",
        ):
            check(getattr(self, key) > 0, s, key, "must be > 0")
        check(self.vocab_size >= 300, s, "vocab_size", "must be >= 300 (256 byte tokens + specials + merges)")
        check(self.hidden_size % self.num_heads == 0, s, "hidden_size", "must be divisible by num_heads")
        check(self.lr > 0, s, "lr", "must be > 0")
        check(self.weight_decay >= 0, s, "weight_decay", "must be >= 0")
        check(self.warmup_steps >= 0, s, "warmup_steps", "must be >= 0")
        check(0.0 <= self.min_lr_ratio <= 1.0, s, "min_lr_ratio", "must be in [0, 1]")
        check(self.max_minutes > 0, s, "max_minutes", "must be > 0")
        check(self.max_train_tokens >= 0, s, "max_train_tokens", "must be >= 0")
