"""HDF5 export / import of a feature store, same arrays and attributes, so that features made
elsewhere (another cluster, another tool) can come in and be verified like our own."""
from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np

from stores.store import FAILED, SCHEMA_VERSION, FeatureSpec, FeatureStore, StoreError, create_store

__all__ = ["export_hdf5", "import_hdf5"]

ATTRS_KEY = "xmei_attrs"  # the store's attributes, as one JSON string
FAILURES_KEY = "xmei_failures"


def export_hdf5(store: FeatureStore, out: Path) -> None:
    """Write every array of ``store`` (one clip per chunk for features) and its attributes."""
    strings = h5py.string_dtype("utf-8")
    with h5py.File(out, "w") as h5:
        h5.attrs[ATTRS_KEY] = json.dumps(store.attrs)
        h5.attrs[FAILURES_KEY] = json.dumps(store.failures())
        for name in [*store.features, "status"]:
            src = store.array(name)
            dst = h5.create_dataset(name, shape=src.shape, dtype=src.dtype,
                                    chunks=(1, *src.shape[1:]) if src.ndim > 1 else None)
            for shard in range(store.num_shards):
                rows = store.shard_range(shard)
                dst[rows.start:rows.stop] = src[rows.start:rows.stop]
        for name in store.texts:
            h5.create_dataset(name, data=np.asarray(store.read_whole(name), dtype=object), dtype=strings)
        for name in store.ints:
            h5.create_dataset(name, data=store.read_whole(name))


def import_hdf5(path: Path, out: Path) -> FeatureStore:
    """Create the store ``out`` from an HDF5 file written by :func:`export_hdf5` (or laid out so)."""
    with h5py.File(path, "r") as h5:
        if ATTRS_KEY not in h5.attrs:
            raise StoreError(f"{path}: no {ATTRS_KEY!r} attribute: not an xmei feature export")
        attrs = json.loads(h5.attrs[ATTRS_KEY])
        if attrs.get("schema_version") != SCHEMA_VERSION:
            raise StoreError(f"{path}: schema version {attrs.get('schema_version')}, this code reads {SCHEMA_VERSION}")
        missing = [k for k in [*attrs["features"], "status", *attrs["texts"], *attrs["ints"]] if k not in h5]
        if missing:
            raise StoreError(f"{path}: missing datasets {missing}")
        features = {k: FeatureSpec(tuple(v["shape"]), v["dtype"]) for k, v in attrs["features"].items()}
        texts = {k: [s.decode() if isinstance(s, bytes) else str(s) for s in h5[k][:]] for k in attrs["texts"]}
        ints = {k: h5[k][...] for k in attrs["ints"]}
        n = int(attrs["num_clips"])
        store = create_store(out, n, int(attrs["shard_size"]), features, texts, ints, attrs,
                             compression=attrs.get("extract", {}).get("compression", "none"))
        failures = {row["video_id"]: row for row in json.loads(h5.attrs.get(FAILURES_KEY, "[]"))}
        for shard in range(store.num_shards):
            rows = store.shard_range(shard)
            arrays = {k: h5[k][rows.start:rows.stop] for k in features}
            status = h5["status"][rows.start:rows.stop]
            failed = [failures[texts["video_id"][i]] for i in rows
                      if status[i - rows.start] == FAILED and texts["video_id"][i] in failures]
            store.write_shard(shard, arrays, status, failed)
    store.write_failures_log()
    return store
