"""Texts and ints of a store, in chunks of one shard's clips: one clip's read without the rest, whole
reads equal to Zarr's, and stores written before (one chunk over all clips) read the same."""
from __future__ import annotations

import numpy as np
import pytest
import zarr

from stores import FeatureStore, StoreError, create_store
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


# every class of character a text may hold (issue 23), one clip each: each reads back byte for byte
EVERY_CLASS = {
    "nul-at-both-ends": "\x00begins and ends with NUL\x00",
    "nul-inside": "mid\x00dle",
    "nuls-only": "\x00\x00\x00",
    "c0-controls": "".join(map(chr, range(1, 32))),
    "del-and-c1-controls": "\x7f" + "".join(map(chr, range(0x80, 0xA0))),
    "combining-marks": "e\u0301 a\u0308\u0323 \u1e9b\u0323 \u0915\u094d\u0937",
    "right-to-left": "\u05e9\u05dc\u05d5\u05dd \u0645\u0631\u062d\u0628\u0627 \u202eabc\u202c \u200f.",
    "astral-plane": "\U0001F600 \U0001F469\u200d\U0001F4BB \U0001D11E \U0010FFFF",
    "line-breaks-and-tabs": "CR\r LF\n CRLF\r\n tab\t VT\x0b FF\x0c NEL\x85 LS\u2028 PS\u2029",
    "specials": "\ufeffBOM \ufffe\uffff \ufffd",
    "20-kB": ("vingt kilo-octets, é \U0001F600 " * 700)[:20000] + "\x00",
    "empty": "",
}
TEXT_CASES = list(EVERY_CLASS.values())


def texts_of_every_class(path) -> FeatureStore:
    """A store of len(EVERY_CLASS) clips in shards of 4, each clip's texts one class; ids of
    combining marks, right-to-left and astral characters but no NUL."""
    n = len(TEXT_CASES)
    texts = {"video_id": [f"clip {i} \u05e9e\u0301\U0001F600\t" for i in range(n)],
             "subtitle": TEXT_CASES, "explanation": TEXT_CASES[::-1]}
    create_store(path, n, SHARD, SPECS, texts, {"label": np.arange(n)}, {})
    return FeatureStore(path)


def assert_texts(store: FeatureStore, expected: FeatureStore) -> None:
    """Every text of ``store`` is the one of ``expected``'s zarr arrays, read every way (a clip, a
    whole array, a shard), of type str and byte for byte."""
    for name in expected.texts:
        written = [str(v) for v in expected.array(name)[...]]
        assert [store[i][name] for i in range(len(store))] == written, name
        assert all(type(store[i][name]) is str for i in range(len(store)))
        assert store.read_whole(name).tolist() == written, name
        assert [v for _, shard in store.iter_shards(names=[name]) for v in shard[name].tolist()] == written, name
        assert [v.encode() for v in written] == [v.encode() for v in store.read_whole(name).tolist()]


def test_texts_of_every_character_class_read_back_byte_for_byte(tmp_path):
    """A NUL at either end, controls, combining marks, right-to-left text, astral characters, line
    breaks, a 20 kB text: as written, through every read and an HDF5 export and import (numpy's
    fixed-width strings, '<U', drop trailing NULs; HDF5 strings end at the first NUL)."""
    import h5py

    from stores import export_hdf5, import_hdf5

    store = texts_of_every_class(tmp_path / "store")
    assert store.array("subtitle")[...].tolist() == TEXT_CASES  # what Zarr holds: the texts themselves
    assert store.array("explanation")[...].tolist() == TEXT_CASES[::-1]
    assert_texts(store, store)
    assert_texts(FeatureStore(tmp_path / "store"), store)  # a fresh reader: nothing kept from the writing
    export_hdf5(store, tmp_path / "out.h5")
    with h5py.File(tmp_path / "out.h5") as h5:
        assert h5["video_id"].dtype.kind == "O" and h5py.check_string_dtype(h5["video_id"].dtype)  # plain strings
        assert not h5py.check_string_dtype(h5["subtitle"].dtype)  # a NUL inside: UTF-8 bytes
    back = import_hdf5(tmp_path / "out.h5", tmp_path / "back")
    for name in store.texts:
        assert back.read_whole(name).tolist() == store.read_whole(name).tolist(), name
    assert_texts(back, store)


def test_a_text_no_utf8_can_hold_is_refused_naming_array_clip_and_character(tmp_path):
    texts = {"video_id": [f"v{i}" for i in range(N)], "subtitle": TEXTS["subtitle"][:6] + ["ok\ud800"] + [""] * 3}
    with pytest.raises(StoreError, match=r"text array 'subtitle', clip 6: character 2 \(counting from 0\) is U\+D800, "
                                         "a lone UTF-16 surrogate"):
        create_store(tmp_path / "store", N, SHARD, SPECS, texts, INTS, {})
    assert list(tmp_path.iterdir()) == []  # no store, no partial folder
