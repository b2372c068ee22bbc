"""A teacher-written corpus (sequence-level KD): the teacher continues a set of prompts with HF ``generate``.

The output directory holds ``part-NNNNN.jsonl`` files (one per batch of ``generate.batch_size`` prompts, one
JSON object per prompt: ``text`` = prompt + continuation, plus ``prompt``, ``continuation``, ``index``,
``source``, ``prompt_tokens``, ``new_tokens``, ``stopped_at_eos``), ``plan.json`` (what the run is made of,
written first) and ``manifest.json`` (written last: teacher sha256, the prompts' sha256, the sampling
settings, the runtime, every part with its sha256, kdcache's version). ``prepare`` reads the parts like any
other jsonl corpus (``corpus.paths: [data/generated/part-*.jsonl]``).

Sampling is deterministic per prompt: prompt i owns a random generator seeded by ``(generate.seed, i)`` and
draws V float64 uniforms from it at every step, whatever batch it is in. ``SeededSampler`` (a logits processor)
applies temperature, top-k and top-p with transformers' own warpers, then takes the Gumbel-max draw
argmax(warped logits + Gumbel noise) in float64, an exact sample of softmax(warped logits), and hands
``generate`` a one-hot score row that its greedy step takes. The batch a prompt lands in never changes its
noise; what can still differ is the logits themselves, which depend on the batch shape (left padding, kernel
blocking) by rounding. A Gumbel-max draw flips only when its two best perturbed scores are within that
rounding (~1e-6 of a logit in fp32), where an inverse-CDF draw flips when its uniform falls within the
accumulated CDF error of any of the V boundaries: on the demo teacher, logits of a row alone vs inside a
padded batch of 64 flip an inverse-CDF draw with probability 1.2e-5 and a Gumbel-max draw with < 6e-7
(bench/generate_speed.py). Runs with the same batch size, dtype, device and software are byte-identical, and
a killed run resumes to the same bytes: finished parts are written atomically and kept when the plan matches.

Decoding uses a static KV cache (``generate.kv_cache``) by default: one preallocated buffer per batch instead
of a cache grown by concatenation at every step. On the demo teacher (CPU, one thread) batch 64 with the
static cache writes 2.0x the new tokens/s of batch 8 with the dynamic cache (1.4x from the cache alone at batch
64); the Gumbel noise costs ~14% of a step there (bench/generate_speed.py).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList
from transformers.generation.logits_process import (
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from kdcache import __version__
from kdcache.config.base import to_dict
from kdcache.config.corpus import CorpusConfig
from kdcache.config.generate import OUTPUT_KIND, GenerateConfig
from kdcache.config.teacher import TeacherConfig
from kdcache.corpus import read_documents, split_documents
from kdcache.corpus_files import default_corpus_name
from kdcache.devices import runtime_key
from kdcache.files import atomic_write, atomic_write_text, crash_point, read_json_file
from kdcache.fingerprint import sha256_file, sha256_json, tokenizer_fingerprint
from kdcache.outputs import hold_output_dir
from kdcache.packing import pad_id_for, special_tokens_around
from kdcache.teacher import Teacher, load_teacher
from kdcache.tokenizer import tokenizer_vocab_size

log = logging.getLogger(__name__)

FORMAT = "kdcache-generated"
FORMAT_VERSION = 1
PLAN_NAME = "plan.json"
MANIFEST_NAME = "manifest.json"


class GenerateError(ValueError):
    """The prompts cannot be made, or an output directory holds a run with another plan."""


@dataclass(frozen=True)
class Prompt:
    """One prompt: its index (the seed stream it draws from), token ids (leading special tokens included), source."""

    index: int
    ids: tuple[int, ...]
    body: int  # ids[body:] is the text part (ids[:body] are the tokenizer's leading special tokens)
    source: str


def part_name(i: int) -> str:
    return f"part-{i:05d}.jsonl"


def prompt_seed(seed: int, index: int) -> int:
    """A 63-bit generator seed for prompt ``index``, stable across platforms and processes."""
    digest = hashlib.sha256(f"kdcache-generate:{int(seed)}:{int(index)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def prompt_generator(seed: int, index: int, device: torch.device | str = "cpu") -> torch.Generator:
    """Prompt ``index``'s own random stream: a generator on ``device`` seeded by ``(seed, index)``."""
    return torch.Generator(device=device).manual_seed(prompt_seed(seed, index))


def gumbel_noise(generators: list[torch.Generator], vocab: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """One step of Gumbel noise, row b from ``generators[b]`` (advancing it by ``vocab`` float64 uniforms):
    (B, vocab) float64, -log(-log(u)) with u in [0, 1) (u = 0 gives -inf: that id is not drawn, p = 2^-53)."""
    u = torch.stack([torch.rand(vocab, generator=g, dtype=torch.float64, device=device) for g in generators])
    return -torch.log(-torch.log(u))  # (B, V)


class SeededSampler(LogitsProcessor):
    """Sampling with one random stream per row: warp (temperature, top-k, top-p: transformers' own warpers),
    draw by Gumbel-max in float64, return scores that are 0 at the drawn id and -inf elsewhere, so
    ``generate``'s greedy step (``do_sample=False``) takes exactly the draw."""

    def __init__(self, generators: list[torch.Generator], *, cfg: GenerateConfig) -> None:
        self.generators = generators  # one per row, each advanced by one step of noise per call
        self.warpers: list[LogitsProcessor] = []
        if cfg.temperature != 1.0:
            self.warpers.append(TemperatureLogitsWarper(cfg.temperature))
        if cfg.top_k:
            self.warpers.append(TopKLogitsWarper(cfg.top_k))
        if cfg.top_p < 1.0:
            self.warpers.append(TopPLogitsWarper(cfg.top_p))

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        logits = scores.float()  # (B, V) fp32
        for warp in self.warpers:
            logits = warp(input_ids, logits)  # (B, V), -inf outside the kept set
        noise = gumbel_noise(self.generators, logits.shape[1], logits.device)  # (B, V) float64
        ids = (logits.double() + noise).argmax(dim=-1, keepdim=True)  # (B, 1) a draw from softmax(logits)
        return torch.full_like(logits, float("-inf")).scatter_(1, ids, 0.0)  # (B, V) one-hot in log space


# ----------------------------------------------------------------------------- prompts


def read_prompts(cfg: GenerateConfig, tokenizer: Any, *, progress: bool = False) -> list[Prompt]:
    """The prompts: train-split documents of ``cfg.prompts`` in sha256 order, each cut to ``cfg.prompt_tokens``.

    Documents are read as prepare reads a corpus (``kdcache.corpus.read_documents``), split by the same
    content-hash rule at ``cfg.val_fraction`` (val documents are never prompts), ordered by the sha256 of
    their text and capped at ``cfg.max_prompts``. Each prompt is the tokenizer's leading special tokens
    (BOS for Llama-3/Gemma-style tokenizers) then the document's first ``prompt_tokens`` ids (0 = all).
    """
    corpus = CorpusConfig(
        paths=cfg.prompts, text_field=cfg.prompt_field, val_fraction=cfg.val_fraction, errors=cfg.errors
    )
    docs = read_documents(corpus, progress=progress)
    if len(docs) >= 2:
        docs = split_documents(docs, val_fraction=cfg.val_fraction)["train"]
    order = sorted(range(len(docs)), key=lambda i: hashlib.sha256(docs[i]["text"].encode("utf-8")).digest())
    if cfg.max_prompts:
        order = order[: cfg.max_prompts]
    prefix, _ = special_tokens_around(tokenizer)
    texts = [docs[i]["text"] for i in order]
    sources = [docs[i]["source"] for i in order]
    encoded = tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"] if texts else []
    prompts = []
    for text_ids, source in zip(encoded, sources, strict=True):
        body = list(text_ids[: cfg.prompt_tokens or None])
        prompts.append(Prompt(index=len(prompts), ids=(*prefix, *body), body=len(prefix), source=source))
    if not prompts:
        raise GenerateError("generate.prompts: no train-split documents to prompt with — add prompt documents")
    return prompts


def prompts_sha256(prompts: list[Prompt]) -> str:
    """sha256 of the prompts' token ids in order (what the teacher sees)."""
    return sha256_json([list(p.ids) for p in prompts])


# ----------------------------------------------------------------------------- generation


def prepare_teacher_for_generate(teacher: Teacher) -> None:
    """Replace the model's own ``generation_config`` (its recommended sampling, penalties, suppressed tokens)
    by an empty one: only ``generate.*`` settings apply, and they are the ones recorded."""
    tok = teacher.tokenizer
    teacher.model.generation_config = GenerationConfig(eos_token_id=tok.eos_token_id, pad_token_id=pad_id_for(tok))


def generate_ids(teacher: Teacher, prompts: list[Prompt], cfg: GenerateConfig) -> list[tuple[list[int], bool]]:
    """Continue a batch of prompts (left-padded, one ``generate`` call): per prompt its new ids (EOS and
    what follows cut off) and whether it stopped at EOS."""
    tok = teacher.tokenizer
    eos, pad = tok.eos_token_id, pad_id_for(tok)
    width = max(len(p.ids) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)  # (B, W) left-padded
    mask = torch.zeros((len(prompts), width), dtype=torch.long)  # (B, W)
    for b, p in enumerate(prompts):
        if p.ids:
            ids[b, width - len(p.ids) :] = torch.tensor(p.ids)
            mask[b, width - len(p.ids) :] = 1
    sampler = SeededSampler([prompt_generator(cfg.seed, p.index, teacher.device) for p in prompts], cfg=cfg)
    settings = GenerationConfig(
        do_sample=False,
        num_beams=1,
        max_new_tokens=cfg.max_new_tokens,
        eos_token_id=eos,
        pad_token_id=pad,
        cache_implementation=cfg.kv_cache,
    )
    with torch.inference_mode():
        out = teacher.model.generate(
            input_ids=ids.to(teacher.device),
            attention_mask=mask.to(teacher.device),
            generation_config=settings,
            logits_processor=LogitsProcessorList([sampler]),
        )  # (B, W + n) with n <= max_new_tokens
    result = []
    for new in out[:, width:].cpu().tolist():
        stopped = eos in new
        result.append((new[: new.index(eos)] if stopped else new, stopped))
    return result


def generate_rows(teacher: Teacher, prompts: list[Prompt], cfg: GenerateConfig) -> list[dict[str, Any]]:
    """One corpus row per prompt of a batch: ``text`` = prompt + continuation, decoded without special tokens."""
    tok = teacher.tokenizer
    rows = []
    for p, (new, stopped) in zip(prompts, generate_ids(teacher, prompts, cfg), strict=True):
        body = list(p.ids[p.body :])
        rows.append(
            {
                "index": p.index,
                "text": tok.decode(body + new, skip_special_tokens=True),
                "prompt": tok.decode(body, skip_special_tokens=True),
                "continuation": tok.decode(new, skip_special_tokens=True),
                "source": p.source,
                "prompt_tokens": len(p.ids),
                "new_tokens": len(new),
                "stopped_at_eos": stopped,
            }
        )
    return rows


# ----------------------------------------------------------------------------- the corpus on disk


def _plan(teacher: Teacher, prompts: list[Prompt], cfg: GenerateConfig) -> dict[str, Any]:
    """Everything the parts' content depends on; a resume with any difference is refused."""
    settings = {k: v for k, v in to_dict(cfg).items() if k != "enabled"}
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "teacher_sha256": teacher.info["sha256"],
        "tokenizer_fingerprint": tokenizer_fingerprint(teacher.tokenizer),
        "prompts_sha256": prompts_sha256(prompts),
        "num_prompts": len(prompts),
        "settings": settings,
        "runtime": runtime_key(teacher.device, teacher.dtype, teacher.model),
    }


def _check_plan(out: Path, plan: dict[str, Any]) -> None:
    path = out / PLAN_NAME
    if not path.exists():
        return
    old = read_json_file(path, what="a generate plan", fix="delete the directory or pass --overwrite")
    diff = sorted(k for k in set(old) | set(plan) if old.get(k) != plan.get(k))
    if "settings" in diff:
        old_settings = old.get("settings") or {}
        diff.remove("settings")
        diff += [f"settings.{k}" for k in sorted(plan["settings"]) if old_settings.get(k) != plan["settings"][k]]
    if diff:
        raise GenerateError(
            f"{out}: holds a generated corpus with another plan ({', '.join(diff)} differ) — point --out "
            "(paths.generated) at a new directory or move this one aside"
        )


def _part_rows(path: Path, prompts: list[Prompt]) -> int | None:
    """Rows of a finished part whose indices are the expected prompts', else None (to be written again)."""
    try:
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    except (OSError, ValueError) as e:
        log.warning("%s: unreadable (%s); generating it again", path, e)
        return None
    if [r.get("index") for r in rows if isinstance(r, dict)] != [p.index for p in prompts]:
        log.warning("%s: holds other prompts than its batch; generating it again", path)
        return None
    return len(rows)


def _write_part(path: Path, rows: list[dict[str, Any]]) -> None:
    text = "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in rows)
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def _part_stats(path: Path) -> dict[str, int]:
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    return {
        "rows": len(rows),
        "new_tokens": sum(r["new_tokens"] for r in rows),
        "stopped_at_eos": sum(bool(r["stopped_at_eos"]) for r in rows),
    }


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """torch's CPU threads set to ``n`` inside (0: unchanged), restored after."""
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def generate_corpus(
    teacher_cfg: TeacherConfig,
    cfg: GenerateConfig,
    *,
    out_dir: str | Path,
    progress: bool = False,
    overwrite: bool = False,
) -> dict[str, Any]:
    """The generate stage: load the teacher (as the cache stage does), continue every prompt, write the corpus.

    Resumable: a rerun with the same plan keeps the finished parts and writes the rest; another plan is
    refused (``overwrite`` moves the old directory aside). Returns the manifest (also written last).
    """
    teacher = load_teacher(teacher_cfg)
    prepare_teacher_for_generate(teacher)
    prompts = read_prompts(cfg, teacher.tokenizer, progress=progress)
    plan = _plan(teacher, prompts, cfg)
    inputs = {"teacher.path": teacher_cfg.path, "generate.prompts": cfg.prompts}
    batches = [prompts[i : i + cfg.batch_size] for i in range(0, len(prompts), cfg.batch_size)]
    with hold_output_dir(
        out_dir, kind=OUTPUT_KIND, inputs=inputs, overwrite=overwrite, check=lambda p: _check_plan(p, plan)
    ) as out:
        atomic_write_text(out / PLAN_NAME, json.dumps(plan, indent=2, sort_keys=True) + "\n")
        done = [
            i
            for i, batch in enumerate(batches)
            if (out / part_name(i)).is_file() and _part_rows(out / part_name(i), batch)
        ]
        if done:
            log.info("%s: %d of %d parts already done", out, len(done), len(batches))
        if len(done) < len(batches):  # a manifest exists only while it describes every part
            (out / MANIFEST_NAME).unlink(missing_ok=True)
        bar = tqdm(total=len(prompts), desc="generate", unit="prompt", disable=not progress)
        bar.update(sum(len(batches[i]) for i in done))
        start, new_tokens = time.perf_counter(), 0
        with torch_threads(cfg.threads):
            for i, batch in enumerate(batches):
                if i in done:
                    continue
                rows = generate_rows(teacher, batch, cfg)
                _write_part(out / part_name(i), rows)
                crash_point(f"after_part:{i}")
                new_tokens += sum(r["new_tokens"] for r in rows)
                bar.update(len(batch))
                bar.set_postfix(tok_s=f"{new_tokens / max(time.perf_counter() - start, 1e-9):.0f}")
        bar.close()
        manifest = _manifest(out, teacher, prompts, cfg, plan, n_parts=len(batches))
        atomic_write_text(out / MANIFEST_NAME, json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    seconds = time.perf_counter() - start
    log.info(
        "generated %d tokens for %d prompts in %.1f s (%.0f new tokens/s this run) -> %s",
        manifest["stats"]["new_tokens"],
        len(prompts),
        seconds,
        new_tokens / max(seconds, 1e-9),
        out,
    )
    return manifest


def _manifest(
    out: Path, teacher: Teacher, prompts: list[Prompt], cfg: GenerateConfig, plan: dict[str, Any], *, n_parts: int
) -> dict[str, Any]:
    parts, stats = [], {"rows": 0, "new_tokens": 0, "stopped_at_eos": 0}
    for i in range(n_parts):
        path = out / part_name(i)
        part = _part_stats(path)
        parts.append(
            {"file": path.name, "rows": part["rows"], "bytes": path.stat().st_size, "sha256": sha256_file(path)}
        )
        stats = {k: stats[k] + part[k] for k in stats}
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "created_by": f"kdcache {__version__}",
        "teacher": {k: teacher.info[k] for k in ("path", "sha256", "model_type", "dtype", "num_parameters")},
        "tokenizer": {
            "fingerprint": plan["tokenizer_fingerprint"],
            "vocab_size": tokenizer_vocab_size(teacher.tokenizer),
        },
        "prompts": {
            "source": list(cfg.prompts) or default_corpus_name(),
            "sha256": plan["prompts_sha256"],
            "count": len(prompts),
            "tokens": sum(len(p.ids) for p in prompts),
        },
        "settings": plan["settings"],
        "runtime": plan["runtime"],
        "parts": parts,
        "stats": {
            "documents": stats["rows"],
            "new_tokens": stats["new_tokens"],
            "mean_new_tokens": stats["new_tokens"] / max(stats["rows"], 1),
            "stopped_at_eos": stats["stopped_at_eos"],
        },
    }
