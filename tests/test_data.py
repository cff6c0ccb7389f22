"""Training data: the epoch order, the sample reader, several stores."""
from __future__ import annotations

import shutil

import numpy as np
import pytest

from conftest import config
from stores import FAILED, FeatureStore
from xmei.data import EpochSampler, StoreSamples


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


def test_failed_clips_are_skipped_and_batches_read_whole(patch_store, tmp_path):
    copy = tmp_path / "store"
    shutil.copytree(patch_store, copy)
    store = FeatureStore(copy, mode="r+")
    status = store.status()
    status[[2, 9]] = FAILED
    store.array("status")[:] = status
    data = StoreSamples([copy])
    assert len(data) == 22 and (0, 2) not in data.items and (0, 9) not in data.items
    batch = data.__getitems__([5, 0, 1, 2, 20])
    single = [data[p] for p in (5, 0, 1, 2, 20)]
    for a, b in zip(batch, single):
        np.testing.assert_array_equal(a["video"], b["video"])
        assert a["texts"] == b["texts"]
    assert batch[1]["video"].shape == (8, 257, 64) and batch[1]["audio"].shape == (8, 64)


def test_two_stores_train_together_and_other_features_are_refused(patch_store, tiny_models, corpus, annotations,
                                                                   tmp_path):
    assert len(StoreSamples([patch_store, patch_store])) == 48
    from pipeline.extract import extract

    extract(config(tiny_models, "extract.visual_tokens=pooled"), annotations, corpus, tmp_path / "pooled", workers=0)
    with pytest.raises(ValueError, match="other encoders or settings"):
        StoreSamples([patch_store, tmp_path / "pooled"])
