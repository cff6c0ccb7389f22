"""The feature store: one Zarr v3 group per split.

Layout (N clips, S clips per shard):

    STORE/zarr.json                 group attributes: schema version, encoders, extraction config, labels,
                                    compute_dtype (the encoders' dtype on every worker: bfloat16 | float16 |
                                    float32; absent in stores made before it was kept)
    STORE/<feature>/                float16 features (N, ...): one clip per inner chunk, S clips per shard
    STORE/<feature>/c/<k>/0/.../0   shard k's file: its clips' bytes (each checksummed), their index (stores/reader.py)
    STORE/status/                   uint8 (N,): 0 pending, 1 ok, 2 failed; sharded like the features
    STORE/<text>/                   strings (N,), S clips per chunk: ids, subtitles, labels, descriptions, reasons...
                                    (vlen-utf8: each text byte for byte, NUL and control characters included)
    STORE/<text>/c/<k>              chunk k: the strings of shard k's clips (zstd), so one clip's text is read alone
    STORE/<ints>/                   int32 (N, ...), S clips per chunk, as texts: caption ids and masks, label indexes
    STORE/failures/shard_00003.json the failed clips of a shard (video_id, stage, reason)
    STORE/failures.jsonl            all of them, one JSON a line (rebuilt by the writer at the end of a run)

The store is created whole in ``STORE.partial-<pid>`` beside it and renamed into place once its
arrays, texts, ints and attributes are written, so ``STORE`` never exists half-made; a partial
folder left by a killed creation is removed by the next one. In object storage (``s3://``
``gs://`` ``az://``, stores.location), which has no rename, the store's attributes are what is
written last: Zarr writes the root ``zarr.json`` first with none, and it gets them once everything
else is written. A store whose root has no attributes is refused as cut off, and the next creation
deletes its objects and starts again (the caller holds the store's lock, xmei.runlock). Texts and
ints are written once, then. Features are written a whole shard at a time by whoever extracts that shard, and its
``status`` last: a shard whose status is not all done is redone on the next run, so the workers of
a run need no lock between them and a killed run resumes cleanly (Zarr's local store writes each
file atomically). Two runs into one store are kept apart by `xmei extract`'s lock (xmei.runlock).
A full disk while the store is created or a shard written is a DiskFullError naming the
filesystem (:func:`xmei.errors.writing`): nothing of a store being created is kept, and a shard
whose status was not written stays pending.

Texts and ints in chunks of S clips, not one chunk over all N, so that ``store[i]`` in a DataLoader
worker decodes S strings, not a million (at 1M clips, ~3 ms for a text and an int array, not ~0.7 s).
The cost is in whole reads: Zarr spends 0.2-0.4 ms on each chunk, 3-6 s for 1M strings in chunks of
64 against ~0.5 s in one chunk, so :meth:`FeatureStore.read_whole` reads the chunk files itself
(~0.9 s). Stores written before (one chunk over all clips, same schema version) read the same.
"""
from __future__ import annotations

import json
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

import numpy as np
import zarr
from numcodecs import VLenUTF8, Zstd
from zarr.codecs import Crc32cCodec, ZstdCodec

from stores.files import FolderFiles, ObjectFiles, store_files
from stores.location import Location
from xmei.errors import UserError, writing

if TYPE_CHECKING:
    from stores.reader import ClipReader

__all__ = ["FAILED", "OK", "PENDING", "PARTIAL", "SCHEMA_VERSION", "FeatureStore", "StoreError", "clip_bytes",
           "copy_store", "create_store", "remove_dead_partials", "store_exists", "unstorable"]

SCHEMA_VERSION = 1
PENDING, OK, FAILED = 0, 1, 2
STATUS_NAMES = {PENDING: "pending", OK: "ok", FAILED: "failed"}


class StoreError(UserError, ValueError):
    """A store that is missing, of another schema, inconsistent or damaged; the message names the
    file and, where there is one, the array, shard and clips."""


# Zarr errors of a file that does not decode: a checksum that does not match (ValueError), zstd
# that does not decompress (RuntimeError), a file that cannot be read (OSError)
DECODE_ERRORS = (ValueError, RuntimeError, OSError)
REWRITE_LOG = "rerun xmei extract to rewrite the log"  # failures.jsonl is rebuilt from the shards' files

# A clip without audio has all-zero audio features, window lengths and flag, and Zarr writes no
# chunk equal to the fill value: a shard none of whose clips has audio has no file in these arrays.
AUDIO_ARRAYS = ("audio", "audio_lengths", "has_audio")


@dataclass(frozen=True)
class FeatureSpec:
    """A per-clip feature array: shape of one clip and dtype."""

    shape: tuple[int, ...]
    dtype: str


INDEX_BYTES = 16  # a clip's entry in each shard file's index (offset, length)


def clip_bytes(features: dict[str, dict[str, Any]]) -> int:
    """Bytes one clip takes on disk, uncompressed: its features (``features``: the store's attribute,
    {name: {"shape": [...], "dtype": "float16"}}) and status, each with its index entry."""
    return sum(int(np.prod(spec["shape"])) * np.dtype(spec["dtype"]).itemsize + INDEX_BYTES
               for spec in [*features.values(), {"shape": [], "dtype": "uint8"}])


def create_store(path: str | Path | Location, n: int, shard_size: int, features: dict[str, FeatureSpec],
                 texts: dict[str, list[str]], ints: dict[str, np.ndarray], attrs: dict[str, Any],
                 compression: str = "none") -> "FeatureStore":
    """Create an empty store for ``n`` clips (all pending) holding ``texts`` and ``ints``.

    In a folder it is built in ``PATH.partial-<pid>`` and renamed to ``path`` when complete (same
    parent, so the rename is atomic): a kill leaves no half-made store, only a partial folder that
    the next creation removes. At a URL its attributes are written last (module docstring)."""
    files = store_files(path)
    if isinstance(files, ObjectFiles):
        return _create_objects(files, n, shard_size, features, texts, ints, attrs, compression)
    _made_whole(files.root, f"the store {files.root}, made whole here before it is renamed into place",
                lambda partial: _write_store(partial, n, shard_size, features, texts, ints, attrs, compression))
    return FeatureStore(files.root, mode="r+")


PARTIAL = ".partial-"  # PATH.partial-<pid>: a store being created by process <pid>


def _made_whole(path: Path, what: str, write: Callable[[FolderFiles], None]) -> None:
    """A store ``write``-n into ``PATH.partial-<pid>`` (``what`` it is: a full disk's message names
    it), then renamed to ``path`` (same parent: atomic). A kill leaves only the partial folder,
    which the next one removes; an error removes it."""
    if path.exists():
        raise StoreError(f"{path} exists already")
    remove_dead_partials(path)
    partial = path.with_name(f"{path.name}{PARTIAL}{os.getpid()}")
    try:
        with writing(partial, what, "nothing of it is kept"):
            write(FolderFiles(partial))
        os.rename(partial, path)  # fails if another process created ``path`` meanwhile
    except BaseException as err:
        shutil.rmtree(partial, ignore_errors=True)
        if isinstance(err, OSError) and path.exists():
            raise StoreError(f"{path} was created by another process meanwhile") from err
        raise
COPIES = 4  # files a store copy streams at once (a shard file may be 270 MB: a few in memory at most)


def _create_objects(files: ObjectFiles, n: int, shard_size: int, features: dict[str, FeatureSpec],
                    texts: dict[str, list[str]], ints: dict[str, np.ndarray], attrs: dict[str, Any],
                    compression: str) -> "FeatureStore":
    """create_store at a URL."""
    _make_room(files)
    try:
        _write_store(files, n, shard_size, features, texts, ints, attrs, compression)
    except BaseException:
        files.remove_all()
        raise
    return FeatureStore(files.location, mode="r+")


def copy_store(source: str | Path | Location, dest: str | Path | Location,
               progress: Callable[[int, int], None] | None = None) -> "FeatureStore":
    """The whole store at ``source`` copied to ``dest`` (nothing there yet; for a URL, or what a
    cut-off creation left), between a folder and object storage either way, file by file, each
    streamed. Into a folder through ``DEST.partial-<pid>``, renamed into place when whole; to a URL
    in the order a creation writes: the root zarr.json without attributes first, the other files
    (COPIES at a time), then the root as it is. ``progress(bytes, total)`` after each file."""
    store, target = FeatureStore(source), store_files(dest)
    sizes = store.files.sizes()
    keys = [k for k in sorted(sizes) if k != "zarr.json" and PARTIAL not in k]  # not a write_whole left by a kill
    total = sum(sizes[k] for k in keys) + sizes["zarr.json"]

    def copy_all(files: FolderFiles | ObjectFiles, keys: list[str], done: int = 0) -> int:
        with ThreadPoolExecutor(COPIES) as pool:
            for key in pool.map(lambda key: files.put(key, store.files) or key, keys):
                done += sizes[key]
                if progress:
                    progress(done, total)
        return done

    if isinstance(target, ObjectFiles):
        _make_room(target)
        meta = store.files.json("zarr.json", "the store's attributes", StoreError)
        target.write("zarr.json", json.dumps({**meta, "attributes": {}}), "the store's root, without its attributes")
        try:
            copy_all(target, ["zarr.json"], copy_all(target, keys))  # the root's attributes last: now it is whole
        except BaseException:
            target.remove_all()
            raise
        return FeatureStore(target.location)
    _made_whole(target.root, f"the copy of {store.where}, renamed to {target.root.name} once whole",
                lambda partial: copy_all(partial, [*keys, "zarr.json"]))
    return FeatureStore(target.root)


def store_exists(where: str | Path | Location) -> bool:
    """Whether a store is at ``where`` for a run to resume: a folder that exists (whatever it holds:
    opening it says what is wrong), or a URL with a root zarr.json not cut off (module docstring)."""
    files = store_files(where)
    if not files.remote:
        return files.root.exists()
    return files.exists("zarr.json") and not _cut_off(files)


def _make_room(files: ObjectFiles) -> None:
    """Before a store is created at a URL: what a cut-off creation left is deleted; a store there
    or objects that are no store's are never touched (a StoreError)."""
    if files.exists("zarr.json"):
        if not _cut_off(files):
            raise StoreError(f"{files.where} exists already")
        files.remove_all()  # a creation cut off before its attributes: nothing of it is a store yet
    elif files.exists():
        raise StoreError(f"{files.where} holds objects but no zarr.json: not a feature store; choose another place")


def _cut_off(files: FolderFiles | ObjectFiles) -> bool:
    """Whether the store's root zarr.json is that of a creation cut off before its attributes
    (a Zarr group without any: they are written last)."""
    return _lacks_attributes(files.json("zarr.json", "the store's attributes", StoreError))


def _lacks_attributes(meta: dict) -> bool:
    """Whether a root zarr.json is a Zarr group's without attributes (a creation cut off before them)."""
    return meta.get("node_type") == "group" and not meta.get("attributes")


def remove_dead_partials(path: Path) -> None:
    """Remove ``PATH.partial-<pid>`` folders (or files) whose process is gone (a write that was killed)."""
    if not path.parent.is_dir():
        return
    for folder in path.parent.iterdir():
        pid = folder.name[len(path.name) + len(PARTIAL):]
        if not (folder.name.startswith(path.name + PARTIAL) and pid.isdigit()) or _alive(int(pid)):
            continue
        if folder.is_dir():
            shutil.rmtree(folder, ignore_errors=True)
        else:
            folder.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # ours, from an earlier create_store that died in this process
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def _write_store(files: FolderFiles | ObjectFiles, n: int, shard_size: int, features: dict[str, FeatureSpec],
                 texts: dict[str, list[str]], ints: dict[str, np.ndarray], attrs: dict[str, Any],
                 compression: str) -> None:
    """The store's arrays, texts and ints, its attributes last (the root's zarr.json is written
    again with them)."""
    group = zarr.open_group(files.zarr_store(read_only=False), mode="w-", zarr_format=3)
    # every clip's bytes carry a checksum (crc32c, or zstd's own), as each shard's index does: a
    # damaged file is an error when it is read, never other features
    compressors = [ZstdCodec(level=1, checksum=True)] if compression == "zstd" else [Crc32cCodec()]
    checked = ZstdCodec(level=0, checksum=True)  # texts and ints: zstd with its checksum
    shard = min(shard_size, n)
    for name, spec in {**features, "status": FeatureSpec((), "uint8")}.items():
        group.create_array(name, shape=(n, *spec.shape), dtype=spec.dtype, chunks=(1, *spec.shape),
                           shards=(shard, *spec.shape), compressors=compressors, fill_value=0)
    for name, values in texts.items():
        if len(values) != n:
            raise StoreError(f"text array {name!r} has {len(values)} values for {n} clips")
        array = group.create_array(name, shape=(n,), dtype=str, chunks=(shard,), compressors=checked)
        try:  # Python strings as they are: numpy's fixed-width '<U' (dtype=str) drops trailing NULs
            array[:] = np.array(values, dtype=object)
        except UnicodeEncodeError:
            clip, problem = next((i, p) for i, p in enumerate(map(unstorable, values)) if p)
            raise StoreError(f"text array {name!r}, clip {clip}: {problem}") from None
    for name, values in ints.items():
        array = group.create_array(name, shape=values.shape, dtype="int32", chunks=(shard, *values.shape[1:]),
                                   compressors=checked)
        array[...] = values.astype(np.int32)
    group.attrs.update({**attrs, "schema_version": SCHEMA_VERSION, "num_clips": n, "shard_size": shard,
                        "features": {k: {"shape": list(v.shape), "dtype": v.dtype} for k, v in features.items()},
                        "texts": list(texts), "ints": list(ints)})


def unstorable(text: str) -> str | None:
    """Why ``text`` cannot be kept exactly (a store keeps texts as UTF-8, which holds every
    character but the halves of UTF-16 surrogate pairs: a JSON "\\ud800" escape alone), naming
    the first such character and its position; None when it can."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        return (f"character {err.start} (counting from 0) is U+{ord(text[err.start]):04X}, a lone UTF-16 surrogate, "
                "which no UTF-8 text can hold")
    return None


STORE_ATTRIBUTES = {"num_clips": int, "shard_size": int, "features": dict, "texts": list, "ints": list}


def _store_attributes(files: FolderFiles | ObjectFiles) -> dict[str, Any]:
    """The attributes in the store's zarr.json, checked: schema version, and the keys this code reads."""
    meta_path = files.name("zarr.json")
    meta = files.json("zarr.json", "the store's attributes", StoreError)
    if files.remote and _lacks_attributes(meta):
        raise StoreError(f"{files.where} was cut off while being created (its attributes, written last, are "
                         "missing): run the same xmei extract again to create it")
    if meta.get("zarr_format") != 3 or meta.get("node_type") != "group" or not isinstance(meta.get("attributes"), dict):
        raise StoreError(f"{meta_path}: not the attributes of a Zarr v3 group (zarr_format "
                         f"{meta.get('zarr_format')!r}, node_type {meta.get('node_type')!r}), damaged")
    return check_attributes(meta["attributes"], str(meta_path))


def check_attributes(attrs: dict[str, Any], where: str) -> dict[str, Any]:
    """``attrs`` (a store's attributes, from ``where``) when of this schema version and holding the
    keys this code reads; else a StoreError naming ``where`` and the key."""
    version = attrs.get("schema_version")
    if version != SCHEMA_VERSION:
        raise StoreError(f"{where}: schema version {version}, this code reads {SCHEMA_VERSION}")
    for key, kind in STORE_ATTRIBUTES.items():
        if key not in attrs:
            raise StoreError(f"{where}: the store's attribute {key!r} is missing, damaged")
        value = attrs[key]
        if not isinstance(value, kind) or isinstance(value, bool):
            raise StoreError(f"{where}: the store's attribute {key!r} is {value!r}, expected a {kind.__name__}")
    if attrs["shard_size"] < 1 or attrs["num_clips"] < 0:
        raise StoreError(f"{where}: shard_size {attrs['shard_size']}, num_clips {attrs['num_clips']}: expected "
                         "at least 1 clip per shard and 0 clips or more")
    for name, spec in attrs["features"].items():
        if not (isinstance(spec, dict) and isinstance(spec.get("shape"), list) and isinstance(spec.get("dtype"), str)):
            raise StoreError(f"{where}: features.{name} is {spec!r}, expected {{'shape': [...], 'dtype': '...'}}")
    return attrs


def _plain_chunks(meta: dict) -> bool:
    """Whether ``meta`` (an array's zarr.json) is a text or int32 array as :func:`create_store` makes
    it: a regular grid of whole rows, default '/' chunk keys, then vlen-utf8 or little-endian
    bytes, and zstd or nothing."""
    serializer = {"string": {"name": "vlen-utf8", "configuration": {}},
                  "int32": {"name": "bytes", "configuration": {"endian": "little"}}}.get(meta.get("data_type"))
    codecs = meta.get("codecs", [])
    grid = meta.get("chunk_grid", {})
    return (meta.get("zarr_format") == 3 and serializer is not None and grid.get("name") == "regular"
            and grid["configuration"]["chunk_shape"][1:] == meta["shape"][1:]
            and meta.get("chunk_key_encoding") == {"name": "default", "configuration": {"separator": "/"}}
            and not meta.get("storage_transformers") and codecs[:1] == [serializer]
            and all(c.get("name") == "zstd" for c in codecs[1:]) and len(codecs) <= 2)


class FeatureStore:
    """Reader (and shard writer) of a feature store.

        store = FeatureStore("stores/train")
        len(store); store.attrs["encoders"]
        clip = store[0]                      # dict: feature arrays, texts and ints of clip 0
        ids = store.read_whole("video_id")   # (N,) strings: every clip's, a chunk file at a time
        visual = store.clip_reader("visual").read([5, 2])   # (2, *clip shape), straight from the shard files
        for index, shard in store.iter_shards():   # dict of arrays over one shard, read sequentially
            ...

    A damaged store is a :class:`StoreError` naming the file (and the array, shard and clips): on
    opening for the store's zarr.json, on first use for an array's, on reading for a shard or chunk
    file; :meth:`check_files` finds missing and damaged shard files without decoding a clip.
    """

    def __init__(self, path: str | Path | Location, mode: str = "r"):
        self.files = store_files(path)
        self.where = self.files.where  # what messages name: the folder, or the URL
        self.path: Path | None = None if self.files.remote else self.files.root  # a local store's folder
        if not self.files.exists("zarr.json"):
            raise StoreError(f"{self.where} is not a feature store (a folder or URL xmei extract makes): "
                             f"{self._not_a_store()}")
        self.attrs: dict[str, Any] = _store_attributes(self.files)
        try:
            self.group = zarr.open_group(self.files.zarr_store(read_only=mode == "r"), mode=mode, zarr_format=3)
        except (ValueError, TypeError, KeyError) as err:
            raise StoreError(f"{self.files.name('zarr.json')}: not a readable Zarr group ({err}), damaged") from err
        self.features: list[str] = list(self.attrs["features"])
        self.texts: list[str] = list(self.attrs["texts"])
        self.ints: list[str] = list(self.attrs["ints"])
        self.shard_size: int = int(self.attrs["shard_size"])
        self._arrays: dict[str, zarr.Array] = {}  # opening an array reads its zarr.json: once is enough
        self._readers: dict[str, ClipReader] = {}
        self._whole: dict[str, np.ndarray] = {}  # texts and ints of an old store (one chunk over all clips)

    def _not_a_store(self) -> str:
        """What is at the store's place instead of a store."""
        if self.files.remote:
            return "no object there" if not self.files.exists() else "objects but no zarr.json"
        path = self.path
        return ("it does not exist" if not path.exists() else "a file, not a folder" if not path.is_dir()
                else "an empty folder" if not any(path.iterdir()) else "a folder without zarr.json")

    def __len__(self) -> int:
        return int(self.attrs["num_clips"])

    @property
    def num_shards(self) -> int:
        return -(-len(self) // self.shard_size)

    def shard_range(self, shard: int) -> range:
        return range(shard * self.shard_size, min((shard + 1) * self.shard_size, len(self)))

    def array(self, name: str) -> zarr.Array:
        """Array ``name``, its zarr.json read and checked once."""
        if name not in self._arrays:
            meta_path = self.files.name(f"{name}/zarr.json")
            what = f"the metadata of array {name!r}"
            meta = self.files.json(f"{name}/zarr.json", what, StoreError)
            if meta.get("zarr_format") != 3 or meta.get("node_type") != "array":
                raise StoreError(f"{meta_path}: not a Zarr v3 array (zarr_format {meta.get('zarr_format')!r}, "
                                 f"node_type {meta.get('node_type')!r}): {what}, damaged")
            try:
                self._arrays[name] = self.group[name]
            except (ValueError, TypeError, KeyError) as err:
                raise StoreError(f"{meta_path}: {what}, damaged ({type(err).__name__}: {err})") from err
        return self._arrays[name]

    def clip_reader(self, name: str) -> ClipReader:
        """Whole clips of a per-clip array (features, ``status``): see :mod:`stores.reader`."""
        from stores.reader import ClipReader  # it imports StoreError from here

        if name not in self._readers:
            if name not in (*self.features, "status"):
                raise StoreError(f"{self.where}: no per-clip array {name!r} (features: {self.features})")
            self._readers[name] = ClipReader.of(self.array(name), self.files, name)
        return self._readers[name]

    def status(self) -> np.ndarray:
        """(N,) uint8: PENDING / OK / FAILED per clip (read directly: Zarr takes ~a minute at 1M clips)."""
        return self.clip_reader("status").read(np.arange(len(self)))

    def read_whole(self, name: str) -> np.ndarray:
        """(N, ...): every row of a text or int array, its chunk files read and decoded here (with
        numcodecs, as Zarr does) when the array is laid out as :func:`create_store` makes it; any
        other layout through Zarr. ~0.9 s for 1M strings in chunks of 64, where Zarr takes 3-6 s."""
        array = self.array(name)
        meta = self.files.json(f"{name}/zarr.json", f"the metadata of array {name!r}", StoreError)
        if not _plain_chunks(meta):
            return self._zarr_rows(name, slice(None))
        decompress = Zstd().decode if len(meta["codecs"]) == 2 else bytes
        decode = VLenUTF8().decode if meta["data_type"] == "string" else lambda raw: np.frombuffer(raw, "<i4")
        out = np.full(array.shape, array.fill_value, array.dtype)
        rows = array.chunks[0]
        starts = range(0, len(out), rows)
        # chunk (k, 0, ..., 0); a chunk all fill value is not written. Objects are fetched concurrently
        raws = self.files.read_many(self._chunk_key(name, k) for k in range(len(starts)))
        for k, (start, raw) in enumerate(zip(starts, raws)):
            path = self.files.name(self._chunk_key(name, k))
            if raw is None:
                continue
            if isinstance(raw, OSError):
                raise StoreError(f"{name}: chunk file {path} (clips {start}-{start + rows - 1}) cannot be read: {raw}")
            stop = min(start + rows, len(out))
            try:
                out[start:stop] = decode(decompress(raw)).reshape(array.chunks)[:stop - start]  # a last chunk is whole
            except (ValueError, RuntimeError, TypeError) as err:
                raise StoreError(f"{name}: chunk file {path} (clips {start}-{stop - 1}) does not decode, "
                                 f"damaged: {err}") from err
        return out

    def _chunk_key(self, name: str, k: int) -> str:
        """The key of chunk (k, 0, ..., 0) of a text or int array (rows k*S ... k*S + S-1)."""
        return "/".join([name, "c", str(k), *["0"] * (self.array(name).ndim - 1)])

    def _zarr_rows(self, name: str, rows: slice | int):
        """Rows of a text or int array through Zarr; a chunk that does not decode is a StoreError
        naming its file(s) and clips."""
        try:
            if isinstance(rows, int):  # one row alone comes back from Zarr as a numpy str_, which drops trailing NULs
                return self.array(name)[rows:rows + 1][0]
            return self.array(name)[rows]
        except DECODE_ERRORS as err:
            n, per_chunk = len(self), self.array(name).chunks[0]
            first, stop = (rows, rows + 1) if isinstance(rows, int) else rows.indices(n)[:2]
            chunks = range(first // per_chunk, (stop - 1) // per_chunk + 1)
            files = ", ".join(self.files.name(self._chunk_key(name, k)) for k in chunks)
            raise StoreError(f"{name}: clips {first}-{stop - 1} do not decode from chunk file(s) {files}, "
                             f"damaged: {err}") from err

    def _read(self, name: str, rows: slice | int):
        """Rows of an array, decoding only the chunks that hold them: a per-clip array's clips
        through its :class:`ClipReader`, for a text or int array the chunk of S clips of each row. A
        store written with texts and ints in one chunk over all clips has them read whole, once,
        and kept."""
        if name in self.features or name == "status":
            reader = self.clip_reader(name)
            if isinstance(rows, slice):
                return reader.read(np.arange(*rows.indices(len(self))))
            return reader.read([rows])[0]
        if (name in self.texts or name in self.ints) and self.array(name).chunks[0] > self.shard_size:
            if name not in self._whole:
                self._whole[name] = self.read_whole(name)
            return self._whole[name][rows]
        return self._zarr_rows(name, rows)

    def done_shards(self) -> set[int]:
        """Shards whose every clip is ok or failed: a rerun skips them."""
        done = self.status() != PENDING
        return {k for k in range(self.num_shards) if done[self.shard_range(k).start:self.shard_range(k).stop].all()}

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < len(self):
            raise IndexError(f"clip {index} out of range for a store of {len(self)}")
        names = [*self.features, "status", *self.texts, *self.ints]
        values = {name: self._read(name, index) for name in names}
        return {k: v[()] if isinstance(v, np.ndarray) and v.ndim == 0 else v for k, v in values.items()}

    def iter_shards(self, shards: list[int] | None = None,
                    names: list[str] | None = None) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
        """(shard index, {name: array over the shard's clips}) for each shard, in the given order;
        every array, or only ``names``."""
        names = names or [*self.features, "status", *self.texts, *self.ints]
        for shard in range(self.num_shards) if shards is None else shards:
            rows = slice(self.shard_range(shard).start, self.shard_range(shard).stop)
            yield shard, {name: self._read(name, rows) for name in names}

    # ------------------------------------------------------------------ checks without decoding

    def shape_problems(self) -> list[str]:
        """Arrays that do not open, or whose shape or dtype is not what the attributes say."""
        problems, n = [], len(self)
        for name in [*self.features, "status", *self.texts, *self.ints]:
            try:
                array = self.array(name)
            except StoreError as err:
                problems.append(str(err))
                continue
            spec = {**self.attrs["features"], "status": {"shape": [], "dtype": "uint8"}}.get(name)
            if spec is not None and (tuple(array.shape) != (n, *spec["shape"]) or str(array.dtype) != spec["dtype"]):
                problems.append(f"{name}: shape {tuple(array.shape)} dtype {array.dtype} in "
                                f"{self.files.name(name + '/zarr.json')}, the store's attributes say "
                                f"{(n, *spec['shape'])} {spec['dtype']}")
            elif array.shape[0] != n:
                problems.append(f"{name}: {array.shape[0]} rows in {self.files.name(name + '/zarr.json')} for {n} clips")
        return problems

    def file_problems(self, names: list[str] | None = None) -> dict[tuple[str, int], str]:
        """What is wrong with the shard files of per-clip arrays (``names``, default all), seen
        without decoding a clip, by (array, shard): a file whose index is damaged (each index is
        read and checked: 16 bytes a clip), or no file for a shard that holds ok clips (Zarr would
        read zeros in their place). ``status`` (and ``has_audio``, which says which shards must have
        audio files) are read, their unreadable shards reported too."""
        names = [*self.features, "status"] if names is None else list(names)
        problems: dict[tuple[str, int], str] = {}
        ok = self._read_each_shard("status", problems) == OK
        has_audio = self._read_each_shard("has_audio", problems) == 1 if "has_audio" in self.features else None
        for name in names:
            reader = self.clip_reader(name)
            checked = reader.check_shards([k for k in range(self.num_shards) if (name, k) not in problems])
            for shard, found in checked.items():
                if isinstance(found, StoreError):
                    problems[name, shard] = str(found)
                    continue
                if found:
                    continue
                rows = self.shard_range(shard)
                oks = int(ok[rows.start:rows.stop].sum())
                if oks and self._needs_file(name, shard, has_audio):
                    problems[name, shard] = (f"{name}: shard file {reader.shard_name(shard)} ({reader.span(shard)}) "
                                             f"is missing, yet {oks} of its clips are ok: they would read as zeros")
        return problems

    def _needs_file(self, name: str, shard: int, has_audio: np.ndarray | None) -> bool:
        """Whether a shard holding ok clips must have a file of array ``name``: always, but for the
        audio arrays of a shard without audio (see AUDIO_ARRAYS)."""
        if name not in AUDIO_ARRAYS or has_audio is None:
            return True
        rows = self.shard_range(shard)
        if has_audio[rows.start:rows.stop].any():
            return True
        # has_audio and audio_lengths are non-zero for the same clips, audio features only where has_audio is 1
        partners = {"has_audio": ("audio_lengths", "audio"), "audio_lengths": ("has_audio",), "audio": ()}[name]
        return any(p in self.features and self.clip_reader(p).has_file(shard) for p in partners)

    def _read_each_shard(self, name: str, problems: dict[tuple[str, int], str]) -> np.ndarray:
        """(N, ...): a per-clip array whole; a shard that cannot be read goes into ``problems`` and
        reads as the fill value."""
        reader = self.clip_reader(name)
        try:
            return reader.read(np.arange(len(self)))
        except StoreError:
            pass
        values = np.full((len(self), *reader.clip_shape), reader.array.fill_value, reader.dtype)
        for shard in range(self.num_shards):
            rows = self.shard_range(shard)
            try:
                values[rows.start:rows.stop] = reader.read(np.arange(rows.start, rows.stop))
            except StoreError as err:
                problems[name, shard] = str(err)
        return values

    def check_files(self, names: list[str]) -> None:
        """Before training or evaluating on the per-clip arrays ``names``: every array opens with
        the attributes' shape and dtype, and :meth:`file_problems` finds nothing; else a StoreError
        listing what is wrong. Cheap (no clip decoded): a damaged clip is found when it is read."""
        problems = [*self.shape_problems()]
        if not problems:
            problems += self.file_problems(names).values()
        if problems:
            shown = problems[:10] + ([f"... and {len(problems) - 10} more"] if len(problems) > 10 else [])
            raise StoreError(f"{self.where} is damaged (`xmei stores verify {self.where}` checks every clip):\n  "
                             + "\n  ".join(shown))

    # ------------------------------------------------------------------ writing

    def write_shard(self, shard: int, features: dict[str, np.ndarray], status: np.ndarray,
                    failures: list[dict[str, str]]) -> None:
        """Write one whole shard: features, then its failures file, then its status (last)."""
        rows = slice(self.shard_range(shard).start, self.shard_range(shard).stop)
        expected = rows.stop - rows.start
        if set(features) != set(self.features):
            raise StoreError(f"shard {shard}: got features {sorted(features)}, the store has {sorted(self.features)}")
        for name, values in features.items():
            if values.shape[0] != expected:
                raise StoreError(f"shard {shard}: {name} has {values.shape[0]} clips, the shard {expected}")
        # Zarr writes each file (object) whole or not at all: a full disk leaves the shard's status unwritten
        what = f"shard {shard} of the store, clips {rows.start}-{rows.stop - 1}"
        with nullcontext() if self.files.remote else writing(self.path, what):
            for name, values in features.items():
                self.array(name)[rows] = values
                if not self.clip_reader(name).has_file(shard):
                    # all its clips are zeros (silence an encoder maps to zeros): written all the same, so
                    # a missing shard file always means a lost one (Zarr skips chunks of the fill value)
                    self.array(name).with_config({"write_empty_chunks": True})[rows] = values
            self.files.write(f"failures/shard_{shard:05d}.json", json.dumps(failures, ensure_ascii=False),
                             f"the failed clips of {what}")
            self.array("status")[rows] = status

    def failures(self) -> list[dict[str, str]]:
        """Failed clips of the finished shards, in clip order."""
        rows = []
        for shard in sorted(self.done_shards()):  # a pending shard's file may be left by a killed run
            key = f"failures/shard_{shard:05d}.json"
            if self.files.exists(key):
                found = self.files.json(key, f"the failed clips of shard {shard}", StoreError, list)
                path = self.files.name(key)
                if not all(isinstance(row, dict) and "video_id" in row for row in found):
                    raise StoreError(f"{path}: expected a list of failed clips, each with its video_id, damaged")
                rows += found
        return rows

    def logged_failures(self) -> list[dict[str, str]]:
        """The rows of ``failures.jsonl`` (empty when there is none); a line that is not a failed
        clip's JSON is a StoreError naming it."""
        log, rows = self.files.name("failures.jsonl"), []
        if not self.files.exists("failures.jsonl"):
            return rows
        for number, row in self.files.lines("failures.jsonl", "the failures log", StoreError, hint=REWRITE_LOG):
            if not isinstance(row, dict) or "video_id" not in row:
                raise StoreError(f"{log} (the failures log): line {number} is not a failed clip (no video_id); "
                                 f"{REWRITE_LOG}")
            rows.append(row)
        return rows

    def write_failures_log(self) -> str:
        """failures.jsonl rebuilt from the finished shards' files, whole or not at all; its name."""
        log = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in self.failures())
        self.files.write("failures.jsonl", log, "the failures log", "the earlier log is kept; " + REWRITE_LOG)
        return self.files.name("failures.jsonl")
