"""Hidden-state (feature) targets (issue 11.3): cache.hidden_layers / hidden_dim stored as int8 + fp16 scale of a
stored orthogonal projection; the feature loss (kdcache.features) against a float64 dense reference; resume;
refusals."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from conftest import make_world, tiny_llama

from kdcache.cache.build import build_cache
from kdcache.cache.hidden import orthogonal_projection
from kdcache.cache.hidden_format import PROJECTION_FILE, projection_sha256
from kdcache.cache.identity import cache_dir_for
from kdcache.cache.reader import CacheError, open_cache
from kdcache.cache.rows import decode_row
from kdcache.cache.verify import verify_cache
from kdcache.cache.writer import CacheWriteError
from kdcache.config.base import ConfigError
from kdcache.config.cache import CacheConfig
from kdcache.config.teacher import TeacherConfig
from kdcache.teacher import load_teacher
from kdcache.token_data import open_tokens

VOCAB, T, DIM = 48, 16, 8
CFG = CacheConfig(targets="topk", top_k=8, batch_size=3, rows_per_shard=5, hidden_layers=(1, -1), hidden_dim=DIM)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict:
    w = make_world(tmp_path_factory.mktemp("hid"), vocab_size=VOCAB, seq=T)
    tiny_llama(VOCAB, max_positions=T, seed=1, num_hidden_layers=2).save_pretrained(w["teacher"])
    w["loaded"] = load_teacher(TeacherConfig(path=str(w["teacher"]), device="cpu"))
    w["cache"] = w["root"] / "cache"
    w["manifest"] = build_cache(w["loaded"], open_tokens(w["tokens"], "train"), CFG, out_dir=w["cache"])
    return w


def _reference(world: dict) -> tuple[np.ndarray, dict[int, np.ndarray]]:
    """An independent forward (the full model, output_hidden_states) projected in float64: {layer: (N, T, dim)}."""
    tokens = open_tokens(world["tokens"], "train")
    ids = torch.from_numpy(np.asarray(tokens.ids, np.int64))  # (N, T)
    with torch.no_grad():
        states = world["loaded"].model(input_ids=ids, output_hidden_states=True).hidden_states  # 3 x (N, T, H)
    p = orthogonal_projection(32, DIM, CFG.seed).astype(np.float64)  # (H, dim)
    return np.asarray(tokens.ids), {layer: states[layer].double().numpy() @ p for layer in (1, 2)}


def test_stored_hidden_states_are_the_projected_teacher_states_within_the_int8_step(world) -> None:
    manifest, cache = world["manifest"], world["cache"]
    hidden = manifest.targets["hidden"]
    assert hidden["layers"] == [1, 2] and hidden["dim"] == DIM  # -1 stored as its non-negative index
    matrix = orthogonal_projection(32, DIM, 0)
    assert hidden["projection"] == {"kind": "orthogonal", "seed": 0, "sha256": projection_sha256(matrix)}
    assert np.abs(matrix.T.astype(np.float64) @ matrix - np.eye(DIM)).max() < 1e-6  # orthonormal columns
    ids, want = _reference(world)
    rows = {r["seq_index"]: r for s in sorted(cache.glob("shard-*.parquet")) for r in pq.read_table(s).to_pylist()}
    for i, raw in rows.items():
        row = decode_row(manifest.layout, raw)
        assert row.hidden["hidden_1"].dtype == np.int8 and row.hidden["hidden_scale_2"].dtype == np.float16
        values = row.as_dict()
        for layer in (1, 2):
            scale = row.hidden[f"hidden_scale_{layer}"].astype(np.float64)  # (T,) the int8 step
            err = np.abs(values[f"hidden_{layer}"] - want[layer][i]).max(axis=-1)  # (T,)
            assert np.all(err <= 0.5 * scale + 1e-5 * np.abs(want[layer][i]).max())
            assert np.allclose(scale, np.abs(want[layer][i]).max(-1) / 127, rtol=2e-3)  # absmax / 127, fp16
    with open_cache(cache, staging_dir=world["root"] / "stage") as reader:
        assert reader.projection is not None and np.array_equal(reader.projection, matrix)
        (batch,) = list(reader.batches(len(reader), seed=0, shuffle=False, keys=("hidden_2",)))
        assert "hidden_1" not in batch and batch["hidden_2"].shape == (len(ids), T, DIM)
        assert batch["hidden_2"].dtype == torch.float32
        direct = np.stack([reader[i]["hidden_2"] for i in range(len(reader))])
        assert np.array_equal(batch["hidden_2"].numpy(), direct)
    assert verify_cache(cache) == []


def test_hidden_targets_leave_the_soft_targets_unchanged_and_change_the_name(world, tmp_path) -> None:
    teacher, tokens = world["loaded"], open_tokens(world["tokens"], "train")
    plain_cfg = CacheConfig(targets="topk", top_k=8, batch_size=3, rows_per_shard=5)
    plain = build_cache(teacher, tokens, plain_cfg, out_dir=tmp_path / "plain")
    a = pq.read_table(tmp_path / "plain" / plain.shards[0].file)
    b = pq.read_table(world["cache"] / world["manifest"].shards[0].file)
    for column in a.column_names:  # the same forward (hooks only observe): the same soft targets, bit for bit
        assert a.column(column).equals(b.column(column)), column
    names = {cache_dir_for(teacher, tokens, c).name for c in (plain_cfg, CFG, CacheConfig(**{**vars(CFG), "seed": 1}))}
    assert len(names) == 3 and all("h1+2d8p" in n for n in names if n != cache_dir_for(teacher, tokens, plain_cfg).name)


def test_a_projection_that_is_not_the_manifests_is_refused(world, tmp_path) -> None:
    import shutil

    cache = Path(shutil.copytree(world["cache"], tmp_path / "c"))
    from safetensors.numpy import save_file

    save_file({"projection": orthogonal_projection(32, DIM, 7)}, str(cache / PROJECTION_FILE))
    with pytest.raises(CacheError, match=r"hidden_projection.safetensors: sha256 .* differs from manifest.json"):
        open_cache(cache, staging_dir=tmp_path / "stage")
    assert any("differs from manifest.json targets.hidden.projection.sha256" in p for p in verify_cache(cache))
    (cache / PROJECTION_FILE).unlink()
    with pytest.raises(CacheError, match=r"cannot read the hidden-state projection .*rebuild it"):
        open_cache(cache, staging_dir=tmp_path / "stage")


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"hidden_layers": (3,)}, r"cache.hidden_layers: layer 3 is outside the teacher .*\[-3, 2\].*pick layers"),
        ({"hidden_layers": (-4,)}, r"cache.hidden_layers: layer -4 is outside"),
        ({"hidden_layers": (2, -1)}, r"cache.hidden_layers: \[2, -1\] names one layer .* twice"),
        ({"hidden_dim": 33}, r"cache.hidden_dim: 33 > the hidden width of the teacher .*set cache.hidden_dim <= 32"),
    ],
)
def test_bad_hidden_settings_are_refused_before_any_work(world, tmp_path, changes, message) -> None:
    cfg = CacheConfig(**{**vars(CFG), **changes})
    with pytest.raises(CacheWriteError, match=message):
        build_cache(world["loaded"], open_tokens(world["tokens"], "train"), cfg, out_dir=tmp_path / "x")
    assert not (tmp_path / "x" / "manifest.json").exists()


def test_config_validates_hidden_fields() -> None:
    with pytest.raises(ConfigError, match="cache.hidden_layers: must be distinct integers"):
        CacheConfig(hidden_layers=(-1, -1))
    with pytest.raises(ConfigError, match=r"cache.hidden_dim: must be in \[1, 65536\]"):
        CacheConfig(hidden_dim=0)


def test_manifest_hidden_record_round_trips(world) -> None:
    data = json.loads((world["cache"] / "manifest.json").read_text())
    assert world["manifest"].layout.to_dict()["hidden"] == data["targets"]["hidden"]


# ----------------------------------------------------------------------------- the feature loss


def _dense_feature_loss(h, w, t, mask, kind) -> torch.Tensor:
    """float64 reference: per position mean squared error / 1 - cosine of W h vs t, averaged over the mask."""
    pred = torch.einsum("bth,dh->btd", h, w)
    if kind == "mse":
        per = ((pred - t) ** 2).sum(-1) / t.shape[-1]
    else:
        per = 1 - (pred * t).sum(-1) / (pred.norm(dim=-1).clamp_min(1e-8) * t.norm(dim=-1).clamp_min(1e-8))
    m = mask.double()
    return (per * m).sum() / m.sum()


@pytest.mark.parametrize("kind", ["mse", "cosine"])
def test_feature_loss_and_gradients_match_a_float64_dense_reference(kind: str) -> None:
    from kdcache.features import feature_loss

    g = torch.Generator().manual_seed(0)
    h = torch.randn(3, 5, 12, generator=g, dtype=torch.float64)  # (B, T, H_s)
    w = torch.randn(4, 12, generator=g, dtype=torch.float64) * 0.3  # (dim, H_s)
    t = torch.randn(3, 5, 4, generator=g, dtype=torch.float64)  # (B, T, dim)
    mask = torch.rand(3, 5, generator=g) > 0.3
    h32, w32 = h.float().requires_grad_(), w.float().requires_grad_()
    got = feature_loss(h32, w32, t.float(), mask, kind)
    got.backward()
    h64, w64 = h.clone().requires_grad_(), w.clone().requires_grad_()
    want = _dense_feature_loss(h64, w64, t, mask, kind)
    want.backward()
    assert got.dtype == torch.float32 and abs(got.item() - want.item()) <= 1e-6 * max(1.0, abs(want.item()))
    assert torch.allclose(h32.grad.double(), h64.grad, rtol=1e-5, atol=1e-7)
    assert torch.allclose(w32.grad.double(), w64.grad, rtol=1e-5, atol=1e-7)
    assert h64.grad[~mask].abs().max() == 0 and h32.grad[~mask].abs().max() == 0  # masked positions: no gradient


def _train_cfg(**kw):
    from kdcache.config.train import StudentConfig, TrainConfig

    tiny = StudentConfig(hidden_size=16, num_layers=2, num_heads=2, intermediate_size=32)
    base = dict(max_steps=6, batch_size=4, lr=1e-2, warmup_steps=2, checkpoint_every=2, log_every=100, student=tiny)
    return TrainConfig(**{**base, "feature_weight": 1.0, **kw})


def _losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "train_log.jsonl").read_text().splitlines()]


def test_training_with_the_feature_loss_resumes_exactly_and_exports_a_plain_student(world, tmp_path) -> None:
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from kdcache.train import train

    cfg = _train_cfg(feature_layer=1, feature_loss="cosine")
    train(cfg, cache_dir=world["cache"], out_dir=tmp_path / "full")
    part = tmp_path / "part"
    train(cfg, cache_dir=world["cache"], out_dir=part, max_steps=2)
    train(cfg, cache_dir=world["cache"], out_dir=part, resume=True)
    assert np.allclose(_losses(part), _losses(tmp_path / "full"), rtol=0, atol=1e-6)
    checkpoint = sorted((part / "checkpoints").glob("step-*"))[-1]  # the map is saved with the training state
    assert any("kdcache_feature_map" in k for k in load_file(checkpoint / "model.safetensors"))
    exported = load_file(part / "model.safetensors")
    assert not any("feature_map" in k for k in exported)  # not part of the exported student
    AutoModelForCausalLM.from_pretrained(part)
    plain = _train_cfg(feature_weight=0.0)
    train(plain, cache_dir=world["cache"], out_dir=tmp_path / "plain")
    assert _losses(tmp_path / "plain") != _losses(tmp_path / "full")  # the feature term is in the loss


def test_feature_loss_refusals(world, tmp_path) -> None:
    from kdcache.cache.build import build_cache as build
    from kdcache.train import train

    plain = tmp_path / "plain-cache"
    build(world["loaded"], open_tokens(world["tokens"], "train"), CacheConfig(targets="topk", top_k=8), out_dir=plain)
    with pytest.raises(
        ConfigError,
        match=r"plain-cache/manifest.json: train.feature_weight is 1.0 but the cache has "
        r"no hidden-state targets .*cache.hidden_layers \(e.g. \[-1\]\), or set train.feature_weight: 0",
    ):
        train(_train_cfg(), cache_dir=plain, out_dir=tmp_path / "a")
    with pytest.raises(ConfigError, match=r"train.feature_layer: 3 is outside the student's output_hidden_states"):
        train(_train_cfg(feature_layer=3), cache_dir=world["cache"], out_dir=tmp_path / "b")
    with pytest.raises(ConfigError, match="train.feature_loss: must be mse|cosine"):
        _train_cfg(feature_loss="l1")
    with pytest.raises(ConfigError, match="train.feature_weight: must be >= 0"):
        _train_cfg(feature_weight=-1.0)


def test_views_and_exports_of_a_hidden_cache_carry_the_soft_targets_only(world, tmp_path) -> None:
    import kdcache
    from kdcache.interop.export import export_cache

    for to in ("lists", "axolotl", "nemo"):
        export_cache(world["cache"], to=to, out=tmp_path / to)
    row = kdcache.to_hf_dataset(world["cache"])[0]
    assert "topk_ids" in row and not any(k.startswith("hidden_") for k in row)


def test_the_readme_decoder_reads_the_hidden_columns_like_the_reader(world) -> None:
    import re

    readme = (Path(__file__).resolve().parents[1] / "cache" / "README.md").read_text(encoding="utf-8")
    code = re.search(r"```python\n(.*?)```", readme[readme.index("## Decoding a row by hand") :], re.S).group(1)
    code = re.sub(r"^cache_dir = .*$", f"cache_dir = {str(world['cache'])!r}", code, count=1, flags=re.M)
    scope: dict = {}
    exec(compile(code, "cache/README.md", "exec"), scope)  # noqa: S102 - the README's own example, on our cache
    with open_cache(world["cache"], staging_dir=world["root"] / "stage-readme") as reader:
        want = reader[0]
    assert sorted(scope["hidden"]) == [1, 2]
    for layer, values in scope["hidden"].items():
        np.testing.assert_array_equal(values, want[f"hidden_{layer}"])


def test_hidden_targets_under_a_teacher_context_are_the_rows_positions_given_the_context(world, tmp_path) -> None:
    from conftest import word_tokenizer

    teacher_dir = tmp_path / "teacher"
    tiny_llama(VOCAB, max_positions=64, seed=2, num_hidden_layers=2).save_pretrained(teacher_dir)
    word_tokenizer(VOCAB).save_pretrained(teacher_dir)
    teacher = load_teacher(TeacherConfig(path=str(teacher_dir), device="cpu"))
    tokens = open_tokens(world["tokens"], "train")
    cfg = CacheConfig(**{**vars(CFG), "hidden_layers": (1,), "teacher_context": "w5 w6 w7"})
    build_cache(teacher, tokens, cfg, out_dir=tmp_path / "c")
    ids = torch.from_numpy(np.asarray(tokens.ids, np.int64))  # (N, T)
    full = torch.cat([torch.tensor([5, 6, 7]).expand(len(ids), -1), ids], dim=1)  # (N, 3 + T)
    with torch.no_grad():
        state = teacher.model(input_ids=full, output_hidden_states=True).hidden_states[1][:, 3:]  # (N, T, H)
    want = state.double().numpy() @ orthogonal_projection(32, DIM, 0).astype(np.float64)  # (N, T, dim)
    with open_cache(tmp_path / "c", staging_dir=tmp_path / "stage") as reader:
        for i in range(len(reader)):
            row = reader[i]
            step = np.abs(want[row["seq_index"]]).max(-1, keepdims=True) / 127  # (T, 1)
            assert np.all(np.abs(row["hidden_1"] - want[row["seq_index"]]) <= 0.51 * step + 1e-6)


# ----------------------------------------------------------------------------- cache.hidden_projection: pca


def _svd_axes(x: np.ndarray, dim: int) -> np.ndarray:
    """float64 reference: the top ``dim`` right singular vectors of the centred rows, largest-|entry| made > 0."""
    _, _, vt = np.linalg.svd(x - x.mean(0), full_matrices=False)
    axes = vt[:dim].T  # (H, dim)
    peak = np.abs(axes).argmax(0)
    return axes * np.sign(axes[peak, np.arange(dim)])


def test_pca_projection_is_the_float64_svd_of_the_centred_states_and_round_trips() -> None:
    from kdcache.cache.hidden import pca_projection

    rng = np.random.default_rng(0)
    x = rng.standard_normal((500, 12)) * np.linspace(4.0, 0.2, 12) @ np.linalg.qr(rng.standard_normal((12, 12)))[0]
    x += 3.0  # an offset: PCA is of the centred states
    chunks = [torch.from_numpy(x[:200]).float(), torch.from_numpy(x[200:]).to(torch.bfloat16).float()]
    got = pca_projection(chunks, 5)  # streamed in chunks of any dtype, accumulated in float64
    xs = np.concatenate([c.double().numpy() for c in chunks])
    assert got.dtype == np.float32 and got.shape == (12, 5)
    np.testing.assert_allclose(got, _svd_axes(xs, 5), atol=1e-5)
    # round trip: states in a 5-dim affine subspace come back exactly from their projection
    low = rng.standard_normal((300, 5)) @ rng.standard_normal((5, 12)) + 2.0  # (300, 12), rank 5 + an offset
    p = pca_projection([torch.from_numpy(low)], 5).astype(np.float64)
    mean = low.mean(0)
    np.testing.assert_allclose(mean + (low - mean) @ p @ p.T, low, atol=1e-5)
    np.testing.assert_allclose(p.T @ p, np.eye(5), atol=1e-6)
    with pytest.raises(ValueError, match="5 states fix at most 4 principal axes, not 5"):
        pca_projection([torch.zeros(5, 12)], 5)


def test_a_pca_cache_stores_the_sample_states_principal_axes_the_same_in_every_build(world, tmp_path) -> None:
    from safetensors.numpy import load_file

    tokens = open_tokens(world["tokens"], "train")  # 12 rows < PCA_SAMPLE_ROWS: all of them
    cfg = CacheConfig(**{**vars(CFG), "hidden_projection": "pca"})
    first = build_cache(world["loaded"], tokens, cfg, out_dir=tmp_path / "a")
    again = build_cache(
        load_teacher(TeacherConfig(path=str(world["teacher"]), device="cpu")), tokens, cfg, out_dir=tmp_path / "b"
    )
    matrix = load_file(str(tmp_path / "a" / PROJECTION_FILE))["projection"]
    assert (tmp_path / "a" / PROJECTION_FILE).read_bytes() == (tmp_path / "b" / PROJECTION_FILE).read_bytes()
    assert first.targets["hidden"] == again.targets["hidden"]
    assert first.targets["hidden"]["projection"] == {"kind": "pca", "seed": 0, "sha256": projection_sha256(matrix)}
    assert [s.sha256 for s in first.shards] == [s.sha256 for s in again.shards]
    ids = torch.from_numpy(np.asarray(tokens.ids, np.int64))
    with torch.no_grad():
        states = world["loaded"].model(input_ids=ids, output_hidden_states=True).hidden_states  # 3 x (N, T, H)
    pooled = np.concatenate([states[layer].double().numpy().reshape(-1, 32) for layer in (1, 2)])  # both layers
    np.testing.assert_allclose(matrix, _svd_axes(pooled, DIM), atol=2e-4)
    with open_cache(tmp_path / "a", staging_dir=tmp_path / "stage") as reader:
        row = reader[0]
        want = states[2][row["seq_index"]].double().numpy() @ matrix.astype(np.float64)  # (T, dim), not centred
        step = np.abs(want).max(-1, keepdims=True) / 127
        assert np.all(np.abs(row["hidden_2"] - want) <= 0.51 * step + 1e-6)
    names = {cache_dir_for(world["loaded"], tokens, c).name for c in (CFG, cfg)}
    assert len(names) == 2  # another projection: another cache


def test_config_validates_the_hidden_projection() -> None:
    with pytest.raises(ConfigError, match=r"cache.hidden_projection: must be orthogonal\|pca, got 'svd'"):
        CacheConfig(hidden_projection="svd")
