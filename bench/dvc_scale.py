"""How DVC's per-file cost scales with the number of shards: `dvc add` + `dvc push` to a local remote.

Creates N small random files (stand-ins for shards; DVC's cost per file is hashing + copying + state
bookkeeping, so content size is a separate, linear term measured with --file-kb), times `dvc add`
and `dvc push` in a fresh git+DVC repo, and prints seconds per file so docs/SCALE.md can extrapolate
to 10^4-10^5 shards. Writes bench/results/dvc_scale.json.

    python bench/dvc_scale.py --files 1000,10000 --file-kb 64
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DVC = [sys.executable, "-m", "dvc"]


def run(cmd: list[str], cwd: Path) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env={**os.environ, "DVC_NO_ANALYTICS": "1"})
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    return time.perf_counter() - t0


def measure(n: int, kb: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        repo, remote = Path(tmp) / "repo", Path(tmp) / "remote"
        repo.mkdir()
        run(["git", "init", "-q"], repo)
        run([*DVC, "init", "-q"], repo)
        run([*DVC, "remote", "add", "-d", "local", str(remote)], repo)
        cache = repo / "cache" / "c"
        cache.mkdir(parents=True)
        for i in range(n):
            (cache / f"shard-{i:05d}.parquet").write_bytes(os.urandom(kb * 1024))
        add = run([*DVC, "add", "cache/c"], repo)
        push = run([*DVC, "push", "-q"], repo)
        return {
            "files": n,
            "file_kb": kb,
            "add_s": add,
            "push_s": push,
            "add_ms_per_file": 1000 * add / n,
            "push_ms_per_file": 1000 * push / n,
        }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--files", default="1000,10000")
    ap.add_argument("--file-kb", type=int, default=64)
    args = ap.parse_args()
    rows = [measure(int(n), args.file_kb) for n in args.files.split(",")]
    out = Path(__file__).parent / "results" / "dvc_scale.json"
    out.write_text(
        json.dumps({"command": "python bench/dvc_scale.py " + " ".join(sys.argv[1:]), "rows": rows}, indent=2) + "\n"
    )
    print("| files | KiB each | dvc add (s) | dvc push (s) | add ms/file | push ms/file |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['files']:,} | {r['file_kb']} | {r['add_s']:.1f} | {r['push_s']:.1f} | "
            f"{r['add_ms_per_file']:.2f} | {r['push_ms_per_file']:.2f} |"
        )


if __name__ == "__main__":
    main()
