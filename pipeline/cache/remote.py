"""Caches at an fsspec URL (``s3://``, ``gs://``, ``memory://``, ``file://``, ...) instead of local disk + ``dvc push``.

A cache is built where it always is -- a local directory, with its lock, ``.tmp`` files and fsync'd renames
(``build``, ``writer``) -- and published to the URL with the same semantics as on disk: each shard is uploaded
as soon as it is renamed into place and its local copy deleted (``ShardUploader``); every file is put under a
temporary name and moved to its final one (an object store's copy is atomic per object); the manifest goes
last, so a reader of the URL sees either the previous cache or the whole new one, never a manifest naming a
missing shard. A rerun resumes from what the URL holds: its finished shards are fetched into the local
directory first (the build checks each one's build key in its footer and refuses shards of another cache), so
only missing shards are scored, and a publish skips shards the URL already holds with the manifest's sha256.
``fetch_cache`` copies a published cache to local disk for ``open_cache``.

Not here: a lock on the URL (two jobs publishing the same URL at once are not refused), and torchrun (one
process builds and publishes).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from pathlib import Path
from typing import Any

from kdcache.cache.build import build_cache
from kdcache.cache.format import MANIFEST_NAME, SHARD_PATTERN, TOKENIZER_DIR, CacheFormatError, Manifest
from kdcache.cache.hidden_format import PROJECTION_FILE
from kdcache.cache.identity import cache_dir_for
from kdcache.cache.writer import CACHE_KIND, CacheWriteError, is_cache_dir
from kdcache.config.cache import CacheConfig
from kdcache.config.teacher import TeacherConfig
from kdcache.devices import use_deterministic_algorithms
from kdcache.distributed import group_rank_world
from kdcache.outputs import claim_output_dir
from kdcache.teacher import Teacher, load_teacher
from kdcache.token_data import TokenSplit, open_tokens

log = logging.getLogger(__name__)
CHUNK = 8 << 20
"""Bytes per read when hashing or copying a remote file."""


def is_url(path: str | os.PathLike[str]) -> bool:
    """``scheme://...`` (an fsspec URL), as opposed to a local path."""
    return "://" in str(path)


class RemoteCache:
    """One cache directory at an fsspec URL: list, read, and publish files atomically (temporary name, then move)."""

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None) -> None:
        import fsspec

        self.url = url.rstrip("/")
        try:
            self.fs, self.root = fsspec.core.url_to_fs(self.url, **(storage_options or {}))
        except (ImportError, ValueError) as e:
            raise CacheWriteError(
                f"{url}: no fsspec filesystem for this URL ({e}); install its package (s3fs, gcsfs, ...)"
            ) from e
        self.root = self.root.rstrip("/")

    def path(self, name: str) -> str:
        return f"{self.root}/{name}"

    def names(self) -> set[str]:
        """Top-level file names at the URL (none if it does not exist yet)."""
        try:
            return {p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(self.root, detail=False)}
        except FileNotFoundError:
            return set()

    def manifest(self) -> Manifest | None:
        """The published manifest, or None before the first publish."""
        if MANIFEST_NAME not in self.names():
            return None
        with self.fs.open(self.path(MANIFEST_NAME), "rb") as f:
            return Manifest.from_dict(json.loads(f.read()), source=f"{self.url}/{MANIFEST_NAME}")

    def get(self, name: str, local: Path) -> None:
        """Copy a file from the URL to ``local`` (via ``local.tmp``, then rename: a killed copy leaves no shard)."""
        tmp = local.with_name(local.name + ".tmp")
        local.parent.mkdir(parents=True, exist_ok=True)
        self.fs.get_file(self.path(name), str(tmp))
        os.replace(tmp, local)

    def put(self, local: Path, name: str) -> None:
        """Publish ``local`` as ``name``: put under ``name.tmp``, then move (atomic per file)."""
        tmp = self.path(name + ".tmp")
        self.fs.makedirs(tmp.rsplit("/", 1)[0], exist_ok=True)  # local filesystems need the parent; stores no-op
        self.fs.put_file(str(local), tmp)
        self.fs.mv(tmp, self.path(name))

    def sha256(self, name: str) -> str:
        digest = hashlib.sha256()
        with self.fs.open(self.path(name), "rb") as f:
            while chunk := f.read(CHUNK):
                digest.update(chunk)
        return digest.hexdigest()


def pull_shards(remote: RemoteCache, out: Path) -> list[str]:
    """Fetch the shards the URL holds and ``out`` lacks, so a build into ``out`` resumes from them; the names."""
    pulled = []
    for name in sorted(n for n in remote.names() if SHARD_PATTERN.match(n)):
        if not (out / name).exists():
            remote.get(name, out / name)
            pulled.append(name)
    if pulled:
        log.info("cache %s: resumed %d shard(s) from %s", out, len(pulled), remote.url)
    return pulled


def publish_cache(out: Path, remote: RemoteCache, *, uploaded: frozenset[str] = frozenset()) -> Manifest:
    """Upload the sealed local cache ``out`` to ``remote``: shards the URL lacks (or holds with another sha256
    than its manifest's) unless ``uploaded`` during the build, the tokenizer and projection files, then the
    manifest, last."""
    manifest = Manifest.load(out)
    published = remote.manifest()
    have = {s.file: s.sha256 for s in published.shards} if published else {}
    names = remote.names()
    for name in sorted(n for n in names if n.endswith(".tmp") and n[: -len(".tmp")] not in uploaded):  # killed
        remote.fs.rm(remote.path(name))
    for shard in manifest.shards:
        if shard.file not in uploaded and (have.get(shard.file) != shard.sha256 or shard.file not in names):
            remote.put(out / shard.file, shard.file)
    extras = sorted((out / TOKENIZER_DIR).iterdir()) if (out / TOKENIZER_DIR).is_dir() else []
    extras += [out / PROJECTION_FILE] if (out / PROJECTION_FILE).exists() else []
    for path in extras:
        if path.is_file():
            remote.put(path, str(path.relative_to(out)))
    remote.put(out / MANIFEST_NAME, MANIFEST_NAME)
    log.info("cache %s published to %s: %d shards, manifest last", out, remote.url, len(manifest.shards))
    return manifest


class ShardUploader:
    """While a build runs, upload each shard as soon as the writer renames it into ``out`` (complete by then), and
    delete the local copy: the writer keeps the shard's size, sha256 and statistics for the manifest (``seal``),
    so the scratch directory holds the shards being written, not the cache. ``keep``: shards that were there
    before the build (resumed; ``seal`` reads them from disk), left for ``publish_cache``."""

    def __init__(self, out: Path, remote: RemoteCache, *, keep: set[str], interval_s: float = 0.2) -> None:
        self.out, self.remote, self.keep, self.interval_s = out, remote, keep, interval_s
        self.uploaded: set[str] = set()
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="kdcache-shard-uploader", daemon=True)

    def __enter__(self) -> ShardUploader:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        if self._error is not None and exc[0] is None:
            raise self._error

    def _run(self) -> None:
        try:
            while True:
                stopping = self._stop.wait(self.interval_s)
                self._scan()  # once more after the build: the last shard
                if stopping:
                    return
        except BaseException as e:  # the build goes on; __exit__ re-raises, the rerun pulls what was uploaded
            self._error = e

    def _scan(self) -> None:
        for path in sorted(self.out.glob("shard-*.parquet")):
            name = path.name
            if SHARD_PATTERN.match(name) and name not in self.keep and name not in self.uploaded:
                self.remote.put(path, name)
                self.uploaded.add(name)
                path.unlink()


def fetch_cache(url: str, out: Path, storage_options: dict[str, Any] | None = None) -> Path:
    """Copy a published cache from ``url`` into the local directory ``out`` (shards checked against the manifest's
    sha256 when ``open_cache`` stages them); the manifest is copied last."""
    remote = RemoteCache(url, storage_options)
    manifest = remote.manifest()
    if manifest is None:
        raise CacheFormatError(f"{url}/{MANIFEST_NAME}: no manifest — the cache was never published (completely)")
    out.mkdir(parents=True, exist_ok=True)
    for shard in manifest.shards:
        remote.get(shard.file, out / shard.file)
    for name in manifest.tokenizer.get("files", {}):
        remote.get(f"{TOKENIZER_DIR}/{name}", out / TOKENIZER_DIR / name)
    if manifest.targets.get("hidden"):
        remote.get(PROJECTION_FILE, out / PROJECTION_FILE)
    remote.get(MANIFEST_NAME, out / MANIFEST_NAME)
    return out


def cache_to_url(
    teacher: Teacher,
    tokens: TokenSplit,
    cfg: CacheConfig,
    *,
    url: str,
    scratch: str | Path,
    content_named: bool = True,
    progress: bool = False,
    overwrite: bool = False,
    storage_options: dict[str, Any] | None = None,
) -> Manifest:
    """``build_cache`` into a local directory under ``scratch``, resumed from and published to ``url``.

    ``content_named`` (``kdcache cache --cache-root URL``): the cache is ``url/<default_cache_name>``, built in
    ``scratch/<the same name>``; else (``--out URL``) it is ``url`` itself, built in ``scratch``. One process
    (under torchrun, build to shared storage and ``publish_cache`` from rank 0)."""
    if group_rank_world() is not None:
        raise CacheWriteError(
            f"{url}: writing a cache to a URL runs in one process; under torchrun build with --out on storage all "
            "ranks share, then publish it from one process (kdcache.cache.remote.publish_cache)"
        )
    scratch = Path(scratch)
    local = cache_dir_for(teacher, tokens, cfg, out_dir=None if content_named else scratch, cache_root=scratch)
    remote = RemoteCache(f"{url.rstrip('/')}/{local.name}" if content_named else url, storage_options)
    claim_output_dir(local, kind=CACHE_KIND, legacy=is_cache_dir, overwrite=overwrite)  # before pulling into it
    pull_shards(remote, local)
    keep = {p.name for p in local.glob("shard-*.parquet")}
    with ShardUploader(local, remote, keep=keep) as uploader:
        manifest = build_cache(
            teacher,
            tokens,
            cfg,
            out_dir=None if content_named else local,
            cache_root=scratch,
            progress=progress,
            overwrite=overwrite,
        )
    if manifest is None:  # one process scores every shard: only an error stops it short
        raise CacheWriteError(f"{local}: the build left shards missing; rerun it")
    publish_cache(local, remote, uploaded=frozenset(uploader.uploaded))
    return manifest


def cache_corpus_to_url(
    teacher_cfg: TeacherConfig,
    cfg: CacheConfig,
    *,
    tokens_dir: str | Path,
    url: str,
    scratch: str | Path,
    content_named: bool = True,
    progress: bool = False,
    overwrite: bool = False,
) -> str:
    """``kdcache cache --cache-root URL`` / ``--out URL``: load the teacher and the token split, then ``cache_to_url``;
    returns the cache's URL."""
    if cfg.deterministic:
        use_deterministic_algorithms()
    teacher, tokens = load_teacher(teacher_cfg), open_tokens(tokens_dir, cfg.split)
    manifest = cache_to_url(
        teacher,
        tokens,
        cfg,
        url=url,
        scratch=scratch,
        content_named=content_named,
        progress=progress,
        overwrite=overwrite,
    )
    return f"{url.rstrip('/')}/{manifest.name}" if content_named else url
