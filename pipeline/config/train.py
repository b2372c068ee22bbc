"""Sections ``train`` and ``train_baseline``: the student and how it is trained."""

from __future__ import annotations

import typing
from dataclasses import dataclass, field
from typing import Literal

from kdcache.config.base import check
from kdcache.config.token_filter import TokenFilterConfig


@dataclass(frozen=True)
class StudentConfig:
    """Student architecture (section ``train.student``) when not loading a pretrained dir."""

    path: str = ""
    """Local pretrained student directory; empty = build from the sizes below (Llama)."""
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    intermediate_size: int = 384

    def __post_init__(self) -> None:
        for key in ("hidden_size", "num_layers", "num_heads", "intermediate_size"):
            check(getattr(self, key) > 0, "train.student", key, "must be > 0")
        check(self.hidden_size % self.num_heads == 0, "train.student", "hidden_size", "must be divisible by num_heads")


RAMPS = ("constant", "linear", "cosine")
"""How a scheduled loss setting moves from its start to its ``end`` over the KD steps."""
ANY_TEMPERATURE_LOSSES = ("topk_renorm", "ce")
"""Losses that take any temperature at every step (``kdcache.losses``: the tail losses re-temper the teacher
only at the temperatures the cache stores log-normalizers for; sampled and hard only at the cache's)."""


@dataclass(frozen=True)
class RampConfig:
    """One loss setting over the KD steps (sections ``train.schedule.alpha`` and ``train.schedule.temperature``)."""

    kind: Literal["constant", "linear", "cosine"] = "constant"
    """constant: ``train.alpha`` (``train.temperature``) at every step; linear: from that value at the first KD
    step straight to ``end`` at the last step; cosine: the same ends joined by half a cosine (flat at both)."""
    end: float | None = None
    """Value at the last step (``train.max_steps``); linear and cosine need it, constant refuses it (null)."""


@dataclass(frozen=True)
class ScheduleConfig:
    """Loss settings over training steps (section ``train.schedule``); a pure function of the step, so a
    resumed run continues it exactly. Every step's alpha and temperature go to train_log.jsonl."""

    alpha: RampConfig = field(default_factory=RampConfig)
    """The KD weight, from ``train.alpha`` to ``alpha.end``."""
    temperature: RampConfig = field(default_factory=RampConfig)
    """The KD temperature, from ``train.temperature`` to ``temperature.end``. A moving temperature needs a loss
    that takes any: topk_renorm (tail losses only take the cache's stored temperatures, sampled/hard its one)."""
    ce_warmup_steps: int = 0
    """Steps of hard-label CE alone (the baseline's loss; targets unread) before distillation starts, as in
    progressive distillation; the alpha and temperature ramps start after them. 0 = KD from the first step."""


@dataclass(frozen=True)
class CacheSourceConfig:
    """One teacher's cache of several (an item of ``train.caches``)."""

    path: str = ""
    """Cache directory (written by the cache stage or ``kdcache cache``)."""
    weight: float = 1.0
    """Relative weight of this teacher (the weights are normalized to sum to 1)."""

    def __post_init__(self) -> None:
        check(bool(self.path), "train.caches[]", "path", "must name a cache directory")
        check(self.weight >= 0 and self.weight < float("inf"), "train.caches[]", "weight", "must be finite and >= 0")


COMBINE = ("mixture", "min_nll", "min_entropy", "nll_softmax")
"""``train.combine`` choices (``kdcache.multi_teacher``)."""


@dataclass(frozen=True)
class TrainConfig:
    """Student training (sections ``train`` and ``train_baseline``)."""

    loss: Literal["auto", "topk_tail", "topk_renorm", "reverse_kl", "jsd", "skew_kl", "tv", "hard", "sampled", "ce"] = (
        "auto"
    )
    """KD loss. auto: the loss matching the cache's targets (topk_tail for a top-k cache, sampled for a
    sampled one). On top-k caches: topk_tail (forward KL on the top-k + tail partition, exact),
    topk_renorm (KL renormalized on the top-k, biased), reverse_kl, jsd, skew_kl, tv (on the same
    partition), hard (CE on the teacher's argmax). On sampled caches: sampled (unbiased MC
    cross-entropy). ce: hard labels only (the baseline). Details: the kdcache.losses docstring."""
    alpha: float = 0.5
    """Weight of the KD term: loss = alpha*KD + (1 - alpha)*CE."""
    temperature: float = 1.0
    """KD temperature tau (KL-family terms scaled by tau^2). Tail losses and sampled/hard need it equal to
    the cache's temperature (a v1 cache stores no log-normalizer to re-temper by); topk_renorm takes any."""
    beta: float = 0.5
    """Teacher weight of the mixture in jsd (in (0, 1)) and skew_kl (in [0, 1); DistiLLM uses 0.1)."""
    max_steps: int = 150
    """Optimizer steps; the learning-rate schedule ends here."""
    batch_size: int = 16
    """Sequences per micro-batch (per rank under torchrun)."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    parallel: Literal["ddp", "fsdp"] = "ddp"
    """How a student is spread over torchrun's ranks: ddp (a full replica per rank, gradients all-reduced) or
    fsdp (FSDP2 ``fully_shard`` per decoder layer: each rank holds 1/world of the weights, gradients and AdamW
    state, for students that do not fit replicated). The same loss curve either way; one process ignores it.
    README "Students on several GPUs"."""
    lr: float = 3e-3
    """Peak AdamW learning rate."""
    weight_decay: float = 0.01
    """AdamW weight decay of matrices (norms, biases and embeddings do not decay)."""
    warmup_steps: int = 15
    """Linear warmup steps, then cosine decay to ``lr * min_lr_ratio`` at ``max_steps``."""
    min_lr_ratio: float = 0.1
    """Cosine decay ends at lr * min_lr_ratio."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0 = off)."""
    chunk_tokens: int = 0
    """Tokens per chunk in the KD loss; 0 = auto: as many as keep its working set within 256 MiB at the
    student's vocabulary size."""
    checkpoint_every: int = 50
    """Save a resumable checkpoint every this many steps (and at the end)."""
    log_every: int = 10
    """Log a progress line every this many steps (every step goes to train_log.jsonl)."""
    seed: int = 0
    """Seeds the student's initialization and the data order."""
    vocab_map: Literal["none", "exact"] = "none"
    """Student tokenizer differs from the cache's: ``none`` refuses; ``exact`` maps identical token strings."""
    cross_tokenizer: Literal["none", "exact", "prefix", "uld"] = "none"
    """A student with another tokenizer (``student_tokenizer``): each cache row's text is re-tokenized by it
    and student positions on a byte boundary shared with a teacher position take that position's target
    (the rest CE only). The targets reach the student's vocabulary by exact (identical token bytes; other
    mass joins the tail), prefix (the student's first token of each teacher token, mass merged) or uld
    (sorted-probability distance, no mapping); none = no re-tokenization (see vocab_map). README "Student
    with another tokenizer"."""
    student_tokenizer: str = ""
    """Local tokenizer directory of the student for cross_tokenizer; empty = the tokenizer saved in
    train.student.path."""
    token_filter: TokenFilterConfig = field(default_factory=TokenFilterConfig)
    """Train the KD term only on positions chosen by the teacher's per-token NLL or entropy (section
    ``train.token_filter``: by, keep, fraction; needs a cache with teacher signals, format 2); CE keeps all."""
    caches: tuple[CacheSourceConfig, ...] = ()
    """Several teachers: caches over the same token data, each {path, weight}, combined per token by
    ``combine``; empty = one cache (paths.cache, or --cache). When set it replaces paths.cache (the first
    listed cache supplies the tokenizer and the data order). CLI: --cache A --cache B --weights 0.7,0.3."""
    combine: Literal["mixture", "min_nll", "min_entropy", "nll_softmax"] = "mixture"
    """How several caches' targets combine per token: mixture (weighted mixture of the teachers'
    distributions on the union of their top-k ids, each tail spread evenly over its other ids; sampled
    targets: draws pooled by weight); min_nll (the teacher with the lowest NLL of the actual next token,
    FuseLLM's MinCE); min_entropy (the most confident teacher); nll_softmax (mixture weights
    weight * exp(-NLL / combine_temperature), renormalized per token). min_nll, min_entropy and nll_softmax
    need caches that store per-token teacher signals (manifest targets.signals)."""
    combine_temperature: float = 1.0
    """T of combine: nll_softmax (lower: closer to min_nll; higher: closer to the static weights)."""
    feature_weight: float = 0.0
    """Weight of the feature (hidden-state) loss added to the KD loss: a learned linear map of the student's
    ``feature_layer`` hidden state against the cache's stored teacher hidden state (cache.hidden_layers; the
    cache's last listed layer). 0 = off. The map is trained and checkpointed with the student but is not part
    of the exported student (kdcache.features)."""
    feature_loss: Literal["mse", "cosine"] = "mse"
    """Feature loss: mse (mean squared error per dimension) or cosine (1 - cosine similarity), averaged over
    the positions that carry a loss."""
    feature_layer: int = -1
    """Student layer whose hidden state is mapped, as an index into its ``output_hidden_states`` (0 = the
    embeddings, i = decoder layer i's output, -1 = the final normed state its LM head reads)."""
    student: StudentConfig = field(default_factory=StudentConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    """alpha and temperature schedules and a CE-only warm-up (section ``train.schedule``)."""

    def __post_init__(self) -> None:
        s = "train"
        kinds = typing.get_args(typing.get_type_hints(TrainConfig)["loss"])
        check(self.loss in kinds, s, "loss", f"must be {'|'.join(kinds)}, got {self.loss!r}")
        check(0.0 <= self.alpha <= 1.0, s, "alpha", f"must be in [0, 1], got {self.alpha}")
        check(self.temperature > 0, s, "temperature", "must be > 0")
        check(self.chunk_tokens >= 0, s, "chunk_tokens", "must be >= 0 (0 = auto)")
        for key in ("max_steps", "batch_size", "grad_accum", "checkpoint_every", "log_every"):
            check(getattr(self, key) > 0, s, key, "must be > 0")
        check(self.lr > 0, s, "lr", "must be > 0")
        check(self.warmup_steps >= 0, s, "warmup_steps", "must be >= 0")
        check(0.0 <= self.min_lr_ratio <= 1.0, s, "min_lr_ratio", "must be in [0, 1]")
        check(self.grad_clip >= 0, s, "grad_clip", "must be >= 0 (0 = off)")
        check(self.parallel in ("ddp", "fsdp"), s, "parallel", f"must be ddp|fsdp, got {self.parallel!r}")
        check(self.vocab_map in ("none", "exact"), s, "vocab_map", "must be 'none' or 'exact'")
        crossing = ("none", "exact", "prefix", "uld")
        check(self.cross_tokenizer in crossing, s, "cross_tokenizer", f"must be {'|'.join(crossing)}")
        check(
            self.cross_tokenizer == "none" or self.vocab_map == "none",
            s,
            "cross_tokenizer",
            "re-tokenizes the text, vocab_map maps ids: set one of them (vocab_map: none)",
        )
        check(
            self.cross_tokenizer == "none" or bool(self.student_tokenizer or self.student.path),
            s,
            "student_tokenizer",
            "cross_tokenizer needs the student's tokenizer: set train.student_tokenizer to a local tokenizer "
            "directory (or train.student.path to a pretrained student)",
        )
        check(self.combine in COMBINE, s, "combine", f"must be {'|'.join(COMBINE)}, got {self.combine!r}")
        check(self.combine_temperature > 0, s, "combine_temperature", "must be > 0")
        check(not self.caches or sum(c.weight for c in self.caches) > 0, s, "caches", "needs a weight > 0 somewhere")
        check(self.feature_weight >= 0, s, "feature_weight", f"must be >= 0 (0 = off), got {self.feature_weight}")
        check(self.feature_loss in ("mse", "cosine"), s, "feature_loss", f"must be mse|cosine: {self.feature_loss!r}")
        self._check_schedule()

    def _check_schedule(self) -> None:
        s, sched = "train.schedule", self.schedule
        ramps = (("alpha", sched.alpha, self.alpha), ("temperature", sched.temperature, self.temperature))
        for name, ramp, start in ramps:
            check(ramp.kind in RAMPS, s, f"{name}.kind", f"must be {'|'.join(RAMPS)}, got {ramp.kind!r}")
            if ramp.kind == "constant":
                check(
                    ramp.end is None or ramp.end == start,
                    s,
                    f"{name}.end",
                    f"is {ramp.end} but kind is constant (train.{name} = {start} throughout); "
                    f"set {name}.kind: linear|cosine, or end: null",
                )
            else:
                check(ramp.end is not None, s, f"{name}.end", f"kind {ramp.kind} needs the value at the last step")
        if sched.alpha.end is not None:
            check(0.0 <= sched.alpha.end <= 1.0, s, "alpha.end", f"must be in [0, 1], got {sched.alpha.end}")
        if sched.temperature.end is not None:
            check(sched.temperature.end > 0, s, "temperature.end", f"must be > 0, got {sched.temperature.end}")
        moving = sched.temperature.kind != "constant" and sched.temperature.end != self.temperature
        check(
            not moving or self.loss in (*ANY_TEMPERATURE_LOSSES, "auto"),
            s,
            "temperature",
            f"kind {sched.temperature.kind} moves tau between {self.temperature} and {sched.temperature.end}, but "
            f"train.loss={self.loss} takes only the temperatures the cache stores (see `kdcache inspect`); "
            "keep temperature.kind: constant, or set train.loss: topk_renorm",
        )
        check(sched.ce_warmup_steps >= 0, s, "ce_warmup_steps", "must be >= 0")
        check(
            sched.ce_warmup_steps < self.max_steps,
            s,
            "ce_warmup_steps",
            f"is {sched.ce_warmup_steps}, leaving no KD step of train.max_steps = {self.max_steps}; lower it "
            "(or set train.loss: ce for a CE-only run)",
        )
