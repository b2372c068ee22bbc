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
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, PreTrainedModel

from kdcache.config.evaluate import EvaluateConfig
from kdcache.config.teacher import TeacherConfig
from kdcache.devices import resolve_dtype
from kdcache.files import InputFileError, atomic_write_text, read_json_file
from kdcache.fingerprint import WEIGHT_SUFFIXES, tokenizer_fingerprint
from kdcache.losses import dense_kl
from kdcache.packing import packing_of, target_mask
from kdcache.teacher import Teacher, load_teacher
from kdcache.token_data import TokenSplit
from kdcache.tokenizer import (
    TOKENIZER_FILES,
    TokenizerError,
    UnsupportedTokenizerError,
    load_tokenizer,
    token_bytes,
    tokenizer_vocab_size,
)

log = logging.getLogger(__name__)

CHUNK_POSITIONS = 1024
"""Positions per fp32 metric chunk: caps the (chunk, V) temporaries."""
SCALARS = (
    "ce",
    "ppl",
    "bits_per_byte",
    "kl_to_teacher",
    "top1_agreement",
    "top1_accuracy",
    "ece",
    "tokens_per_s",
    "num_parameters",
    "size_bytes",
)


class EvaluateError(ValueError):
    """The models or token data cannot be compared as asked."""


@dataclass
class Tally:
    """Running sums for one model over scored positions."""

    bins: int
    n: int = 0
    ce: float = 0.0
    text_nll: float = 0.0  # nats at positions whose target token spells text
    text_bytes: int = 0  # UTF-8 bytes those targets spell
    kl: float = 0.0
    agree: int = 0
    correct: int = 0
    forward_s: float = 0.0
    forward_tokens: int = 0
    bin_count: np.ndarray = field(init=False)
    bin_conf: np.ndarray = field(init=False)
    bin_correct: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.bin_count = np.zeros(self.bins, np.int64)
        self.bin_conf = np.zeros(self.bins, np.float64)
        self.bin_correct = np.zeros(self.bins, np.float64)

    def add_calibration(self, confidence: torch.Tensor, correct: torch.Tensor) -> None:
        """Bin top-1 confidences (n,) in [0, 1] into equal-width bins; 1.0 falls in the last bin."""
        index = (confidence.double() * self.bins).floor().clamp(0, self.bins - 1).long()  # (n,)
        self.bin_count += torch.bincount(index, minlength=self.bins).cpu().numpy()
        self.bin_conf += torch.bincount(index, weights=confidence.double(), minlength=self.bins).cpu().numpy()
        self.bin_correct += torch.bincount(index, weights=correct.double(), minlength=self.bins).cpu().numpy()

    def ece(self) -> float:
        """sum_b (n_b / N) |accuracy_b - confidence_b| = sum_b |correct_b - conf_b| / N."""
        return float(np.abs(self.bin_correct - self.bin_conf).sum() / max(self.n, 1))

    def reliability(self) -> list[dict[str, float]]:
        rows = []
        for b in range(self.bins):
            count = int(self.bin_count[b])
            rows.append(
                {
                    "bin": b,
                    "lower": b / self.bins,
                    "upper": (b + 1) / self.bins,
                    "count": count,
                    "confidence": float(self.bin_conf[b] / count) if count else None,
                    "accuracy": float(self.bin_correct[b] / count) if count else None,
                }
            )
        return rows


def expected_calibration_error(confidence: torch.Tensor, correct: torch.Tensor, *, bins: int) -> float:
    """ECE of top-1 predictions with ``bins`` equal-width confidence bins."""
    tally = Tally(bins=bins, n=int(confidence.numel()))
    tally.add_calibration(confidence.reshape(-1), correct.reshape(-1))
    return tally.ece()


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
    Everything is compared in the teacher tokenizer's id space: logits past it (padded embedding
    rows, as Qwen2 and Phi-3 have) are dropped before any softmax. Token data made with another
    tokenizer is refused, and so is a model whose own tokenizer differs. Positions whose next token
    is padding (``prepare.packing: documents``) are not scored. Metric math is fp32.
    """
    from tqdm.auto import tqdm

    if "teacher" in models:
        raise EvaluateError("models: the name 'teacher' is taken by the teacher (teacher.path); rename that model")
    loaded_teacher = load_teacher(teacher)
    dev, vocab = loaded_teacher.device, tokenizer_vocab_size(loaded_teacher.tokenizer)
    fingerprint = tokenizer_fingerprint(loaded_teacher.tokenizer)
    byte_counts = _byte_counts(loaded_teacher.tokenizer, device=dev)
    _check_tokens(tokens, loaded_teacher, vocab=vocab, fingerprint=fingerprint)
    paths = {"teacher": Path(teacher.path), **{name: Path(p) for name, p in models.items()}}
    trained = {name: trained_against(paths[name]) for name in models}
    _check_trained_against(trained, teacher=loaded_teacher, tokens=tokens, allow=cfg.allow_other_teacher)
    loaded = {"teacher": loaded_teacher.model} | {name: load_model(path, device=dev) for name, path in models.items()}
    _check_models(loaded, paths=paths, vocab=vocab, fingerprint=fingerprint)
    count = len(tokens) if cfg.max_sequences == 0 else min(cfg.max_sequences, len(tokens))
    if count == 0 or tokens.seq_len < 2:
        raise EvaluateError(
            f"token split {tokens.split!r} has no sequences of >= 2 tokens to evaluate; rerun prepare "
            "with a non-empty val split (corpus.val_fraction, prepare.max_val_sequences)"
        )
    packing = packing_of(tokens.manifest)
    tallies = {name: Tally(bins=cfg.calibration_bins) for name in loaded}
    for start in tqdm(range(0, count, cfg.batch_size), desc="evaluate", unit="batch", disable=not progress):
        rows = np.asarray(tokens.ids[start : min(start + cfg.batch_size, count)], dtype=np.int64)
        ids = torch.from_numpy(rows).to(dev)  # (B, T)
        scored = target_mask(ids, packing)  # (B, T-1) positions whose next token is real
        if start == 0:
            for model in loaded.values():  # warm-up forward per model, not timed
                _forward(model, ids, dev)
        teacher_logits = _timed_forward(loaded["teacher"], ids, dev, tallies["teacher"])[..., :vocab]  # (B, T, V)
        for name, model in loaded.items():
            logits = teacher_logits if name == "teacher" else _timed_forward(model, ids, dev, tallies[name])
            is_teacher = name == "teacher"
            _score(tallies[name], logits[..., :vocab], teacher_logits, ids, scored, byte_counts, is_teacher=is_teacher)
            del logits
    results = {name: _finish(tallies[name], loaded[name], paths[name]) for name in loaded}
    n_tokens = tallies["teacher"].n
    log.info("evaluated %d models on %d sequences (%d positions)", len(loaded), count, n_tokens)
    return {
        "teacher": "teacher",
        "split": tokens.split,
        "token_fingerprint": tokens.fingerprint,
        "tokenizer_fingerprint": tokens.tokenizer_fingerprint,
        "teacher_sha256": loaded_teacher.info["sha256"],
        "num_sequences": count,
        "num_tokens": n_tokens,
        "num_bytes": tallies["teacher"].text_bytes if byte_counts is not None else None,
        "trained_against": trained,
        "models": results,
    }


TRAINING_RECORD = "training.json"
"""A student's training summary (``kdcache.train_run.SUMMARY_NAME``); its ``cache`` section: what it learned from."""


def trained_against(model_dir: Path) -> dict[str, Any] | None:
    """The ``cache`` section (teacher sha256, tokenizer and corpus fingerprints, cache name and path) and
    loss kind of a student's ``training.json``; None for a model kdcache did not train."""
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
    return {"record": str(record_path), "loss": kind, **cache}


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


def _check_models(loaded: dict[str, PreTrainedModel], *, paths: dict[str, Path], vocab: int, fingerprint: str) -> None:
    """Every model scores the teacher tokenizer's ``vocab`` ids (padded rows allowed) and speaks that tokenizer."""
    for name, model in loaded.items():
        rows = model.get_output_embeddings().weight.shape[0]
        if rows < vocab:
            raise EvaluateError(
                f"{paths[name]}: {rows} output logits but the teacher tokenizer has {vocab} ids; KL and "
                "agreement need every id — evaluate a model trained on a cache of this teacher"
            )
        if name == "teacher" or not any((paths[name] / f).is_file() for f in TOKENIZER_FILES):
            continue
        try:
            theirs = tokenizer_fingerprint(load_tokenizer(paths[name]))
        except TokenizerError as e:
            raise EvaluateError(f"{paths[name]}: cannot load its tokenizer ({e})") from e
        if theirs != fingerprint:
            raise EvaluateError(
                f"{paths[name]}: its tokenizer ({theirs[:12]}…) differs from the teacher's ({fingerprint[:12]}…); "
                "evaluate compares next-token distributions in the teacher's ids — evaluate a student trained "
                "with the teacher's tokenizer"
            )


@torch.inference_mode()
def _forward(model: PreTrainedModel, ids: torch.Tensor, dev: torch.device) -> torch.Tensor:
    logits = model(input_ids=ids, use_cache=False).logits  # (B, T, V)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    return logits


def _timed_forward(model: PreTrainedModel, ids: torch.Tensor, dev: torch.device, tally: Tally) -> torch.Tensor:
    t0 = time.perf_counter()
    logits = _forward(model, ids, dev)
    tally.forward_s += time.perf_counter() - t0
    tally.forward_tokens += ids.numel()
    return logits


@torch.inference_mode()
def _score(
    tally: Tally,
    logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    ids: torch.Tensor,
    scored: torch.Tensor,
    byte_counts: torch.Tensor | None,
    *,
    is_teacher: bool,
) -> None:
    """Add one batch's scored positions (``scored`` (B, T-1): t predicts t+1) to ``tally``, in chunks;
    ``byte_counts`` (V,): the UTF-8 bytes each id spells, for bits per byte (None: not computed)."""
    vocab = logits.shape[-1]
    keep = scored.reshape(-1)  # (B*(T-1),)
    flat = logits[:, :-1].reshape(-1, vocab)[keep]  # (N, V)
    flat_teacher = teacher_logits[:, :-1].reshape(-1, vocab)[keep]  # (N, V)
    labels = ids[:, 1:].reshape(-1)[keep]  # (N,)
    for s in range(0, flat.shape[0], CHUNK_POSITIONS):
        rows = slice(s, s + CHUNK_POSITIONS)
        logq = F.log_softmax(flat[rows].float(), dim=-1)  # (c, V)
        logp = F.log_softmax(flat_teacher[rows].float(), dim=-1)  # (c, V)
        conf, pred = logq.max(dim=-1)  # (c,), (c,)
        correct = pred == labels[rows]  # (c,)
        nll = -logq.gather(1, labels[rows, None]).squeeze(1)  # (c,) nats
        tally.n += int(labels[rows].numel())
        tally.ce += float(nll.sum())
        if byte_counts is not None:
            nbytes = byte_counts[labels[rows]]  # (c,) 0 for special tokens, which spell no text
            tally.text_nll += float(nll[nbytes > 0].sum())
            tally.text_bytes += int(nbytes.sum())
        if not is_teacher:
            tally.kl += float(dense_kl(logp, flat[rows].float()).sum())
        tally.agree += int((pred == logp.argmax(dim=-1)).sum())
        tally.correct += int(correct.sum())
        tally.add_calibration(conf.exp(), correct)


def _finish(tally: Tally, model: PreTrainedModel, path: Path) -> dict[str, Any]:
    ce = tally.ce / max(tally.n, 1)
    return {
        "path": str(path),
        "ce": ce,
        "ppl": math.exp(min(ce, 700.0)),
        "bits_per_byte": tally.text_nll / (math.log(2) * tally.text_bytes) if tally.text_bytes else None,
        "kl_to_teacher": tally.kl / max(tally.n, 1),
        "top1_agreement": tally.agree / max(tally.n, 1),
        "top1_accuracy": tally.correct / max(tally.n, 1),
        "ece": tally.ece(),
        "tokens_per_s": tally.forward_tokens / max(tally.forward_s, 1e-9),
        "num_parameters": int(model.num_parameters()),
        "size_bytes": model_size_bytes(path),
        "calibration": tally.reliability(),
    }


def _byte_counts(tokenizer: Any, *, device: torch.device) -> torch.Tensor | None:
    """(V,) int64: the UTF-8 bytes each id spells (``kdcache.tokenizer.token_bytes``; special tokens 0),
    or None for a tokenizer whose tokens cannot spell text (word-level, WordPiece): no bits per byte."""
    try:
        spelled = token_bytes(tokenizer)
    except UnsupportedTokenizerError as e:
        log.info("no bits per byte: %s", e)
        return None
    return torch.tensor([len(b) for b in spelled], dtype=torch.int64, device=device)


def model_size_bytes(path: str | Path) -> int:
    """Bytes of the weight files in a model directory."""
    return sum(p.stat().st_size for p in Path(path).iterdir() if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES))


def write_metrics(metrics: dict[str, Any], *, metrics_path: str | Path, plots_dir: str | Path) -> None:
    """A flat JSON for ``dvc metrics show`` and ``calibration.csv`` (model,bin,confidence,accuracy,count)
    for ``dvc plots show``; both written atomically."""
    models = metrics["models"]
    flat: dict[str, Any] = {name: {k: m[k] for k in SCALARS if m.get(k) is not None} for name, m in models.items()}
    if "student" in models and "baseline" in models:
        flat["kd_minus_baseline_ce"] = models["student"]["ce"] - models["baseline"]["ce"]
        flat["kd_minus_baseline_kl"] = models["student"]["kl_to_teacher"] - models["baseline"]["kl_to_teacher"]
    flat["num_sequences"], flat["num_tokens"] = metrics["num_sequences"], metrics["num_tokens"]
    metrics_path = Path(metrics_path)
    metrics_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(metrics_path, json.dumps(flat, indent=2) + "\n")
    plots = Path(plots_dir)
    plots.mkdir(parents=True, exist_ok=True)
    rows = io.StringIO(newline="")
    writer = csv.writer(rows)
    writer.writerow(["model", "bin", "confidence", "accuracy", "count"])
    for name, m in models.items():
        for row in m["calibration"]:
            if row["count"]:
                writer.writerow([name, row["bin"], f"{row['confidence']:.6f}", f"{row['accuracy']:.6f}", row["count"]])
    atomic_write_text(plots / "calibration.csv", rows.getvalue())
