"""Section ``extra_teachers``: more teachers for the DVC pipeline's several-teacher students.

``extra_teachers: {NAME: MODEL_DIR, ...}`` (default ``{}``: none). dvc.yaml's ``cache_teacher`` stage runs once
per entry (``cache_teacher@NAME``, a DVC ``foreach``): it caches ``MODEL_DIR`` over ``paths.tokens`` with the
``teacher`` section's other settings and the ``cache`` section, into ``<paths.teacher_caches>/NAME``. The students
read those caches when ``train.caches`` lists them; the train stages depend on the whole
``paths.teacher_caches`` directory, so a rebuilt teacher cache retrains them.
"""

from __future__ import annotations

import re
from pathlib import PurePosixPath
from typing import Any

from kdcache.config.base import ConfigError

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
"""An extra teacher's name: its DVC stage is ``cache_teacher@NAME`` and its cache ``<paths.teacher_caches>/NAME``."""

INDEX_FILE = "teachers.json"
"""The file the ``teacher_caches`` stage writes into ``paths.teacher_caches``: which caches are there."""


def load_extra_teachers(values: Any) -> dict[str, str]:
    """``extra_teachers`` from params.yaml -> {name: teacher model directory}; refuses anything else, naming the key."""
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ConfigError(
            f"extra_teachers: must be a mapping of names to teacher model directories "
            f"(e.g. {{teacher-b: models/teacher-b}}) or {{}}, got {type(values).__name__}"
        )
    for name, path in values.items():
        if not isinstance(name, str) or not NAME.fullmatch(name):
            raise ConfigError(
                f"extra_teachers: name {name!r} must be 1-64 letters, digits, '_' or '-' (it names the DVC stage "
                "cache_teacher@NAME and the directory <paths.teacher_caches>/NAME), starting with a letter or digit"
            )
        if not isinstance(path, str) or not path.strip():
            raise ConfigError(f"extra_teachers.{name}: must be a teacher model directory (a path), got {path!r}")
    return dict(values)


def check_cache_sources(extra: dict[str, str], teacher_caches: str, sections: dict[str, Any]) -> None:
    """Refuse a ``train.caches`` path under ``teacher_caches`` that no ``extra_teachers`` entry builds (a typo would
    otherwise surface only when training opens it). ``sections``: {section name: raw train-like mapping}."""
    root = PurePosixPath(teacher_caches)
    for section, values in sections.items():
        caches = (values or {}).get("caches") or []
        for i, source in enumerate(caches if isinstance(caches, list) else []):
            path = PurePosixPath(str(source.get("path", ""))) if isinstance(source, dict) else None
            if path is None or path.parent != root or path.name in extra:
                continue
            raise ConfigError(
                f"{section}.caches[{i}].path: {path} is in paths.teacher_caches ({teacher_caches}) but extra_teachers "
                f"builds no teacher {path.name!r} there (it has {sorted(extra) or 'none'}); add "
                f"`{path.name}: <teacher model dir>` to extra_teachers or fix the path"
            )
