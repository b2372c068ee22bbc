"""Process entry helpers shared by the ``kdcache`` CLI and the DVC stage scripts.

Owns what the library must not: logging configuration and turning a known error into one
line on stderr and a non-zero exit code (a traceback helps nobody fix a params typo).
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable

log = logging.getLogger("kdcache")

# Every error the library raises for bad input subclasses ValueError (ConfigError,
# CacheFormatError, TokenDataError, TeacherError, ...) or is an OSError naming a file.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError)


def setup_logging(verbose: bool = False) -> None:
    level = logging.DEBUG if verbose else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    for noisy in ("httpx", "urllib3", "filelock", "datasets", "fsspec"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def show_progress() -> bool:
    """Progress bars on, unless KDCACHE_NO_PROGRESS is set (tests, CI logs)."""
    return not os.environ.get("KDCACHE_NO_PROGRESS")


def run(main: Callable[[], object], *, prog: str) -> int:
    """Run ``main``; a user error becomes ``prog: error: <message>`` and exit code 1."""
    try:
        main()
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; completed work is kept — rerun to resume", file=sys.stderr)
        return 130
    except USER_ERRORS as e:
        if os.environ.get("KDCACHE_TRACEBACK"):
            raise
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 1
    return 0
