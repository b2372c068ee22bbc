"""Cross-tokenizer alignment (kdcache.crosstok) and vocabulary projection (kdcache.crossproj), against
brute-force byte-prefix references and float64 dense references on hand-made tokenizer pairs."""

from __future__ import annotations

import random

import numpy as np
import pytest
import sp_tokenizers
import torch
from conftest import WORDS
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from kdcache.crossproj import build_projection, merge_by_row, project_batch_targets, uld_loss
from kdcache.crosstok import Aligner, CrossTokenizerBatches, event_map, student_row_length, utf8_pieces
from kdcache.losses import KDLossSpec, kd_loss
from kdcache.tokenizer import token_bytes, train_bpe_tokenizer

ADVERSARIAL = [
    "héllo wörld  the  cat\t\tsat\n\n\n    indented",
    "世界你好，こんにちは 안녕하세요 e\u0301",
    "emoji 🎉🎉 flags 🇫🇷 zwj 👩\u200d👩\u200d👧 nbsp\u00a0x",
    "def f(x):\r\n    return 'héllo ✓ 🎉'\t\n",
]


def corpus(n: int = 60) -> list[str]:
    rng = random.Random(1)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12))) for _ in range(n)] + ADVERSARIAL[:2]


@pytest.fixture(scope="module")
def teacher():
    return train_bpe_tokenizer(corpus(), vocab_size=420)


@pytest.fixture(scope="module", params=["bpe", "metaspace"])
def student(request):
    if request.param == "bpe":
        return train_bpe_tokenizer(corpus()[::-1] + ["🎉 party"], vocab_size=330)
    return sp_tokenizers.metaspace_bpe(corpus(), 320)


def teacher_rows(teacher) -> list[np.ndarray]:
    """Windows of each adversarial text's teacher ids (cut inside characters at both ends) and two
    documents joined by EOS."""
    rows = []
    for text in ADVERSARIAL:
        ids = teacher(text, add_special_tokens=False)["input_ids"]
        rows += [np.asarray(ids[a : len(ids) - b]) for a in range(0, 6) for b in range(0, 4)]
    a, b = (teacher(t, add_special_tokens=False)["input_ids"] for t in ADVERSARIAL[:2])
    rows.append(np.asarray([*a, teacher.eos_token_id, *b, teacher.eos_token_id]))
    return rows


def test_utf8_pieces_skip_characters_cut_at_either_end_or_broken_inside():
    data = "é🎉x".encode()[1:] + b"ab\xff\xfecd" + "世".encode()[:2]
    assert [data[a:b] for a, b in utf8_pieces(data)] == ["🎉x".encode() + b"ab", b"cd"]
    assert utf8_pieces(b"") == [] and utf8_pieces(b"ok") == [(0, 2)]


def test_aligned_positions_are_exactly_the_shared_byte_prefixes(teacher, student):
    """Brute force: student position i takes teacher position j iff both prefixes spell the same bytes
    (dummy-prefix space and broken leading bytes removed); every student row spells its text."""
    aligner = Aligner(teacher, student)
    tb, sb = token_bytes(teacher), token_bytes(student)
    eos = student.eos_token_id
    rows = teacher_rows(teacher)
    for ids, row in zip(rows, aligner.align_rows(rows, max_len=10_000), strict=True):
        segments_t = _segments([tb[t] for t in ids])  # per document: list of token bytes
        sids = row.student_ids.tolist()
        assert sids.count(eos) == sum(tb[t] == b"" for t in ids)
        prefixes_t = {}
        for j in range(len(ids)):
            seg = sum(1 for t in ids[: j + 1] if tb[t] == b"")
            body = b"".join(tb[t] for t in ids[: j + 1][_last_event(ids[: j + 1], tb) :])
            prefixes_t[(seg, body[_lead(segments_t[seg]) :])] = j
        want = np.full(len(sids), -1)
        for i in range(len(sids)):
            seg = sids[: i + 1].count(eos)
            start = _last_event_s(sids[: i + 1], eos)
            body = b"".join(sb[s] for s in sids[start : i + 1])
            text = _segment_text(segments_t, seg)
            if body.startswith(b" ") and not text.startswith(b" "):
                body = body[1:]  # the student's dummy prefix
            after = b"".join(sb[s] for s in sids[start : i + 2])
            last_of_prefix = (
                i + 1 == len(sids) or sids[i + 1] == eos or after != b"".join(sb[s] for s in sids[start : i + 1])
            )
            if (seg, body) in prefixes_t and last_of_prefix and (body or sids[i] == eos):
                want[i] = prefixes_t[(seg, body)]
        np.testing.assert_array_equal(row.teacher_pos, want)
        assert row.unspelled_tokens == 0 and row.student_tokens_cut == 0
        assert int(row.token_spans.sum()) == sum(len(_strip_broken(b"".join(s))) for s in segments_t)
    assert sum(int((r.teacher_pos >= 0).sum()) for r in aligner.align_rows(rows, max_len=10_000)) > 0


def _segments(spelled: list[bytes]) -> list[list[bytes]]:
    out = [[]]
    for b in spelled:
        if b:
            out[-1].append(b)
        else:
            out.append([])
    return out


def _segment_text(segments: list[list[bytes]], seg: int) -> bytes:
    return _strip_broken(b"".join(segments[seg])) if seg < len(segments) else b""


def _last_event(ids, tb) -> int:
    return max((k + 1 for k, t in enumerate(ids) if tb[t] == b""), default=0)


def _last_event_s(ids, eos) -> int:
    return max((k + 1 for k, s in enumerate(ids) if s == eos), default=0)


def _lead(segment: list[bytes]) -> int:
    """Broken bytes at the start of a segment (a row cut inside a character)."""
    data = b"".join(segment)
    return data.index(_strip_broken(data)) if data else 0


def _strip_broken(data: bytes) -> bytes:
    """The bytes of ``data`` that lie in whole UTF-8 characters (brute force: drop bytes until it decodes)."""
    for a in range(0, 4):
        for b in range(0, 4):
            try:
                data[a : len(data) - b].decode("utf-8")
                return data[a : len(data) - b]
            except UnicodeDecodeError:
                continue
    raise AssertionError(f"test rows have broken bytes only at the edges: {data!r}")


def test_same_tokenizer_aligns_every_position_to_itself(teacher):
    rows = [np.asarray(teacher(t, add_special_tokens=False)["input_ids"]) for t in ADVERSARIAL] + teacher_rows(teacher)[
        -1:
    ]
    for ids, row in zip(rows, Aligner(teacher, teacher).align_rows(rows, max_len=10_000), strict=True):
        np.testing.assert_array_equal(row.student_ids, ids)
        np.testing.assert_array_equal(row.teacher_pos, np.arange(len(ids)))


def test_rows_longer_than_the_student_row_are_cut_and_counted(teacher, student):
    aligner = Aligner(teacher, student)
    rows = teacher_rows(teacher)[:3]
    full = aligner.align_rows(rows, max_len=10_000)
    cut = aligner.align_rows(rows, max_len=5)
    for f, c in zip(full, cut, strict=True):
        assert len(c.student_ids) == min(5, len(f.student_ids))
        assert c.student_tokens_cut == len(f.student_ids) - len(c.student_ids)
        np.testing.assert_array_equal(c.teacher_pos, f.teacher_pos[:5])
    assert student_row_length(aligner, rows) >= max(len(f.student_ids) for f in full)


# -- projections on a hand-made pair of tokenizers

SPECIAL = "<|endoftext|>"


def hand_made(merges: list[tuple[str, str]]) -> PreTrainedTokenizerFast:
    """Byte-level BPE: <|endoftext|> = 0, the 256 byte symbols, then one token per merge."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {SPECIAL: 0, **{c: i + 1 for i, c in enumerate(alphabet)}}
    for a, b in merges:
        vocab[a + b] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=SPECIAL)
    tok.add_special_tokens({"eos_token": SPECIAL})
    return tok


TEACHER_MERGES = [("a", "b"), ("ab", "c"), ("Ġ", "t"), ("Ġt", "h"), ("Ġth", "e"), ("c", "d"), ("Ã", "©")]
STUDENT_MERGES = [("b", "c"), ("a", "bc"), ("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("Ã", "©")]


@pytest.fixture(scope="module")
def pair():
    return hand_made(TEACHER_MERGES), hand_made(STUDENT_MERGES)


def reference_table(method: str, teacher, student) -> np.ndarray:
    """Brute force: exact = the student id spelling the same bytes; prefix = the first id of the student's
    encoding when it spells the token, else the longest student token that is a byte prefix."""
    tb, sb = token_bytes(teacher), token_bytes(student)
    table = np.full(len(tb), -1)
    for t, b in enumerate(tb):
        if not b:
            table[t] = student.eos_token_id
            continue
        same = [s for s, x in enumerate(sb) if x == b]
        table[t] = min(same) if same else -1
        if method == "prefix" and table[t] < 0:
            try:
                ids = student(b.decode(), add_special_tokens=False)["input_ids"]
            except UnicodeDecodeError:
                ids = []
            if ids and b"".join(sb[i] for i in ids) == b:
                table[t] = ids[0]
            else:
                prefixes = [s for s, x in enumerate(sb) if x and b.startswith(x)]
                table[t] = max(prefixes, key=lambda s: len(sb[s]))
    return table


def dense_topk_batch(V: int, *, n: int, k: int, seed: int = 0):
    """A float64 dense teacher (n, V) and its cached top-k (ids, log-probs, mask, log tail) as a batch."""
    rng = np.random.default_rng(seed)
    p = rng.dirichlet(np.full(V, 0.05), size=n)  # (n, V)
    ids = np.argsort(-p, axis=-1)[:, :k]  # (n, k)
    top = np.take_along_axis(p, ids, -1)
    batch = {
        "topk_ids": torch.from_numpy(ids)[None],
        "topk_logprobs": torch.from_numpy(np.log(top))[None].float(),
        "topk_mask": torch.ones((1, n, k), dtype=torch.bool),
        "topk_log_tail": torch.from_numpy(np.log1p(-top.sum(-1)))[None].float(),
    }
    return p, ids, batch


@pytest.mark.parametrize("method", ["exact", "prefix"])
def test_projection_tables_match_the_brute_force_reference(pair, method):
    teacher, student = pair
    aligner = Aligner(teacher, student)
    proj = build_projection(
        method,
        teacher_bytes=aligner.teacher_bytes,
        student_tokenizer=student,
        student_bytes=aligner.student_bytes,
        events=aligner.events,
    )
    np.testing.assert_array_equal(proj.to_student, reference_table(method, teacher, student))
    tb = aligner.teacher_bytes
    if method == "exact":
        assert proj.to_student[teacher.convert_tokens_to_ids("abc")] == student.convert_tokens_to_ids("abc")
        assert proj.to_student[teacher.convert_tokens_to_ids("ab")] == -1
    else:
        assert (proj.to_student[[t for t, b in enumerate(tb) if b]] >= 0).all()
        assert proj.to_student[teacher.convert_tokens_to_ids("ab")] == student.convert_tokens_to_ids("a")
        assert proj.to_student[teacher.convert_tokens_to_ids("Ġthe")] == student.convert_tokens_to_ids("Ġthe")


@pytest.mark.parametrize("method", ["exact", "prefix"])
def test_projected_topk_targets_match_the_dense_float64_projection(pair, method):
    teacher, student = pair
    aligner = Aligner(teacher, student)
    proj = build_projection(
        method,
        teacher_bytes=aligner.teacher_bytes,
        student_tokenizer=student,
        student_bytes=aligner.student_bytes,
        events=aligner.events,
    )
    table = reference_table(method, teacher, student)
    Vt, Vs, n, k = len(teacher), len(student), 24, 40
    p, ids, batch = dense_topk_batch(Vt, n=n, k=k)
    pos = torch.arange(n)[None]
    out, kept, cached = project_batch_targets(batch, pos, torch.ones((1, n), dtype=torch.bool), projection=proj)
    ref = np.zeros((n, Vs))
    ref_tail = 1.0 - np.take_along_axis(p, ids, -1).sum(-1)
    for r in range(n):
        for t in ids[r]:
            if table[t] >= 0:
                ref[r, table[t]] += p[r, t]
            else:
                ref_tail[r] += p[r, t]
    got = np.zeros((n, Vs))
    got_ids, got_lp, got_mask = (out[key][0].numpy() for key in ("topk_ids", "topk_logprobs", "topk_mask"))
    for r in range(n):
        np.add.at(got[r], got_ids[r][got_mask[r]], np.exp(got_lp[r][got_mask[r]].astype(np.float64)))
        assert len(set(got_ids[r][got_mask[r]].tolist())) == int(got_mask[r].sum())  # merged: ids unique
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(np.exp(out["topk_log_tail"][0].double().numpy()), ref_tail, rtol=1e-5, atol=1e-7)
    assert kept == pytest.approx(ref.sum(), rel=1e-6)
    assert cached == pytest.approx(np.take_along_axis(p, ids, -1).sum(), rel=1e-6)


def test_topk_tail_loss_on_projected_targets_equals_the_dense_coarse_kl(pair):
    """kd_loss(topk_tail) on the projected targets = float64 KL(p' || q) on the student's mapped ids + tail."""
    teacher, student = pair
    aligner = Aligner(teacher, student)
    proj = build_projection(
        "exact",
        teacher_bytes=aligner.teacher_bytes,
        student_tokenizer=student,
        student_bytes=aligner.student_bytes,
        events=aligner.events,
    )
    n, Vs = 12, len(student)
    p, ids, batch = dense_topk_batch(len(teacher), n=n, k=30, seed=3)
    out, _, _ = project_batch_targets(
        batch, torch.arange(n)[None], torch.ones((1, n), dtype=torch.bool), projection=proj
    )
    logits = torch.randn(1, n, Vs, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    spec = KDLossSpec(kind="topk_tail", alpha=1.0)
    got = kd_loss(logits, input_ids=torch.zeros((1, n), dtype=torch.long), spec=spec, **out).loss
    q = torch.softmax(logits[0], -1).numpy()
    ref = 0.0
    for r in range(n):
        real = out["topk_mask"][0, r].numpy()
        sid = out["topk_ids"][0, r].numpy()[real]
        pk = np.exp(out["topk_logprobs"][0, r].double().numpy()[real])
        pt, qt = 1 - pk.sum(), 1 - q[r, sid].sum()
        ref += (pk * np.log(pk / q[r, sid])).sum() + pt * np.log(pt / qt)
    assert float(got) == pytest.approx(ref / n, rel=1e-5)


def test_projected_samples_merge_counts_and_drop_draws_the_student_lacks(pair):
    teacher, student = pair
    aligner = Aligner(teacher, student)
    proj = build_projection(
        "exact",
        teacher_bytes=aligner.teacher_bytes,
        student_tokenizer=student,
        student_bytes=aligner.student_bytes,
        events=aligner.events,
    )
    table = reference_table("exact", teacher, student)
    rng = np.random.default_rng(0)
    n, S = 10, 6
    ids = rng.integers(0, len(teacher), size=(1, n, S))
    counts = rng.integers(0, 4, size=(1, n, S)).astype(np.float32)
    batch = {
        "sample_ids": torch.from_numpy(ids),
        "sample_counts": torch.from_numpy(counts),
        "sample_total": torch.full((1, n), 24.0),
    }
    out, kept, cached = project_batch_targets(
        batch, torch.arange(n)[None], torch.ones((1, n), dtype=torch.bool), projection=proj
    )
    for r in range(n):
        ref = np.zeros(len(student))
        np.add.at(ref, table[ids[0, r]][table[ids[0, r]] >= 0], counts[0, r][table[ids[0, r]] >= 0])
        got = np.zeros(len(student))
        np.add.at(got, out["sample_ids"][0, r].numpy(), out["sample_counts"][0, r].numpy())
        np.testing.assert_array_equal(got, ref)
    assert (out["sample_total"] == 24).all()
    assert kept == pytest.approx(sum(counts[0][table[ids[0]] >= 0]) / 24)
    assert cached == pytest.approx(counts.sum() / 24)


def test_ids_past_the_tokenizer_map_to_nothing(pair):
    teacher, student = pair
    aligner = Aligner(teacher, student)
    proj = build_projection(
        "prefix",
        teacher_bytes=aligner.teacher_bytes,
        student_tokenizer=student,
        student_bytes=aligner.student_bytes,
        events=aligner.events,
    )
    V = len(aligner.teacher_bytes)
    np.testing.assert_array_equal(proj.map(np.array([[1, V, V + 5]])), [[proj.to_student[1], -1, -1]])


def test_merge_by_row_sums_equal_ids_and_pads():
    ids = np.array([[3, 1, 3, -1], [-1, -1, -1, -1], [2, 2, 2, 2]])
    w = np.array([[0.1, 0.2, 0.3, 0.4], [1, 1, 1, 1], [0.25] * 4])
    out_ids, out_w = merge_by_row(ids, w, vocab_size=5)
    np.testing.assert_array_equal(out_ids, [[1, 3], [0, 0], [2, 0]])
    np.testing.assert_allclose(out_w, [[0.2, 0.4], [0, 0], [1.0, 0]])


# -- ULD


def dense_uld(p: np.ndarray, q: np.ndarray) -> float:
    """Boizard et al. 2024: sum over ranks of |sorted p - sorted q|, the shorter vocabulary padded with 0."""
    width = max(p.size, q.size)
    ps, qs = np.zeros(width), np.zeros(width)
    ps[: p.size], qs[: q.size] = np.sort(p)[::-1], np.sort(q)[::-1]
    return float(np.abs(ps - qs).sum())


@pytest.mark.parametrize(("Vt", "Vs"), [(30, 50), (50, 30)])
def test_uld_with_the_full_teacher_equals_the_dense_sorted_distance(Vt, Vs):
    rng = np.random.default_rng(1)
    n = 7
    p = rng.dirichlet(np.full(Vt, 0.3), size=n)  # (n, Vt)
    logits = torch.randn(1, n, Vs, dtype=torch.float64, generator=torch.Generator().manual_seed(2), requires_grad=True)
    mask = torch.tensor([[True] * 5 + [False] * 2])
    got, count = uld_loss(
        logits,
        uld_probs=torch.from_numpy(np.sort(p, -1)[:, ::-1].copy())[None],
        uld_tail=torch.zeros(1, n),
        uld_mask=torch.ones(1, n, Vt, dtype=torch.bool),
        loss_mask=mask,
    )
    q = torch.softmax(logits[0].detach(), -1).numpy()
    ref = np.mean([dense_uld(p[r], q[r]) for r in range(5)])
    assert int(count) == 5 and float(got.detach()) == pytest.approx(ref, rel=1e-5)
    got.backward()
    assert logits.grad[0, 5:].abs().max() == 0 and logits.grad[0, :5].abs().max() > 0


def test_uld_on_top_k_plus_tail_matches_the_float64_reference_value_and_gradient():
    rng = np.random.default_rng(4)
    n, V, k = 6, 40, 5
    p = rng.dirichlet(np.full(V, 0.2), size=n)
    top = -np.sort(-p, -1)[:, :k]
    real = np.ones((n, k), bool)
    real[0, 3:] = False  # adaptive k: fewer entries, the rest in the tail
    top = np.where(real, top, 0)
    tail = 1 - top.sum(-1)
    logits = torch.randn(1, n, V, dtype=torch.float64, generator=torch.Generator().manual_seed(5), requires_grad=True)
    got, _ = uld_loss(
        logits.float(),
        uld_probs=torch.from_numpy(top)[None].float(),
        uld_tail=torch.from_numpy(tail)[None].float(),
        uld_mask=torch.from_numpy(real)[None],
        loss_mask=torch.ones(1, n, dtype=torch.bool),
    )
    got.backward()
    ref_logits = logits.detach().clone().requires_grad_(True)
    q = torch.softmax(ref_logits[0], -1)
    total = 0
    for r in range(n):
        m = int(real[r].sum())
        qs = torch.sort(q[r], descending=True).values[:m]
        total = total + (torch.from_numpy(top[r, :m]) - qs).abs().sum() + (tail[r] - (1 - qs.sum())).abs()
    (total / n).backward()
    assert float(got.detach()) == pytest.approx(float(total.detach() / n), rel=1e-5)
    torch.testing.assert_close(logits.grad, ref_logits.grad, rtol=1e-4, atol=1e-6)


# -- the batch transform


def test_batches_carry_student_ids_masks_and_projected_targets(teacher, student):
    rows = [np.asarray(teacher(t, add_special_tokens=False)["input_ids"] + [teacher.eos_token_id]) for t in ADVERSARIAL]
    T = max(len(r) for r in rows) + 2
    pad = teacher.pad_token_id
    ids = torch.tensor([np.pad(r, (0, T - len(r)), constant_values=pad).tolist() for r in rows])  # (B, T)
    _, _, topk = dense_topk_batch(len(teacher), n=len(rows) * T, k=8)
    batch = {"input_ids": ids, **{k: v.reshape(len(rows), T, *v.shape[2:]) for k, v in topk.items()}}
    packing = {"mode": "documents", "eos_id": teacher.eos_token_id, "pad_id": pad}
    aligner = Aligner(teacher, student)
    L = student_row_length(aligner, rows)
    for method in ("exact", "prefix", "uld"):
        cross = CrossTokenizerBatches(teacher, student, method=method, student_seq_len=L, packing=packing)
        out = cross.apply(batch)
        assert out["input_ids"].shape == (len(rows), L) and out["loss_mask"].shape == (len(rows), L)
        lengths = out["ce_mask"].sum(-1) + 1  # (B,) student tokens per row
        real = torch.arange(L)[None, :] < lengths[:, None]  # (B, L)
        assert (out["input_ids"][~real] == cross.aligner.pad_id).all() and (out["loss_mask"] <= real).all()
        for b in range(len(rows)):  # each row ends with the student's EOS, which has no target
            n = int(lengths[b])
            assert out["input_ids"][b, n - 1] == student.eos_token_id and not out["loss_mask"][b, n - 1]
            assert out["ce_mask"][b, n - 2] and not out["ce_mask"][b, n - 1]
        report = cross.report()
        assert report["soft_target_fraction"] == pytest.approx(int(out["loss_mask"].sum()) / int(real.sum()))
        assert 0.3 < report["soft_target_fraction"] <= 1.0 and report["lost_byte_fraction"] == 0
        if method == "uld":
            assert set(out) >= {"uld_probs", "uld_tail", "uld_mask"} and report["teacher_mass_kept_ratio"] == 1.0
        else:
            assert out["topk_ids"].max() < len(student) and 0 < report["teacher_mass_kept_ratio"] <= 1.0 + 1e-6
    assert event_map(teacher, student, token_bytes(teacher))[teacher.eos_token_id] == student.eos_token_id


def test_uld_output_mixes_ce_and_uld_with_alpha():
    from kdcache.crossproj import uld_output

    rng = np.random.default_rng(7)
    B, T, V, k = 2, 5, 12, 4
    logits = torch.randn(B, T, V, generator=torch.Generator().manual_seed(1), requires_grad=True)
    ids = torch.from_numpy(rng.integers(0, V, size=(B, T)))
    top = torch.from_numpy(-np.sort(-rng.dirichlet(np.ones(V), size=(B, T)), -1)[..., :k]).float()
    batch = {
        "uld_probs": top,
        "uld_tail": 1 - top.sum(-1),
        "uld_mask": torch.ones(B, T, k, dtype=torch.bool),
        "loss_mask": torch.rand(B, T, generator=torch.Generator().manual_seed(2)) > 0.3,
        "ce_mask": torch.ones(B, T, dtype=torch.bool),
    }
    out = uld_output(logits, input_ids=ids, spec=KDLossSpec(kind="sampled", alpha=0.3), batch=batch)
    ce = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, V), ids[:, 1:].reshape(-1))
    uld, count = uld_loss(logits, **{k: batch[k] for k in ("uld_probs", "uld_tail", "uld_mask", "loss_mask")})
    assert float(out.loss.detach()) == pytest.approx(float((0.7 * ce + 0.3 * uld).detach()), rel=1e-5)
    assert float(out.kd) == pytest.approx(float(uld.detach()), rel=1e-6) and int(out.kd_count) == int(count)
    out.loss.backward()
    assert torch.isfinite(logits.grad).all()


# -- the trainer (train.cross_tokenizer, train.student_tokenizer)

SEQ = 32


@pytest.fixture(scope="module")
def cross_world(tmp_path_factory):
    """A byte-level BPE teacher (tiny Llama), stream-packed tokens, a top-k and a sampled cache of them, and
    a SentencePiece-style student tokenizer saved on its own."""
    from conftest import tiny_llama

    from kdcache.cache.build import build_cache
    from kdcache.config.cache import CacheConfig
    from kdcache.config.teacher import TeacherConfig
    from kdcache.fingerprint import tokenizer_fingerprint
    from kdcache.teacher import load_teacher
    from kdcache.token_data import open_tokens, write_tokens

    root = tmp_path_factory.mktemp("cross")
    texts = corpus(40) + ADVERSARIAL
    tok = train_bpe_tokenizer(texts, vocab_size=300)
    tiny_llama(len(tok), max_positions=SEQ).save_pretrained(root / "teacher")
    tok.save_pretrained(root / "teacher")
    stream = [i for t in texts for i in [*tok(t, add_special_tokens=False)["input_ids"], tok.eos_token_id]]
    rows = np.asarray(stream[: len(stream) // SEQ * SEQ]).reshape(-1, SEQ)[:12]
    fp = tokenizer_fingerprint(tok)
    write_tokens(root / "tokens", {"train": rows[:10], "val": rows[10:]}, vocab_size=len(tok), tokenizer_fingerprint=fp)
    teacher = load_teacher(TeacherConfig(path=str(root / "teacher"), device="cpu"))
    for kind in ("topk", "sampled"):
        cfg = CacheConfig(targets=kind, top_k=8, samples=8, batch_size=4, rows_per_shard=8)
        build_cache(teacher, open_tokens(root / "tokens", "train"), cfg, out_dir=root / kind)
    sp_tokenizers.metaspace_bpe(texts, 280).save_pretrained(root / "student_tokenizer")
    return root


@pytest.mark.parametrize(
    ("cache", "method"), [("topk", "exact"), ("topk", "prefix"), ("topk", "uld"), ("sampled", "prefix")]
)
def test_trainer_distills_a_student_with_another_tokenizer(cross_world, cache, method, tmp_path, monkeypatch):
    import json
    import math

    from kdcache.config.train import StudentConfig, TrainConfig
    from kdcache.fingerprint import tokenizer_fingerprint
    from kdcache.train import train

    monkeypatch.setenv("KDCACHE_STAGING_DIR", str(tmp_path / "staging"))
    cfg = TrainConfig(
        max_steps=2,
        batch_size=4,
        lr=1e-2,
        warmup_steps=1,
        checkpoint_every=2,
        log_every=100,
        student=StudentConfig(hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32),
        cross_tokenizer=method,
        student_tokenizer=str(cross_world / "student_tokenizer"),
    )
    summary = train(cfg, cache_dir=cross_world / cache, out_dir=tmp_path / "s")
    assert summary["complete"] and math.isfinite(summary["final_loss"])
    report = json.loads((tmp_path / "s" / "training.json").read_text())["vocab_map"]
    assert report["method"] == method and 0.3 < report["soft_target_fraction"] <= 1
    assert 0 < report["teacher_mass_kept_ratio"] <= 1 + 1e-6 and report["student_seq_len"] >= 8
    student = PreTrainedTokenizerFast.from_pretrained(tmp_path / "s")
    assert tokenizer_fingerprint(student) == tokenizer_fingerprint(
        PreTrainedTokenizerFast.from_pretrained(cross_world / "student_tokenizer")
    )


def test_trainer_refuses_what_cross_tokenizer_cannot_serve(cross_world, tmp_path, monkeypatch):
    from kdcache.config.base import ConfigError
    from kdcache.config.train import TrainConfig
    from kdcache.train import train

    monkeypatch.setenv("KDCACHE_STAGING_DIR", str(tmp_path / "staging"))
    common = {"cross_tokenizer": "exact", "student_tokenizer": str(cross_world / "student_tokenizer"), "max_steps": 1}
    with pytest.raises(ConfigError, match=r"train.temperature=2 with train.cross_tokenizer=exact: .*topk_renorm"):
        train(TrainConfig(**common, temperature=2.0), cache_dir=cross_world / "topk", out_dir=tmp_path / "a")
    with pytest.raises(ConfigError, match=r"train.cross_tokenizer: .*train.feature_weight: 0"):
        train(TrainConfig(**common, feature_weight=1.0), cache_dir=cross_world / "topk", out_dir=tmp_path / "b")
    with pytest.raises(ConfigError, match=r"train.cross_tokenizer: re-tokenizes the text, vocab_map maps ids"):
        TrainConfig(**common, vocab_map="exact")


def test_student_tokenizer_errors_name_the_field(tmp_path):
    from kdcache.crosstrain import CrossTokenizerError, load_student_tokenizer_dir

    with pytest.raises(CrossTokenizerError, match=r"train.student_tokenizer=.*nope: not a directory"):
        load_student_tokenizer_dir(tmp_path / "nope")
    from conftest import word_tokenizer

    word_tokenizer(10).save_pretrained(tmp_path / "words")
    with pytest.raises(CrossTokenizerError, match=r"train.student_tokenizer=.*words: .*model=WordLevel"):
        load_student_tokenizer_dir(tmp_path / "words")
    (tmp_path / "empty").mkdir()
    with pytest.raises(
        CrossTokenizerError, match=r"train.student_tokenizer=.*empty: no tokenizer files .*save_pretrained"
    ):
        load_student_tokenizer_dir(tmp_path / "empty")
    no_eos = train_bpe_tokenizer(corpus(10), vocab_size=270)
    no_eos.eos_token = None
    no_eos.save_pretrained(tmp_path / "no_eos")
    with pytest.raises(
        CrossTokenizerError, match=r"train.student_tokenizer=.*no_eos: tokenizer has no EOS token.*eos_token"
    ):
        load_student_tokenizer_dir(tmp_path / "no_eos")
    assert len(load_student_tokenizer_dir(_saved(tmp_path / "ok", no_eos))) == len(no_eos)


def _saved(path, tokenizer):
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend_tokenizer, eos_token="<|endoftext|>")
    tokenizer.save_pretrained(path)
    return path
