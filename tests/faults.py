"""Test-only entry point: the ``kdcache`` CLI with one crash point armed.

``python tests/faults.py POINT ARGS...`` runs ``kdcache ARGS...`` and SIGKILLs the process when
the library reaches ``kdcache.files.crash_point(POINT)`` (e.g. ``after_shard:1``,
``before_replace:manifest.json``, ``checkpoint_write:6``). Production code never arms a crash
point: only this script installs the hook.
"""

from __future__ import annotations

import os
import signal
import sys

from kdcache.cli import main
from kdcache.files import set_crash_hook


def arm(point: str) -> None:
    """Kill this process with SIGKILL (no cleanup, like a power cut) when ``point`` is reached."""

    def hook(name: str) -> None:
        if name == point:
            os.kill(os.getpid(), signal.SIGKILL)

    set_crash_hook(hook)


if __name__ == "__main__":
    arm(sys.argv[1])
    sys.exit(main(sys.argv[2:]))
