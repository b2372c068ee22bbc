"""The `kdcache` command line: help texts, flag validation, one-line errors."""

from __future__ import annotations

import subprocess
import sys

import pytest

from pipeline.cli import build_parser, field_docs, main
from pipeline.config import CacheConfig

COMMANDS = ["demo-teacher", "prepare", "cache", "train", "evaluate", "inspect", "verify"]


def _kdcache(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args([command, "--help"])
    assert exit_.value.code == 0
    assert "usage: kdcache " + command in capsys.readouterr().out


def test_cache_help_explains_every_flag_from_the_config_docstrings(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["cache", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    for name, doc in field_docs(CacheConfig).items():
        assert f"--{name.replace('_', '-')}" in out
        assert doc.split(".")[0] in out, f"help for --{name} lacks its documentation"


def test_flags_are_validated_by_the_config_dataclass(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["cache", "--teacher", str(tmp_path), "--tokens", str(tmp_path), "--out", str(tmp_path / "c"),
                 "--top-k", "0"])
    assert code == 1
    assert "cache.top_k: must be in [1, 1024]" in capsys.readouterr().err


def test_choice_flags_reject_unknown_values(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(["cache", "--teacher", "t", "--tokens", "d", "--out", "o", "--targets", "dense"])
    assert exit_.value.code == 2
    assert "invalid choice: 'dense'" in capsys.readouterr().err


def test_inspect_of_a_missing_cache_is_one_line_naming_the_file(tmp_path) -> None:
    proc = _kdcache("inspect", str(tmp_path / "nope"))
    assert proc.returncode == 1
    assert proc.stderr.startswith("kdcache: error: ") and "manifest.json: no manifest" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_missing_teacher_dir_is_a_clear_error(tmp_path) -> None:
    proc = _kdcache("prepare", "--tokenizer", str(tmp_path / "missing-teacher"), "--out", str(tmp_path / "t"),
                    "--corpus", str(tmp_path / "none.txt"))
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr and "kdcache: error:" in proc.stderr
