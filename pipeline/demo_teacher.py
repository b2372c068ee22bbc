"""Train the demo teacher: a byte-level BPE tokenizer and a small Llama, on the train split only.

With no downloadable weights, the default pipeline makes its own teacher. The result is an ordinary
Hugging Face model directory (safetensors + tokenizer files + ``training.json``), so every later
stage loads it exactly like a user's own ``teacher.path``.

Training runs ``max_steps`` optimizer steps with the student trainer's optimizer and schedule
(``kdcache.optim``: warmup, then cosine over the step budget), so the weights are the same on any
machine. ``max_minutes`` is only a safety cap: a run stopped by it says so (``stopped_by`` in
``training.json``) and is not reproducible.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase

from kdcache.config.base import to_dict
from kdcache.config.corpus import CorpusConfig
from kdcache.config.demo_teacher import DemoTeacherConfig
from kdcache.corpus import read_documents, split_documents, tokenize_and_pack
from kdcache.files import atomic_dir
from kdcache.optim import lr_scheduler, make_optimizer
from kdcache.outputs import hold_output_dir, mark_output_dir
from kdcache.tokenizer import train_bpe_tokenizer

log = logging.getLogger(__name__)

TRAINING_JSON = "training.json"
OUTPUT_KIND = "demo-teacher"
"""The marker kind of a demo teacher directory (``kdcache.files``)."""
PACKING = "stream"
"""The demo teacher trains on documents packed back to back: its own loop masks nothing, so rows carry
no padding (``prepare.packing: documents``, the pipeline's default for caching, pads and masks)."""
GRAD_CLIP = 1.0
VAL_SEQUENCES = 64
"""Val sequences scored after training (a quick held-out loss for ``training.json``)."""


def build_model(cfg: DemoTeacherConfig, tokenizer: PreTrainedTokenizerBase) -> LlamaForCausalLM:
    """A randomly initialised Llama sized by ``cfg``, with the tokenizer's vocabulary and special ids."""
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_heads,
        intermediate_size=cfg.intermediate_size,
        max_position_embeddings=cfg.seq_len,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaForCausalLM(config)


def _batches(num_rows: int, batch_size: int, generator: torch.Generator):
    """Endless random batches of row indices: a fresh permutation per epoch."""
    while True:
        perm = torch.randperm(num_rows, generator=generator)
        for start in range(0, max(num_rows - batch_size, 0) + 1, batch_size):  # a short last batch is dropped
            yield perm[start : start + batch_size]


def train_loop(
    model: LlamaForCausalLM, ids: np.ndarray, cfg: DemoTeacherConfig, *, progress: bool = False
) -> dict[str, Any]:
    """Train ``model`` on packed rows ``ids`` (N, T) with AdamW; returns step/loss/throughput stats."""
    data = torch.from_numpy(np.ascontiguousarray(ids, dtype=np.int64))  # (N, T)
    generator = torch.Generator().manual_seed(cfg.seed)
    optimizer = make_optimizer(model, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = lr_scheduler(
        optimizer, warmup_steps=cfg.warmup_steps, max_steps=cfg.max_steps, min_lr_ratio=cfg.min_lr_ratio
    )
    budget_s = cfg.max_minutes * 60.0
    losses: list[float] = []
    tokens = step = 0
    stopped_by = "max_steps"
    model.train()
    bar = tqdm(total=cfg.max_steps, desc="demo teacher", unit="step", disable=not progress)
    start = time.perf_counter()
    for rows in _batches(len(data), cfg.batch_size, generator):
        elapsed = time.perf_counter() - start
        if step >= cfg.max_steps:
            break
        if elapsed >= budget_s:
            stopped_by = "max_minutes"
            break
        batch = data[rows]  # (B, T)
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
        tokens += batch.numel()
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{losses[-1]:.3f}", tok_s=f"{tokens / max(elapsed, 1e-9):.0f}")
    bar.close()
    elapsed = time.perf_counter() - start
    final = float(np.mean(losses[-10:])) if losses else float("nan")
    log.info(
        "demo teacher: %d steps in %.0f s (%s), %.0f tokens/s, final train loss %.3f",
        step,
        elapsed,
        stopped_by,
        tokens / max(elapsed, 1e-9),
        final,
    )
    return {
        "steps": step,
        "stopped_by": stopped_by,
        "final_train_loss": final,
        "losses": losses,
        "tokens_seen": tokens,
        "elapsed_s": round(elapsed, 3),
        "tokens_per_s": round(tokens / max(elapsed, 1e-9), 1),
    }


@torch.no_grad()
def mean_loss(model: LlamaForCausalLM, ids: np.ndarray, *, batch_size: int) -> float | None:
    """Mean next-token cross-entropy of ``model`` over rows ``ids`` (N, T); None when there are none."""
    if len(ids) == 0:
        return None
    model.eval()
    data = torch.from_numpy(np.ascontiguousarray(ids, dtype=np.int64))  # (N, T)
    total = 0.0
    for start in range(0, len(data), batch_size):
        batch = data[start : start + batch_size]  # (B, T)
        total += model(input_ids=batch, labels=batch).loss.item() * len(batch)
    return total / len(data)


def _save_atomic(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerBase, info: dict[str, Any], out: Path) -> None:
    """Write everything to a temporary sibling, then swap it in; a crash leaves ``out`` untouched.

    ``out`` is a demo teacher directory kdcache made (``train_demo_teacher`` claimed it): the
    previous demo teacher in it is replaced whole."""
    with atomic_dir(out, replace=True) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / TRAINING_JSON).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
        mark_output_dir(tmp, OUTPUT_KIND)


def is_legacy_demo_teacher(path: Path) -> bool:
    """A demo teacher directory written before output markers existed (its ``training.json`` says so)."""
    try:
        info = json.loads((path / TRAINING_JSON).read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(info, dict) and {"stopped_by", "corpus", "config"} <= set(info)


def train_demo_teacher(
    corpus_cfg: CorpusConfig,
    cfg: DemoTeacherConfig,
    *,
    out_dir: str | Path,
    progress: bool = False,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Read and split the corpus, train tokenizer + Llama on the train split, save to ``out_dir``.

    ``out_dir`` must be new or a demo teacher kdcache made (``kdcache.outputs.claim_output_dir``; with
    ``overwrite`` anything else there is moved aside), and is locked against a concurrent run.
    Returns the ``training.json`` dict (steps, final train loss, val loss, tokens seen, elapsed, config).
    """
    with hold_output_dir(
        out_dir,
        kind=OUTPUT_KIND,
        inputs={"corpus": corpus_cfg.paths},
        overwrite=overwrite,
        legacy=is_legacy_demo_teacher,
    ):
        return _train_and_save(corpus_cfg, cfg, out=Path(out_dir), progress=progress)


def _train_and_save(corpus_cfg: CorpusConfig, cfg: DemoTeacherConfig, *, out: Path, progress: bool) -> dict[str, Any]:
    threads = torch.get_num_threads()
    torch.set_num_threads(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    try:
        torch.manual_seed(cfg.seed)
        splits = split_documents(read_documents(corpus_cfg, progress=progress), val_fraction=corpus_cfg.val_fraction)
        tokenizer = train_bpe_tokenizer(splits["train"]["text"], vocab_size=cfg.vocab_size)
        tokenizer.model_max_length = cfg.seq_len
        cap = max(1, cfg.max_train_tokens // cfg.seq_len) if cfg.max_train_tokens else 0
        train_ids = tokenize_and_pack(
            splits["train"],
            tokenizer,
            seq_len=cfg.seq_len,
            packing=PACKING,
            max_sequences=cap,
            seq_len_key="demo_teacher.seq_len",
            progress=progress,
        )  # (N, T)
        val_ids = tokenize_and_pack(
            splits["val"],
            tokenizer,
            seq_len=cfg.seq_len,
            packing=PACKING,
            max_sequences=VAL_SEQUENCES,
            allow_empty=True,
        )  # (M, T)
        model = build_model(cfg, tokenizer)
        stats = train_loop(model, train_ids, cfg, progress=progress)
        val_loss = mean_loss(model, val_ids, batch_size=cfg.batch_size)
    finally:
        torch.set_num_threads(threads)
    info = {
        **{k: v for k, v in stats.items() if k != "losses"},
        "val_loss": val_loss,
        "val_sequences": len(val_ids),
        "train_sequences": len(train_ids),
        "vocab_size": len(tokenizer),
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "num_documents": {name: len(ds) for name, ds in splits.items()},
        "config": to_dict(cfg),
        "corpus": to_dict(corpus_cfg),
        "losses": [round(x, 4) for x in stats["losses"]],
    }
    _save_atomic(model, tokenizer, info, out)
    log.info("demo teacher saved to %s (val loss %s)", out, f"{val_loss:.3f}" if val_loss is not None else "n/a")
    return info
