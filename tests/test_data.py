"""Training data: the epoch order, the sample reader, several stores."""
from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import store_in_dtype
from stores import FAILED, FeatureStore
from xmei.data import TEXTS, EpochSampler, PackedStrings, StoreSamples, dtype_warning


def test_epoch_order_is_a_function_of_seed_and_epoch(patch_store):
    data = StoreSamples([patch_store])
    sampler = EpochSampler(data, seed=7, shuffle_shards=1)
    first, again, second = sampler.order(0), EpochSampler(data, seed=7, shuffle_shards=1).order(0), sampler.order(1)
    assert first.tolist() == again.tolist() and first.tolist() != second.tolist()
    assert sorted(first.tolist()) == list(range(24))  # every clip once per pass
    shards = [data.shard_of(int(p))[1] for p in first]
    assert all(len(set(shards[k:k + 8])) == 1 for k in range(0, 24, 8))  # a buffer of one shard: reads stay in it
    orders = {tuple(data.shard_of(int(p))[1] for p in sampler.order(e)[::8]) for e in range(6)}
    assert len(orders) > 1  # the shard order changes from epoch to epoch
    sampler.set_epoch(0, start=10)
    assert list(sampler) == first[10:].tolist()  # a resumed epoch starts where the killed one stopped
    ranks = [EpochSampler(data, 7, 1, rank=r, world=2) for r in (0, 1)]
    assert sorted(list(ranks[0]) + list(ranks[1])) == list(range(24))
    cycling = EpochSampler(data, 7, 2, samples=60).order(3)
    assert len(cycling) == 60 and np.bincount(cycling).min() >= 2  # iters_per_epoch past one pass cycles


def copy_with_failed(store: Path, folder: Path, failed: list[int]) -> Path:
    """A copy of ``store`` in which the ``failed`` clips are marked failed."""
    copy = folder / "store"
    shutil.copytree(store, copy)
    store = FeatureStore(copy, mode="r+")
    status = store.status()
    status[failed] = FAILED
    store.array("status")[:] = status
    return copy


def test_failed_clips_are_skipped_and_batches_read_whole(patch_store, tmp_path):
    data = StoreSamples([copy_with_failed(patch_store, tmp_path, [2, 9])])
    assert len(data) == 22 and data.clips.tolist() == [i for i in range(24) if i not in (2, 9)]
    batch = data.__getitems__([5, 0, 1, 2, 20])
    single = [data[p] for p in (5, 0, 1, 2, 20)]
    for a, b in zip(batch, single):
        np.testing.assert_array_equal(a["video"], b["video"])
        assert a["texts"] == b["texts"]
    assert batch[1]["video"].shape == (8, 257, 64) and batch[1]["audio"].shape == (8, 64)


def test_two_stores_train_together_and_other_features_are_refused(patch_store, pooled_store):
    assert len(StoreSamples([patch_store, patch_store])) == 48
    with pytest.raises(ValueError, match="other encoders or settings"):
        StoreSamples([patch_store, pooled_store])


def test_stores_of_other_compute_dtypes_train_together_with_a_warning(patch_store, tmp_path):
    fp32, bf16 = (store_in_dtype(patch_store, tmp_path / name, name) for name in ("float32", "bfloat16"))
    unknown = store_in_dtype(patch_store, tmp_path / "unknown", None)
    assert len(StoreSamples([fp32, bf16, unknown])) == 72  # the same layout: no error
    assert dtype_warning([fp32, unknown]) is None  # a store that does not say is not counted
    assert dtype_warning([fp32], "float32") is None
    assert dtype_warning([fp32, bf16, unknown]) == (
        f"features computed by the encoders in different dtypes (bfloat16 in {bf16}; float32 in {fp32}): the "
        "model sees slightly other features than it was trained on; extract every store with one extract.precision")
    assert "bfloat16 in the checkpoint's training stores; float32 in" in dtype_warning([fp32], "bfloat16")


class ShardedPositions:
    """What EpochSampler needs of a dataset: len() and each position's shard."""

    def __init__(self, shard_ids: np.ndarray):
        self.shard_ids = shard_ids

    def __len__(self) -> int:
        return len(self.shard_ids)


def test_epoch_order_is_n_log_n_and_reads_stay_within_a_buffer_of_shards():
    rng = np.random.default_rng(0)
    sizes = rng.integers(1, 20, 300)  # ragged shards, numbered out of order
    ids = np.repeat(rng.permutation(10_000)[:300], sizes)
    data = ShardedPositions(ids[rng.permutation(len(ids))])
    order = EpochSampler(data, seed=1, shuffle_shards=4).order(0)
    assert sorted(order.tolist()) == list(range(len(ids)))
    left = {s: n for s, n in zip(*np.unique(ids, return_counts=True))}
    open_shards: set[int] = set()  # the buffer: shards begun and not finished
    for shard in data.shard_ids[order]:
        open_shards.add(shard)
        left[shard] -= 1
        assert len(open_shards) <= 4
        if all(left[s] == 0 for s in open_shards):  # the group is read: the next one starts
            open_shards.clear()
    big = EpochSampler(ShardedPositions(np.arange(1_000_000) // 64), seed=0, shuffle_shards=4)
    start = time.perf_counter()
    assert len(np.unique(big.order(0))) == 1_000_000
    assert time.perf_counter() - start < 10  # ~0.3 s; comparing every clip with every shard took hours


def test_samples_hold_packed_texts_and_no_python_object_per_clip(patch_store):
    data, store = StoreSamples([patch_store, patch_store]), FeatureStore(patch_store)
    for name in TEXTS:
        assert list(data.strings[name]) == [str(v) for v in store.array(name)[...]] * 2
    packed = PackedStrings(["", "héllo", "日本", "x"])
    assert list(packed) == ["", "héllo", "日本", "x"] and packed.data.dtype == np.uint8
    assert data.store_ids.tolist() == [0] * 24 + [1] * 24 and data.clips.tolist() == list(range(24)) * 2
    assert data.shard_ids.tolist() == [k for k in range(6) for _ in range(8)]

    def arrays(obj, path):  # every array held, and no list/tuple with an entry per clip
        if isinstance(obj, np.ndarray):
            yield path, obj
        elif isinstance(obj, (list, tuple)):
            assert len(obj) < len(data), f"{path} holds a Python object per clip"
            for i, v in enumerate(obj):
                yield from arrays(v, f"{path}[{i}]")
        elif isinstance(obj, dict):
            for k, v in obj.items():
                yield from arrays(v, f"{path}[{k!r}]")
        elif isinstance(obj, PackedStrings):
            yield from arrays(vars(obj), path)

    held = dict(arrays(vars(data), "data"))
    assert {"data['clips']", "data['has_audio']", "data['strings']['video_id']['data']"} <= set(held)
    assert all(a.dtype.kind in "biuf" for a in held.values()), {p: a.dtype for p, a in held.items()}
