"""The student model: a small Llama built from ``StudentConfig`` sizes, or a local pretrained dir.

The student must speak the cache's tokenizer: a pretrained student whose tokenizer fingerprint
differs from the cache's is refused (comparing ``vocab_size`` alone passes two different
tokenizers of the same size) unless ``train.vocab_map: exact``, which maps the token strings the
two vocabularies share (:class:`VocabMap`); teacher mass on ids the student lacks joins the tail.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedModel

from kdcache.config.train import StudentConfig
from kdcache.fingerprint import tokenizer_fingerprint

log = logging.getLogger(__name__)


class StudentError(ValueError):
    """The student cannot be built or does not match the cache it should learn from."""


def load_student_tokenizer(cfg: StudentConfig, *, cache_tokenizer: Any, vocab_map: str = "none") -> Any:
    """The tokenizer the student uses: its own (pretrained dir) or the cache's.

    A different tokenizer is refused unless ``vocab_map="exact"``, in which case it is returned
    and the caller maps cache ids onto it with :func:`build_vocab_map`.
    """
    if not cfg.path:
        return cache_tokenizer
    path = Path(cfg.path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as e:
        raise StudentError(
            f"train.student.path={path}: cannot load a tokenizer from it ({e}); "
            "the directory needs the tokenizer files saved with save_pretrained"
        ) from e
    ours, theirs = tokenizer_fingerprint(tokenizer), tokenizer_fingerprint(cache_tokenizer)
    if ours != theirs and vocab_map != "exact":
        raise StudentError(
            f"train.student.path={path}: tokenizer fingerprint {ours} differs from the cache's "
            f"{theirs}; pick a student trained with the teacher's tokenizer, build one from sizes "
            "(leave train.student.path empty), or set train.vocab_map: exact to map the token "
            "strings both vocabularies share"
        )
    return tokenizer


@dataclass(frozen=True)
class VocabMap:
    """Cache (teacher) token ids -> student token ids, for token strings both vocabularies hold.

    ``apply`` rewrites a batch: input tokens the student lacks become ``fallback_id`` (its unk or
    eos token) and ``ce_mask`` drops the positions whose label is such a token from the CE term; top-k
    entries on unmapped ids are masked out and their teacher probability moves into the stored tail
    (``topk_log_tail``), so ``topk_tail`` counts it there and ``topk_renorm`` renormalizes over the
    mapped ones; sampled draws of unmapped ids are dropped while ``sample_total`` keeps the number of
    draws made, so the sampled loss stays unbiased for the mapped part (no renormalization).
    """

    to_student: np.ndarray  # (V_cache,) int64; -1 where the student has no token with that string
    student_vocab_size: int
    fallback_id: int

    @property
    def num_mapped(self) -> int:
        return int((self.to_student >= 0).sum())

    def apply(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        table = torch.from_numpy(self.to_student)  # (V_cache,)
        out = dict(batch)
        ids = table[batch["input_ids"]]  # (B, T)
        out["input_ids"] = torch.where(ids >= 0, ids, self.fallback_id)
        label_ok = torch.nn.functional.pad(ids[:, 1:] >= 0, (0, 1), value=False)  # (B, T): position t's label is t+1
        out["ce_mask"] = label_ok & batch["ce_mask"] if "ce_mask" in batch else label_ok
        if "topk_ids" in batch:
            ids = table[batch["topk_ids"]]  # (B, T, k)
            real = batch.get("topk_mask", torch.ones_like(ids, dtype=torch.bool))  # (B, T, k)
            mask = real & (ids >= 0)  # (B, T, k)
            out["topk_ids"], out["topk_mask"] = ids.clamp_min(0), mask
            if "topk_log_tail" in batch:  # unmapped entries' probability joins the tail
                dropped = batch["topk_logprobs"].masked_fill(~(real & ~mask), -torch.inf).logsumexp(-1)  # (B, T)
                out["topk_log_tail"] = torch.logaddexp(batch["topk_log_tail"], dropped)
        if "sample_ids" in batch:
            ids = table[batch["sample_ids"]]  # (B, T, S)
            out["sample_ids"] = ids.clamp_min(0)
            out["sample_counts"] = torch.where(ids >= 0, batch["sample_counts"], 0.0)
        return out


def build_vocab_map(
    cache_tokenizer: Any, student_tokenizer: Any, *, cache_vocab_size: int, student_vocab_size: int
) -> VocabMap:
    """Map every cache id whose token string the student vocabulary holds (exact string match)."""
    student = {tok: i for tok, i in student_tokenizer.get_vocab().items() if i < student_vocab_size}
    to_student = np.full(cache_vocab_size, -1, np.int64)
    for tok, i in cache_tokenizer.get_vocab().items():
        if i < cache_vocab_size and tok in student:
            to_student[i] = student[tok]
    fallback = student_tokenizer.unk_token_id
    fallback = student_tokenizer.eos_token_id if fallback is None else fallback
    if fallback is None:
        raise StudentError(
            "train.vocab_map: exact needs the student tokenizer to have an unk or eos token to stand in "
            "for input tokens it lacks; save the student tokenizer with one"
        )
    specials = {cache_tokenizer.convert_tokens_to_ids(t) for t in cache_tokenizer.all_special_tokens}
    if not any(to_student[i] >= 0 for i in range(cache_vocab_size) if i not in specials):
        raise StudentError(
            "train.vocab_map: exact found no token string besides special tokens shared by the cache's "
            "and the student's vocabularies; the student cannot learn from this cache"
        )
    return VocabMap(to_student=to_student, student_vocab_size=student_vocab_size, fallback_id=int(fallback))


def mapping_coverage(vmap: VocabMap, sequences: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """How much the mapping keeps, measured on decoded cache rows (``CacheReader[i]`` dicts).

    ``teacher_mass_kept`` is the mean over positions of the teacher probability on mapped top-k ids;
    ``teacher_mass_cached`` the same over all cached top-k ids (what an unmapped student would get);
    for sampled caches ``draws_kept`` is the fraction of draws on mapped ids.
    """
    sums = {"positions": 0, "inputs_mapped": 0, "kept": 0.0, "cached": 0.0, "draws": 0, "draws_kept": 0}
    for row in sequences:
        inputs = vmap.to_student[row["input_ids"]]  # (T,)
        sums["positions"] += inputs.size
        sums["inputs_mapped"] += int((inputs >= 0).sum())
        if row.get("topk_ids") is not None:
            p = np.exp(np.asarray(row["topk_logprobs"], np.float64))  # (T, k); exp(-inf) = 0 at padding
            sums["cached"] += float(p.sum())
            sums["kept"] += float((p * (vmap.to_student[row["topk_ids"]] >= 0)).sum())
        if row.get("sample_ids") is not None:
            counts = np.asarray(row["sample_counts"], np.int64)  # (T, S)
            sums["draws"] += int(counts.sum())
            sums["draws_kept"] += int((counts * (vmap.to_student[row["sample_ids"]] >= 0)).sum())
    n = max(sums["positions"], 1)
    report: dict[str, Any] = {
        "cache_vocab_size": int(vmap.to_student.size),
        "student_vocab_size": vmap.student_vocab_size,
        "ids_mapped": vmap.num_mapped,
        "vocab_mapped": vmap.num_mapped / max(vmap.to_student.size, 1),
        "positions_measured": sums["positions"],
        "input_tokens_mapped": sums["inputs_mapped"] / n,
    }
    if sums["cached"]:
        report |= {
            "teacher_mass_cached": sums["cached"] / n,
            "teacher_mass_kept": sums["kept"] / n,
            "teacher_mass_kept_ratio": sums["kept"] / sums["cached"],
        }
    if sums["draws"]:
        report["draws_kept"] = sums["draws_kept"] / sums["draws"]
    return report


def build_student(cfg: StudentConfig, *, vocab_size: int, seq_len: int, tokenizer: Any) -> PreTrainedModel:
    """A fresh Llama with tied embeddings sized by ``cfg``, or the pretrained model at ``cfg.path``.

    ``tokenizer`` is the student's tokenizer (checked by :func:`load_student_tokenizer`; its
    pad/bos/eos ids go into a fresh model's config). A pretrained student must have at least
    ``vocab_size`` logits (padded vocabularies are common).
    """
    if cfg.path:
        return _load_pretrained(Path(cfg.path), vocab_size=vocab_size, seq_len=seq_len)
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_heads,
        intermediate_size=cfg.intermediate_size,
        max_position_embeddings=seq_len,
        tie_word_embeddings=True,
        pad_token_id=pad,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=eos,
        use_cache=False,
    )
    model = LlamaForCausalLM(config)
    log.info(
        "built student: %s parameters (hidden %d, layers %d, vocab %d)",
        f"{count_parameters(model):,}",
        cfg.hidden_size,
        cfg.num_layers,
        vocab_size,
    )
    return model


def _load_pretrained(path: Path, *, vocab_size: int, seq_len: int) -> PreTrainedModel:
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, local_files_only=True)
    except (OSError, ValueError) as e:
        raise StudentError(f"train.student.path={path}: cannot load a causal LM from it ({e})") from e
    out_vocab = model.get_output_embeddings().weight.shape[0]
    if out_vocab < vocab_size:
        raise StudentError(
            f"train.student.path={path}: the model has {out_vocab} output logits but its vocabulary "
            f"has {vocab_size} token ids; the model and tokenizer do not belong together"
        )
    max_pos = getattr(model.config, "max_position_embeddings", None)
    if max_pos is not None and max_pos < seq_len:
        raise StudentError(f"train.student.path={path}: max_position_embeddings {max_pos} < cache seq_len {seq_len}")
    return model


def count_parameters(model: torch.nn.Module) -> int:
    """Number of distinct parameters (tied embedding and LM head counted once)."""
    return sum(p.numel() for p in model.parameters())
