"""Real model families as teachers: prepare -> cache -> train -> evaluate through the CLI, per family quirk.

Each family is a tiny random-weight model built from its own config class (hidden 32) plus a
locally built word-level tokenizer with the family's quirks: its id space (padded embedding rows,
262,144 ids), its special tokens and whether it adds BOS. The cached top-k targets are checked
against an independent forward of the saved model: top-k ids exact, probabilities within the
cache format's stated error, tail mass within its stated error (cache/README.md).

The default suite runs four quirks: padded vocabulary (Qwen2), a BOS-adding tokenizer (Llama-3),
a tied head with final-logit soft-capping (Gemma-2) and a 262,144-id vocabulary padded to 262,208
rows (Gemma-3 text). The other families run with ``pytest -m families``.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

from kdcache.cache.reader import open_cache
from kdcache.cli import main
from kdcache.token_data import open_tokens
from kdcache.tokenizer import load_tokenizer, tokenizer_vocab_size

SEQ, TOP_K = 32, 8
VALUE_STEP = 0.5 / 255
"""Largest error of a stored value code in u = (p / p_max)^(1/3) (cache/README.md: 255 steps)."""
TAIL_STEP = 0.5 / 1024
"""Largest error of the stored logit(p_tail) (cache/README.md: steps of 1/1024)."""
SMALL = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2}


@dataclass(frozen=True)
class Family:
    """A family's tiny config and the tokenizer quirks that go with it."""

    model_type: str
    ids: int  # the tokenizer's id space
    specials: tuple[str, ...]  # ids 0..n-1
    eos: str
    bos: str | None = None  # added at every document start by the tokenizer's template
    pad: str | None = None
    rows: int | None = None  # embedding rows (padded past ``ids``); None = ids
    config: dict[str, Any] = field(default_factory=dict)
    documents: int = 14  # in the corpus (the 262k family: fewer, to keep the default suite fast)
    bpe: bool = False  # byte-level BPE trained on the corpus: transformers loads Qwen2's own tokenizer class,
    # which rebuilds the tokenizer from vocab + merges (a word-level model would not survive it)


FAMILIES = {
    "qwen2_padded_vocab": Family(
        "qwen2", ids=1000, rows=1024, specials=("<|endoftext|>", "<|im_start|>"), eos="<|endoftext|>",
        pad="<|endoftext|>", config={"num_key_value_heads": 1, "tie_word_embeddings": False}, bpe=True,
    ),
    "llama3_bos": Family(
        "llama", ids=768, specials=("<|begin_of_text|>", "<|end_of_text|>"), eos="<|end_of_text|>",
        bos="<|begin_of_text|>", config={"num_key_value_heads": 1},
    ),
    "gemma2_tied_softcap": Family(
        "gemma2", ids=640, specials=("<pad>", "<eos>", "<bos>"), eos="<eos>", bos="<bos>", pad="<pad>",
        config={"head_dim": 16, "num_key_value_heads": 1, "final_logit_softcapping": 2.0, "tie_word_embeddings": True},
    ),
    "gemma3_262k_ids": Family(
        "gemma3_text", ids=262_144, rows=262_208, specials=("<pad>", "<eos>", "<bos>"), eos="<eos>", bos="<bos>",
        pad="<pad>", config={"head_dim": 16, "num_key_value_heads": 1, "tie_word_embeddings": True}, documents=8,
    ),
    # opt-in: pytest -m families
    "mistral": Family(
        "mistral", ids=512, specials=("<unk>", "<s>", "</s>"), eos="</s>", bos="<s>", config={"num_key_value_heads": 1}
    ),
    "phi3_padded_vocab": Family(
        "phi3", ids=1011, rows=1064, specials=("<unk>", "<s>", "</s>", "<|endoftext|>"), eos="<|endoftext|>",
        pad="<|endoftext|>", config={"num_key_value_heads": 1, "pad_token_id": 3},
    ),
    "gpt2_tied_no_bos": Family(
        "gpt2", ids=600, specials=("<|endoftext|>",), eos="<|endoftext|>",
        config={"n_embd": 32, "n_layer": 1, "n_head": 2, "n_positions": SEQ},
    ),
    "olmo2": Family(
        "olmo2", ids=700, specials=("<|endoftext|>", "<|pad|>"), eos="<|endoftext|>", pad="<|pad|>",
        config={"num_key_value_heads": 1, "pad_token_id": 1},
    ),
    "gpt_neox": Family(
        "gpt_neox", ids=512, specials=("<|endoftext|>", "<|padding|>"), eos="<|endoftext|>", pad="<|padding|>",
        config={"tie_word_embeddings": False},
    ),
    "cohere_logit_scale": Family(
        "cohere", ids=512, specials=("<PAD>", "<BOS_TOKEN>", "<EOS_TOKEN>"), eos="<EOS_TOKEN>", bos="<BOS_TOKEN>",
        pad="<PAD>", config={"num_key_value_heads": 1, "logit_scale": 0.25},
    ),
    "granite_logits_scaling": Family(
        "granite", ids=512, specials=("<|end_of_text|>", "<|pad|>"), eos="<|end_of_text|>", pad="<|pad|>",
        config={"num_key_value_heads": 1, "logits_scaling": 4.0},
    ),
}  # fmt: skip
DEFAULT = ("qwen2_padded_vocab", "llama3_bos", "gemma2_tied_softcap", "gemma3_262k_ids")


def corpus_texts(f: Family) -> list[str]:
    """Documents of 6-90 words: ``w<id>`` words over the whole id space, or letter words for BPE tokenizers."""
    rng = random.Random(0)
    letters = "abcdefghijklmnopqrstuvwxyz"

    def word() -> str:
        if f.bpe:
            return "".join(rng.choice(letters) for _ in range(rng.randint(2, 7)))
        return f"w{rng.randrange(len(f.specials), f.ids)}"

    return [" ".join(word() for _ in range(rng.choice([6, 20, 45, 90]))) + "\n" for _ in range(f.documents)]


def make_tokenizer(f: Family) -> PreTrainedTokenizerFast:
    """The family's special tokens, then word-level ``w<i>`` ids (or BPE merges); a BOS template if it adds BOS."""
    if f.bpe:
        backend = Tokenizer(models.BPE())
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
        trainer = trainers.BpeTrainer(
            vocab_size=f.ids, special_tokens=list(f.specials), initial_alphabet=alphabet, show_progress=False
        )
        backend.train_from_iterator(corpus_texts(f) * 4, trainer)
    else:
        vocab = {s: i for i, s in enumerate(f.specials)} | {f"w{i}": i for i in range(len(f.specials), f.ids)}
        backend = Tokenizer(models.WordLevel(vocab, unk_token=f.specials[0]))
        backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if f.bos:
        backend.post_processor = processors.TemplateProcessing(
            single=f"{f.bos} $A", special_tokens=[(f.bos, backend.token_to_id(f.bos))]
        )
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=f.eos, bos_token=f.bos, pad_token=f.pad)


def make_teacher(f: Family, path: Path) -> Path:
    tokenizer = make_tokenizer(f)
    ids = tokenizer_vocab_size(tokenizer)
    sizes = {} if f.model_type == "gpt2" else dict(SMALL, max_position_embeddings=SEQ)
    rows = ids + (f.rows - f.ids if f.rows else 0)
    config = AutoConfig.for_model(
        f.model_type, vocab_size=rows, initializer_range=0.5, **sizes, **f.config
    )  # init 0.5: peaked distributions, so top-k ids are far from ties
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def write_corpus(f: Family, root: Path) -> str:
    root.mkdir()
    for i, text in enumerate(corpus_texts(f)):
        (root / f"doc{i:02d}.txt").write_text(text)
    return str(root / "*.txt")


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> None:
    code = main(list(args))
    assert code == 0, capsys.readouterr().err[-3000:]


def check_bos(f: Family, tokens_dir: Path, tokenizer: Any) -> None:
    """Every document starts a row with the tokenizer's BOS; BOS appears nowhere else."""
    for split in ("train", "val"):
        t = open_tokens(tokens_dir, split)
        if f.bos is None:
            assert t.manifest["packing"]["prefix"] == []
            continue
        bos = tokenizer.convert_tokens_to_ids(f.bos)
        ids = np.asarray(t.ids)
        assert t.manifest["packing"]["prefix"] == [bos]
        assert (ids[:, 0] == bos).sum() == t.manifest["corpus"]["num_documents"][split] == (ids == bos).sum()


def check_targets_against_a_fresh_forward(teacher_dir: Path, cache_dir: Path, vocab: int) -> None:
    model = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).eval()
    reader = open_cache(cache_dir, staging_dir=cache_dir.parent / "staging")
    assert reader.layout.vocab_size == vocab  # the tokenizer's ids, not the padded rows
    for i in range(len(reader)):
        row = reader[i]
        ids = torch.from_numpy(row["input_ids"].astype(np.int64))[None]  # (1, T)
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, :, :vocab]  # (T, V) padded rows dropped
        ref = torch.log_softmax(logits.double(), dim=-1)  # (T, V)
        ref_lp, ref_ids = ref.topk(TOP_K, dim=-1)  # (T, k)
        order = ref_ids.argsort(dim=-1)
        ref_ids, ref_p = ref_ids.gather(1, order), ref_lp.gather(1, order).exp()  # ascending ids, as cached
        assert np.array_equal(row["topk_ids"], ref_ids.numpy()), f"sequence {i}: top-k ids differ"
        p = np.exp(row["topk_logprobs"].astype(np.float64))  # (T, k)
        p_max = ref_p.max(dim=-1, keepdim=True).values.numpy()
        # a code's error in u = (p/p_max)^(1/3) moves p by <= 3 u^2 VALUE_STEP p_max; renormalizing to the
        # exact kept mass at most doubles it
        assert np.abs(p - ref_p.numpy()).max() <= (2 * 3 * VALUE_STEP * p_max).max()
        tail, ref_tail = 1 - p.sum(-1), 1 - ref_p.sum(-1).numpy()  # (T,)
        bound = TAIL_STEP * ref_tail * (1 - ref_tail) * 1.01 + 1e-6  # d p_tail = p(1-p) d logit; fp32 sums
        assert np.all(np.abs(tail - ref_tail) <= bound), np.abs(tail - ref_tail).max()


def model_rows(path: Path) -> int:
    return AutoModelForCausalLM.from_pretrained(path).get_output_embeddings().weight.shape[0]


def run_family(name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch) -> None:
    monkeypatch.setenv("KDCACHE_NO_PROGRESS", "1")
    f = FAMILIES[name]
    teacher = make_teacher(f, tmp_path / "teacher")
    tokens, cache, student = tmp_path / "tokens", tmp_path / "cache", tmp_path / "student"
    run_cli(
        capsys, "prepare", "--tokenizer", str(teacher), "--out", str(tokens),
        "--corpus", write_corpus(f, tmp_path / "corpus"), "--seq-len", str(SEQ), "--val-fraction", "0.3",
    )  # fmt: skip
    tokenizer = load_tokenizer(teacher)  # as the pipeline loads it (transformers may pick the family's class)
    vocab = tokenizer_vocab_size(tokenizer)
    assert model_rows(teacher) - vocab == (f.rows - f.ids if f.rows else 0)
    check_bos(f, tokens, tokenizer)
    run_cli(
        capsys, "cache", "--teacher", str(teacher), "--tokens", str(tokens), "--out", str(cache),
        "--targets", "topk", "--top-k", str(TOP_K), "--batch-size", "4", "--rows-per-shard", "8", "--device", "cpu",
        "--value-encoding", "rel8",  # the bound below is rel8's stated error (abs8's: tests/test_value_codes.py)
    )  # fmt: skip
    check_targets_against_a_fresh_forward(teacher, cache, vocab)
    sizes = tmp_path / "student.json"
    sizes.write_text(json.dumps({"hidden_size": 16, "num_layers": 1, "num_heads": 2, "intermediate_size": 32}))
    run_cli(
        capsys, "train", "--cache", str(cache), "--out", str(student), "--student", str(sizes),
        "--max-steps", "2", "--batch-size", "4", "--warmup-steps", "0", "--device", "cpu",
    )  # fmt: skip
    metrics = tmp_path / "metrics.json"
    run_cli(
        capsys, "evaluate", "--tokens", str(tokens), "--teacher", str(teacher), "--model", f"student={student}",
        "--metrics", str(metrics), "--plots", str(tmp_path / "plots"), "--device", "cpu", "--batch-size", "4",
    )  # fmt: skip
    flat = json.loads(metrics.read_text())
    assert all(math.isfinite(flat[m][k]) for m in ("teacher", "student") for k in ("ce", "top1_agreement"))
    assert math.isfinite(flat["student"]["kl_to_teacher"]) and flat["num_tokens"] > 0


@pytest.mark.parametrize("name", DEFAULT)
def test_family_quirk_through_the_whole_pipeline(name: str, tmp_path: Path, capsys, monkeypatch) -> None:
    run_family(name, tmp_path, capsys, monkeypatch)


@pytest.mark.families
@pytest.mark.parametrize("name", [n for n in FAMILIES if n not in DEFAULT])
def test_other_family_through_the_whole_pipeline(name: str, tmp_path: Path, capsys, monkeypatch) -> None:
    run_family(name, tmp_path, capsys, monkeypatch)
