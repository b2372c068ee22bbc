"""The student model: a small Llama built from ``StudentConfig`` sizes, or a local pretrained dir.

The student must speak the cache's tokenizer: a pretrained student whose tokenizer fingerprint
differs from the cache's is refused (comparing ``vocab_size`` alone passes two different
tokenizers of the same size).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedModel

from pipeline.config import ConfigError, StudentConfig
from pipeline.fingerprint import tokenizer_fingerprint

log = logging.getLogger(__name__)


class StudentError(ValueError):
    """The student cannot be built or does not match the cache it should learn from."""


def load_student_tokenizer(cfg: StudentConfig, *, cache_tokenizer: Any, vocab_map: str = "none") -> Any:
    """The tokenizer the student uses: its own (pretrained dir) or the cache's; refuses a mismatch.

    ``vocab_map="exact"`` (mapping between different tokenizers) is not supported yet.
    """
    if vocab_map != "none":
        raise ConfigError(f"train.vocab_map: {vocab_map!r} is not supported yet; the student must use the cache's "
                          "tokenizer — set train.vocab_map: none and leave train.student.path empty, or point it at a "
                          "student trained with the teacher's tokenizer")
    if not cfg.path:
        return cache_tokenizer
    path = Path(cfg.path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as e:
        raise StudentError(f"train.student.path={path}: cannot load a tokenizer from it ({e}); "
                           "the directory needs the tokenizer files saved with save_pretrained") from e
    ours, theirs = tokenizer_fingerprint(tokenizer), tokenizer_fingerprint(cache_tokenizer)
    if ours != theirs:
        raise StudentError(f"train.student.path={path}: tokenizer fingerprint {ours} differs from the cache's "
                           f"{theirs}; a student must use the teacher's tokenizer (vocabulary mapping is not "
                           "supported yet) — pick a student trained with that tokenizer or build one from sizes")
    return tokenizer


def build_student(cfg: StudentConfig, *, vocab_size: int, seq_len: int, tokenizer: Any) -> PreTrainedModel:
    """A fresh Llama with tied embeddings sized by ``cfg``, or the pretrained model at ``cfg.path``.

    ``tokenizer`` is the cache's tokenizer (its pad/bos/eos ids go into the config). A pretrained
    student is checked against it by fingerprint and must have exactly ``vocab_size`` logits.
    """
    if cfg.path:
        load_student_tokenizer(cfg, cache_tokenizer=tokenizer)
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
    log.info("built student: %s parameters (hidden %d, layers %d, vocab %d)",
             f"{count_parameters(model):,}", cfg.hidden_size, cfg.num_layers, vocab_size)
    return model


def _load_pretrained(path: Path, *, vocab_size: int, seq_len: int) -> PreTrainedModel:
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, local_files_only=True)
    except (OSError, ValueError) as e:
        raise StudentError(f"train.student.path={path}: cannot load a causal LM from it ({e})") from e
    out_vocab = model.get_output_embeddings().weight.shape[0]
    if out_vocab != vocab_size:
        raise StudentError(f"train.student.path={path}: the model has {out_vocab} output logits but the cache's "
                           f"vocabulary has {vocab_size}; they must be equal")
    max_pos = getattr(model.config, "max_position_embeddings", None)
    if max_pos is not None and max_pos < seq_len:
        raise StudentError(f"train.student.path={path}: max_position_embeddings {max_pos} < cache seq_len {seq_len}")
    return model


def count_parameters(model: torch.nn.Module) -> int:
    """Number of distinct parameters (tied embedding and LM head counted once)."""
    return sum(p.numel() for p in model.parameters())
