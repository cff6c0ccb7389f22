"""The direct clip reader (stores/reader.py): equal to Zarr on every layout it reads, Zarr itself on
the others, and the same batches in DataLoader workers."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from stores import FAILED, OK, PENDING, FeatureSpec, FeatureStore, StoreError, create_store
from stores.reader import MISSING
from test_data import copy_with_failed
from xmei.data import EpochSampler, StoreSamples, loader

SPECS = {"visual": FeatureSpec((2, 3), "float16"), "audio": FeatureSpec((3,), "float16"),
         "has_audio": FeatureSpec((), "uint8")}


def small_store(path, compression: str = "none") -> FeatureStore:
    """10 clips in shards of 4: shard 0 with a failed clip (1) and a clip without audio (2), shard 1
    never written (pending), shard 2 (2 clips, the last) without audio at all."""
    store = create_store(path, 10, 4, SPECS, {"video_id": [f"v{i}" for i in range(10)]}, {}, {},
                         compression=compression)
    rng = np.random.default_rng(0)
    for shard, n in ((0, 4), (2, 2)):
        arrays = {"visual": rng.standard_normal((n, 2, 3)).astype(np.float16),
                  "audio": rng.standard_normal((n, 3)).astype(np.float16), "has_audio": np.ones(n, np.uint8)}
        status = np.full(n, OK, np.uint8)
        if shard == 0:
            status[1] = FAILED
            arrays["visual"][1] = arrays["audio"][1] = arrays["has_audio"][1] = 0
            arrays["audio"][2] = arrays["has_audio"][2] = 0
        else:
            arrays["audio"][:] = arrays["has_audio"][:] = 0
        store.write_shard(shard, arrays, status, [])
    return store


def assert_reads_equal_zarr(store: FeatureStore, direct: bool) -> None:
    rng = np.random.default_rng(1)
    n = len(store)
    for name in [*store.features, "status"]:
        reader, expected = store.clip_reader(name), store.array(name)[...]
        assert reader.direct == direct, (name, reader.why_not_direct)
        for clips in (np.arange(n), np.arange(n)[::-1], rng.integers(0, n, 3 * n), [n - 1, 0, 1, 2, 2, 3]):
            got, each = reader.read(clips), reader.read_each(clips)
            assert got.dtype == expected.dtype and got.shape == (len(clips), *expected.shape[1:])
            np.testing.assert_array_equal(got, expected[clips], err_msg=name)
            assert len(each) == len(clips) and all(e.flags.writeable for e in each)
            assert all(e.flags.owndata for e in each) or not direct  # each clip its own memory
            np.testing.assert_array_equal(np.stack(each), expected[clips], err_msg=name)


def test_direct_reads_equal_zarr_on_the_patch_store(patch_store):
    store = FeatureStore(patch_store)
    assert_reads_equal_zarr(store, direct=True)
    audio = store.clip_reader("audio")
    # the end of a shard file: (offset, nbytes) uint64 per clip, then a 4-byte checksum
    index = np.frombuffer(audio.shard_file(0).read_bytes()[-(16 * 8 + 4):-4], "<u8").reshape(8, 2)
    assert (index[:, 0] == MISSING).any()  # clips without audio: their all-zero chunks are not written
    with pytest.raises(IndexError, match="clip 24 out of range"):
        audio.read([3, 24])


def test_failed_clips_missing_chunks_and_unwritten_shards_read_as_zeros(tmp_path):
    store = small_store(tmp_path / "store")
    assert store.status().tolist() == [OK, FAILED, OK, OK, *[PENDING] * 4, OK, OK]
    assert not store.clip_reader("visual").shard_file(1).exists()  # a shard never written has no file
    assert_reads_equal_zarr(store, direct=True)
    visual, audio = store.clip_reader("visual").read(range(10)), store.clip_reader("audio").read(range(10))
    assert not visual[[1, 4, 5, 6, 7]].any() and all(visual[i].any() for i in (0, 2, 3, 8, 9))
    assert not audio[[1, 2, 4, 5, 6, 7, 8, 9]].any() and audio[[0, 3]].any()


def test_a_compressed_store_is_read_through_zarr(tmp_path):
    store = small_store(tmp_path / "zstd", compression="zstd")
    assert "uncompressed" in store.clip_reader("visual").why_not_direct
    assert_reads_equal_zarr(store, direct=False)


def test_a_damaged_index_names_the_array_and_the_shard_file(tmp_path):
    small_store(tmp_path / "store")
    shard = tmp_path / "store" / "visual" / "c" / "2" / "0" / "0"
    data = bytearray(shard.read_bytes())
    data[-10] ^= 0xFF  # inside the index, before its checksum
    shard.write_bytes(bytes(data))
    reader = FeatureStore(tmp_path / "store").clip_reader("visual")
    reader.read([0, 1])  # shard 0 is sound
    with pytest.raises(StoreError, match=r"visual: the index of shard file .*visual/c/2/0/0 is damaged"):
        reader.read([0, 9])


def test_a_rewritten_shard_is_read_anew(tmp_path):
    store = small_store(tmp_path / "store")
    reader = store.clip_reader("visual")
    before = reader.read([8, 9])
    arrays = {name: np.full((2, *spec.shape), 3, spec.dtype) for name, spec in SPECS.items()}
    store.write_shard(2, arrays, np.full(2, OK, np.uint8), [])  # the cached index is out of date
    after = reader.read([8, 9])
    assert (after == 3).all() and not (before == 3).all()


def stack_features(samples: list[dict]) -> dict[str, torch.Tensor]:
    return {k: torch.stack([torch.as_tensor(s[k]) for s in samples]) for k in ("video", "audio", "has_audio")}


def test_dataloader_workers_give_the_batches_read_in_process(patch_store, tmp_path):
    copy = copy_with_failed(patch_store, tmp_path, [3, 17])
    data = StoreSamples([copy, patch_store])
    plan = [list(b) for b in np.array_split(EpochSampler(data, seed=5, shuffle_shards=2).order(0), 9)]
    plan.append([len(data) - 1, 0, 24, 25, 26])  # both stores in one batch, one run of clips
    batches = {}
    for workers in (0, 2):
        batches[workers] = list(loader(data, plan, stack_features, num_workers=workers))
    assert len(batches[0]) == len(plan)
    for a, b, positions in zip(batches[0], batches[2], plan):
        for key in a:
            assert torch.equal(a[key], b[key]), key
        stores = [FeatureStore(copy), FeatureStore(patch_store)]
        expected = [stores[s].array("visual")[c] for s, c in zip(data.store_ids[positions], data.clips[positions])]
        np.testing.assert_array_equal(a["video"].numpy(), np.stack(expected))
