"""pipeline/train.py's step and loop: the fused head trains exactly like the full logits, a step reads no
number back from the device, the log gets one line per step (with the data wait) written per log window,
and a non-finite loss is refused naming its step."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from test_train import TINY, VOCAB, cfg_for, losses, write_tiny_cache
from torch.utils._python_dispatch import TorchDispatchMode

import kdcache.train as train_module
from kdcache.cache.reader import open_cache
from kdcache.checkpoint import list_checkpoints
from kdcache.config.train import StudentConfig
from kdcache.lm_head import fused_head
from kdcache.losses import TARGET_KEYS, KDLossSpec
from kdcache.train import _step, train
from kdcache.train_data import Position, TrainError, batch_stream
from kdcache.train_run import LOG_FIELDS

pytestmark = pytest.mark.usefixtures("staging_one_thread")


@pytest.fixture(scope="module")
def caches(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return {"both": write_tiny_cache(tmp_path_factory.mktemp("caches") / "both")}


@pytest.mark.parametrize("loss", ["topk_tail", "sampled", "ce"])
def test_fused_head_training_follows_the_full_logits_curve(
    loss: str, caches: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    train(cfg_for(loss=loss, max_steps=5), cache_dir=caches["both"], out_dir=tmp_path / "fused")
    monkeypatch.setattr(train_module, "fused_head", lambda model: (None, "forced by the test"))
    train(cfg_for(loss=loss, max_steps=5), cache_dir=caches["both"], out_dir=tmp_path / "logits")
    assert np.allclose(losses(tmp_path / "fused"), losses(tmp_path / "logits"), rtol=0, atol=1e-5)


def test_the_log_has_one_line_per_step_with_its_data_wait_even_when_written_per_window(
    caches: dict, tmp_path: Path
) -> None:
    out = tmp_path / "s"
    train(cfg_for(max_steps=7, log_every=3, checkpoint_every=5), cache_dir=caches["both"], out_dir=out)
    lines = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == list(range(1, 8))
    assert all(tuple(r) == LOG_FIELDS and r["data_wait_s"] >= 0 for r in lines)


def test_a_non_finite_loss_is_refused_naming_its_step_before_its_checkpoint(caches: dict, tmp_path: Path) -> None:
    out, cfg = tmp_path / "s", cfg_for(lr=float("inf"), max_steps=4, log_every=3, checkpoint_every=2)
    with pytest.raises(TrainError, match="loss is nan at step 2 "):  # step 1's update is inf
        train(cfg, cache_dir=caches["both"], out_dir=out)
    assert list_checkpoints(out) == []


class _ScalarReads(TorchDispatchMode):
    """Counts reads of a tensor's value into Python (``item``, ``float``, ``bool``, ``tolist``)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.count += 1
        return func(*args, **(kwargs or {}))


class _NoOptimizer:
    """AdamW reads its CPU step counter with ``item``; this stand-in isolates the step's own reads."""

    def zero_grad(self, set_to_none: bool = True) -> None:
        pass

    def step(self) -> None:
        pass


@pytest.mark.parametrize("fused", [True, False])
def test_a_step_reads_no_number_back_from_the_device(fused: bool, caches: dict) -> None:
    model = _tiny_student()
    head = fused_head(model)[0] if fused else None
    spec = KDLossSpec(kind="topk_tail", chunk_tokens=8)
    cfg = cfg_for(grad_accum=2)
    with open_cache(caches["both"]) as reader:
        stream = batch_stream(reader, 4, seed=0, pos=Position(), rank=0, world=1, keys=TARGET_KEYS[spec.kind])
        batches = [next(stream) for _ in range(2)]
        stream.close()
    with _ScalarReads() as reads:
        stats = _step(
            cfg,
            model=model,
            head=head,
            optimizer=_NoOptimizer(),  # type: ignore[arg-type]
            spec=spec,
            stream=iter(batches),
            pos=Position(),
            dev=torch.device("cpu"),
        )
    assert reads.count == 0
    assert isinstance(stats["values"], torch.Tensor) and stats["values"].shape == (4,)
    assert stats["tokens"] == 2 * 4 * 16 and stats["data_wait_s"] >= 0


def _tiny_student() -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    s: StudentConfig = TINY
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=s.hidden_size,
        num_hidden_layers=s.num_layers,
        num_attention_heads=s.num_heads,
        intermediate_size=s.intermediate_size,
        max_position_embeddings=16,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config)
