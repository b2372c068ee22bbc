"""The `kdcache` command line: help texts, flag validation, one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from kdcache.cli import build_parser, field_docs, main
from kdcache.config.cache import CacheConfig

COMMANDS = ["demo-teacher", "prepare", "cache", "train", "evaluate", "inspect", "verify", "retokenize"]


def _kdcache(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kdcache.cli", *args], capture_output=True, text=True, timeout=120)


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
    code = main(
        ["cache", "--teacher", str(tmp_path), "--tokens", str(tmp_path), "--out", str(tmp_path / "c"), "--top-k", "0"]
    )
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
    proc = _kdcache(
        "prepare",
        "--tokenizer",
        str(tmp_path / "missing-teacher"),
        "--out",
        str(tmp_path / "t"),
        "--corpus",
        str(tmp_path / "none.txt"),
    )
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr and "kdcache: error:" in proc.stderr


# ----------------------------------------------------------------------------- cache names, refusals, inspect


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two tiny teachers (different weights) with the same tokenizer and token data; one cache by content name."""
    from test_distributed import make_teacher_and_tokens

    root = tmp_path_factory.mktemp("cli")
    teacher, tokens = make_teacher_and_tokens(root / "a", n=8)
    other, _ = make_teacher_and_tokens(root / "b", n=8, seed=1)
    return {"root": root, "teacher": teacher, "other": other, "tokens": tokens}


def _cache(made: dict[str, Path], *extra: str, teacher: str = "teacher") -> list[str]:
    return [
        "cache",
        "--teacher",
        str(made[teacher]),
        "--tokens",
        str(made["tokens"]),
        "--targets",
        "topk",
        "--top-k",
        "4",
        "--batch-size",
        "4",
        "--rows-per-shard",
        "4",
        "--device",
        "cpu",
        *extra,
    ]


def test_cache_without_out_writes_to_a_content_named_dir_and_prints_it(made, tmp_path, capsys) -> None:
    from kdcache.cache.format import Manifest

    root = tmp_path / "caches"
    assert main(_cache(made, "--cache-root", str(root))) == 0
    path = Path(capsys.readouterr().out.strip())
    m = Manifest.load(path)
    assert path.parent == root
    assert path.name == f"{m.teacher['sha256'][:8]}-{m.corpus['fingerprint'][:8]}-train-top4"
    before = {p.name: p.stat().st_mtime_ns for p in path.iterdir() if p.is_file()}
    assert main(_cache(made, "--cache-root", str(root))) == 0  # same inputs: same name, nothing rewritten
    assert Path(capsys.readouterr().out.strip()) == path
    assert {p.name: p.stat().st_mtime_ns for p in path.iterdir() if p.is_file()} == before
    assert main(_cache(made, "--cache-root", str(root), teacher="other")) == 0
    assert Path(capsys.readouterr().out.strip()) != path  # another teacher can never land in this cache
    assert main(_cache(made, "--cache-root", str(root), "--top-k", "8")) == 0
    assert capsys.readouterr().out.strip().endswith("-train-top8")


def test_cache_into_a_dir_made_by_another_teacher_or_settings_is_refused(made, tmp_path, capsys) -> None:
    out = tmp_path / "mine"
    assert main(_cache(made, "--out", str(out))) == 0
    capsys.readouterr()
    assert main(_cache(made, "--out", str(out), teacher="other")) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]  # (after transformers' weight-loading bar)
    assert err.startswith(f"kdcache: error: {out / 'manifest.json'}: this directory holds a cache made by a different")
    assert "teacher.sha256" in err and "omit --out" in err
    assert main(_cache(made, "--out", str(out), "--top-k", "8")) == 1
    assert "targets.top_k 4 (this run: 8)" in capsys.readouterr().err


def test_inspect_shows_what_a_receiving_team_needs(made, tmp_path, capsys) -> None:
    from kdcache.cache.format import FORMAT_VERSION, Manifest

    out = tmp_path / "c"
    assert main(_cache(made, "--out", str(out))) == 0
    capsys.readouterr()
    assert main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    m = Manifest.load(out)
    size = sum(s.bytes for s in m.shards)
    for needle in (
        m.teacher["sha256"],
        m.teacher["path"],
        m.tokenizer["fingerprint"],
        f"vocab {m.tokenizer['vocab_size']}",
        m.corpus["fingerprint"],
        "topk, k=4",
        f"{size} bytes",
        f"{size / m.num_tokens:.2f} bytes/token",
        "mean_entropy",
        "mean_topk_mass",
        f"format {m.format} {FORMAT_VERSION}",
    ):
        assert str(needle) in text, f"{needle!r} missing from:\n{text}"
    assert main(["inspect", "--json", str(out)]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["tokenizer"]["fingerprint"] == m.tokenizer["fingerprint"] and data["total_bytes"] == size
    assert data["format_version"] == FORMAT_VERSION and "shards" not in data


# ----------------------------------------------------------------------------- params files


def test_a_yaml_key_given_twice_is_refused_naming_both_lines(tmp_path, capsys) -> None:
    spec = tmp_path / "student.yaml"
    spec.write_text("hidden_size: 16\nnum_layers: 1\nhidden_size: 32\n")
    assert main(["train", "--cache", str(tmp_path), "--out", str(tmp_path / "s"), "--student", str(spec)]) == 1
    assert capsys.readouterr().err.strip() == (
        f"kdcache: error: {spec}: not valid YAML: key 'hidden_size' appears twice in one mapping (lines 1 and 3); "
        "YAML would keep only the last — remove one"
    )


def test_params_sections_twice_are_refused_and_a_missing_section_is_named(tmp_path) -> None:
    import yaml

    root = Path(__file__).resolve().parents[1]
    params = yaml.safe_load((root / "params.yaml").read_text())
    text = (root / "params.yaml").read_text()
    (tmp_path / "twice.yaml").write_text(text + "\ntrain:\n  lr: 0.1\n")
    (tmp_path / "missing.yaml").write_text(yaml.safe_dump({k: v for k, v in params.items() if k != "evaluate"}))
    stage = [sys.executable, str(root / "stages" / "check_params.py"), "--out", str(tmp_path / "ok")]
    twice = subprocess.run([*stage, "--params", str(tmp_path / "twice.yaml")], capture_output=True, text=True)
    assert twice.returncode == 1 and "Traceback" not in twice.stderr
    assert f"{tmp_path / 'twice.yaml'}: not valid YAML: key 'train' appears twice in one mapping" in twice.stderr
    missing = subprocess.run([*stage, "--params", str(tmp_path / "missing.yaml")], capture_output=True, text=True)
    assert missing.returncode == 0 and (tmp_path / "ok").read_text() == "every section of params.yaml is valid\n"
    assert "params: no 'evaluate' section — using the library defaults for all of it" in missing.stderr


def test_every_writing_command_offers_overwrite_and_train_says_what_happens_without_resume(capsys) -> None:
    for command in ("demo-teacher", "prepare", "cache", "train", "evaluate"):
        with pytest.raises(SystemExit):
            build_parser().parse_args([command, "--help"])
        out = " ".join(capsys.readouterr().out.split())
        assert "--overwrite" in out and "never deletes what it did not make" in out, command
        if command == "train":
            assert "is moved aside to run.moved-<UTC time>-started-without-resume/" in out


def test_list_flags_take_numbers_and_optional_flags_their_type() -> None:
    from kdcache.cli import config_from_args
    from kdcache.config.corpus import CorpusConfig

    args = build_parser().parse_args(
        [
            "cache",
            "--teacher",
            "t",
            "--tokens",
            "d",
            "--targets",
            "topk",
            "--temperatures",
            "2",
            "4.0",
            "--hidden-layers",
            "-1",
            "2",
        ]
    )
    cfg = config_from_args(CacheConfig, args)
    assert cfg.temperatures == (2.0, 4.0) and cfg.hidden_layers == (-1, 2)
    args = build_parser().parse_args(["prepare", "--tokenizer", "t", "--out", "o", "--context-field", "prompt"])
    assert config_from_args(CorpusConfig, args).context_field == "prompt"
