"""load_teacher loads local causal LMs only, with clear errors; teacher_logits is a plain forward."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from kdcache.config.base import ConfigError
from kdcache.config.teacher import TeacherConfig
from kdcache.teacher import TeacherError, load_teacher, teacher_logits
from kdcache.tokenizer import tokenizer_vocab_size

MODEL_VOCAB = 320  # > the tokenizer's 300 ids: padding rows, as real models have


def make_tokenizer(vocab_size: int = 300):
    """A tiny byte-level BPE tokenizer trained on this file's own text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<eos>"],
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(Path(__file__).read_text().splitlines() * 3, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


def make_teacher_dir(path: Path, *, model_vocab: int = MODEL_VOCAB, tokenizer=None) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=model_vocab,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    LlamaForCausalLM(config).save_pretrained(path)
    (tokenizer or make_tokenizer()).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory) -> Path:
    return make_teacher_dir(tmp_path_factory.mktemp("teacher"))


def test_load_teacher_records_provenance_and_runs_in_eval_mode(teacher_dir):
    teacher = load_teacher(TeacherConfig(path=str(teacher_dir), device="cpu"))
    info = teacher.info
    assert set(info) == {"path", "sha256", "files", "dtype", "model_type", "num_parameters", "vocab_size"}
    assert info["dtype"] == "float32" and teacher.dtype == torch.float32  # auto on CPU
    assert info["model_type"] == "llama" and info["vocab_size"] == MODEL_VOCAB == teacher.vocab_size
    assert "model.safetensors" in info["files"] and "config.json" in info["files"] and len(info["sha256"]) == 64
    assert info["num_parameters"] == sum(p.numel() for p in teacher.model.parameters())
    assert not teacher.model.training
    assert tokenizer_vocab_size(teacher.tokenizer) == 300


def test_teacher_logits_equal_a_plain_forward(teacher_dir):
    teacher = load_teacher(TeacherConfig(path=str(teacher_dir), device="cpu"))
    ids = torch.randint(0, 300, (2, 9))
    logits = teacher_logits(teacher, ids)
    assert logits.shape == (2, 9, MODEL_VOCAB) and logits.device == teacher.device
    with torch.no_grad():
        torch.testing.assert_close(logits, teacher.model(input_ids=ids).logits)
    with pytest.raises(ValueError, match=r"\(B, T\)"):
        teacher_logits(teacher, ids[0])


def test_explicit_dtype_is_used(teacher_dir):
    teacher = load_teacher(TeacherConfig(path=str(teacher_dir), device="cpu", dtype="bfloat16"))
    assert teacher.dtype == torch.bfloat16 and teacher.info["dtype"] == "bfloat16"
    assert next(teacher.model.parameters()).dtype == torch.bfloat16


def test_trust_remote_code_logs_a_warning(teacher_dir, caplog):
    with caplog.at_level(logging.WARNING, logger="kdcache.teacher"):
        load_teacher(TeacherConfig(path=str(teacher_dir), device="cpu", trust_remote_code=True))
    assert "trust_remote_code" in caplog.text


def test_missing_dir_names_the_key_and_the_demo_stage(tmp_path):
    with pytest.raises(TeacherError, match=r"teacher.path '.*nope' does not exist .* demo_teacher"):
        load_teacher(TeacherConfig(path=str(tmp_path / "nope")))


def test_dir_without_config_is_refused(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(TeacherError, match="no config.json"):
        load_teacher(TeacherConfig(path=str(tmp_path)))


def test_encoder_only_config_is_not_a_causal_lm(tmp_path):
    from transformers import BertConfig, BertModel

    BertModel(
        BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    ).save_pretrained(tmp_path)
    with pytest.raises(TeacherError, match="BertModel .* is not a causal LM"):
        load_teacher(TeacherConfig(path=str(tmp_path)))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "t5", "is_encoder_decoder": True}))
    with pytest.raises(TeacherError, match="not a causal LM"):
        load_teacher(TeacherConfig(path=str(tmp_path)))


def test_config_without_weights_is_refused(tmp_path):
    from transformers import LlamaConfig

    LlamaConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2).save_pretrained(tmp_path)
    with pytest.raises(TeacherError, match="no weight files"):
        load_teacher(TeacherConfig(path=str(tmp_path)))


def test_tokenizer_larger_than_the_logits_is_refused(tmp_path):
    make_teacher_dir(tmp_path, model_vocab=256)
    with pytest.raises(TeacherError, match="logits have 256 entries but its tokenizer has 300"):
        load_teacher(TeacherConfig(path=str(tmp_path), device="cpu"))


def test_model_dir_without_tokenizer_is_refused(tmp_path):
    make_teacher_dir(tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).unlink()
    with pytest.raises(TeacherError, match="no tokenizer files"):
        load_teacher(TeacherConfig(path=str(tmp_path), device="cpu"))


MARKER_CODE = "import os, pathlib\npathlib.Path(os.environ['KDCACHE_TEST_MARKER']).write_text('executed')\n"


def _with_shipped_code(src: Path, dst: Path, **config) -> Path:
    import shutil

    shutil.copytree(src, dst)
    data = json.loads((dst / "config.json").read_text()) | config
    (dst / "config.json").write_text(json.dumps(data))
    for name in ("configuration_evil.py", "modeling_evil.py"):
        (dst / name).write_text(MARKER_CODE)
    return dst


def test_code_shipped_in_the_teacher_dir_never_runs_unless_trusted(teacher_dir, tmp_path, monkeypatch):
    assert TeacherConfig(path="x").trust_remote_code is False
    marker = tmp_path / "executed"
    monkeypatch.setenv("KDCACHE_TEST_MARKER", str(marker))
    auto_map = {"AutoConfig": "configuration_evil.EvilConfig", "AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    custom = _with_shipped_code(
        teacher_dir, tmp_path / "custom", model_type="evil_lm", architectures=["EvilForCausalLM"], auto_map=auto_map
    )
    with pytest.raises(TeacherError, match=f"{custom}.*teacher.trust_remote_code: true"):
        load_teacher(TeacherConfig(path=str(custom), device="cpu"))
    assert not marker.exists()
    shadow = _with_shipped_code(teacher_dir, tmp_path / "shadow", auto_map=auto_map)  # a llama that also ships code
    teacher = load_teacher(TeacherConfig(path=str(shadow), device="cpu"))
    assert type(teacher.model).__name__ == "LlamaForCausalLM" and not marker.exists()


# ----------------------------------------------------------------------------- chunked LM head


def _tiny(model_type: str, **config):
    from transformers import AutoConfig, AutoModelForCausalLM

    sizes = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2}
    sizes = {"n_embd": 32, "n_layer": 1, "n_head": 2} if model_type == "gpt2" else sizes
    torch.manual_seed(0)
    cfg = AutoConfig.for_model(model_type, vocab_size=MODEL_VOCAB, initializer_range=0.5, **sizes, **config)
    return AutoModelForCausalLM.from_config(cfg).eval()


HEADS = {
    "llama_untied": ("llama", {}),
    "gemma2_tied_softcap": ("gemma2", {"head_dim": 16, "num_key_value_heads": 1, "final_logit_softcapping": 3.0}),
    "gpt2_tied": ("gpt2", {}),
    "cohere_logit_scale": ("cohere", {"logit_scale": 0.25}),
    "granite_logits_scaling": ("granite", {"logits_scaling": 3.0}),
}


@pytest.mark.parametrize("family", sorted(HEADS))
def test_hidden_states_through_the_head_equal_the_models_own_logits(family):
    from kdcache.teacher import Teacher, head_logits, logit_rows, output_head, teacher_hidden

    model = _tiny(HEADS[family][0], **HEADS[family][1])
    head = output_head(model, model.config)
    teacher = Teacher(model, None, torch.device("cpu"), torch.float32, {"path": family}, head=head)
    ids = torch.randint(0, MODEL_VOCAB, (2, 24))
    hidden = teacher_hidden(teacher, ids)  # (B, T, H)
    with torch.no_grad():
        full = model(input_ids=ids).logits  # (B, T, V)
    assert torch.equal(head_logits(head, hidden.reshape(48, -1)), full.reshape(48, -1))  # bit for bit in fp32
    rows = logit_rows(teacher, hidden)
    torch.testing.assert_close(rows(slice(16, 40)), full.reshape(48, -1)[16:40], atol=1e-6, rtol=0)
    if family == "gemma2_tied_softcap":
        assert (
            head.softcap == 3.0 and full.abs().max() < 3.0 and head.module.weight is model.get_input_embeddings().weight
        )


def test_an_output_transform_kdcache_does_not_know_is_refused(tmp_path, monkeypatch):
    from kdcache import teacher as teacher_module

    model = _tiny("gemma2", head_dim=16, num_key_value_heads=1, final_logit_softcapping=3.0)
    model.save_pretrained(tmp_path)
    make_tokenizer().save_pretrained(tmp_path)
    load_teacher(TeacherConfig(path=str(tmp_path), device="cpu"))  # known: soft-capping
    known = dict(teacher_module.OUTPUT_TRANSFORMS)
    del known["final_logit_softcapping"]
    monkeypatch.setattr(teacher_module, "OUTPUT_TRANSFORMS", known)
    with pytest.raises(TeacherError, match=r"cannot reproduce from its final hidden states .* add that transform"):
        load_teacher(TeacherConfig(path=str(tmp_path), device="cpu"))


def test_the_cache_path_equals_materialized_logits_bit_for_bit_on_the_demo_size_model():
    """Chunked head (what the cache stage runs) == the model's (B, T, V) logits then ``sparsify``, in fp32."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from kdcache.cache.format import TargetLayout
    from kdcache.cache.targets import cache_chunk_tokens, sparsify, sparsify_rows
    from kdcache.teacher import Teacher, logit_rows, output_head, teacher_hidden

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=4096,
        hidden_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=768,
        max_position_embeddings=256,
    )  # the demo teacher's shape (2 of its 4 layers)
    model = LlamaForCausalLM(config).eval()
    teacher = Teacher(
        model, None, torch.device("cpu"), torch.float32, {"path": "demo"}, head=output_head(model, config)
    )
    B, T = 8, 256
    ids, seqs = torch.randint(0, 4096, (B, T)), torch.arange(100, 100 + B)
    layout = TargetLayout(kind="both", vocab_size=4096, seq_len=T, top_k=32, samples=16, seed=3)
    chunk = cache_chunk_tokens(4096, "cpu")
    whole = sparsify(teacher_logits(teacher, ids), layout=layout, seq_indices=seqs, chunk_tokens=chunk)
    rows = logit_rows(teacher, teacher_hidden(teacher, ids))
    chunked = sparsify_rows(rows, batch=B, device=teacher.device, layout=layout, seq_indices=seqs, chunk_tokens=chunk)
    assert whole.keys() == chunked.keys()
    for key in whole:
        assert torch.equal(whole[key], chunked[key]), key


def test_the_cache_stage_never_runs_the_full_forward_and_feeds_the_head_chunks(teacher_dir, tmp_path, monkeypatch):
    import numpy as np

    from kdcache.cache.build import build_cache
    from kdcache.cache.reader import open_cache
    from kdcache.config.cache import CacheConfig
    from kdcache.fingerprint import tokenizer_fingerprint
    from kdcache.token_data import open_tokens, write_tokens

    teacher = load_teacher(TeacherConfig(path=str(teacher_dir), device="cpu"))
    ids = np.random.default_rng(0).integers(0, 300, size=(6, 40), dtype=np.int32)
    fingerprint = tokenizer_fingerprint(teacher.tokenizer)
    write_tokens(tmp_path / "tokens", {"train": ids}, vocab_size=300, tokenizer_fingerprint=fingerprint)
    seen: list[int] = []
    teacher.head.module.register_forward_hook(lambda m, args, out: seen.append(args[0].shape[0]))

    def no_full_forward(*args, **kwargs):
        raise AssertionError("the cache stage ran the model's full forward: (B, T, V) logits")

    monkeypatch.setattr(teacher.model, "forward", no_full_forward)
    monkeypatch.setattr("kdcache.cache.scoring.cache_chunk_tokens", lambda vocab, device_type: 32)
    tokens = open_tokens(tmp_path / "tokens", "train")
    build_cache(teacher, tokens, CacheConfig(targets="topk", top_k=4, batch_size=3), out_dir=tmp_path / "cache")
    assert seen and max(seen) == 32 and sum(seen) == 6 * 40  # every position once, 32 at a time
    assert len(open_cache(tmp_path / "cache", staging_dir=tmp_path / "staging")) == 6


def test_bf16_teacher_head_matches_its_own_forward_within_bf16_rounding(teacher_dir):
    teacher = load_teacher(TeacherConfig(path=str(teacher_dir), device="cpu", dtype="bfloat16"))
    from kdcache.teacher import logit_rows, teacher_hidden

    ids = torch.randint(0, 300, (2, 20))
    chunk = logit_rows(teacher, teacher_hidden(teacher, ids))(slice(0, 40))  # (40, V) fp32
    assert chunk.dtype == torch.float32
    full = teacher_logits(teacher, ids).float().reshape(40, -1)
    torch.testing.assert_close(chunk, full, atol=1e-2 * float(full.abs().max()), rtol=0)


def test_a_device_map_that_offloads_most_of_the_model_gives_the_same_cache_bytes(tmp_path) -> None:
    """Teachers larger than one device: accelerate's placement (here: CPU memory too small, the rest offloaded
    to disk) computes exactly what the plain load computes, in fp32."""
    from conftest import make_world

    from kdcache.cache.build import build_cache
    from kdcache.config.cache import CacheConfig
    from kdcache.token_data import open_tokens

    world = make_world(tmp_path, vocab_size=64, n=8, seq=16)
    tokens = open_tokens(world["tokens"], "train")
    cfg = CacheConfig(targets="topk", top_k=4, batch_size=4, rows_per_shard=4)
    plain = load_teacher(TeacherConfig(path=str(world["teacher"]), device="cpu"))
    mapped = load_teacher(
        TeacherConfig(path=str(world["teacher"]), device="cpu", device_map="auto", max_memory=("cpu=40KB",))
    )
    assert "disk" in set(mapped.model.hf_device_map.values())
    a = build_cache(plain, tokens, cfg, out_dir=tmp_path / "plain")
    b = build_cache(mapped, tokens, cfg, out_dir=tmp_path / "mapped")
    assert [s.sha256 for s in a.shards] == [s.sha256 for s in b.shards]


def test_max_memory_without_a_device_map_is_refused() -> None:
    with pytest.raises(ConfigError, match="teacher.max_memory: needs teacher.device_map"):
        TeacherConfig(max_memory=("cpu=1GiB",))
