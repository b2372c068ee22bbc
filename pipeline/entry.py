"""Process entry helpers shared by the ``kdcache`` CLI and the DVC stage scripts.

Owns what the library must not: logging configuration and turning a known error into one
line on stderr and a non-zero exit code (a traceback helps nobody fix a params typo); and the
output checks of ``evaluate``, whose library function writes where its caller says.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path

from kdcache.files import LOAD_ERRORS
from kdcache.outputs import Inputs, claim_output_dir, claim_output_file

log = logging.getLogger("kdcache")

# Every error the library raises for bad input subclasses ValueError (ConfigError,
# CacheFormatError, TokenDataError, TeacherError, OutputDirError, InputFileError, ...) or is an
# OSError naming a file.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError)
PLOTS_KIND = "plots"
"""The marker kind of an evaluate plots directory (``kdcache.files``)."""


def setup_logging(verbose: bool = False) -> None:
    level = logging.DEBUG if verbose else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    for noisy in ("httpx", "urllib3", "filelock", "datasets", "fsspec"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def show_progress() -> bool:
    """Progress bars on, unless KDCACHE_NO_PROGRESS is set (tests, CI logs)."""
    return not os.environ.get("KDCACHE_NO_PROGRESS")


def run(main: Callable[[], object], *, prog: str) -> int:
    """Run ``main``; a user error becomes ``prog: error: <message>`` and exit code 1.

    Errors a third-party loader (transformers, tokenizers, safetensors, json) raises on a malformed
    input file (``kdcache.files.LOAD_ERRORS``: RecursionError, SafetensorError, KeyError, ...) that no
    kdcache call site wrapped are one line too, pointing to ``KDCACHE_TRACEBACK=1`` for the file; any
    other exception is a bug and keeps its traceback.
    """
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
    except LOAD_ERRORS as e:
        if os.environ.get("KDCACHE_TRACEBACK") or not raised_by_a_loader(e):
            raise
        detail = (str(e).strip().splitlines() or [""])[0][:200]
        file = file_being_loaded(e)
        print(
            f"{prog}: error: {file or 'an input file'}: cannot load it ({type(e).__name__}: {detail}) — it is "
            "malformed, truncated or does not fit its config.json: replace it with an intact copy "
            "(KDCACHE_TRACEBACK=1 shows the full traceback)",
            file=sys.stderr,
        )
        return 1
    return 0


LOADER_PACKAGES = ("transformers", "tokenizers", "safetensors", "json", "huggingface_hub")


def raised_by_a_loader(e: BaseException) -> bool:
    """Whether the innermost frame of ``e``'s traceback is in a file-loading package (not kdcache's code)."""
    tb = e.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    parts = Path(tb.tb_frame.f_code.co_filename).parts if tb is not None else ()
    return any(package in parts for package in LOADER_PACKAGES)


FILE_LOCALS = (
    "filename",  # safetensors
    "checkpoint_file",
    "resolved_archive_file",  # transformers weights
    "checkpoint_files",
    "tokenizer_file",
    "fast_tokenizer_file",
    "vocab_file",
    "resolved_config_file",
    "config_file",
    "json_file",
    "path",
)
"""Local variable names under which the loaders hold the file they are reading."""


def file_being_loaded(e: BaseException) -> str | None:
    """The file a loader was reading when it raised ``e``: the innermost frame holding an existing
    file under a ``FILE_LOCALS`` name; else the directory it was loading from."""
    frames = []
    tb = e.__traceback__
    while tb is not None:
        frames.append(tb.tb_frame.f_locals)
        tb = tb.tb_next
    for names in ((FILE_LOCALS, os.path.isfile), (("pretrained_model_name_or_path", "path"), os.path.isdir)):
        for f_locals in reversed(frames):
            for name in names[0]:
                value = f_locals.get(name)
                for item in value if isinstance(value, (list, tuple)) else [value]:
                    if isinstance(item, (str, os.PathLike)) and names[1](item):
                        return str(item)
    return None


def claim_evaluate_outputs(*, metrics: str | Path, plots: str | Path, inputs: Inputs, overwrite: bool = False) -> None:
    """Check evaluate's outputs before it runs (``kdcache.files`` rule): the metrics file is new or a
    metrics file kdcache wrote, the plots directory new or kdcache's, neither one of ``inputs`` nor in one."""
    claim_output_file(metrics, inputs=inputs, overwrite=overwrite, legacy=_is_metrics_json)
    claim_output_dir(plots, kind=PLOTS_KIND, inputs=inputs, overwrite=overwrite, legacy=_holds_only_plots)


def _is_metrics_json(path: Path) -> bool:
    try:
        data = json.loads(path.read_text(encoding="utf-8")) if path.stat().st_size < 1 << 20 else None
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(data, dict) and {"num_sequences", "num_tokens"} <= set(data)


def _holds_only_plots(path: Path) -> bool:
    return all(p.name == "calibration.csv" for p in path.iterdir())
