"""Section ``cache``: which teacher soft targets to store."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from kdcache.config.base import check


@dataclass(frozen=True)
class CacheConfig:
    """Teacher soft targets to cache (section ``cache``)."""

    targets: Literal["topk", "sampled", "both"] = "sampled"
    """``sampled``: ids drawn from the teacher with counts (the default: closest to online KD per byte,
    bench/RESULTS.md); ``topk``: top-k ids + log-probs and the exact tail mass; ``both``: a top-k head
    plus samples."""
    top_k: int = 32
    """Top-k entries per token (the maximum when ``mass`` is set; at most 1,024)."""
    mass: float = 0.0
    """Adaptive top-k: keep entries until their cumulative probability reaches ``mass``
    (e.g. 0.99), at most ``top_k``. 0 = fixed k."""
    samples: int = 16
    """Draws per token for sampled targets (at most 65,535). 16: closer to online KD than 8 with a teacher
    better than the CE-only student (3 seeds, bench/RESULTS.md "KD quality"), ~18 bytes/token of targets."""
    temperature: float = 1.0
    """Teacher temperature applied before log-softmax; recorded in the manifest."""
    temperatures: tuple[float, ...] = ()
    """Extra temperatures at which the teacher's log normalizer over the whole vocabulary is stored per token.
    float32, about 3 bytes/token each after compression: training at any of them (``train.temperature``)
    re-tempers top-k + tail targets exactly. Top-k caches only (sampled ids are drawn at ``temperature``);
    e.g. [2.0, 4.0]."""
    value_encoding: Literal["abs8", "rel8", "log32"] = "abs8"
    """How top-k log-probs are stored (cache/README.md "Value encodings"; bench/RESULTS.md). ``abs8``:
    one byte per entry, uniform in p ** (1/4) -- the smallest (top-64: 0.37x int32 ids + fp16 values) at KL
    error ~5e-5 nats (it grows with top_k: 7e-5 at 128; prefer rel8 above that); ``rel8``: format 2.0's first
    code, uniform in (p / p_max) ** (1/3) (KL ~1e-5, +16 B/token at top-64); ``log32``: 1/4096-nat steps, for
    re-tempering (``temperatures``, ``train.temperature``) within 0.1% of the dense teacher at tau >= tau0 / 2,
    at about twice abs8's bytes. Top-k caches only."""
    batch_size: int = 8
    """Sequences per teacher forward. Part of the determinism contract: bf16/fp16 outputs
    depend on batch shape, so a cache is byte-identical only for the same batch size and dtype."""
    rows_per_shard: int = 512
    """Sequences per Parquet shard."""
    seed: int = 0
    """Seed for sampled targets (per sequence index and position)."""
    on_nan: Literal["fail", "skip"] = "fail"
    """Non-finite teacher logits: ``fail`` stops naming the sequence; ``skip`` drops that sequence."""
    deterministic: bool = False
    """Run the teacher with deterministic kernels (torch.use_deterministic_algorithms, fixed cuBLAS
    workspaces): bitwise-reproducible on the same GPU model and library versions, slower. Recorded in
    the manifest (targets.runtime)."""
    split: Literal["train", "val"] = "train"
    """Token split to score (one cache per split)."""
    teacher_context: str = ""
    """Context distillation: text the teacher sees before every row and the student never does (a system prompt,
    few-shot examples, a reference document) — the text itself, or the path of a UTF-8 file holding it. Targets
    are stored for the rows' own positions; the manifest records the context's sha256, token count and source
    (corpus.teacher_context), and the cache's name and resume key change with it. Empty: no context."""
    hidden_layers: tuple[int, ...] = ()
    """Teacher layers whose hidden states are stored as feature targets (``train.feature_weight``), as indices into
    the teacher's ``output_hidden_states``: 0 = the embeddings, i = decoder layer i's output, -1 = the final
    normed state the LM head reads. Each is projected to ``hidden_dim`` by a matrix stored in the cache
    (``hidden_projection``), and kept as int8 with a float16 scale per position (hidden_dim + 2 bytes/token
    per layer before compression). e.g. [-1]; [] = none."""
    hidden_dim: int = 64
    """Width each stored hidden state is projected to (at most the teacher's hidden size; used only with
    ``hidden_layers``)."""
    hidden_projection: Literal["orthogonal", "pca"] = "orthogonal"
    """The (H, hidden_dim) projection of ``hidden_layers``: orthogonal (a random orthonormal matrix drawn from
    ``seed``) or pca (the states' top principal axes, fitted on the token split's first 64 rows, the same on every
    rank; ``kdcache.cache.hidden``)."""

    def __post_init__(self) -> None:
        s = "cache"
        check(
            self.targets in ("topk", "sampled", "both"),
            s,
            "targets",
            f"must be topk|sampled|both, got {self.targets!r}",
        )
        check(1 <= self.top_k <= 1024, s, "top_k", f"must be in [1, 1024], got {self.top_k}")
        check(0.0 <= self.mass < 1.0, s, "mass", f"must be in [0, 1) (0 = fixed k), got {self.mass}")
        check(1 <= self.samples <= 65535, s, "samples", f"must be in [1, 65535], got {self.samples}")
        check(self.temperature > 0, s, "temperature", "must be > 0")
        check(
            all(t > 0 and math.isfinite(t) for t in self.temperatures)
            and len(set(self.temperatures)) == len(self.temperatures),
            s,
            "temperatures",
            f"must be distinct numbers > 0, got {list(self.temperatures)}",
        )
        check(
            self.temperature not in self.temperatures,
            s,
            "temperatures",
            f"must not repeat cache.temperature {self.temperature} (its log-normalizer is 0: nothing to store)",
        )
        check(
            not self.temperatures or self.targets != "sampled",
            s,
            "temperatures",
            "needs cache.targets topk|both: sampled ids are drawn at one temperature (cache.temperature); "
            "set temperatures: [] or targets: topk",
        )
        check(
            all(isinstance(x, int) and not isinstance(x, bool) for x in self.hidden_layers)
            and len(set(self.hidden_layers)) == len(self.hidden_layers),
            s,
            "hidden_layers",
            f"must be distinct integers (teacher layer indices, e.g. [-1]), got {list(self.hidden_layers)}",
        )
        check(1 <= self.hidden_dim <= 65536, s, "hidden_dim", f"must be in [1, 65536], got {self.hidden_dim}")
        check(
            self.hidden_projection in ("orthogonal", "pca"),
            s,
            "hidden_projection",
            f"must be orthogonal|pca, got {self.hidden_projection!r}",
        )
        check(
            self.value_encoding in ("abs8", "rel8", "log32"),
            s,
            "value_encoding",
            f"must be abs8|rel8|log32, got {self.value_encoding!r}",
        )
        check(self.batch_size > 0, s, "batch_size", "must be > 0")
        check(self.rows_per_shard > 0, s, "rows_per_shard", "must be > 0")
        check(self.on_nan in ("fail", "skip"), s, "on_nan", "must be 'fail' or 'skip'")
        check(self.split in ("train", "val"), s, "split", f"must be 'train' or 'val', got {self.split!r}")
