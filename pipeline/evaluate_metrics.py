"""What ``kdcache.evaluate`` counts per model: running sums over scored positions (:class:`Tally`), the
same-tokenizer scoring of one batch, the finished metrics and the files ``dvc metrics``/``dvc plots`` read.

A position t of a row predicts its token t + 1. CE, top-1 accuracy and calibration are over every scored
position; KL(teacher || model) and top-1 agreement over the positions where the teacher's distribution is
known for the model's next token (``kl_n``: every scored position for a model of the teacher's tokenizer,
the aligned ones for a model of another tokenizer, ``kdcache.evaluate_cross``). Bits per byte: the NLL
summed over scored positions whose target spells text, divided by ln 2 times the UTF-8 bytes those
targets spell (special tokens spell none and count in neither sum).
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
from transformers import PreTrainedModel

from kdcache.files import atomic_write_text
from kdcache.fingerprint import WEIGHT_SUFFIXES
from kdcache.losses import dense_kl
from kdcache.tokenizer import UnsupportedTokenizerError, token_bytes

log = logging.getLogger(__name__)

CHUNK_POSITIONS = 1024
"""Positions per fp32 metric chunk: caps the (chunk, V) temporaries."""
SCALARS = (
    "ce",
    "ppl",
    "bits_per_byte",
    "kl_to_teacher",
    "top1_agreement",
    "kl_coverage",
    "top1_accuracy",
    "ece",
    "tokens_per_s",
    "num_parameters",
    "size_bytes",
)
"""The per-model figures ``write_metrics`` puts in the flat metrics JSON (those a model has)."""


@dataclass
class Tally:
    """Running sums for one model over scored positions."""

    bins: int
    n: int = 0
    ce: float = 0.0
    text_nll: float = 0.0  # nats at positions whose target token spells text
    text_bytes: int = 0  # UTF-8 bytes those targets spell
    kl: float = 0.0
    kl_n: int = 0  # positions KL and agreement are measured on
    agree: int = 0
    correct: int = 0
    forward_s: float = 0.0
    forward_tokens: int = 0
    cross: dict[str, Any] | None = None  # a model of another tokenizer: kdcache.evaluate_cross's counts
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

    def add_own_tokens(self, logq: torch.Tensor, labels: torch.Tensor, spans: torch.Tensor | None) -> torch.Tensor:
        """Add CE, accuracy, calibration and bits-per-byte sums of log-probs ``logq`` (c, V) fp32 for next tokens
        ``labels`` (c,) spelling ``spans`` (c,) bytes each (None: no bits per byte). Returns the top-1 ids (c,)."""
        conf, pred = logq.max(dim=-1)  # (c,), (c,)
        correct = pred == labels  # (c,)
        nll = -logq.gather(1, labels[:, None]).squeeze(1)  # (c,) nats
        self.n += int(labels.numel())
        self.ce += float(nll.sum())
        if spans is not None:
            self.text_nll += float(nll[spans > 0].sum())  # special tokens spell no text
            self.text_bytes += int(spans.sum())
        self.correct += int(correct.sum())
        self.add_calibration(conf.exp(), correct)
        return pred

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


@torch.inference_mode()
def forward(model: PreTrainedModel, ids: torch.Tensor, dev: torch.device) -> torch.Tensor:
    logits = model(input_ids=ids, use_cache=False).logits  # (B, T, V)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    return logits


def timed_forward(model: PreTrainedModel, ids: torch.Tensor, dev: torch.device, tally: Tally) -> torch.Tensor:
    t0 = time.perf_counter()
    logits = forward(model, ids, dev)
    tally.forward_s += time.perf_counter() - t0
    tally.forward_tokens += ids.numel()
    return logits


@torch.inference_mode()
def score_same_tokenizer(
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
        spans = byte_counts[labels[rows]] if byte_counts is not None else None  # (c,)
        pred = tally.add_own_tokens(logq, labels[rows], spans)
        if not is_teacher:
            tally.kl += float(dense_kl(logp, flat[rows].float()).sum())
        tally.agree += int((pred == logp.argmax(dim=-1)).sum())
        tally.kl_n += int(pred.numel())


def finish(tally: Tally, model: PreTrainedModel, path: Path) -> dict[str, Any]:
    """The metrics of one model (``SCALARS`` plus ``calibration``, and ``cross_tokenizer`` for a model of
    another tokenizer)."""
    ce = tally.ce / max(tally.n, 1)
    out = {
        "path": str(path),
        "ce": ce,
        "ppl": math.exp(min(ce, 700.0)),
        "bits_per_byte": tally.text_nll / (math.log(2) * tally.text_bytes) if tally.text_bytes else None,
        "kl_to_teacher": tally.kl / max(tally.kl_n, 1),
        "top1_agreement": tally.agree / max(tally.kl_n, 1),
        "top1_accuracy": tally.correct / max(tally.n, 1),
        "ece": tally.ece(),
        "tokens_per_s": tally.forward_tokens / max(tally.forward_s, 1e-9),
        "num_parameters": int(model.num_parameters()),
        "size_bytes": model_size_bytes(path),
        "calibration": tally.reliability(),
    }
    if tally.cross is not None:
        c = tally.cross
        out["kl_coverage"] = tally.kl_n / max(tally.n, 1)
        out["cross_tokenizer"] = {
            "projection": c["projection"],
            "num_tokens": tally.n,
            "num_bytes": tally.text_bytes,
            "aligned_positions": tally.kl_n,
            "teacher_mass_kept": c["mass_kept"] / max(tally.kl_n, 1),
            "student_tokens_cut": c["tokens_cut"],
            "lost_byte_fraction": c["lost_bytes"] / max(c["lost_bytes"] + c["text_bytes"], 1),
            "tokenizer_fingerprint": c["tokenizer_fingerprint"],
        }
    return out


def byte_counts(tokenizer: Any, *, device: torch.device) -> torch.Tensor | None:
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
        student, baseline = models["student"], models["baseline"]
        if _tokenizer_of(student) == _tokenizer_of(baseline):  # CE in nats per token of one tokenizer
            flat["kd_minus_baseline_ce"] = student["ce"] - baseline["ce"]
            flat["kd_minus_baseline_kl"] = student["kl_to_teacher"] - baseline["kl_to_teacher"]
        if "cross_tokenizer" in student and None not in (student["bits_per_byte"], baseline["bits_per_byte"]):
            flat["kd_minus_baseline_bits_per_byte"] = student["bits_per_byte"] - baseline["bits_per_byte"]
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


def _tokenizer_of(model_metrics: dict[str, Any]) -> str | None:
    """The fingerprint of a model's own tokenizer when it is not the teacher's (None: the teacher's)."""
    return (model_metrics.get("cross_tokenizer") or {}).get("tokenizer_fingerprint")
