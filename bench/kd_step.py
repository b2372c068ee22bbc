"""Benchmark: every sparse KD loss vs a plain CE training step, time and peak memory, side by side.

Same student (the default ``StudentConfig``, tied embeddings), same batch, one optimizer step each
(forward, loss, backward, clip, AdamW). Variants, interleaved step by step so load drift hits all alike:

- ``plain CE``: ``F.cross_entropy`` on the full (B, T, V) logits -- the reference plain CE step;
- ``logits: <kind>``: ``kd_loss`` on the full logits (the chunked fused pass; ``ce`` = the chunked CE path);
- ``fused: <kind>``: ``kd_loss_from_hidden``, the LM head inside the loss (what ``kdcache.train`` runs;
  ``ce`` = the fused CE path): no (B, T, V) logits at all.

Time: median step over ``--steps`` after ``--warmup``. Peak memory: each variant in a fresh process,
growth of the peak RSS during one step over the RSS before it (``/proc/self/clear_refs`` resets the
peak; glibc mmaps large blocks so freed tensors leave; on CUDA ``max_memory_allocated``). Targets are
random but valid: top-k of 3 * randn teacher logits (log-probs, stored tail, log-normalizer at tau)
and S draws from that teacher. Prints one table per vocabulary and writes ``bench/results/kd_step.json``.

    python bench/kd_step.py --threads 1                       # V = 4096 and 151936
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from train_step import make_student

from kdcache.config.train import TrainConfig
from kdcache.lm_head import final_hidden_states, fused_head
from kdcache.losses import KINDS, TARGET_KEYS, KDLossSpec, kd_loss, kd_loss_from_hidden
from kdcache.optim import make_optimizer
from kdcache.student import count_parameters

RESULTS = Path(__file__).parent / "results" / "kd_step.json"
KD_KINDS = tuple(k for k in KINDS if k != "ce")


def variants(kinds: tuple[str, ...]) -> list[str]:
    return ["plain CE", "logits: ce", *(f"logits: {k}" for k in kinds), "fused: ce", *(f"fused: {k}" for k in kinds)]


def make_batch(vocab: int, *, batch: int, seq: int, k: int, samples: int, tau: float) -> dict[str, torch.Tensor]:
    """Input ids and every target kind, from a random teacher (3 * randn logits), built row block by row block."""
    g = torch.Generator().manual_seed(0)
    out: dict[str, list[torch.Tensor]] = {}
    for _ in range(batch):
        logits = 3.0 * torch.randn(seq, vocab, generator=g)  # (T, V)
        logp = logits.log_softmax(-1)  # (T, V)
        top = logp.topk(k, -1)  # (T, k)
        draws = torch.multinomial(logp.exp(), samples, replacement=True, generator=g)  # (T, S)
        ids, counts = draws.sort(-1).values, torch.ones(seq, samples)
        parts = {
            "input_ids": torch.randint(vocab, (seq,), generator=g),
            "topk_ids": top.indices,
            "topk_logprobs": top.values,
            "topk_log_tail": logp.scatter(-1, top.indices, -torch.inf).logsumexp(-1),
            "topk_log_z": (logp / tau).logsumexp(-1),
            "sample_ids": ids,
            "sample_counts": counts,
            "sample_total": torch.full((seq,), float(samples)),
        }
        for name, t in parts.items():
            out.setdefault(name, []).append(t)
    return {name: torch.stack(ts) for name, ts in out.items()}


class Trainer:
    """One variant: the student, its optimizer and the loss path."""

    def __init__(self, variant: str, *, vocab: int, seq: int, tau: float, device: torch.device) -> None:
        self.path, _, kind = variant.partition(": ")
        self.kind = kind or "ce"
        cfg = TrainConfig(loss="ce")
        self.device, self.clip = device, cfg.grad_clip
        self.model = make_student(vocab, seq).to(device)
        self.optimizer = make_optimizer(self.model, lr=cfg.lr, weight_decay=cfg.weight_decay)
        tau = tau if self.kind in ("topk_tail", "topk_renorm", "reverse_kl", "jsd", "skew_kl", "tv") else 1.0
        self.spec = KDLossSpec(kind=self.kind, alpha=cfg.alpha, temperature=tau)
        self.head = fused_head(self.model)[0] if self.path == "fused" else None

    def step(self, batch: dict[str, torch.Tensor]) -> float:
        dev = self.device
        t0 = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        ids = batch["input_ids"].to(dev)  # (B, T)
        targets = {k: batch[k].to(dev) for k in TARGET_KEYS[self.kind] if k in batch}
        cuda = dev.type == "cuda"
        with torch.autocast("cuda", dtype=torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False):
            if self.head is not None:
                hidden = final_hidden_states(self.model, ids)  # (B, T, H)
                loss = kd_loss_from_hidden(hidden, self.head, input_ids=ids, spec=self.spec, **targets).loss
            else:
                logits = self.model(input_ids=ids).logits  # (B, T, V)
        if self.path == "plain CE":
            vocab = logits.shape[-1]
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, vocab).float(), ids[:, 1:].reshape(-1))
        elif self.path == "logits":
            loss = kd_loss(logits, input_ids=ids, spec=self.spec, **targets).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
        self.optimizer.step()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        return time.perf_counter() - t0


def time_steps(vocab: int, batch: dict, names: list[str], args: argparse.Namespace, device) -> dict[str, list[float]]:
    trainers = {v: Trainer(v, vocab=vocab, seq=args.seq_len, tau=args.tau, device=device) for v in names}
    times: dict[str, list[float]] = {v: [] for v in names}
    for i in range(args.warmup + args.steps):
        for v, trainer in trainers.items():
            dt = trainer.step(batch)
            if i >= args.warmup:
                times[v].append(dt)
    return times


def measure_memory(vocab: int, batch_size: int, variant: str, args: argparse.Namespace) -> int:
    """Peak step memory of ``variant`` in a fresh process (``--worker``), in bytes."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    cmd = [sys.executable, __file__, "--worker", variant, "--vocabs", str(vocab), "--batch-sizes", str(batch_size)]
    cmd += ["--seq-len", str(args.seq_len), "--top-k", str(args.top_k), "--samples", str(args.samples)]
    cmd += ["--tau", str(args.tau), "--threads", str(args.threads), "--device", args.device]
    for attempt in (1, 2):  # a worker killed by the shared machine gets one more try
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if done.returncode == 0:
            return int(json.loads(done.stdout.strip().splitlines()[-1])["peak_step_bytes"])
        print(f"memory worker {variant!r} (V = {vocab}), attempt {attempt}:\n{done.stderr[-2000:]}", file=sys.stderr)
    raise RuntimeError(f"memory worker {variant!r} (V = {vocab}) failed twice; see stderr above")


def worker(args: argparse.Namespace) -> None:
    device = resolve(args.device)
    vocab, batch_size = int(args.vocabs), int(args.batch_sizes)
    batch = make_batch(vocab, batch=batch_size, seq=args.seq_len, k=args.top_k, samples=args.samples, tau=args.tau)
    trainer = Trainer(args.worker, vocab=vocab, seq=args.seq_len, tau=args.tau, device=device)
    trainer.step(batch)  # warm-up: optimizer state, workspaces
    trainer.step(batch)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        trainer.step(batch)
        peak = torch.cuda.max_memory_allocated(device) - before
    else:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        before = _proc_status_kib("VmRSS")
        trainer.step(batch)
        peak = (_proc_status_kib("VmHWM") - before) * 1024
    print(json.dumps({"peak_step_bytes": peak}))


def _proc_status_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def resolve(device: str) -> torch.device:
    return torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vocabs", default="4096,151936")
    ap.add_argument("--batch-sizes", default="16,4", help="sequences per step, one per vocabulary")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--top-k", type=int, default=64)
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--tau", type=float, default=1.0, help="KD temperature of the tail kinds and topk_renorm")
    ap.add_argument("--kinds", default=",".join(KD_KINDS))
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--no-memory", action="store_true", help="skip the per-variant memory subprocesses")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (0 = torch's default)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker:
        return worker(args)
    device = resolve(args.device)
    names = variants(tuple(args.kinds.split(",")))
    result = {"command": "python " + " ".join(sys.argv), "machine": machine(device), "vocabs": {}}
    for vocab, batch_size in zip(map(int, args.vocabs.split(",")), map(int, args.batch_sizes.split(",")), strict=True):
        batch = make_batch(vocab, batch=batch_size, seq=args.seq_len, k=args.top_k, samples=args.samples, tau=args.tau)
        times = time_steps(vocab, batch, names, args, device)
        memory = {} if args.no_memory else {v: measure_memory(vocab, batch_size, v, args) for v in names}
        result["vocabs"][str(vocab)] = summarize(vocab, batch_size, args, times, memory)
        print_table(result["vocabs"][str(vocab)])
    result["machine"]["load_avg_1m_at_end"] = os.getloadavg()[0]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.out}")


def machine(device: torch.device) -> dict:
    return {
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
    }


def summarize(vocab: int, batch_size: int, args: argparse.Namespace, times: dict, memory: dict) -> dict:
    step = {v: statistics.median(t) for v, t in times.items()}
    rows = {}
    for v in times:
        path = v.partition(": ")[0]
        same_path_ce = "fused: ce" if path == "fused" else "logits: ce"
        row = {"step_s": step[v], "over_plain_ce_time": step[v] / step["plain CE"]}
        row["over_chunked_ce_time"] = step[v] / step[same_path_ce]
        if memory:
            row |= {"peak_step_mib": memory[v] / 2**20, "over_plain_ce_memory": memory[v] / memory["plain CE"]}
            row["over_chunked_ce_memory"] = memory[v] / memory[same_path_ce]
        rows[v] = row
    student = make_student(vocab, args.seq_len)
    return {
        "vocab": vocab,
        "batch_size": batch_size,
        "seq_len": args.seq_len,
        "tokens_per_step": batch_size * args.seq_len,
        "top_k": args.top_k,
        "samples": args.samples,
        "tau": args.tau,
        "num_parameters": count_parameters(student),
        "fused_head": fused_head(student)[0] is not None,
        "steps": args.steps,
        "variants": rows,
        "step_s_all": times,
    }


def print_table(res: dict) -> None:
    print(
        f"\nV = {res['vocab']:,}: student {res['num_parameters']:,} params, batch {res['batch_size']} x "
        f"{res['seq_len']} tokens, k = {res['top_k']}, S = {res['samples']}, tau = {res['tau']} "
        f"({torch.get_num_threads()} thread(s))\n"
    )
    mem = "peak_step_mib" in next(iter(res["variants"].values()))
    head = "| variant | step ms | / plain CE | / chunked CE |"
    head += " peak MiB | / plain CE | / chunked CE |" if mem else ""
    print(head + "\n|---|" + "---:|" * (6 if mem else 3))
    for v, r in res["variants"].items():
        line = f"| {v} | {r['step_s'] * 1e3:.0f} | {r['over_plain_ce_time']:.2f} | {r['over_chunked_ce_time']:.2f} |"
        if mem:
            line += f" {r['peak_step_mib']:.0f} | {r['over_plain_ce_memory']:.2f} | {r['over_chunked_ce_memory']:.2f} |"
        print(line)


if __name__ == "__main__":
    main()
