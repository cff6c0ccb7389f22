"""Texts and ints of a store, in chunks of one shard's clips: one clip's read without the rest, whole
reads equal to Zarr's, and stores written before (one chunk over all clips) read the same."""
from __future__ import annotations

import numpy as np
import pytest
import zarr

from stores import FeatureStore, create_store
from test_reader import SPECS

N, SHARD = 10, 4
TEXTS = {"video_id": [f"v{i}" for i in range(N)],
         "subtitle": [""] * SHARD + [f"ligne {i} — é" * i for i in range(SHARD, N)]}  # chunk 0 all "": not written
INTS = {"label": np.arange(N) - 1, "caption_ids": np.arange(N * 3).reshape(N, 3) + 1}


def text_store(path) -> FeatureStore:
    """10 clips in shards of 4 with TEXTS and INTS (no features written: they play no part here)."""
    create_store(path, N, SHARD, SPECS, TEXTS, INTS, {})
    return FeatureStore(path)


def one_chunk_store(path) -> FeatureStore:
    """A store as written before texts were chunked: each text and int array one chunk over all clips."""
    text_store(path)
    group = zarr.open_group(path, mode="r+", zarr_format=3)
    for name, values in TEXTS.items():
        group.create_array(name, shape=(N,), dtype=str, chunks=(N,), overwrite=True)[:] = np.array(values, dtype=str)
    for name, values in INTS.items():
        group.create_array(name, shape=values.shape, dtype="int32", chunks=values.shape, overwrite=True)[...] = values
    return FeatureStore(path)


def test_texts_and_ints_are_chunked_by_the_shard_size(tmp_path):
    store = text_store(tmp_path / "store")
    assert [store.array(n).chunks for n in (*TEXTS, *INTS)] == [(SHARD,), (SHARD,), (SHARD,), (SHARD, 3)]
    assert all(store.array(n).shards is None for n in (*TEXTS, *INTS))
    assert not (tmp_path / "store" / "subtitle" / "c" / "0").exists()  # all fill value: not written
    small = create_store(tmp_path / "small", 3, SHARD, SPECS, {"video_id": ["a", "b", "c"]}, {}, {})
    assert small.array("video_id").chunks == (3,)  # a store smaller than a shard: one chunk, as the features


def test_one_clip_is_read_without_the_other_clips_chunks(tmp_path):
    store = text_store(tmp_path / "store")
    for name in (*TEXTS, *INTS):
        for chunk in (tmp_path / "store" / name / "c").rglob("*"):
            if chunk.is_file() and chunk.relative_to(tmp_path / "store" / name / "c").parts[0] != str(5 // SHARD):
                chunk.write_bytes(b"not a zstd frame")  # any read of another chunk now fails
    with pytest.raises(RuntimeError, match="Zstd decompression error"):
        store.array("video_id")[...]  # what a whole read would do
    clip = FeatureStore(tmp_path / "store")[5]
    assert {n: clip[n] for n in TEXTS} == {n: v[5] for n, v in TEXTS.items()}
    assert clip["label"] == 4 and clip["caption_ids"].tolist() == [16, 17, 18]
    [(shard, data)] = list(FeatureStore(tmp_path / "store").iter_shards([1], names=[*TEXTS, *INTS]))
    assert shard == 1 and data["subtitle"].tolist() == TEXTS["subtitle"][4:8]
    np.testing.assert_array_equal(data["caption_ids"], INTS["caption_ids"][4:8])


@pytest.mark.parametrize("make", [text_store, one_chunk_store])
def test_every_clip_and_every_shard_read_as_written(tmp_path, make):
    store = make(tmp_path / "store")
    for i in range(N):
        clip = store[i]
        assert {n: clip[n] for n in TEXTS} == {n: v[i] for n, v in TEXTS.items()}
        assert type(clip["video_id"]) is str and type(clip["label"]) is np.int32
        assert clip["label"] == INTS["label"][i] and clip["caption_ids"].tolist() == INTS["caption_ids"][i].tolist()
    shards = list(store.iter_shards())
    assert [k for k, _ in shards] == [0, 1, 2]
    for k, data in shards:
        rows = store.shard_range(k)
        assert {n: data[n].tolist() for n in TEXTS} == {n: v[rows.start:rows.stop] for n, v in TEXTS.items()}
        for name, values in INTS.items():
            np.testing.assert_array_equal(data[name], values[rows.start:rows.stop])


def test_an_old_store_reads_the_same_as_a_new_one(tmp_path):
    new, old = text_store(tmp_path / "new"), one_chunk_store(tmp_path / "old")
    assert old.array("video_id").chunks == (N,) and old.array("caption_ids").chunks == (N, 3)
    for i in range(N):
        a, b = new[i], old[i]
        assert a.keys() == b.keys()
        for key in a:
            assert type(a[key]) is type(b[key]), key
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    for (k, a), (j, b) in zip(new.iter_shards(), old.iter_shards(), strict=True):
        assert k == j and a.keys() == b.keys()
        for key in a:
            assert a[key].dtype == b[key].dtype, key
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)


@pytest.mark.parametrize("make", [text_store, one_chunk_store])
def test_whole_reads_equal_zarr(tmp_path, make):
    store = make(tmp_path / "store")
    for name in (*TEXTS, *INTS):
        got, expected = store.read_whole(name), store.array(name)[...]
        assert got.dtype == expected.dtype and got.shape == expected.shape
        np.testing.assert_array_equal(got, expected, err_msg=name)
    assert store.read_whole("subtitle").tolist() == TEXTS["subtitle"]


def test_a_whole_read_of_another_layout_goes_through_zarr(tmp_path):
    store = text_store(tmp_path / "store")
    group = zarr.open_group(tmp_path / "store", mode="r+", zarr_format=3)
    group.create_array("video_id", shape=(N,), dtype=str, chunks=(SHARD,), overwrite=True,
                       chunk_key_encoding={"name": "default", "separator": "."})[:] = np.array(TEXTS["video_id"])
    assert (tmp_path / "store" / "video_id" / "c.1").is_file()  # not the c/<k> files read directly
    assert FeatureStore(tmp_path / "store").read_whole("video_id").tolist() == TEXTS["video_id"]
    np.testing.assert_array_equal(store.read_whole("visual"), store.array("visual")[...])  # sharded
