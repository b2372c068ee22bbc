"""Which files make a corpus: globs expanded to distinct files (links and symlink loops read once), the
default corpus (the running Python's standard library source), file kinds, and UTF-8 checks.
"""

from __future__ import annotations

import codecs
import glob
import logging
import os
import platform
import sysconfig
from pathlib import Path

log = logging.getLogger(__name__)


JSON_SUFFIXES = (".jsonl", ".json", ".ndjson")


PARQUET_SUFFIXES = (".parquet",)


STDLIB_SKIP_DIRS = frozenset(
    {
        "site-packages",
        "dist-packages",
        "__pycache__",
        "test",
        "tests",
        "idle_test",
        # packaged separately by some distributions (Debian/Ubuntu): leave them out so the default
        # corpus is the same on every machine with the same Python version
        "idlelib",
        "lib2to3",
        "tkinter",
        "turtledemo",
        "distutils",
        "ensurepip",
        "venv",
    }
)


_READ_CHUNK = 1 << 20


class CorpusError(ValueError):
    """The corpus cannot be read, split or packed as configured."""


def default_corpus_name() -> str:
    return f"python-stdlib-{platform.python_version()}"


def default_corpus_files() -> list[Path]:
    """The standard library's ``.py`` files, sorted; third-party, test and build-specific files excluded.

    Files that are not valid UTF-8 are skipped (and counted in the log): the strict encoding policy is
    for the user's own files.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    files: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel = Path(dirpath).relative_to(root)
        dirnames[:] = [
            d for d in dirnames if d not in STDLIB_SKIP_DIRS and not (rel == Path(".") and d.startswith("config-"))
        ]
        files += [Path(dirpath) / f for f in filenames if f.endswith(".py") and not f.startswith("_sysconfigdata")]
    files.sort(key=lambda p: p.relative_to(root).as_posix())
    good = [p for p in files if utf8_error_offset(p) is None]
    if len(good) < len(files):
        log.info(
            "default corpus: skipped %d of %d files under %s that are not UTF-8",
            len(files) - len(good),
            len(files),
            root,
        )
    return good


def utf8_error_offset(path: Path) -> int | None:
    """Byte offset of the first invalid UTF-8 sequence in ``path`` (streamed), or None if valid."""
    pos, pending = 0, b""
    with open(path, "rb") as f:
        while True:
            chunk = f.read(_READ_CHUNK)
            data = pending + chunk
            try:
                _, used = codecs.utf_8_decode(data, "strict", not chunk)
            except UnicodeDecodeError as e:
                return pos + e.start
            pos, pending = pos + used, data[used:]
            if not chunk:
                return None


def check_utf8(path: Path) -> None:
    offset = utf8_error_offset(path)
    if offset is not None:
        raise CorpusError(f"{path}: not UTF-8 at byte {offset} — fix the file or set corpus.errors: replace")


def expand_paths(patterns: tuple[str, ...] | list[str]) -> list[Path]:
    """Expand files and globs (``**`` allowed) into a sorted list of distinct files.

    Distinct by identity (device, inode), not by name: a glob through a symlink loop, or a file linked
    under two names, is read once (the first name in sorted order), with a warning naming the others.
    """
    files: set[Path] = set()
    for pattern in patterns:
        if glob.has_magic(pattern):
            matched = [Path(p) for p in glob.glob(pattern, recursive=True) if Path(p).is_file()]
            if not matched:
                raise CorpusError(
                    f"corpus.paths: no files matched the glob {pattern!r} — check the pattern "
                    "(relative paths are from the working directory)"
                )
            files.update(matched)
        elif Path(pattern).is_file():
            files.add(Path(pattern))
        else:
            what = "is a directory; use a glob such as 'DIR/**/*.txt'" if Path(pattern).is_dir() else "not found"
            raise CorpusError(f"corpus.paths: {pattern} {what} — fix corpus.paths in params.yaml")
    first: dict[tuple[int, int], Path] = {}
    for path in sorted(files, key=lambda p: p.as_posix()):
        st = path.stat()
        if (key := (st.st_dev, st.st_ino)) in first:
            log.warning(
                "corpus: %s is the same file as %s (a link or a symlink loop); reading it once", path, first[key]
            )
        else:
            first[key] = path
    return list(first.values())


def file_kind(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix in JSON_SUFFIXES:
        return "json"
    return "parquet" if suffix in PARQUET_SUFFIXES else "text"
