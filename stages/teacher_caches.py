"""DVC stage `teacher_caches`: the index of the extra teachers' caches (params.yaml `extra_teachers`).

Writes `<paths.teacher_caches>/teachers.json` ({name: {teacher, cache}}), so that the directory the train
stages depend on exists even when `extra_teachers` is empty (the default: then this is all the several-teacher
part of the pipeline does). Each cache in it is built by its own stage `cache_teacher@NAME`
(stages/cache.py --teacher MODEL_DIR --out <paths.teacher_caches>/NAME).
"""

import argparse
import json
import sys
from pathlib import Path

from kdcache.config.base import load_params, load_section
from kdcache.config.extra_teachers import INDEX_FILE, load_extra_teachers
from kdcache.config.paths import PathsConfig
from kdcache.entry import run, setup_logging
from kdcache.files import atomic_write_text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", default="params.yaml")
    args = ap.parse_args()
    params = load_params(args.params)
    root = Path(load_section(PathsConfig, params.get("paths"), section="paths").teacher_caches)
    extra = load_extra_teachers(params.get("extra_teachers"))
    index = {name: {"teacher": path, "cache": str(root / name)} for name, path in sorted(extra.items())}
    root.mkdir(parents=True, exist_ok=True)
    atomic_write_text(root / INDEX_FILE, json.dumps(index, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    setup_logging()
    sys.exit(run(main, prog="stages/teacher_caches.py"))
