"""The feature store: one Zarr v3 group per split.

Layout (N clips, S clips per shard):

    STORE/zarr.json                 group attributes: schema version, encoders, extraction config, labels
    STORE/<feature>/                float16 features (N, ...): one clip per inner chunk, S clips per shard
    STORE/<feature>/c/<k>/0/.../0   shard k's file: its clips' bytes, then their index (see stores/reader.py)
    STORE/status/                   uint8 (N,): 0 pending, 1 ok, 2 failed; sharded like the features
    STORE/<text>/                   strings (N,), S clips per chunk: ids, subtitles, labels, descriptions, reasons...
    STORE/<text>/c/<k>              chunk k: the strings of shard k's clips (zstd), so one clip's text is read alone
    STORE/<ints>/                   int32 (N, ...), S clips per chunk, as texts: caption ids and masks, label indexes
    STORE/failures/shard_00003.json the failed clips of a shard (video_id, stage, reason)
    STORE/failures.jsonl            all of them, one JSON a line (rebuilt by the writer at the end of a run)

The store is created whole in ``STORE.partial-<pid>`` beside it and renamed into place once its
arrays, texts, ints and attributes are written, so ``STORE`` never exists half-made; a partial
folder left by a killed creation is removed by the next one. Texts and ints are written once,
then. Features are written a whole shard at a time by whoever extracts that shard, and its
``status`` last: a shard whose status is not all done is redone on the next run, so no lock is
ever needed and a killed run resumes cleanly (Zarr's local store writes each file atomically).

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
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np
import zarr
from numcodecs import VLenUTF8, Zstd
from zarr.codecs import ZstdCodec

from xmei.errors import UserError

if TYPE_CHECKING:
    from stores.reader import ClipReader

__all__ = ["FAILED", "OK", "PENDING", "SCHEMA_VERSION", "FeatureStore", "StoreError", "create_store"]

SCHEMA_VERSION = 1
PENDING, OK, FAILED = 0, 1, 2
STATUS_NAMES = {PENDING: "pending", OK: "ok", FAILED: "failed"}


class StoreError(UserError, ValueError):
    """A store that is missing, of another schema, or inconsistent."""


@dataclass(frozen=True)
class FeatureSpec:
    """A per-clip feature array: shape of one clip and dtype."""

    shape: tuple[int, ...]
    dtype: str


def create_store(path: str | Path, n: int, shard_size: int, features: dict[str, FeatureSpec],
                 texts: dict[str, list[str]], ints: dict[str, np.ndarray], attrs: dict[str, Any],
                 compression: str = "none") -> "FeatureStore":
    """Create an empty store for ``n`` clips (all pending) holding ``texts`` and ``ints``.

    It is built in ``PATH.partial-<pid>`` and renamed to ``path`` when complete (same parent,
    so the rename is atomic): a kill leaves no half-made store, only a partial folder that the
    next creation removes."""
    path = Path(path)
    if path.exists():
        raise StoreError(f"{path} exists already")
    _remove_dead_partials(path)
    partial = path.with_name(f"{path.name}{PARTIAL}{os.getpid()}")
    try:
        _write_store(partial, n, shard_size, features, texts, ints, attrs, compression)
        os.rename(partial, path)  # fails if another process created ``path`` meanwhile
    except BaseException as err:
        shutil.rmtree(partial, ignore_errors=True)
        if isinstance(err, OSError) and path.exists():
            raise StoreError(f"{path} was created by another process meanwhile") from err
        raise
    return FeatureStore(path, mode="r+")


PARTIAL = ".partial-"  # PATH.partial-<pid>: a store being created by process <pid>


def _remove_dead_partials(path: Path) -> None:
    """Remove ``PATH.partial-<pid>`` folders whose process is gone (a creation that was killed)."""
    if not path.parent.is_dir():
        return
    for folder in path.parent.iterdir():
        pid = folder.name[len(path.name) + len(PARTIAL):]
        if not (folder.name.startswith(path.name + PARTIAL) and pid.isdigit()) or _alive(int(pid)):
            continue
        shutil.rmtree(folder, ignore_errors=True)


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


def _write_store(path: Path, n: int, shard_size: int, features: dict[str, FeatureSpec],
                 texts: dict[str, list[str]], ints: dict[str, np.ndarray], attrs: dict[str, Any],
                 compression: str) -> None:
    group = zarr.open_group(path, mode="w-", zarr_format=3)
    compressors = [ZstdCodec(level=1)] if compression == "zstd" else None
    shard = min(shard_size, n)
    for name, spec in {**features, "status": FeatureSpec((), "uint8")}.items():
        group.create_array(name, shape=(n, *spec.shape), dtype=spec.dtype, chunks=(1, *spec.shape),
                           shards=(shard, *spec.shape), compressors=compressors, fill_value=0)
    for name, values in texts.items():
        if len(values) != n:
            raise StoreError(f"text array {name!r} has {len(values)} values for {n} clips")
        group.create_array(name, shape=(n,), dtype=str, chunks=(shard,))[:] = np.array(values, dtype=str)
    for name, values in ints.items():
        array = group.create_array(name, shape=values.shape, dtype="int32", chunks=(shard, *values.shape[1:]))
        array[...] = values.astype(np.int32)
    group.attrs.update({**attrs, "schema_version": SCHEMA_VERSION, "num_clips": n, "shard_size": shard,
                        "features": {k: {"shape": list(v.shape), "dtype": v.dtype} for k, v in features.items()},
                        "texts": list(texts), "ints": list(ints)})
    (path / "failures").mkdir()


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
    """

    def __init__(self, path: str | Path, mode: str = "r"):
        self.path = Path(path)
        if not (self.path / "zarr.json").is_file():
            raise StoreError(f"{self.path} is not a feature store (no zarr.json)")
        self.group = zarr.open_group(self.path, mode=mode, zarr_format=3)
        self.attrs: dict[str, Any] = dict(self.group.attrs)
        version = self.attrs.get("schema_version")
        if version != SCHEMA_VERSION:
            raise StoreError(f"{self.path}: schema version {version}, this code reads {SCHEMA_VERSION}")
        self.features: list[str] = list(self.attrs["features"])
        self.texts: list[str] = list(self.attrs["texts"])
        self.ints: list[str] = list(self.attrs["ints"])
        self.shard_size: int = int(self.attrs["shard_size"])
        self._arrays: dict[str, zarr.Array] = {}  # opening an array reads its zarr.json: once is enough
        self._readers: dict[str, ClipReader] = {}
        self._whole: dict[str, np.ndarray] = {}  # texts and ints of an old store (one chunk over all clips)

    def __len__(self) -> int:
        return int(self.attrs["num_clips"])

    @property
    def num_shards(self) -> int:
        return -(-len(self) // self.shard_size)

    def shard_range(self, shard: int) -> range:
        return range(shard * self.shard_size, min((shard + 1) * self.shard_size, len(self)))

    def array(self, name: str) -> zarr.Array:
        if name not in self._arrays:
            self._arrays[name] = self.group[name]
        return self._arrays[name]

    def clip_reader(self, name: str) -> ClipReader:
        """Whole clips of a per-clip array (features, ``status``): see :mod:`stores.reader`."""
        from stores.reader import ClipReader  # it imports StoreError from here

        if name not in self._readers:
            if name not in (*self.features, "status"):
                raise StoreError(f"{self.path}: no per-clip array {name!r} (features: {self.features})")
            self._readers[name] = ClipReader(self.array(name), self.path / name)
        return self._readers[name]

    def status(self) -> np.ndarray:
        """(N,) uint8: PENDING / OK / FAILED per clip (read directly: Zarr takes ~a minute at 1M clips)."""
        return self.clip_reader("status").read(np.arange(len(self)))

    def read_whole(self, name: str) -> np.ndarray:
        """(N, ...): every row of a text or int array, its chunk files read and decoded here (with
        numcodecs, as Zarr does) when the array is laid out as :func:`create_store` makes it; any
        other layout through Zarr. ~0.9 s for 1M strings in chunks of 64, where Zarr takes 3-6 s."""
        array = self.array(name)
        folder = self.path / name
        meta = json.loads((folder / "zarr.json").read_text())
        if not _plain_chunks(meta):
            return array[...]
        decompress = Zstd().decode if len(meta["codecs"]) == 2 else bytes
        decode = VLenUTF8().decode if meta["data_type"] == "string" else lambda raw: np.frombuffer(raw, "<i4")
        out = np.full(array.shape, array.fill_value, array.dtype)
        rows = array.chunks[0]
        for k, start in enumerate(range(0, len(out), rows)):
            try:  # the key of chunk (k, 0, ..., 0); a chunk all fill value is not written
                raw = folder.joinpath("c", str(k), *["0"] * (out.ndim - 1)).read_bytes()
            except FileNotFoundError:
                continue
            stop = min(start + rows, len(out))
            out[start:stop] = decode(decompress(raw)).reshape(array.chunks)[:stop - start]  # a last chunk is whole
        return out

    def _read(self, name: str, rows: slice | int):
        """Rows of an array, decoding only the chunks that hold them: for a text or int array the
        chunk of S clips of each row. A store written with texts and ints in one chunk over all
        clips has them read whole, once, and kept."""
        if (name in self.texts or name in self.ints) and self.array(name).chunks[0] > self.shard_size:
            if name not in self._whole:
                self._whole[name] = self.read_whole(name)
            return self._whole[name][rows]
        return self.array(name)[rows]

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
            self.array(name)[rows] = values
        (self.path / "failures" / f"shard_{shard:05d}.json").write_text(json.dumps(failures, ensure_ascii=False))
        self.array("status")[rows] = status

    def failures(self) -> list[dict[str, str]]:
        """Failed clips of the finished shards, in clip order."""
        rows = []
        for shard in sorted(self.done_shards()):  # a pending shard's file may be left by a killed run
            path = self.path / "failures" / f"shard_{shard:05d}.json"
            rows += json.loads(path.read_text()) if path.exists() else []
        return rows

    def write_failures_log(self) -> Path:
        log = self.path / "failures.jsonl"
        log.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in self.failures()))
        return log
