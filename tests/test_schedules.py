"""Loss schedules (``train.schedule``): alpha and temperature ramps and the CE-only warm-up, against their
closed forms, in the training log, across an interrupt + resume, and refused where the cache cannot feed them."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from test_train import caches, cfg_for  # noqa: F401  (fixtures)
from transformers import AutoModelForCausalLM

from kdcache.cache.format import TargetLayout
from kdcache.config.base import ConfigError, load_section
from kdcache.config.train import ANY_TEMPERATURE_LOSSES, RampConfig, ScheduleConfig, TrainConfig
from kdcache.losses import KINDS, TAIL_KINDS, KDLossSpec
from kdcache.train import check_schedule, ramp_value, step_spec, train

pytestmark = pytest.mark.usefixtures("staging_one_thread")


def schedule(alpha: tuple = ("constant", None), temperature: tuple = ("constant", None), warmup: int = 0):
    return ScheduleConfig(alpha=RampConfig(*alpha), temperature=RampConfig(*temperature), ce_warmup_steps=warmup)


def log_lines(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


def test_ramps_equal_their_closed_forms() -> None:
    cases = {
        # progress: 0, 1/4, 1/2, 3/4, 1 -- from 0.9 to 0.1
        "constant": [0.9, 0.9, 0.9, 0.9, 0.9],
        "linear": [0.9, 0.7, 0.5, 0.3, 0.1],
        # 0.1 + 0.8 * (1 + cos(pi p)) / 2: cos(pi/4) = sqrt(2)/2
        "cosine": [0.9, 0.1 + 0.4 * (1 + math.sqrt(0.5)), 0.5, 0.1 + 0.4 * (1 - math.sqrt(0.5)), 0.1],
    }
    for kind, want in cases.items():
        ramp = RampConfig(kind, None if kind == "constant" else 0.1)
        got = [ramp_value(ramp, 0.9, p) for p in (0.0, 0.25, 0.5, 0.75, 1.0)]
        assert got == pytest.approx(want, abs=1e-15), kind


def test_step_spec_is_ce_during_warmup_then_runs_the_ramps_over_the_remaining_steps() -> None:
    cfg = TrainConfig(
        loss="topk_renorm",
        alpha=0.8,
        temperature=1.0,
        max_steps=7,
        schedule=schedule(alpha=("linear", 0.2), temperature=("cosine", 3.0), warmup=2),
    )
    base = KDLossSpec(kind="topk_renorm", alpha=0.8, temperature=1.0)
    specs = [step_spec(base, cfg, s) for s in range(7)]
    assert [s.kind for s in specs] == ["ce"] * 2 + ["topk_renorm"] * 5
    # KD steps 2..6: progress (s - 2) / 4
    assert [s.alpha for s in specs[2:]] == pytest.approx([0.8, 0.65, 0.5, 0.35, 0.2], abs=1e-12)
    cosine = [3.0 + (1.0 - 3.0) * 0.5 * (1 + math.cos(math.pi * i / 4)) for i in range(5)]
    assert [s.temperature for s in specs[2:]] == pytest.approx(cosine, abs=1e-12)
    assert specs[2].temperature == 1.0 and specs[-1].temperature == pytest.approx(3.0, abs=1e-12)
    constant = TrainConfig(loss="topk_renorm", alpha=0.8, max_steps=7)
    assert all(step_spec(base, constant, s) == base for s in range(7))  # the default: the spec as given


def test_the_log_records_each_steps_alpha_and_temperature_and_the_loss_mixes_with_them(
    caches: dict,  # noqa: F811
    tmp_path: Path,
) -> None:
    cfg = cfg_for(
        loss="topk_renorm",
        alpha=0.9,
        max_steps=7,
        schedule=schedule(alpha=("linear", 0.1), temperature=("linear", 2.0), warmup=2),
    )
    train(cfg, cache_dir=caches["topk"], out_dir=tmp_path / "s")
    lines = log_lines(tmp_path / "s")
    alphas = [0.0, 0.0, 0.9, 0.7, 0.5, 0.3, 0.1]  # CE alone, then 0.9 -> 0.1 over steps 2..6
    temps = [1.0, 1.0, 1.0, 1.25, 1.5, 1.75, 2.0]
    assert [r["alpha"] for r in lines] == pytest.approx(alphas, abs=1e-12)
    assert [r["temperature"] for r in lines] == pytest.approx(temps, abs=1e-12)
    for r in lines:  # kd holds tau^2 * KL already (kdcache.losses)
        assert r["loss"] == pytest.approx(r["alpha"] * r["kd"] + (1 - r["alpha"]) * r["ce"], rel=1e-5)
    assert all(r["kd"] == 0.0 and r["loss"] == r["ce"] for r in lines[:2])
    assert all(r["kd"] > 0 for r in lines[2:])


def test_ce_warmup_steps_are_the_ce_baselines_steps(caches: dict, tmp_path: Path) -> None:  # noqa: F811
    """Progressive distillation starts as the CE-only baseline: same init, data and loss, so the same numbers."""
    sched = schedule(warmup=3)
    train(cfg_for(loss="topk_tail", max_steps=5, schedule=sched), cache_dir=caches["both"], out_dir=tmp_path / "kd")
    train(cfg_for(loss="ce", max_steps=5, schedule=sched), cache_dir=caches["both"], out_dir=tmp_path / "ce")
    kd, ce = log_lines(tmp_path / "kd"), log_lines(tmp_path / "ce")
    for key in ("loss", "ce", "grad_norm"):
        assert [r[key] for r in kd[:3]] == [r[key] for r in ce[:3]], key
    assert kd[3]["loss"] != ce[3]["loss"] and kd[3]["alpha"] == 0.5 and ce[3]["alpha"] == 0.0


def test_interrupted_and_resumed_run_continues_the_schedule_exactly(caches: dict, tmp_path: Path) -> None:  # noqa: F811
    cfg = cfg_for(
        loss="topk_renorm",
        alpha=0.9,
        max_steps=8,
        checkpoint_every=2,
        schedule=schedule(alpha=("cosine", 0.2), temperature=("linear", 2.5), warmup=2),
    )
    train(cfg, cache_dir=caches["both"], out_dir=tmp_path / "full")
    part = tmp_path / "part"
    train(cfg, cache_dir=caches["both"], out_dir=part, max_steps=3)  # one KD step after the warm-up
    train(cfg, cache_dir=caches["both"], out_dir=part, resume=True, max_steps=5)  # mid ramp
    train(cfg, cache_dir=caches["both"], out_dir=part, resume=True)
    timing = {"tokens_per_s", "elapsed", "data_wait_s"}
    strip = [{k: v for k, v in r.items() if k not in timing} for r in log_lines(part)]
    assert strip == [{k: v for k, v in r.items() if k not in timing} for r in log_lines(tmp_path / "full")]
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "full").state_dict()
    b = AutoModelForCausalLM.from_pretrained(part).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_moving_temperature_is_refused_for_losses_that_take_only_stored_temperatures(
    caches: dict,  # noqa: F811
    tmp_path: Path,
) -> None:
    moving = schedule(temperature=("linear", 2.0))
    for loss in ("topk_tail", "jsd", "sampled", "hard"):  # at config time (check_params), when the loss is explicit
        with pytest.raises(ConfigError, match=f"train.schedule.temperature: .*train.loss={loss} takes only"):
            TrainConfig(loss=loss, schedule=moving)
    # loss auto: at startup, once the cache says which loss it is, naming what the cache stores
    with pytest.raises(ConfigError, match=r"train.loss=topk_tail re-tempers .* log-normalizers for: 1; keep"):
        train(cfg_for(schedule=moving), cache_dir=caches["topk"], out_dir=tmp_path / "a")
    with pytest.raises(ConfigError, match="train.loss=sampled takes only the cache's temperature 1; keep"):
        train(cfg_for(schedule=moving), cache_dir=caches["sampled"], out_dir=tmp_path / "b")
    renorm = cfg_for(loss="topk_renorm", schedule=moving, max_steps=2)
    assert train(renorm, cache_dir=caches["topk"], out_dir=tmp_path / "c")["complete"]
    layout = TargetLayout(kind="topk", vocab_size=48, seq_len=16, top_k=8, temperatures=(2.0, 0.5))
    with pytest.raises(ConfigError, match=r"log-normalizers for: 0.5, 1, 2; keep temperature.kind: constant"):
        check_schedule(TrainConfig(schedule=moving), KDLossSpec(kind="reverse_kl"), layout, cache_dir="c")
    check_schedule(TrainConfig(schedule=moving), KDLossSpec(kind="topk_renorm"), layout, cache_dir="c")


def test_losses_that_take_any_temperature_are_the_non_tail_soft_losses() -> None:
    assert set(ANY_TEMPERATURE_LOSSES) == set(KINDS) - set(TAIL_KINDS) - {"sampled", "hard"}


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"schedule": {"alpha": {"kind": "step"}}}, "train.schedule.alpha.kind: must be one of constant|linear|cosine"),
        ({"schedule": {"alpha": {"kind": "linear"}}}, "train.schedule.alpha.end: kind linear needs the value"),
        ({"schedule": {"alpha": {"end": 0.1}}}, "train.schedule.alpha.end: is 0.1 but kind is constant"),
        ({"schedule": {"alpha": {"kind": "cosine", "end": 1.5}}}, r"train.schedule.alpha.end: must be in \[0, 1\]"),
        ({"schedule": {"temperature": {"kind": "linear", "end": 0}}}, "train.schedule.temperature.end: must be > 0"),
        ({"schedule": {"ce_warmup_steps": 150}}, "ce_warmup_steps: is 150, leaving no KD step"),
        ({"schedule": {"warmup": 3}}, "unknown key 'train.schedule.warmup'"),
    ],
)
def test_bad_schedules_are_refused_naming_the_key(values: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_section(TrainConfig, values, section="train")
