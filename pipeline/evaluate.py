"""Held-out comparison of a teacher and its students on the val split.

For every model: next-token cross-entropy (nats/token) and perplexity, bits per byte, KL(teacher || model) with
full-vocabulary distributions, top-1 agreement with the teacher, top-1 accuracy, expected
calibration error of top-1 predictions (equal-width bins) with reliability-diagram data, forward
throughput, parameter count and size on disk. All models see the same batches side by side, so
the teacher's logits are computed once per batch. Metrics run in fp32 over chunks of positions,
in the teacher tokenizer's id space (padded logit rows dropped).

Positions 0..T-2 of each sequence are scored (position t predicts token t+1), except those whose
next token is padding (``kdcache.packing``).

Bits per byte, the tokenizer-neutral measure: the NLL summed over scored positions whose target
spells text, divided by ln 2 times the UTF-8 bytes those targets spell (``kdcache.tokenizer.token_bytes``).
Special tokens (EOS, BOS, padding) spell no bytes and are left out of both sums, as in nanochat's bpb.
A tokenizer whose tokens cannot spell text (word-level, WordPiece) gets none.

A model whose own tokenizer differs from the teacher's (a ``train.cross_tokenizer`` student and its CE
baseline) reads each row re-tokenized by its tokenizer, and gets bits per byte on its own tokens and
KL / agreement at the positions the byte alignment pairs with the teacher's (``kdcache.evaluate_cross``).
The counting and the metrics files live in ``kdcache.evaluate_metrics``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

from kdcache.config.evaluate import EvaluateConfig
from kdcache.config.teacher import TeacherConfig
from kdcache.devices import resolve_dtype
from kdcache.evaluate_cross import CrossModel, align_batch, cross_model, cross_tally, projection_for, score_cross
from kdcache.evaluate_metrics import (
    Tally,
    byte_counts,
    expected_calibration_error,
    finish,
    forward,
    score_same_tokenizer,
    timed_forward,
    write_metrics,
)
from kdcache.files import InputFileError, read_json_file
from kdcache.fingerprint import tokenizer_fingerprint
from kdcache.packing import packing_of, target_mask, valid_lengths
from kdcache.teacher import Teacher, load_teacher
from kdcache.token_data import TokenSplit
from kdcache.tokenizer import TOKENIZER_FILES, TokenizerError, load_tokenizer, tokenizer_vocab_size

__all__ = ["EvaluateError", "Tally", "evaluate", "expected_calibration_error", "trained_against", "write_metrics"]

log = logging.getLogger(__name__)


class EvaluateError(ValueError):
    """The models or token data cannot be compared as asked."""


def evaluate(
    cfg: EvaluateConfig,
    *,
    tokens: TokenSplit,
    teacher: TeacherConfig,
    models: dict[str, str | Path],
    progress: bool = False,
) -> dict[str, Any]:
    """Metrics for the teacher and each model in ``models`` (name -> local model dir) against the teacher.

    The teacher is loaded by ``kdcache.teacher.load_teacher`` (the cache stage's loader: its device,
    dtype and checks); the other models go on the same device, in fp32 on CPU and bf16 on CUDA.
    Models of the teacher's tokenizer are compared in its id space: logits past it (padded embedding
    rows, as Qwen2 and Phi-3 have) are dropped before any softmax. A model whose own tokenizer (saved in
    its dir) differs reads each row re-tokenized and is compared through the byte alignment
    (``kdcache.evaluate_cross``). Token data made with another tokenizer than the teacher's is refused.
    Positions whose next token is padding (``prepare.packing: documents``) are not scored. Metric math is fp32.
    """
    from tqdm.auto import tqdm

    if "teacher" in models:
        raise EvaluateError("models: the name 'teacher' is taken by the teacher (teacher.path); rename that model")
    loaded_teacher = load_teacher(teacher)
    dev, vocab = loaded_teacher.device, tokenizer_vocab_size(loaded_teacher.tokenizer)
    fingerprint = tokenizer_fingerprint(loaded_teacher.tokenizer)
    counts = byte_counts(loaded_teacher.tokenizer, device=dev)
    _check_tokens(tokens, loaded_teacher, vocab=vocab, fingerprint=fingerprint)
    paths = {"teacher": Path(teacher.path), **{name: Path(p) for name, p in models.items()}}
    trained = {name: trained_against(paths[name]) for name in models}
    _check_trained_against(trained, teacher=loaded_teacher, tokens=tokens, allow=cfg.allow_other_teacher)
    loaded = {"teacher": loaded_teacher.model} | {name: load_model(path, device=dev) for name, path in models.items()}
    cross = _check_models(loaded, paths=paths, vocab=vocab, teacher=loaded_teacher, trained=trained)
    count = len(tokens) if cfg.max_sequences == 0 else min(cfg.max_sequences, len(tokens))
    if count == 0 or tokens.seq_len < 2:
        raise EvaluateError(
            f"token split {tokens.split!r} has no sequences of >= 2 tokens to evaluate; rerun prepare "
            "with a non-empty val split (corpus.val_fraction, prepare.max_val_sequences)"
        )
    packing = packing_of(tokens.manifest)
    tallies = {
        name: cross_tally(cross[name], bins=cfg.calibration_bins) if name in cross else Tally(bins=cfg.calibration_bins)
        for name in loaded
    }
    for start in tqdm(range(0, count, cfg.batch_size), desc="evaluate", unit="batch", disable=not progress):
        rows = np.asarray(tokens.ids[start : min(start + cfg.batch_size, count)], dtype=np.int64)
        ids = torch.from_numpy(rows).to(dev)  # (B, T)
        scored = target_mask(ids, packing)  # (B, T-1) positions whose next token is real
        lengths = valid_lengths(torch.from_numpy(rows), packing).tolist()  # (B,) real tokens per row
        real = [r[:n] for r, n in zip(rows, lengths, strict=True)]  # each row's real teacher tokens
        theirs = {name: align_batch(cm, real, device=dev) for name, cm in cross.items()}  # their own tokens
        if start == 0:
            for name, model in loaded.items():  # warm-up forward per model, not timed
                forward(model, theirs[name].ids if name in theirs else ids, dev)
        teacher_logits = timed_forward(loaded["teacher"], ids, dev, tallies["teacher"])[..., :vocab]  # (B, T, V)
        for name, model in loaded.items():
            if name in cross:
                logits = timed_forward(model, theirs[name].ids, dev, tallies[name])  # (B, L, V')
                score_cross(tallies[name], cross[name], logits, teacher_logits, theirs[name])
                continue
            logits = teacher_logits if name == "teacher" else timed_forward(model, ids, dev, tallies[name])
            is_teacher = name == "teacher"
            score_same_tokenizer(
                tallies[name], logits[..., :vocab], teacher_logits, ids, scored, counts, is_teacher=is_teacher
            )
            del logits
    results = {name: finish(tallies[name], loaded[name], paths[name]) for name in loaded}
    n_tokens = tallies["teacher"].n
    log.info("evaluated %d models on %d sequences (%d positions)", len(loaded), count, n_tokens)
    for name in cross:
        c = results[name]["cross_tokenizer"]
        log.info(
            "%s (another tokenizer): %d own tokens, KL and agreement on the %.1f%% aligned with the teacher "
            "(projection %s, keeps %.1f%% of the teacher's mass there)",
            name,
            c["num_tokens"],
            100 * results[name]["kl_coverage"],
            c["projection"],
            100 * c["teacher_mass_kept"],
        )
    return {
        "teacher": "teacher",
        "split": tokens.split,
        "token_fingerprint": tokens.fingerprint,
        "tokenizer_fingerprint": tokens.tokenizer_fingerprint,
        "teacher_sha256": loaded_teacher.info["sha256"],
        "num_sequences": count,
        "num_tokens": n_tokens,
        "num_bytes": tallies["teacher"].text_bytes if counts is not None else None,
        "trained_against": trained,
        "models": results,
    }


TRAINING_RECORD = "training.json"
"""A student's training summary (``kdcache.train_run.SUMMARY_NAME``); its ``cache`` section: what it learned from."""


def trained_against(model_dir: Path) -> dict[str, Any] | None:
    """The ``cache`` section (teacher sha256, tokenizer and corpus fingerprints, cache name and path), loss
    kind and, for a student of another tokenizer, the projection it trained with (``vocab_map``:
    ``kdcache.evaluate_cross.projection_for``) of a student's ``training.json``; None for a model kdcache
    did not train."""
    record_path = model_dir / TRAINING_RECORD
    if not record_path.is_file():
        return None
    fix = f"retrain the model, or move {record_path} away to evaluate it as a model of unknown origin"
    try:
        record = read_json_file(record_path, what="the training record", fix=fix)
    except InputFileError as e:
        raise EvaluateError(str(e)) from e
    cache = record.get("cache") if isinstance(record, dict) else None
    if not isinstance(cache, dict):
        return None
    loss = record.get("loss")
    kind = loss.get("kind") if isinstance(loss, dict) else None
    mapped = {"vocab_map": projection_for(record)} if isinstance(record.get("vocab_map"), dict) else {}
    return {"record": str(record_path), "loss": kind, **cache, **mapped}


def _check_trained_against(
    trained: dict[str, dict[str, Any] | None], *, teacher: Teacher, tokens: TokenSplit, allow: bool
) -> None:
    """Refuse a teacher other than the one whose cache a student learned from (by sha256), and a val split
    whose tokenizer is not the one it was trained with, unless ``allow`` (then: a warning). A CE-only
    baseline learned nothing from the teacher: only its tokenizer is checked. Models without a training
    record are not checked; a val split not prepared with the cache's training data gets a warning (its
    documents may overlap what the student saw)."""
    sha, where = teacher.info["sha256"], teacher.info["path"]
    split = f"{tokens.path}/{tokens.split}" if tokens.path is not None else f"token split {tokens.split!r}"
    allow_hint = "or pass --allow-other-teacher (evaluate.allow_other_teacher: true) to compare anyway"
    for name, rec in trained.items():
        if rec is None:
            log.info("%s: no %s: not checked against the teacher it learned from", name, TRAINING_RECORD)
            continue
        cache = f"cache {rec.get('path') or rec.get('name') or '?'}"
        problems = []
        if rec.get("loss") != "ce" and rec.get("teacher_sha256") not in (None, sha):
            problems.append(
                f"{rec['record']}: {name} learned from teacher {str(rec['teacher_sha256'])[:12]}… ({cache}) but "
                f"the teacher here, {where}, is {sha[:12]}… — evaluate with the teacher that cache was made from, "
                f"{allow_hint}"
            )
        if rec.get("tokenizer_fingerprint") not in (None, tokens.tokenizer_fingerprint):
            problems.append(
                f"{rec['record']}: {name} was trained with tokenizer {str(rec['tokenizer_fingerprint'])[:12]}… "
                f"({cache}) but {split} was made with tokenizer {tokens.tokenizer_fingerprint[:12]}… — evaluate on "
                f"a val split prepared with that tokenizer (the cache's teacher), {allow_hint}"
            )
        for problem in problems:
            if not allow:
                raise EvaluateError(problem)
            log.warning("evaluate.allow_other_teacher: %s", problem.split(" — ")[0])
        train_split = (tokens.manifest.get("splits") or {}).get("train") or {}
        if rec.get("corpus_fingerprint") not in (None, train_split.get("fingerprint")):
            log.warning(
                "%s: %s was trained on corpus %s… (%s), not on the train split next to %s: their documents may "
                "overlap — evaluate on the val split prepared with the cache's train split",
                rec["record"],
                name,
                str(rec["corpus_fingerprint"])[:12],
                cache,
                split,
            )


def load_model(path: str | Path, *, device: torch.device) -> PreTrainedModel:
    path = Path(path)
    dtype = resolve_dtype("auto", device)
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, local_files_only=True)
    except (OSError, ValueError) as e:
        raise EvaluateError(
            f"{path}: cannot load a causal LM ({e}); is this a model directory (config.json + "
            "safetensors weights)? Train or pull it first"
        ) from e
    return model.to(device).eval()


def _check_tokens(tokens: TokenSplit, teacher: Teacher, *, vocab: int, fingerprint: str) -> None:
    """Refuse token data made with another tokenizer than the teacher's (fingerprints, not sizes)."""
    theirs = fingerprint
    if tokens.tokenizer_fingerprint != theirs:
        raise EvaluateError(
            f"token split {tokens.split!r} was made with tokenizer {tokens.tokenizer_fingerprint[:12]}… but "
            f"teacher {teacher.info['path']} has tokenizer {theirs[:12]}… — rerun prepare with this teacher's "
            f"tokenizer (kdcache prepare --tokenizer {teacher.info['path']}), or evaluate with the teacher it "
            "was made for"
        )
    if tokens.vocab_size > vocab:
        raise EvaluateError(
            f"token split {tokens.split!r} declares vocab_size {tokens.vocab_size} > the teacher tokenizer's "
            f"{vocab} ids — rerun prepare with this teacher's tokenizer"
        )


def _check_models(
    loaded: dict[str, PreTrainedModel],
    *,
    paths: dict[str, Path],
    vocab: int,
    teacher: Teacher,
    trained: dict[str, dict[str, Any] | None],
) -> dict[str, CrossModel]:
    """Every model scores the teacher tokenizer's ``vocab`` ids (padded rows allowed) and speaks that tokenizer,
    or speaks another byte-spelling tokenizer (saved in its dir) and scores all of its ids: those models are
    returned, with how they read the teacher's rows (``kdcache.evaluate_cross``)."""
    fingerprint = tokenizer_fingerprint(teacher.tokenizer)
    cross: dict[str, CrossModel] = {}
    for name, model in loaded.items():
        rows = model.get_output_embeddings().weight.shape[0]
        own = None if name == "teacher" else _own_tokenizer(paths[name])
        theirs = None if own is None else tokenizer_fingerprint(own)
        why = None
        if theirs not in (None, fingerprint):
            method = (trained.get(name) or {}).get("vocab_map") or "prefix"
            max_len = getattr(model.config, "max_position_embeddings", None) or 1 << 30
            try:
                cm = cross_model(
                    teacher.tokenizer, own, method=method, max_len=max_len, fingerprint=theirs, device=teacher.device
                )
            except TokenizerError as e:
                why = e
            else:
                if rows < cm.vocab:
                    raise EvaluateError(
                        f"{paths[name]}: {rows} output logits but its own tokenizer has {cm.vocab} ids; save the "
                        "tokenizer the model was trained with in its directory"
                    )
                cross[name] = cm
                continue
        if rows < vocab:
            raise EvaluateError(
                f"{paths[name]}: {rows} output logits but the teacher tokenizer has {vocab} ids; KL and "
                "agreement need every id — evaluate a model trained on a cache of this teacher"
            )
        if why is not None:
            raise EvaluateError(
                f"{paths[name]}: its tokenizer ({theirs[:12]}…) differs from the teacher's ({fingerprint[:12]}…) and "
                f"the two cannot be aligned by bytes ({why}) — evaluate a student trained with the teacher's "
                "tokenizer, or one whose tokens spell text (byte-level BPE, SentencePiece)"
            )
    return cross


def _own_tokenizer(path: Path) -> Any:
    """The tokenizer saved in a model dir; None when it holds none (then: the teacher's is assumed)."""
    if not any((path / f).is_file() for f in TOKENIZER_FILES):
        return None
    try:
        return load_tokenizer(path)
    except TokenizerError as e:
        raise EvaluateError(f"{path}: cannot load its tokenizer ({e})") from e
