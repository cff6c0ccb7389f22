"""HDF5 export / import of a feature store, same arrays and attributes, so that features made
elsewhere (another cluster, another tool) can come in and be verified like our own. Texts go
out as vlen UTF-8 strings, but a text array holding a NUL (which HDF5 strings end at) goes out as
each text's UTF-8 bytes: every text comes back byte for byte.

Both write beside their target (``OUT.partial-<pid>``) and rename into place when whole: a failed
export leaves no half-written file (an existing one is replaced only when asked, and only by a
whole export), a failed import no half-filled store. Both refuse to start when the target's
filesystem has less room than the features take uncompressed, and a disk that fills on the way is
a DiskFullError naming the filesystem (:func:`xmei.errors.writing`). A store in object storage
(stores.location) is exported from as from a folder; an import into one is made whole in a local
temporary folder, then uploaded in the order a creation writes (stores.store.copy_store): the
temporary folder's filesystem needs the room."""
from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import h5py
import numpy as np

from stores.location import Location
from stores.store import (FAILED, PARTIAL, FeatureSpec, FeatureStore, StoreError, check_attributes, clip_bytes,
                          copy_store, create_store, remove_dead_partials, store_exists)
from xmei.errors import check_space, writing

__all__ = ["export_hdf5", "import_hdf5"]

ATTRS_KEY = "xmei_attrs"  # the store's attributes, as one JSON string
FAILURES_KEY = "xmei_failures"
ENCODING_KEY, UTF8_BYTES = "xmei_encoding", "utf-8 bytes"  # a text dataset of each text's UTF-8 bytes (see _write_texts)


def export_hdf5(store: FeatureStore, out: Path, overwrite: bool = False) -> None:
    """Write every array of ``store`` (one clip per chunk for features) and its attributes to
    ``out``; an existing ``out`` is a StoreError unless ``overwrite``."""
    out = Path(out)
    if out.is_dir():
        raise StoreError(f"{out} is a folder: give the HDF5 file to write")
    if out.exists() and not overwrite:
        raise StoreError(f"{out} exists already: choose another file, or pass --overwrite to replace it")
    if not out.parent.is_dir():
        raise StoreError(f"{out.parent} does not exist: no folder to write {out.name} into")
    kept = f"the earlier {out.name} is as it was" if out.exists() else "nothing of it is kept"
    what = f"the HDF5 export of {store.where}"
    check_space(out, len(store) * clip_bytes(store.attrs["features"]), f"{what}, its features", kept)
    partial = out.with_name(f"{out.name}{PARTIAL}{os.getpid()}")
    try:
        with writing(partial, f"{what}, renamed to {out.name} once whole", kept):
            _apart(store.where, partial)
        os.replace(partial, out)
    finally:
        partial.unlink(missing_ok=True)


def _apart(store_path: str, out: Path) -> None:
    """:func:`_write_hdf5` in a fresh process, its exception raised here. HDF5 that met a full disk
    cannot close its file, and h5py then crashes the process that holds it (a segfault, at once or
    when the file's objects are freed): the child sends its error back and exits without freeing
    them. What it prints (h5py's complaints about the objects it could not close) is not shown."""
    child = subprocess.run([sys.executable, "-c", "from stores.hdf5 import _child; _child()", str(store_path),
                            str(out)], capture_output=True)
    if child.returncode == 0:
        return
    try:
        error = pickle.loads(child.stdout)
    except Exception:  # noqa: BLE001 - it died before it could say why
        error = RuntimeError(f"the process writing {out} ended with status {child.returncode}: "
                             f"{child.stderr.decode(errors='replace')[-2000:]}")
    raise error


def _child() -> None:
    """The child of :func:`_apart` (argv: STORE OUT): its error goes pickled to its stdout, which
    nothing else writes to (it is sent to stderr)."""
    result = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    try:
        _write_hdf5(sys.argv[1], Path(sys.argv[2]))
    except BaseException as err:  # noqa: BLE001 - every error goes to the parent
        try:
            result.write(pickle.dumps(err))
        except Exception:  # noqa: BLE001 - an exception that does not pickle
            result.write(pickle.dumps(RuntimeError(f"{type(err).__name__}: {err}")))
        result.flush()
        os._exit(1)  # nothing freed, closed or flushed: see _apart


def _write_hdf5(store_path: str, out: Path) -> None:
    """The export of the store at ``store_path`` into the new HDF5 file ``out``."""
    store = FeatureStore(store_path)
    with h5py.File(out, "w") as h5:
        h5.attrs[ATTRS_KEY] = json.dumps(store.attrs)
        h5.attrs[FAILURES_KEY] = json.dumps(store.failures())
        for name in [*store.features, "status"]:
            src = store.clip_reader(name)  # every clip's checksum checked on the way
            dst = h5.create_dataset(name, shape=(len(store), *src.clip_shape), dtype=src.dtype.newbyteorder("="),
                                    chunks=(1, *src.clip_shape) if src.clip_shape else None)
            for shard in range(store.num_shards):
                rows = store.shard_range(shard)
                dst[rows.start:rows.stop] = src.read(np.arange(rows.start, rows.stop))
        for name in store.texts:
            _write_texts(h5, name, store.read_whole(name).tolist())
        for name in store.ints:
            h5.create_dataset(name, data=store.read_whole(name))


def _write_texts(h5: h5py.File, name: str, texts: list[str]) -> None:
    """The text dataset ``name``: vlen UTF-8 strings, which every HDF5 reader takes, unless a text
    holds NUL, which HDF5 strings cannot (they end at the first); then each text's UTF-8 bytes
    (vlen uint8), the dataset's ENCODING_KEY attribute saying so."""
    if not any("\x00" in text for text in texts):
        h5.create_dataset(name, data=np.array(texts, dtype=object), dtype=h5py.string_dtype("utf-8"))
        return
    data = np.empty(len(texts), dtype=object)  # (N,) of uint8 arrays
    data[:] = [np.frombuffer(text.encode(), np.uint8) for text in texts]
    h5.create_dataset(name, data=data, dtype=h5py.vlen_dtype(np.uint8)).attrs[ENCODING_KEY] = UTF8_BYTES


def _read_texts(h5: h5py.File, name: str, path: Path) -> list[str]:
    """The texts of dataset ``name``, as :func:`_write_texts` writes them (or as fixed-width or
    vlen strings of another tool); a text that is not UTF-8 is a StoreError naming the dataset and row."""
    dataset = h5[name]
    as_bytes = dataset.attrs.get(ENCODING_KEY) == UTF8_BYTES
    texts = []
    for row, value in enumerate(dataset[:]):
        try:
            texts.append(bytes(value).decode() if as_bytes or isinstance(value, bytes) else str(value))
        except UnicodeDecodeError as err:
            raise StoreError(f"{path}: dataset {name!r}, row {row}: not UTF-8 text ({err.reason} at byte "
                             f"{err.start}), damaged") from None
    return texts


def import_hdf5(path: Path, out: str | Path) -> FeatureStore:
    """Create the store ``out`` (a folder or a URL) from an HDF5 file written by :func:`export_hdf5`
    (or laid out so); a file that is not such an export, or is damaged, is a StoreError naming it."""
    where = Location.parse(out)
    if where.remote:
        if store_exists(where):
            raise StoreError(f"{where} exists already: choose another store")
        with tempfile.TemporaryDirectory(prefix="xmei-import-") as staging:
            return copy_store(import_hdf5(path, Path(staging) / where.name).path, where)
    path, out = Path(path), where.path
    if not path.is_file():
        raise StoreError(f"{path} {'is a folder' if path.is_dir() else 'does not exist'}: give an HDF5 file")
    if out.exists():
        raise StoreError(f"{out} exists already: choose another store folder")
    if not h5py.is_hdf5(path):
        raise StoreError(f"{path} is not an HDF5 file")
    remove_dead_partials(out)
    partial = out.with_name(f"{out.name}{PARTIAL}{os.getpid()}")
    try:
        with writing(partial, f"the store imported from {path}, renamed to {out.name} once whole",
                     "nothing of it is kept"), h5py.File(path, "r") as h5:
            _import(h5, path, partial)
            FeatureStore(partial, mode="r+").write_failures_log()
        os.rename(partial, out)
    except (OSError, RuntimeError, KeyError) as err:  # h5py's errors of a damaged file
        if isinstance(err, OSError) and err.errno is not None:  # the system's (a write that failed)
            raise
        raise StoreError(f"{path} cannot be read whole, damaged ({type(err).__name__}: {err})") from err
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return FeatureStore(out)


def _import(h5: h5py.File, path: Path, out: Path) -> None:
    if ATTRS_KEY not in h5.attrs:
        raise StoreError(f"{path}: no {ATTRS_KEY!r} attribute: not an xmei feature export")
    try:
        attrs = json.loads(h5.attrs[ATTRS_KEY])
        failures = {row["video_id"]: row for row in json.loads(h5.attrs.get(FAILURES_KEY, "[]"))}
    except (json.JSONDecodeError, TypeError, KeyError) as err:
        raise StoreError(f"{path}: attribute {ATTRS_KEY!r} or {FAILURES_KEY!r} is not what an export writes "
                         f"({type(err).__name__}: {err}), damaged") from err
    if not isinstance(attrs, dict):
        raise StoreError(f"{path}: attribute {ATTRS_KEY!r} is not a JSON object, damaged")
    check_attributes(attrs, f"{path} ({ATTRS_KEY})")
    n = int(attrs["num_clips"])
    features = {k: FeatureSpec(tuple(v["shape"]), v["dtype"]) for k, v in attrs["features"].items()}
    expected = {**{k: (n, *v.shape) for k, v in features.items()}, "status": (n,),
                **{k: (n,) for k in attrs["texts"]}}
    missing = [k for k in [*expected, *attrs["ints"]] if k not in h5]
    if missing:
        raise StoreError(f"{path}: missing datasets {missing}")
    wrong = [f"{k} {h5[k].shape} (expected {shape})" for k, shape in expected.items() if h5[k].shape != shape]
    wrong += [f"{k} {h5[k].shape} (expected {n} rows)" for k in attrs["ints"] if h5[k].shape[:1] != (n,)]
    if wrong:
        raise StoreError(f"{path}: datasets of the wrong shape: {', '.join(wrong)}")
    texts = {k: _read_texts(h5, k, path) for k in attrs["texts"]}
    ints = {k: h5[k][...] for k in attrs["ints"]}
    check_space(out, n * clip_bytes(attrs["features"]), f"the store imported from {path}, its features")
    store = create_store(out, n, int(attrs["shard_size"]), features, texts, ints, attrs,
                         compression=attrs.get("extract", {}).get("compression", "none"))
    for shard in range(store.num_shards):
        rows = store.shard_range(shard)
        arrays = {k: h5[k][rows.start:rows.stop] for k in features}
        status = h5["status"][rows.start:rows.stop]
        failed = [failures[texts["video_id"][i]] for i in rows
                  if status[i - rows.start] == FAILED and texts["video_id"][i] in failures]
        store.write_shard(shard, arrays, status, failed)
