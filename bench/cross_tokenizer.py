"""Benchmark: a student with another tokenizer distilled from the demo cache, per ``train.cross_tokenizer``.

The student's tokenizer is a byte-level BPE trained on the same corpus (the train split of
``corpus``'s default documents, as the demo teacher's was) with ``--vocab`` tokens (3,000 vs the
teacher's 4,096). Every variant trains the same freshly initialised small student (``--seed``) on the
same cache batches in the same order, each batch re-tokenized by ``kdcache.crosstok`` (the trainer's
batch path): CE only (the baseline), then ``exact``, ``prefix`` and ``uld`` with
``alpha * KD + (1 - alpha) * CE`` (KD: the cache's own loss, ``sampled`` or ``topk_tail``, on the
projected targets; for ``uld`` the sorted-probability distance of ``kdcache.crossproj.uld_loss``).

Reports per variant: val bits per byte (the val split's text re-tokenized by the student; nats of
each predicted token / ln 2 / the bytes of text it covers, the tokenizer-neutral measure), the share
of student tokens that got a soft target and the teacher mass the projection kept; and the teacher's
own bits per byte on the same rows. Prints a markdown table; writes ``bench/results/cross_tokenizer.json``.

    python bench/cross_tokenizer.py --cache cache/demo --tokens data/tokens --teacher models/demo-teacher
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kdcache.cache.reader import open_cache
from kdcache.config.corpus import CorpusConfig
from kdcache.config.train import StudentConfig
from kdcache.corpus import read_documents, split_documents
from kdcache.crossproj import uld_loss
from kdcache.crosstok import Aligner, CrossTokenizerBatches, student_row_length
from kdcache.losses import KDLossSpec, default_loss, kd_loss
from kdcache.optim import lr_scheduler, make_optimizer
from kdcache.packing import packing_of, valid_lengths
from kdcache.student import build_student
from kdcache.token_data import open_tokens
from kdcache.tokenizer import load_tokenizer, token_bytes, train_bpe_tokenizer

RESULTS = Path(__file__).parent / "results" / "cross_tokenizer.json"
STUDENT = StudentConfig(hidden_size=64, num_layers=2, num_heads=2, intermediate_size=192)
log = logging.getLogger("cross_tokenizer")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cache", default="cache/demo")
    ap.add_argument("--tokens", default="data/tokens", help="token data of the cache (its val split is scored)")
    ap.add_argument("--teacher", default="models/demo-teacher", help="for the teacher's own bits per byte")
    ap.add_argument("--vocab", type=int, default=3000, help="0: the teacher's tokenizer (the control)")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--alpha", type=float, default=0.5)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--val", type=int, default=64, help="val rows scored")
    ap.add_argument("--methods", default="ce,exact,prefix,uld")
    ap.add_argument("--seed", type=int, default=0, help="the student's initialisation and the batch order")
    ap.add_argument("--threads", type=int, default=1, help="tiny models: one thread is faster on a loaded machine")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument(
        "--save",
        type=Path,
        default=None,
        help="save each student (+ its tokenizer) under DIR/<variant> and score them with kdcache.evaluate too "
        "(KL to the teacher and top-1 agreement at the aligned positions, coverage)",
    )
    ap.add_argument("--kl-projection", default="prefix", choices=("exact", "prefix"), help="for --save's KL")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)

    t0 = time.perf_counter()
    teacher_tok = load_tokenizer(Path(args.cache) / "tokenizer")
    if args.vocab:
        corpus = CorpusConfig()
        train_texts = split_documents(read_documents(corpus), val_fraction=corpus.val_fraction)["train"]["text"]
        student_tok = train_bpe_tokenizer(train_texts, vocab_size=args.vocab)
    else:  # the control: a student with the teacher's own tokenizer, through the same path
        student_tok = teacher_tok
    log.info("student tokenizer: %d tokens (%.1f s)", len(student_tok), time.perf_counter() - t0)

    reader = open_cache(args.cache)
    packing = packing_of(reader.meta.corpus)
    aligner = Aligner(teacher_tok, student_tok)
    sample = [_real(reader[i]["input_ids"], packing) for i in range(min(len(reader), 256))]
    L = student_row_length(aligner, sample)
    val_ids = open_tokens(args.tokens, "val").ids[: args.val].astype(np.int64)  # (N, T) teacher ids
    val = _student_val(aligner, val_ids, packing, max_len=L)
    results: dict[str, Any] = {
        "cache": str(args.cache),
        "cache_targets": reader.layout.kind,
        "teacher_vocab": len(teacher_tok),
        "student_vocab": len(student_tok),
        "student_row_length": L,
        "teacher_row_length": reader.layout.seq_len,
        "args": {k: str(v) for k, v in vars(args).items()},
        "teacher_bits_per_byte": _teacher_bpb(args.teacher, val_ids, packing, teacher_tok),
        "variants": {},
    }
    for method in args.methods.split(","):
        start = time.perf_counter()
        run = _train(method, reader, teacher_tok, student_tok, packing=packing, L=L, args=args)
        model = run.pop("model")
        bpb = _bits_per_byte(model, val)
        results["variants"][method] = {"val_bits_per_byte": bpb, "seconds": time.perf_counter() - start, **run}
        log.info("%s: val %.4f bits/byte (%.0f s)", method, bpb, time.perf_counter() - start)
        if args.save is not None:
            _save(model, student_tok, args.save / method, projection=args.kl_projection, cache=args.cache)
    if args.save is not None:
        results["evaluate"] = _evaluate(args, [m for m in args.methods.split(",")])
    results["machine"] = {"platform": platform.platform(), "cpus": len(os.sched_getaffinity(0)), "shared": True}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(_table(results))


def _save(model: torch.nn.Module, tokenizer: Any, out: Path, *, projection: str, cache: str) -> None:
    """The student as ``kdcache train`` leaves it: weights, tokenizer, and a record naming ``projection`` as
    the one it trained with (what ``kdcache.evaluate`` projects the teacher by)."""
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    vocab_map = {"method": projection}  # every model through one projection: their KL compares
    (out / "training.json").write_text(json.dumps({"cache": {"path": str(cache)}, "vocab_map": vocab_map}) + "\n")


def _evaluate(args: argparse.Namespace, methods: list[str]) -> dict[str, Any]:
    """``kdcache.evaluate`` of the saved students against the teacher on the same val rows."""
    from kdcache.config.evaluate import EvaluateConfig
    from kdcache.config.teacher import TeacherConfig
    from kdcache.evaluate import evaluate

    metrics = evaluate(
        EvaluateConfig(batch_size=8, max_sequences=args.val),
        tokens=open_tokens(args.tokens, "val"),
        teacher=TeacherConfig(path=str(args.teacher), device="cpu"),
        models={m: args.save / m for m in methods},
    )
    keep = ("ce", "bits_per_byte", "kl_to_teacher", "top1_agreement", "kl_coverage", "top1_accuracy")
    return {
        name: {k: m.get(k) for k in keep} | {"cross": m.get("cross_tokenizer")} for name, m in metrics["models"].items()
    }


def _real(ids: Any, packing: dict[str, Any]) -> np.ndarray:
    row = torch.as_tensor(np.asarray(ids, np.int64))[None]
    return row[0, : int(valid_lengths(row, packing)[0])].numpy()


def _train(method, reader, teacher_tok, student_tok, *, packing, L, args) -> dict[str, Any]:
    """One student; ``ce`` re-tokenizes the same batches and ignores their targets."""
    cross = CrossTokenizerBatches(
        teacher_tok, student_tok, method="exact" if method == "ce" else method, student_seq_len=L, packing=packing
    )
    torch.manual_seed(args.seed)
    model = build_student(STUDENT, vocab_size=len(student_tok), seq_len=L, tokenizer=student_tok)
    optimizer = make_optimizer(model, lr=args.lr, weight_decay=0.01)
    scheduler = lr_scheduler(optimizer, warmup_steps=args.steps // 10, max_steps=args.steps, min_lr_ratio=0.1)
    kind = "ce" if method in ("ce", "uld") else default_loss(reader.layout.kind)
    spec = KDLossSpec(kind=kind, alpha=args.alpha)
    keys = None if method != "ce" else ("input_ids",)
    step, epoch, kd_sum = 0, 0, 0.0
    while step < args.steps:
        for batch in reader.batches(args.batch_size, seed=args.seed, epoch=epoch, keys=keys):
            b = cross.apply(batch)
            logits = model(input_ids=b["input_ids"]).logits  # (B, L, V)
            targets = {k: v for k, v in b.items() if k not in ("input_ids", "seq_index") and not k.startswith("uld")}
            out = kd_loss(logits, input_ids=b["input_ids"], spec=spec, **targets)
            loss = out.loss
            if method == "uld":
                u, _ = uld_loss(logits, **{k: b[k] for k in ("uld_probs", "uld_tail", "uld_mask", "loss_mask")})
                loss = (1 - args.alpha) * out.loss + args.alpha * u
                kd_sum += float(u.detach())
            else:
                kd_sum += float(out.kd)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            step += 1
            if step % 50 == 0:
                log.info("%s step %d loss %.4f", method, step, float(loss.detach()))
            if step == args.steps:
                break
        epoch += 1
    report = cross.report()
    keep = ("soft_target_fraction", "teacher_mass_kept_ratio", "lost_byte_fraction", "student_tokens_cut")
    summary = {k: report[k] for k in keep} | {"projection": report["projection"]}
    return {"model": model, "mean_kd": kd_sum / step, **summary}


def _student_val(aligner: Aligner, ids: np.ndarray, packing: dict[str, Any], *, max_len: int) -> list[tuple]:
    """Val rows as student ids with the text bytes of each token (the denominator of bits per byte)."""
    rows = aligner.align_rows([_real(r, packing) for r in ids], max_len=max_len)
    return [(torch.from_numpy(r.student_ids), torch.from_numpy(r.token_spans)) for r in rows if len(r.student_ids) > 1]


@torch.no_grad()
def _bits_per_byte(model: torch.nn.Module, rows: list[tuple]) -> float:
    model.eval()
    nats = nbytes = 0.0
    for ids, spans in rows:
        logp = torch.log_softmax(model(input_ids=ids[None]).logits[0].float(), -1)  # (n, V)
        nats -= float(logp[:-1].gather(-1, ids[1:, None]).sum())
        nbytes += float(spans[1:].sum())
    return nats / math.log(2) / nbytes


@torch.no_grad()
def _teacher_bpb(teacher_dir: str, ids: np.ndarray, packing: dict[str, Any], teacher_tok: Any) -> float | None:
    from transformers import AutoModelForCausalLM

    if not Path(teacher_dir).is_dir():
        return None
    model = AutoModelForCausalLM.from_pretrained(teacher_dir).eval()
    spelled = token_bytes(teacher_tok)
    nats = nbytes = 0.0
    for row in ids:
        real = torch.from_numpy(_real(row, packing))
        logp = torch.log_softmax(model(input_ids=real[None]).logits[0].float(), -1)
        nats -= float(logp[:-1].gather(-1, real[1:, None]).sum())
        nbytes += sum(len(spelled[t]) for t in real[1:].tolist())
    return nats / math.log(2) / nbytes


def _table(results: dict[str, Any]) -> str:
    base = results["variants"].get("ce", {}).get("val_bits_per_byte")
    lines = [
        f"cache {results['cache']} ({results['cache_targets']}), teacher vocab {results['teacher_vocab']} -> "
        f"student vocab {results['student_vocab']}; student rows {results['student_row_length']} tokens "
        f"(teacher {results['teacher_row_length']}); teacher val bits/byte {results['teacher_bits_per_byte']:.4f}",
        "",
        "| variant | val bits/byte | vs CE | student tokens with a soft target | teacher mass kept | seconds |",
        "|---|---|---|---|---|---|",
    ]
    for name, v in results["variants"].items():
        rel = f"{100 * (v['val_bits_per_byte'] / base - 1):+.2f}%" if base else "-"
        soft = "-" if name == "ce" else f"{100 * v['soft_target_fraction']:.1f}%"
        kept = "-" if name == "ce" else f"{100 * v['teacher_mass_kept_ratio']:.1f}%"
        lines.append(f"| {name} | {v['val_bits_per_byte']:.4f} | {rel} | {soft} | {kept} | {v['seconds']:.0f} |")
    if "evaluate" in results:
        lines += [
            "",
            "kdcache.evaluate of the same students (KL and agreement at the aligned positions):",
            "",
            "| model | bits/byte | KL(teacher ‖ model) | top-1 agreement | aligned positions | projection |",
            "|---|---|---|---|---|---|",
        ]
        for name, m in results["evaluate"].items():
            cross = m["cross"] or {}
            cover = f"{100 * m['kl_coverage']:.1f}%" if m["kl_coverage"] is not None else "100%"
            lines.append(
                f"| {name} | {m['bits_per_byte']:.4f} | {m['kl_to_teacher']:.4f} | {m['top1_agreement']:.4f} | "
                f"{cover} | {cross.get('projection', '-')} |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
