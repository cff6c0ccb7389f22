"""Store locations (stores.location): folders and object-storage URLs, and obstore against a real
S3 endpoint on 127.0.0.1 (conftest's s3_endpoint: moto's server), as the URL stores will use it."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from stores.location import Location, LocationError


@pytest.mark.parametrize("given, scheme, bucket, key", [
    ("s3://bucket/stores/train", "s3", "bucket", "stores/train"),
    ("s3://bucket/train/", "s3", "bucket", "train"),
    ("gs://bucket/a/b", "gs", "bucket", "a/b"),
    ("az://account/container/stores/val", "az", "account/container", "stores/val"),
])
def test_a_url_names_scheme_bucket_and_key(given, scheme, bucket, key):
    where = Location.parse(given)
    assert (where.scheme, where.bucket, where.key, where.remote) == (scheme, bucket, key, True)
    assert str(where) == f"{scheme}://{bucket}/{key}" and where.child("x").key == f"{key}/x"


def test_a_folder_is_a_path_and_file_urls_are_folders(tmp_path):
    assert Location.parse(tmp_path / "s") == Location("", path=tmp_path / "s")
    assert Location.parse(str(tmp_path / "s")).path == tmp_path / "s"
    assert Location.parse(f"file://{tmp_path}/s").path == tmp_path / "s" and not Location.parse("runs/x").remote
    assert Location.parse(tmp_path).child("train").path == tmp_path / "train"


@pytest.mark.parametrize("given, words", [
    ("http://host/store", "not http://"),
    ("s3://bucket", "needs a key under the bucket"),
    ("s3:///key", "no bucket"),
    ("az://account", "no account/container"),
    ("file://otherhost/x", "names a local path"),
    ("s3://AKIAEXAMPLE:verysecret@bucket/train", "credentials and options do not go in a store's URL"),
    ("s3://bucket/train?token=verysecret", "credentials and options do not go in a store's URL"),
])
def test_a_bad_location_is_named_without_its_secrets(given, words):
    with pytest.raises(LocationError, match=words) as caught:
        Location.parse(given)
    assert "verysecret" not in str(caught.value) and "AKIAEXAMPLE" not in str(caught.value)


def test_obstore_reads_ranges_suffixes_and_multipart_objects_from_the_s3_endpoint(s3_endpoint):
    """What the URL stores need of the server and the client: whole objects under the store's key
    only, coalescable range reads, a suffix range (a shard's index), a multipart upload."""
    import obstore

    url, bucket = s3_endpoint
    objects = Location.parse(f"s3://{bucket}/test_location/store").object_store(endpoint_url=url)
    data = np.random.default_rng(0).integers(0, 256, 300_000, dtype=np.uint8).tobytes()
    obstore.put(objects, "a/c/0/0", data)
    starts, ends = [0, 1000, 1100, 250_000], [1000, 1100, 5000, 300_000]  # neighbours merge into one request
    assert [bytes(r) for r in obstore.get_ranges(objects, "a/c/0/0", starts=starts, ends=ends)] == \
        [data[s:e] for s, e in zip(starts, ends)]
    assert bytes(obstore.get(objects, "a/c/0/0", options={"range": {"suffix": 20}}).bytes()) == data[-20:]
    big = os.urandom(11 * 2**20)  # past one 5 MiB part: a multipart upload
    obstore.put(objects, "big", big, chunk_size=5 * 2**20)
    assert bytes(obstore.get(objects, "big").bytes()) == big
    assert sorted(o["path"] for o in obstore.list(objects).collect()) == ["a/c/0/0", "big"]
    with pytest.raises(FileNotFoundError):
        obstore.get(objects, "missing")


def test_zarr_writes_and_reads_a_sharded_array_at_a_url(s3_endpoint):
    import zarr
    from zarr.storage import ObjectStore

    url, bucket = s3_endpoint
    where = Location.parse(f"s3://{bucket}/test_location/zarr")
    values = np.arange(40, dtype=np.float16).reshape(10, 4)
    array = zarr.create_array(ObjectStore(where.object_store(endpoint_url=url)), name="visual", shape=(10, 4),
                              chunks=(1, 4), shards=(5, 4), dtype="float16")
    array[:] = values
    again = zarr.open_array(ObjectStore(where.object_store(endpoint_url=url), read_only=True), path="visual")
    np.testing.assert_array_equal(again[:], values)


def test_a_folder_location_is_a_local_object_store(tmp_path):
    import obstore

    objects = Location.parse(tmp_path / "store").object_store()
    obstore.put(objects, "x/y", b"hello")
    assert (tmp_path / "store" / "x" / "y").read_bytes() == b"hello"
    with pytest.raises(LocationError, match="for S3-compatible servers"):
        Location.parse("gs://bucket/key").object_store(endpoint_url="http://127.0.0.1:1")
    assert isinstance(Location.parse(Path("x")).path, Path)
