"""Config: strict loading of params sections into frozen dataclasses."""

from __future__ import annotations

import dataclasses

import pytest

from kdcache.config.base import ConfigError, load_params, load_section, to_dict
from kdcache.config.cache import CacheConfig
from kdcache.config.corpus import CorpusConfig
from kdcache.config.train import TrainConfig


def test_unknown_key_is_refused_with_a_did_you_mean_hint() -> None:
    with pytest.raises(ConfigError, match=r"unknown key 'cache.topk' — did you mean 'cache.top_k'\?"):
        load_section(CacheConfig, {"topk": 16}, section="cache")


def test_unknown_key_without_close_match_lists_the_known_keys() -> None:
    with pytest.raises(ConfigError, match="known keys: .*top_k"):
        load_section(CacheConfig, {"zzzzzz": 1}, section="cache")


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"top_k": "32"}, "cache.top_k: must be int, got str"),
        ({"top_k": True}, "cache.top_k: must be int, got bool"),
        ({"top_k": 0}, r"cache.top_k: must be in \[1, 1024\]"),
        ({"targets": "dense"}, "cache.targets: must be one of topk|sampled|both"),
        ({"mass": 1.5}, r"cache.mass: must be in \[0, 1\)"),
        ({"on_nan": "ignore"}, "cache.on_nan: must be one of fail|skip"),
    ],
)
def test_bad_values_name_the_key_and_the_rule(values: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_section(CacheConfig, values, section="cache")


def test_nested_student_section_is_validated_with_its_full_key() -> None:
    cfg = load_section(TrainConfig, {"student": {"hidden_size": 64, "num_heads": 4}}, section="train")
    assert cfg.student.hidden_size == 64 and cfg.student.num_layers == 2
    with pytest.raises(ConfigError, match="unknown key 'train.student.width'"):
        load_section(TrainConfig, {"student": {"width": 64}}, section="train")
    with pytest.raises(ConfigError, match="train.student.hidden_size: must be divisible by num_heads"):
        load_section(TrainConfig, {"student": {"hidden_size": 30, "num_heads": 4}}, section="train")


def test_lists_become_tuples_and_ints_are_accepted_for_floats() -> None:
    cfg = load_section(CorpusConfig, {"paths": ["a.txt", "b/*.jsonl"], "val_fraction": 0.1}, section="corpus")
    assert cfg.paths == ("a.txt", "b/*.jsonl")
    assert load_section(TrainConfig, {"lr": 1}, section="train").lr == 1.0
    with pytest.raises(ConfigError, match=r"corpus.paths\[1\]: must be str"):
        load_section(CorpusConfig, {"paths": ["a.txt", 3]}, section="corpus")


def test_configs_are_frozen_and_defaults_live_in_the_dataclass() -> None:
    cfg = load_section(CacheConfig, None, section="cache")
    assert cfg == CacheConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.top_k = 3  # type: ignore[misc]
    assert to_dict(TrainConfig())["student"]["hidden_size"] == 128


def test_section_that_is_not_a_mapping_is_refused() -> None:
    with pytest.raises(ConfigError, match="cache: must be a mapping, got list"):
        load_section(CacheConfig, [1, 2], section="cache")  # type: ignore[arg-type]


def test_load_params_names_the_file_on_missing_or_invalid_yaml(tmp_path) -> None:
    with pytest.raises(ConfigError, match="params.yaml: not found"):
        load_params(tmp_path / "params.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("cache: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_params(bad)
