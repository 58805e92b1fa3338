"""Packing, mixing, sharding, determinism, resume, eval, cache: checked on the batches themselves.

Every segment of a batch is looked up among the samples encoded directly with ``encode_all`` (not
through the cache), so these tests also check that the cache stores exactly what it produces.
"""

from __future__ import annotations

import json
import logging
import math
import random
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from finetune.data.args import DataArgs, InstructArgs
from finetune.data.cache import TokenizerPool, load_tokenized
from finetune.data.dataset import open_manifest
from finetune.data.loader import Batch, build_eval_batches, build_train_loader
from finetune.data.tokenize import SampleType, encode_all
from finetune.data.validation import check_data
from tests.data_helpers import chat, numbered_texts, spm, write_jsonl

SPM = spm()


def lookup(
    samples: list[dict], as_type: SampleType, tag: str
) -> dict[tuple[int, ...], tuple[str, int, list[bool]]]:
    out = {}
    for i, s in enumerate(samples):
        ts = encode_all(s, SPM, as_type, chunk=False)[0]
        out[tuple(ts.tokens)] = (tag, i, ts.masks)
    return out


def segments(batch: Batch, seq_len: int):
    """(row, x, y, mask) per segment; checks the Batch invariants on the way."""
    assert batch.x.dtype == np.int64 and batch.y.dtype == np.int64 and batch.y_mask.dtype == np.bool_
    assert len(batch.x) == len(batch.y) == len(batch.y_mask) == sum(batch.seqlens)
    assert all(isinstance(n, int) and n > 0 for n in batch.seqlens)
    at = 0
    for n in batch.seqlens:
        assert at // seq_len == (at + n - 1) // seq_len, "a segment crosses a row boundary"
        yield at // seq_len, batch.x[at : at + n], batch.y[at : at + n], batch.y_mask[at : at + n]
        at += n


def identify(batch: Batch, seq_len: int, known: dict) -> list[tuple[str, int] | None]:
    """Whole samples in the batch in order; None for filler. Fails on anything else (e.g. a split sample)."""
    out: list[tuple[str, int] | None] = []
    for _, x, y, m in segments(batch, seq_len):
        key = tuple(int(t) for t in x) + (int(y[-1]),)
        if key in known:
            tag, i, masks = known[key]
            assert list(m) == masks[1:]
            assert list(y) == list(key[1:])
            out.append((tag, i))
        else:
            assert not m.any() and not x.any() and not y.any(), "unknown segment that is not filler"
            out.append(None)
    return out


def pretrain_file(
    tmp_path: Path, name: str, n: int, seed: int = 0, max_words: int = 60
) -> tuple[Path, list[dict]]:
    samples = numbered_texts(name, n, random.Random(seed), max_words=max_words)
    return write_jsonl(tmp_path / f"{name}.jsonl", samples), samples


def checked(args: DataArgs, cache: Path, seq_len: int = 128):
    """check_data with the token cache in ``cache``: the report the loaders are built from."""
    report = check_data(replace(args, cache_dir=str(cache)), SPM, seq_len)
    assert report.ok, report.errors
    return report


def loader(tmp_path, args, **kw):
    kw.setdefault("seed", 0)
    kw.setdefault("rank", 0)
    kw.setdefault("world_size", 1)
    report = checked(args, tmp_path / "cache", kw["seq_len"])
    return build_train_loader(report.train, long_sample_policy=args.long_sample_policy, **kw)


def eval_batches(args, cache, **kw):
    report = checked(args, cache, kw["seq_len"])
    return build_eval_batches(report.eval, long_sample_policy=args.long_sample_policy, **kw)


def test_packing_never_splits_a_fitting_sample(tmp_path) -> None:
    path, samples = pretrain_file(tmp_path, "doc", 400)
    known = lookup(samples, SampleType.PRETRAIN, "doc")
    ld = loader(tmp_path, DataArgs(data=str(path), shuffle=True), seq_len=128, batch_size=2, buffer_size=64)
    seen = Counter()
    for _ in range(200):
        batch = next(ld)
        ids = identify(batch, 128, known)
        seen.update(i for i in ids if i is not None)
        # filler only ever ends a row, and is a single segment
        rows = [r for r, *_ in segments(batch, 128)]
        for j, i in enumerate(ids):
            if i is None:
                assert j + 1 == len(ids) or rows[j + 1] != rows[j]
    # every sample reached, about as often as the others (~3.5 epochs; packing delays a
    # sample by at most buffer_size rows, never skips it)
    assert len(seen) == 400 and max(seen.values()) - min(seen.values()) <= 2, Counter(seen.values())
    assert ld.filler_fraction < 0.05, ld.filler_fraction


def test_instruct_masks_survive_packing(tmp_path) -> None:
    rng = random.Random(3)
    samples = [chat(rng, rng.randint(1, 3)) for _ in range(50)]
    for s in samples[::4]:
        s["messages"][1]["weight"] = 0
    path = write_jsonl(tmp_path / "chat.jsonl", samples)
    known = lookup(samples, SampleType.INSTRUCT, "chat")
    ld = loader(tmp_path, DataArgs(instruct_data=str(path)), seq_len=256, batch_size=2)
    for _ in range(10):
        assert [i for i in identify(next(ld), 256, known) if i is not None]


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_ranks_are_disjoint_and_complete(tmp_path, world_size) -> None:
    # buffer_size=1 turns packing into one sample per row in stream order, exposing the rank split.
    path, samples = pretrain_file(tmp_path, "doc", 12)
    known = lookup(samples, SampleType.PRETRAIN, "doc")
    args = DataArgs(data=str(path), shuffle=True)

    def stream(rank: int, ws: int, n: int) -> list[int]:
        ld = loader(tmp_path, args, seq_len=128, batch_size=1, rank=rank, world_size=ws, buffer_size=1)
        return [identify(next(ld), 128, known)[0][1] for _ in range(n)]

    single = stream(0, 1, 24)
    per_rank = [stream(r, world_size, 24 // world_size) for r in range(world_size)]
    first_epoch = [i for r in range(world_size) for i in per_rank[r][: 12 // world_size]]
    assert sorted(first_epoch) == list(range(12))  # disjoint and complete
    # interleaving the ranks gives the single-process stream: two ranks equal one
    assert [per_rank[k % world_size][k // world_size] for k in range(24)] == single
    assert sorted(single[:12]) == sorted(single[12:]) and single[:12] != single[12:]  # reshuffled per epoch


def test_deterministic_for_a_seed(tmp_path) -> None:
    path, _ = pretrain_file(tmp_path, "doc", 200)
    args = DataArgs(data=str(path), shuffle=True)
    a, b, c = (loader(tmp_path, args, seq_len=64, batch_size=2, seed=s) for s in (7, 7, 8))
    for _ in range(5):
        ba, bb, bc = next(a), next(b), next(c)
        assert np.array_equal(ba.x, bb.x) and ba.seqlens == bb.seqlens
    assert not np.array_equal(ba.x, bc.x)


def test_no_shuffle_keeps_file_order(tmp_path) -> None:
    path, samples = pretrain_file(tmp_path, "doc", 10)
    known = lookup(samples, SampleType.PRETRAIN, "doc")
    ld = loader(tmp_path, DataArgs(data=str(path), shuffle=False), seq_len=128, batch_size=1, buffer_size=1)
    assert [identify(next(ld), 128, known)[0][1] for _ in range(12)] == list(range(10)) + [0, 1]


@pytest.mark.parametrize("world_size, rank", [(1, 0), (2, 1)])
def test_resume_continues_exactly(tmp_path, world_size, rank) -> None:
    a_path, _ = pretrain_file(tmp_path, "a", 150)
    rng = random.Random(5)
    b_path = write_jsonl(tmp_path / "b.jsonl", [chat(rng, 2) for _ in range(80)])
    args = DataArgs(data=f"{a_path}:1", instruct_data=f"{b_path}:2", shuffle=True)
    kw = dict(seq_len=96, batch_size=2, rank=rank, world_size=world_size, buffer_size=32)
    original = loader(tmp_path, args, **kw)
    for _ in range(17):  # past the first epoch of a
        next(original)
    state = json.loads(json.dumps(original.state_dict()))
    resumed = loader(tmp_path, args, **kw)
    resumed.load_state_dict(state)
    for _ in range(8):
        x, y = next(original), next(resumed)
        assert np.array_equal(x.x, y.x) and np.array_equal(x.y_mask, y.y_mask) and x.seqlens == y.seqlens
    with pytest.raises(ValueError, match="seed changed"):
        loader(tmp_path, args, seed=1, **kw).load_state_dict(state)


def test_mixing_is_per_token_by_weight(tmp_path) -> None:
    a_path, a = pretrain_file(tmp_path, "a", 300, seed=1, max_words=20)
    b_path, b = pretrain_file(tmp_path, "b", 300, seed=2, max_words=80)
    known = {**lookup(a, SampleType.PRETRAIN, "a"), **lookup(b, SampleType.PRETRAIN, "b")}
    args = DataArgs(data=f"{a_path}:3,{b_path}:1", shuffle=True)
    ld = loader(tmp_path, args, seq_len=128, batch_size=4, buffer_size=64)
    tokens = Counter()
    for _ in range(100):
        batch = next(ld)
        for (_, x, _, _), who in zip(segments(batch, 128), identify(batch, 128, known), strict=False):
            if who:
                tokens[who[0]] += len(x)
    assert tokens["a"] / (tokens["a"] + tokens["b"]) == pytest.approx(0.75, abs=0.03)


def _long_file(tmp_path) -> tuple[Path, list[dict]]:
    rng = random.Random(0)
    samples = [{"text": f"short{i} " + " ".join(["alpha"] * rng.randint(2, 20))} for i in range(20)]
    samples.append({"text": "long " + " ".join(f"w{i}" for i in range(200))})  # ~ 600 tokens
    return write_jsonl(tmp_path / "long.jsonl", samples), samples


@pytest.mark.parametrize("policy", ["split", "truncate", "drop"])
def test_long_sample_policy(tmp_path, policy) -> None:
    path, samples = _long_file(tmp_path)
    long_tokens = encode_all(samples[-1], SPM, SampleType.PRETRAIN, chunk=False)[0].tokens
    seq_len = 64
    args = DataArgs(data=str(path), long_sample_policy=policy)
    report = check_data(replace(args, cache_dir=str(tmp_path / "cache")), SPM, seq_len)
    assert report.sources[0].too_long == 1
    ld = loader(tmp_path, args, seq_len=seq_len, batch_size=1, buffer_size=4)
    segs = []
    for _ in range(40):
        segs += [[int(t) for t in x] + [int(y[-1])] for _, x, y, _ in segments(next(ld), seq_len)]
    cuts = [long_tokens[a : a + seq_len + 1] for a in range(0, len(long_tokens) - 1, seq_len)]
    assert len(cuts) == math.ceil((len(long_tokens) - 1) / seq_len) > 2
    found = [c in segs for c in cuts]
    assert ld.stats["long_samples"] >= 1  # counted under every policy
    if policy == "split":  # consecutive cuts, together covering every position
        assert all(found)
    elif policy == "truncate":
        assert found[0] and not any(found[1:])
    else:
        assert not any(found)


@pytest.mark.parametrize("world_size", [1, 2, 3])
@pytest.mark.parametrize("batch_size", [1, 3])
def test_eval_uses_every_sample_once(tmp_path, world_size, batch_size) -> None:
    rng = random.Random(9)
    samples = [chat(rng, rng.randint(1, 2), max_words=30) for _ in range(23)]
    path = write_jsonl(tmp_path / "eval.jsonl", samples)
    known = lookup(samples, SampleType.INSTRUCT, "eval")
    args = DataArgs(instruct_data=str(path), eval_instruct_data=str(path))
    per_rank = [
        eval_batches(args, tmp_path / "c", seq_len=128, batch_size=batch_size, rank=r, world_size=world_size)
        for r in range(world_size)
    ]
    assert len({len(b) for b in per_rank}) == 1  # same number of batches on every rank
    used = Counter(
        i for batches in per_rank for b in batches for i in identify(b, 128, known) if i is not None
    )
    assert used == Counter({("eval", i): 1 for i in range(23)})
    total_targets = sum(b.n_targets for batches in per_rank for b in batches)
    assert total_targets == sum(sum(encode_all(s, SPM, SampleType.INSTRUCT, chunk=False)[0].masks[1:]) for s in samples)
    for batches in per_rank:
        assert all(len(b.x) == batch_size * 128 for b in batches)


def test_eval_pads_ranks_to_the_same_batch_count(tmp_path) -> None:
    # 3 samples that each fill a row, 2 ranks: rank 0 gets 2 rows, rank 1 gets 1 row plus an empty one.
    samples = [
        {
            "messages": [
                {"role": "user", "content": "q"},
                {"role": "assistant", "content": " ".join(["alpha"] * 100)},
            ]
        }
    ] * 3
    path = write_jsonl(tmp_path / "e.jsonl", samples)
    args = DataArgs(instruct_data=str(path), eval_instruct_data=str(path))
    r0, r1 = (
        eval_batches(args, tmp_path / "c", seq_len=110, batch_size=1, rank=r, world_size=2)
        for r in (0, 1)
    )
    assert len(r0) == len(r1) == 2
    assert [b.n_targets > 0 for b in r1] == [True, False] and r1[1].seqlens == [110]


def test_cache_is_reused_and_keyed_by_content(tmp_path, caplog) -> None:
    caplog.set_level(logging.INFO, logger="finetune.data")
    path, _ = pretrain_file(tmp_path, "doc", 50)
    cache = tmp_path / "cache"
    args = DataArgs(data=str(path))
    check_data(replace(args, cache_dir=str(cache)), SPM, 128)
    assert caplog.text.count("Tokenized") == 1
    entries = sorted(p.name for p in cache.iterdir() if p.is_dir())
    caplog.clear()
    check_data(replace(args, cache_dir=str(cache)), SPM, 128)
    ld = build_train_loader(checked(args, cache).train, seq_len=128, batch_size=1, seed=0, rank=0, world_size=1,
                            long_sample_policy="split")
    next(ld)
    assert "Tokenized" not in caplog.text  # second run reads the cache
    assert sorted(p.name for p in cache.iterdir() if p.is_dir()) == entries
    tf = load_tokenized(path, SampleType.PRETRAIN, SPM, chunk=False, cache_dir=cache)
    assert isinstance(tf.tokens, np.memmap) and isinstance(tf.masks, np.memmap)
    with open(path, "a") as f:
        f.write(json.dumps({"text": "one more"}) + "\n")
    check_data(replace(args, cache_dir=str(cache)), SPM, 128)
    assert caplog.text.count("Tokenized") == 1  # changed content, new entry
    # another tokenizer or another encoding option is another entry, too
    check_data(
        DataArgs(
            instruct_data=str(write_jsonl(tmp_path / "c.jsonl", [chat(random.Random(0), 1)])),
            instruct=InstructArgs(dynamic_chunk_fn_call=False),
            cache_dir=str(cache),
        ),
        SPM,
        128,
    )
    assert len([p for p in cache.iterdir() if p.is_dir()]) == len(entries) + 2


def test_process_pool_matches_in_process(tmp_path) -> None:
    rng = random.Random(4)
    lines = [json.dumps(chat(rng, rng.randint(1, 3))) for _ in range(300)]
    lines[17] = "{broken"
    lines[250] = ""
    path = write_jsonl(tmp_path / "big.jsonl", lines)
    serial = load_tokenized(path, SampleType.INSTRUCT, SPM, chunk=True, cache_dir=tmp_path / "a")
    pool = TokenizerPool(SPM, num_workers=2, block_bytes=8192, min_bytes=0)
    try:
        parallel = load_tokenized(
            path, SampleType.INSTRUCT, SPM, chunk=True, cache_dir=tmp_path / "b", pool=pool
        )
    finally:
        pool.close()
    for name in ("tokens", "masks", "offsets", "lines", "targets"):
        assert np.array_equal(getattr(serial, name), getattr(parallel, name)), name
    assert [(e.line, e.kind) for e in parallel.errors] == [(18, "invalid_json"), (251, "blank_line")]
    assert parallel.n_lines == 300 and parallel.n_valid == 298
    assert list(parallel.lines[:3]) == [1, 2, 3]


def _load_in_process(path: str, cache: str, out: str) -> None:
    tf = load_tokenized(Path(path), SampleType.INSTRUCT, spm(), chunk=True, cache_dir=Path(cache))
    Path(out).write_text(json.dumps([int(tf.tokens.sum()), int(tf.masks.sum()), len(tf)]))


def test_concurrent_ranks_share_one_cache_entry(tmp_path) -> None:
    # Two real processes race on the same file and cache: one tokenizes, the other waits and reuses it.
    import multiprocessing as mp

    rng = random.Random(8)
    path = write_jsonl(tmp_path / "d.jsonl", [chat(rng, 2) for _ in range(200)])
    ctx = mp.get_context("spawn")
    procs = [
        ctx.Process(
            target=_load_in_process, args=(str(path), str(tmp_path / "cache"), str(tmp_path / f"{r}.json"))
        )
        for r in range(2)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    results = [json.loads((tmp_path / f"{r}.json").read_text()) for r in range(2)]
    assert results[0] == results[1] and results[0][2] == 200
    assert len([p for p in (tmp_path / "cache").iterdir() if p.is_dir()]) == 1


def test_rank_without_trainable_samples_is_an_error_not_a_hang(tmp_path) -> None:
    trained = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    untrained = {
        "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "b", "weight": 0}]
    }
    path = write_jsonl(tmp_path / "d.jsonl", [trained, untrained])
    args = DataArgs(instruct_data=str(path), instruct=InstructArgs(shuffle=False))
    assert next(loader(tmp_path, args, seq_len=32, batch_size=1, rank=0, world_size=2)).n_targets == 2
    with pytest.raises(ValueError, match="Rank 1 of 2 receives no sample with a training target"):
        next(loader(tmp_path, args, seq_len=32, batch_size=1, rank=1, world_size=2))
    with pytest.raises(ValueError, match="has no sample with a training target"):
        loader(
            tmp_path,
            DataArgs(instruct_data=str(write_jsonl(tmp_path / "u.jsonl", [untrained]))),
            seq_len=32,
            batch_size=1,
        )


def test_manifest_opens_the_scanned_sources_without_reading_the_data(tmp_path, caplog) -> None:
    # What rank 0 sends the other ranks: they open the same cache entries by name and get the same
    # batches; a node whose cache folder lacks an entry builds it from the named file.
    path, _ = pretrain_file(tmp_path, "doc", 40)
    args = DataArgs(data=str(path), shuffle=True)
    report = checked(args, tmp_path / "cache")
    sent = json.loads(json.dumps(report.manifest()))  # crosses ranks as JSON text
    kw = dict(seq_len=64, batch_size=2, seed=3, rank=0, world_size=1, long_sample_policy="split")
    expected = next(build_train_loader(report.train, **kw))
    caplog.set_level(logging.INFO, logger="finetune.data")
    for cache in (tmp_path / "cache", tmp_path / "node2"):
        caplog.clear()
        opened = open_manifest(sent["train"], SPM, cache)
        assert [d.source for d in opened] == [d.source for d in report.train]
        got = next(build_train_loader(opened, **kw))
        assert np.array_equal(got.x, expected.x) and np.array_equal(got.y_mask, expected.y_mask)
        assert ("Tokenized" in caplog.text) == (cache.name == "node2")
    assert open_manifest(sent["eval"], SPM, tmp_path / "cache") == []
