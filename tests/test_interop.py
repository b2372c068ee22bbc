"""kdcache.interop: the decoded ``datasets`` view equals ``open_cache`` exactly and feeds a DataLoader;
exports follow Axolotl's / NeMo-Aligner's row layouts and plain list columns; imports of both make
caches that verify and train; kdcache -> export -> import gives back the same targets."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from conftest import STUDENT, make_world

from kdcache.cache.build import build_cache
from kdcache.cache.format import Manifest
from kdcache.cache.reader import open_cache
from kdcache.cache.rows import stage_rows
from kdcache.cache.shards import CacheError
from kdcache.cache.verify import verify_cache
from kdcache.cli import main as kdcache
from kdcache.config.cache import CacheConfig
from kdcache.config.teacher import TeacherConfig
from kdcache.interop.export import AXOLOTL_SCHEMA, ExportError, export_cache
from kdcache.interop.hf_view import to_hf_dataset
from kdcache.interop.ingest import NOMINAL_MASS, import_cache
from kdcache.interop.rows import decoded_schema
from kdcache.interop.sources import SourceError
from kdcache.packing import token_mask
from kdcache.teacher import load_teacher
from kdcache.token_data import open_tokens

V, N, T = 48, 12, 16
CONFIGS = {
    # rel8: codes relative to each position's max survive a float export and re-import exactly (imports write
    # rel8; abs8's absolute codes move with the renormalizing offset -- tests/test_value_codes.py exports abs8)
    "topk": CacheConfig(targets="topk", top_k=8, batch_size=4, rows_per_shard=5, value_encoding="rel8"),
    "adaptive": CacheConfig(targets="topk", top_k=8, mass=0.1, batch_size=4, rows_per_shard=5, value_encoding="rel8"),
    "both": CacheConfig(targets="both", top_k=4, samples=16, batch_size=4, rows_per_shard=5, value_encoding="rel8"),
    "sampled": CacheConfig(targets="sampled", samples=16, batch_size=4, rows_per_shard=5),
}


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("interop")
    made = make_world(root, vocab_size=V, n=N, seq=T)
    teacher = load_teacher(TeacherConfig(path=str(made["teacher"]), device="cpu", dtype="float32"))
    for kind, cfg in CONFIGS.items():
        build_cache(teacher, open_tokens(made["tokens"], "train"), cfg, out_dir=root / kind)
    return made | {kind: root / kind for kind in CONFIGS}


@pytest.fixture(autouse=True)
def _staging(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("KDCACHE_STAGING_DIR", str(tmp_path / "staging"))


def reader_rows(cache: Path) -> list[dict]:
    with open_cache(cache) as reader:
        return [reader[i] for i in range(len(reader))]


def reader_tails(cache: Path) -> np.ndarray:
    with open_cache(cache) as reader:
        (batch,) = reader.batches(len(reader), seed=0, shuffle=False)
        return batch["topk_log_tail"].numpy()  # (N, T)


def staged(cache: Path) -> list:
    """Every shard's stored arrays (codes, tail codes, ids), decoded from Parquet only."""
    m = Manifest.load(cache)
    return [stage_rows(m.layout, pq.read_table(cache / s.file)) for s in m.shards]


def unpadded(values: np.ndarray, lengths: np.ndarray) -> list[list]:
    return [row[:n].tolist() for row, n in zip(values, lengths, strict=True)]


# ----------------------------------------------------------------------------- the datasets view


@pytest.mark.parametrize("kind", ["topk", "adaptive", "both", "sampled"])
def test_hf_rows_equal_open_cache_rows_exactly(world, kind, tmp_path) -> None:
    ds = to_hf_dataset(world[kind], hf_cache_dir=tmp_path / "hf")
    want = reader_rows(world[kind])
    assert len(ds) == len(want) == N
    tails = reader_tails(world[kind]) if "topk_ids" in want[0] else None
    for i, (got, row) in enumerate(zip(ds, want, strict=True)):
        assert got["seq_index"] == row["seq_index"] and got["input_ids"] == row["input_ids"].tolist()
        if "topk_ids" in row:
            n = row["topk_lengths"]
            assert got["topk_ids"] == unpadded(row["topk_ids"], n)
            assert got["topk_logprobs"] == unpadded(row["topk_logprobs"], n)  # float32 values, bit for bit
            assert got["topk_log_tail"] == tails[i].tolist()
        if "sample_ids" in row:
            n = (row["sample_counts"] > 0).sum(-1)
            assert got["sample_ids"] == unpadded(row["sample_ids"], n)
            assert got["sample_counts"] == unpadded(row["sample_counts"], n)


def test_hf_padded_rows_stack_in_a_dataloader_with_a_worker_like_the_readers_batches(world, tmp_path) -> None:
    ds = to_hf_dataset(world["both"], padded=True, hf_cache_dir=tmp_path / "hf")
    loader = torch.utils.data.DataLoader(ds, batch_size=5, num_workers=1)  # the dataset pickles to the worker
    with open_cache(world["both"]) as reader:
        want = list(reader.batches(5, seed=0, shuffle=False, drop_last=False))
    got = list(loader)
    assert [len(b["seq_index"]) for b in got] == [5, 5, 2]
    for g, w in zip(got, want, strict=True):
        assert torch.equal(g["input_ids"], w["input_ids"]) and torch.equal(g["seq_index"], w["seq_index"])
        assert g["topk_ids"].shape == (len(g["seq_index"]), T, 4)
        for key in ("topk_ids", "topk_logprobs", "topk_log_tail"):
            assert torch.equal(g[key], w[key]), key
        width = w["sample_ids"].shape[-1]  # the reader pads to the batch's widest position, the view to S
        assert g["sample_ids"].shape[-1] == 16 and not g["sample_counts"][..., width:].any()
        assert torch.equal(g["sample_ids"][..., :width], w["sample_ids"])
        assert torch.equal(g["sample_counts"][..., :width].float(), w["sample_counts"])


def test_hf_ragged_rows_batch_in_a_dataloader_with_a_list_collate(world, tmp_path) -> None:
    ds = to_hf_dataset(world["adaptive"], hf_cache_dir=tmp_path / "hf")
    batches = list(torch.utils.data.DataLoader(ds, batch_size=4, collate_fn=list))
    rows = [row for batch in batches for row in batch]
    lengths = {len(entries) for row in rows for entries in row["topk_ids"]}
    assert len(rows) == N and len(lengths) > 1  # adaptive top-k: per-position lists of different lengths
    assert all(np.isclose(sum(np.exp(row["topk_logprobs"][0])), 1 - np.exp(row["topk_log_tail"][0])) for row in rows)


def test_hf_view_refuses_a_shard_whose_sha256_differs(world, tmp_path) -> None:
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(world["topk"], copy)
    shard = copy / "shard-00001.parquet"
    data = bytearray(shard.read_bytes())
    data[200] ^= 1
    shard.write_bytes(bytes(data))
    with pytest.raises(CacheError, match=f"{shard}: sha256 .* does not match the manifest"):
        to_hf_dataset(copy, hf_cache_dir=tmp_path / "hf")


def test_kdcache_resolves_to_hf_dataset_lazily_without_importing_datasets() -> None:
    code = (
        "import sys, kdcache; assert 'datasets' not in sys.modules and 'pyarrow' not in sys.modules; "
        "f = kdcache.to_hf_dataset; assert 'to_hf_dataset' in kdcache.__all__ and callable(f)"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# ----------------------------------------------------------------------------- export


def test_lists_export_holds_native_columns_that_datasets_reads(world, tmp_path) -> None:
    import datasets

    out = export_cache(world["both"], to="lists", out=tmp_path / "lists")
    files = sorted(out.glob("part-*.parquet"))
    assert len(files) == 3 and (out / "tokenizer" / "tokenizer.json").is_file()
    layout = Manifest.load(world["both"]).layout
    assert all(pq.read_schema(f).remove_metadata() == decoded_schema(layout) for f in files)
    ds = datasets.load_dataset("parquet", data_files=[str(f) for f in files], split="train", cache_dir=tmp_path / "hf")
    assert ds.features["topk_ids"].feature.feature.dtype == "int32"
    assert ds.features["topk_logprobs"].feature.feature.dtype == "float32"
    view = to_hf_dataset(world["both"], hf_cache_dir=tmp_path / "hf")
    rows = list(view)
    assert json.dumps([dict(row) for row in ds]) == json.dumps(rows)  # as text: NaN (no next token) equals NaN
    with open_cache(world["both"]) as reader:  # format 2 columns, as the reader serves them
        first = reader[0]
    np.testing.assert_array_equal(np.array(rows[0]["teacher_nll"], np.float32), first["teacher_nll"])
    np.testing.assert_array_equal(np.array(rows[0]["teacher_entropy"], np.float32), first["teacher_entropy"])
    record = json.loads((out / "kdcache_export.json").read_text())
    assert record["format"] == "lists" and [f["file"] for f in record["files"]] == [f.name for f in files]
    assert record["source"]["tokenizer"]["fingerprint"] == Manifest.load(world["both"]).tokenizer["fingerprint"]


def test_axolotl_export_follows_its_kd_row_layout(world, tmp_path) -> None:
    out = export_cache(world["adaptive"], to="axolotl", out=tmp_path / "ax")
    table = pq.read_table(sorted(out.glob("data-*.parquet")))
    assert table.schema.remove_metadata() == AXOLOTL_SCHEMA and table.num_rows == N
    rows, want, tails = table.to_pylist(), reader_rows(world["adaptive"]), reader_tails(world["adaptive"])
    for row, ref, tail in zip(rows, want, tails, strict=True):
        assert row["input_ids"] == row["labels"] == ref["input_ids"].tolist() and row["attention_mask"] == [1] * T
        assert len(row["target_token_ids"]) == len(row["target_logprobs"]) == len(row["target_mask"]) == T
        assert row["target_token_ids"] == unpadded(ref["topk_ids"], ref["topk_lengths"])
        assert row["target_logprobs"] == unpadded(ref["topk_logprobs"], ref["topk_lengths"])
        assert [set(m) for m in row["target_mask"]] == [{1}] * (T - 1) + [{0}]  # the last row predicts nothing
        kept = np.array([np.exp(np.array(lp, np.float64)).sum() for lp in row["target_logprobs"]])
        np.testing.assert_allclose(kept, -np.expm1(tail), rtol=1e-5)  # true log-probs, not renormalized
    settings = yaml.safe_load((out / "axolotl.yaml").read_text())
    assert settings["kd_temperature"] == 1.0 and settings["kd_trainer"] is True


def test_nemo_export_rows_give_the_exact_tail_through_log_sum_exp(world, tmp_path) -> None:
    out = export_cache(world["topk"], to="nemo", out=tmp_path / "nemo")
    lines = [
        json.loads(line) for f in sorted(out.glob("kd_with_logits_*.jsonl")) for line in f.read_text().splitlines()
    ]
    want, tails = reader_rows(world["topk"]), reader_tails(world["topk"])
    assert [row["index"] for row in lines] == list(range(N))
    for row, ref, tail in zip(lines, want, tails, strict=True):
        assert row["tokens"] == ref["input_ids"].tolist() and row["labels"][:-1] == row["tokens"][1:]
        assert row["loss_mask"] == [1] * (T - 1) + [0] and row["log_sum_exp_logits"] == [0.0] * T
        assert row["topk_token_ids"] == ref["topk_ids"].tolist()
        np.testing.assert_allclose(row["topk_logits"], ref["topk_logprobs"], atol=1e-6)
        rest = 1 - np.exp(np.array(row["topk_logits"]) - np.array(row["log_sum_exp_logits"])[:, None]).sum(-1)
        np.testing.assert_allclose(rest, np.exp(tail.astype(np.float64)), rtol=1e-6)
    assert yaml.safe_load((out / "nemo.yaml").read_text())["model"]["data"]["n_chunks"] == 3


def test_export_of_sampled_targets_as_top_k_is_refused_naming_the_fix(world, tmp_path) -> None:
    with pytest.raises(ExportError, match="holds 'sampled' targets.*--to lists"):
        export_cache(world["sampled"], to="axolotl", out=tmp_path / "x")
    assert not (tmp_path / "x").exists()


# ----------------------------------------------------------------------------- import and round trips


@pytest.mark.parametrize("kind", ["topk", "adaptive"])
def test_kdcache_to_nemo_and_back_keeps_every_code_and_the_tail(world, kind, tmp_path) -> None:
    export_cache(world[kind], to="nemo", out=tmp_path / "nemo")
    out = import_cache(
        tmp_path / "nemo", fmt="nemo", out=tmp_path / "back", tokenizer=world["teacher"], rows_per_shard=5
    )
    m, source = Manifest.load(out), Manifest.load(world[kind])
    assert verify_cache(out) == []
    assert m.teacher["identity"] == "unknown" and m.targets["renormalized"] is False
    assert m.tokenizer["fingerprint"] == source.tokenizer["fingerprint"]
    assert m.targets["mass"] == (NOMINAL_MASS if kind == "adaptive" else 0.0)
    assert m.targets["source"]["placeholder_positions"] == 0
    for got, want in zip(staged(out), staged(world[kind]), strict=True):
        assert np.array_equal(got.seq_index, want.seq_index) and np.array_equal(got.input_ids, want.input_ids)
        for key in ("topk_lengths", "topk_ids", "topk_codes", "topk_tail"):
            assert np.array_equal(got.arrays[key], want.arrays[key]), key


def test_kdcache_to_axolotl_and_back_keeps_the_codes_and_marks_the_targets_renormalized(world, tmp_path) -> None:
    export_cache(world["topk"], to="axolotl", out=tmp_path / "ax")
    out = import_cache(
        tmp_path / "ax", fmt="axolotl", out=tmp_path / "back", tokenizer=world["teacher"], rows_per_shard=5
    )
    m = Manifest.load(out)
    assert verify_cache(out) == [] and m.targets["renormalized"] is True and m.targets["mass"] == 0.0
    for got, want in zip(staged(out), staged(world["topk"]), strict=True):
        for key in ("topk_ids", "topk_codes"):  # codes are relative to each position's max: unchanged
            assert np.array_equal(got.arrays[key], want.arrays[key]), key
        assert (got.arrays["topk_tail"] == 65535).all()  # the tail is not in Axolotl's format
    for got, want in zip(reader_rows(out), reader_rows(world["topk"]), strict=True):
        renormalized = want["topk_logprobs"] - np.logaddexp.reduce(want["topk_logprobs"], -1, keepdims=True)
        np.testing.assert_allclose(got["topk_logprobs"], renormalized, atol=2e-6)


def _axolotl_rows() -> list[dict]:
    """Two chat-like Axolotl KD rows of different lengths; the first has two prompt positions that its
    producer padded (ids range(k), log-prob -inf) and one position with only 3 of 4 entries."""
    rng = np.random.default_rng(0)

    def position(ids: list[int]) -> tuple[list[int], list[float]]:
        lp = rng.normal(size=len(ids))
        return ids, (lp - np.logaddexp.reduce(lp)).tolist()

    rows = []
    for length in (6, 4):
        ids, lps = zip(
            *[position(sorted(rng.choice(np.arange(2, V), 4, replace=False).tolist())) for _ in range(length)],
            strict=True,
        )
        rows.append(
            {
                "input_ids": rng.integers(2, V, length).tolist(),
                "target_token_ids": list(ids),
                "target_logprobs": list(lps),
                "target_mask": [[1] * 4] * length,
            }
        )
    rows[0]["target_token_ids"][:2] = [[0, 1, 2, 3]] * 2
    rows[0]["target_logprobs"][:2] = [[-float("inf")] * 4] * 2
    rows[0]["target_logprobs"][3][1] = -1e9  # padding inside a position
    return rows


def test_axolotl_import_pads_rows_and_fills_positions_without_targets(world, tmp_path) -> None:
    source = tmp_path / "ax.jsonl"
    source.write_text("".join(json.dumps(r).replace("-Infinity", "-1e30") + "\n" for r in _axolotl_rows()))
    out = import_cache(source, fmt="axolotl", out=tmp_path / "c", tokenizer=world["teacher"])
    m = Manifest.load(out)
    assert verify_cache(out) == [] and m.corpus["seq_len"] == 6 and m.targets["mass"] == NOMINAL_MASS
    assert m.targets["source"]["placeholder_positions"] == 2 + 2  # two prompt positions + the short row's padding
    pad = m.corpus["packing"]["pad_id"]
    first, second = reader_rows(out)
    assert first["topk_lengths"].tolist() == [1, 1, 4, 3, 4, 4] and second["topk_lengths"].tolist() == [4] * 4 + [1, 1]
    assert first["topk_ids"][0, 0] == first["input_ids"][1] and first["topk_logprobs"][0, 0] == 0  # the next token
    assert second["input_ids"][4:].tolist() == [pad, pad] and second["topk_ids"][5, 0] == pad
    ids = torch.from_numpy(np.stack([first["input_ids"], second["input_ids"]]))
    assert token_mask(ids, m.corpus["packing"]).sum(1).tolist() == [6, 4]


def test_import_refuses_misaligned_rows_foreign_ids_and_a_wrong_normalizer_naming_the_row(world, tmp_path) -> None:
    good = _axolotl_rows()[1]
    cases = [
        (
            "axolotl",
            good | {"target_logprobs": good["target_logprobs"][:-1]},
            "expected one target row per input token",
        ),
        ("axolotl", good | {"input_ids": [V + 5] * 4}, rf"token ids outside \[0, {V}\)"),
        (
            "nemo",
            {
                "tokens": [3, 4],
                "topk_token_ids": [[5, 6], [5, 6]],
                "topk_logits": [[0.0, 0.0]] * 2,
                "log_sum_exp_logits": [0.0, 0.0],
            },
            "sum to 2.0000 > 1",
        ),
        ("nemo", good, "no 'tokens' field"),
    ]
    for i, (fmt, row, message) in enumerate(cases):
        source = tmp_path / f"bad{i}.jsonl"
        source.write_text(json.dumps(row) + "\n")
        with pytest.raises(SourceError, match=f"{source}:1.*{message}"):
            import_cache(source, fmt=fmt, out=tmp_path / f"c{i}", tokenizer=world["teacher"])
        assert not (tmp_path / f"c{i}").exists()


def test_cli_export_import_train_and_verify_an_imported_cache(world, tmp_path, capsys) -> None:
    ax, cache = tmp_path / "ax", tmp_path / "imported"
    assert kdcache(["export", str(world["topk"]), "--to", "axolotl", str(ax)]) == 0
    assert kdcache(["import", "--from", "axolotl", str(ax), str(cache), "--tokenizer", str(world["teacher"])]) == 0
    assert kdcache(["import", "--from", "axolotl", str(ax), str(cache), "--tokenizer", str(world["teacher"])]) == 1
    assert "already holds a cache" in capsys.readouterr().err
    assert kdcache(["verify", str(cache)]) == 0
    student = tmp_path / "student.json"
    student.write_text(json.dumps(STUDENT))
    args = ["train", "--cache", str(cache), "--student", str(student), "--device", "cpu", "--max-steps", "2"]
    assert kdcache([*args, "--batch-size", "4", "--loss", "topk_renorm", "--out", str(tmp_path / "s")]) == 0
    assert (tmp_path / "s" / "model.safetensors").is_file() or any((tmp_path / "s").rglob("*.safetensors"))


def test_training_refuses_tail_losses_on_an_imported_renormalized_cache(world, tmp_path, capsys) -> None:
    """Axolotl targets carry no tail: tail losses are refused naming the fix, and auto picks topk_renorm."""
    ax, cache = tmp_path / "ax", tmp_path / "imported"
    assert kdcache(["export", str(world["topk"]), "--to", "axolotl", str(ax)]) == 0
    assert kdcache(["import", "--from", "axolotl", str(ax), str(cache), "--tokenizer", str(world["teacher"])]) == 0
    student = tmp_path / "student.json"
    student.write_text(json.dumps(STUDENT))
    args = ["train", "--cache", str(cache), "--student", str(student), "--device", "cpu", "--max-steps", "1"]
    assert kdcache([*args, "--batch-size", "4", "--loss", "topk_tail", "--out", str(tmp_path / "a")]) == 1
    err = capsys.readouterr().err
    assert (
        "holds renormalized top-k targets (targets.renormalized, imported from axolotl" in err and "topk_renorm" in err
    )
    assert kdcache([*args, "--batch-size", "4", "--out", str(tmp_path / "b")]) == 0
    assert json.loads((tmp_path / "b" / "training.json").read_text())["loss"]["kind"] == "topk_renorm"
