"""Whole clips of a store's per-clip arrays, read straight from the shard files.

An uncompressed per-clip array (``visual``, ``audio``, ``status``...: N clips in shards of S, as
:func:`~stores.store.create_store` makes it) is one file per shard, written by Zarr v3's
``sharding_indexed`` codec (checked against zarr 3.1.6):

    ARRAY/c/<shard>/0/.../0        one ``/0`` per axis of a clip; clips shard*S ... shard*S + S-1
        [clip bytes][clip bytes]...          each clip one inner chunk: C-order little-endian bytes
        [index]                              S x (offset, nbytes) uint64 little-endian, 16*S bytes
        [crc32c of the index]                uint32 little-endian, 4 bytes

A clip equal to the fill value is not written (all-zero features of a failed clip or of a clip
without audio): its index entry is (2**64-1, 2**64-1). A shard with no clip written has no file.
Both read as the fill value. Zarr writes a shard's chunks in Morton order, which over (S, 1, ..., 1)
chunks is clip order, so a run of consecutive clips is one byte range, read with one ``preadv``;
the reader follows the offsets of the index, not that rule.

:class:`ClipReader` reads this way only when the array's ``zarr.json`` is exactly that layout;
any other (a zstd-compressed store, another chunk key encoding...) is read through Zarr. Each
shard index is checked (crc32c) when it is read and kept, per shard, until the file changes.
Reads are ``os.preadv`` on files opened per call: no threads, no open handles, so a reader can be
forked into DataLoader workers.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import google_crc32c
import numpy as np
import zarr

from stores.store import StoreError

__all__ = ["ClipReader"]

MISSING = 2**64 - 1  # index entry of an inner chunk that was not written
IOV_MAX = 1024  # buffers one preadv takes on Linux
NUMERIC = {"bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
           "float16", "float32", "float64"}


def _direct_layout(meta: dict) -> str | None:
    """None when ``meta`` (an array's zarr.json) is the layout read directly, else what differs."""
    shape, clip = meta.get("shape", []), meta.get("shape", [])[1:]
    grid = meta.get("chunk_grid", {})
    shards = grid.get("configuration", {}).get("chunk_shape", [])
    codecs = meta.get("codecs", [])
    sharding = codecs[0].get("configuration", {}) if len(codecs) == 1 else {}
    little = {"name": "bytes", "configuration": {"endian": "little"}}
    inner_ok = [little] if meta.get("data_type") not in ("bool", "int8", "uint8") else [little, {"name": "bytes"}]
    checks = {
        "zarr format 3 array": meta.get("zarr_format") == 3 and meta.get("node_type") == "array",
        "fixed-size numeric data type": meta.get("data_type") in NUMERIC,
        "numeric fill value": isinstance(meta.get("fill_value"), (int, float)),
        "regular chunk grid of (S, *clip shape)": grid.get("name") == "regular" and len(shape) >= 1
        and len(shards) == len(shape) and shards[1:] == clip,
        "default chunk keys with '/'": meta.get("chunk_key_encoding") == {"name": "default",
                                                                         "configuration": {"separator": "/"}},
        "no storage transformers": not meta.get("storage_transformers"),
        "one sharding_indexed codec": len(codecs) == 1 and codecs[0].get("name") == "sharding_indexed",
        "inner chunks of one clip": sharding.get("chunk_shape") == [1, *clip],
        "uncompressed little-endian inner chunks": len(sharding.get("codecs", [])) == 1
        and sharding["codecs"][0] in inner_ok,
        "index of bytes + crc32c": sharding.get("index_codecs") == [little, {"name": "crc32c"}],
        "index at the end": sharding.get("index_location", "end") == "end",
    }
    missing = [what for what, ok in checks.items() if not ok]
    return ", ".join(missing) if missing else None


class ClipReader:
    """Whole clips of one per-clip array of a store, in any order (repeats allowed):

        reader = store.clip_reader("visual")
        clips = reader.read([7, 3, 4])      # (3, *clip shape): clip 7, clip 3, clip 4
        reader.direct                       # False: read through Zarr (e.g. a zstd store)
    """

    def __init__(self, array: zarr.Array, folder: str | Path):
        self.folder = Path(folder)
        self.name = self.folder.name
        self.array = array
        meta = json.loads((self.folder / "zarr.json").read_text())
        self.why_not_direct = _direct_layout(meta)  # None: shard files are read directly
        self.num_clips = int(meta["shape"][0])
        self.clip_shape: tuple[int, ...] = tuple(meta["shape"][1:])
        self.dtype = np.dtype(array.dtype)
        if self.direct:
            self.dtype = self.dtype.newbyteorder("<")
            self.shard_size = int(meta["chunk_grid"]["configuration"]["chunk_shape"][0])
            self.fill = np.array(meta["fill_value"], self.dtype)
            self.chunk_bytes = int(np.prod(self.clip_shape, dtype=np.int64)) * self.dtype.itemsize
            self.index_bytes = 16 * self.shard_size + 4
        # shard -> ((inode, size, mtime) of its file, (S, 2) uint64 index): a rewritten file is reread
        self._indexes: dict[int, tuple[tuple[int, int, int], np.ndarray]] = {}

    @property
    def direct(self) -> bool:
        return self.why_not_direct is None

    def read(self, clips: Sequence[int] | np.ndarray) -> np.ndarray:
        """(len(clips), *clip shape): the clips, in the order given."""
        clips = self._checked(clips)
        if not self.direct:
            return self._read_zarr(clips)
        out = np.empty((len(clips), *self.clip_shape), self.dtype)
        self._read_direct(clips, out.reshape(len(clips), -1).view(np.uint8))  # (n, chunk bytes), out's memory
        return out

    def read_each(self, clips: Sequence[int] | np.ndarray) -> list[np.ndarray]:
        """The clips in the order given, each its own array of the clip shape (as a DataLoader sample
        holds it: measured faster than rows of one batch array, whose pages are new on every call,
        while malloc hands a freed clip-sized block out again)."""
        clips = self._checked(clips)
        if not self.direct:
            values = self._read_zarr(clips)
            return [values[i, ...] for i in range(len(clips))]  # arrays, 0-d ones too (not numpy scalars)
        out = [np.empty(self.clip_shape, self.dtype) for _ in clips]
        self._read_direct(clips, [a.reshape(-1).view(np.uint8) for a in out])
        return out

    def shard_file(self, shard: int) -> Path:
        return self.folder.joinpath("c", str(shard), *["0"] * len(self.clip_shape))

    def _checked(self, clips: Sequence[int] | np.ndarray) -> np.ndarray:
        clips = np.asarray(clips, dtype=np.int64).reshape(-1)  # (n,)
        outside = (clips < 0) | (clips >= self.num_clips)
        if outside.any():
            raise IndexError(f"{self.name}: clip {clips[outside][0]} out of range for {self.num_clips} clips")
        return clips

    def _read_zarr(self, clips: np.ndarray) -> np.ndarray:
        unique, inverse = np.unique(clips, return_inverse=True)
        values = np.require(self.array.oindex[unique], requirements="W")  # (unique clips, *clip shape)
        return values if np.array_equal(unique, clips) else values[inverse]

    def _read_direct(self, clips: np.ndarray, rows: np.ndarray | list[np.ndarray]) -> None:
        """Clip ``clips[i]`` into ``rows[i]`` ((chunk bytes,) uint8), shard by shard."""
        shards = clips // self.shard_size
        by_shard = np.argsort(shards, kind="stable")  # slots grouped by shard, ascending within
        cuts = np.flatnonzero(np.diff(shards[by_shard])) + 1
        for slots in np.split(by_shard, cuts) if len(clips) else []:
            shard = int(shards[slots[0]])
            self._read_shard(shard, clips[slots] - shard * self.shard_size, slots, rows)

    def _read_shard(self, shard: int, local: np.ndarray, slots: np.ndarray,
                    rows: np.ndarray | list[np.ndarray]) -> None:
        """Clips ``local`` (within the shard) into ``rows[slots]`` (slots ascending): one preadv
        for each run of consecutive slots whose clips lie back to back in the file."""
        path = self.shard_file(shard)
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:  # no clip of the shard was written
            for slot in slots:
                rows[slot].view(self.dtype)[...] = self.fill
            return
        try:
            starts = self._index(shard, fd, path)[local, 0]  # (n,) byte offsets, MISSING if not written
            written = starts != MISSING
            joins = (written[1:] & written[:-1] & (np.diff(slots) == 1)  # (n-1,): clip k+1 goes on k's read
                     & (starts[1:] == starts[:-1] + np.uint64(self.chunk_bytes)))
            for run in np.split(np.arange(len(slots)), np.flatnonzero(~joins) + 1):
                first = slots[run[0]]
                if not written[run[0]]:  # a clip not written is a run of its own
                    rows[first].view(self.dtype)[...] = self.fill
                elif isinstance(rows, np.ndarray):  # consecutive rows of one array: one buffer
                    self._pread(fd, [memoryview(rows[first:first + len(run)]).cast("B")], int(starts[run[0]]), path)
                else:
                    self._pread(fd, [memoryview(rows[s]) for s in slots[run]], int(starts[run[0]]), path)
        finally:
            os.close(fd)

    def _pread(self, fd: int, buffers: list[memoryview], offset: int, path: Path) -> None:
        """Fill ``buffers`` (bytes) from byte ``offset`` of the file on, IOV_MAX buffers per call; a
        short read goes on where it stopped."""
        while buffers:
            got = os.preadv(fd, buffers[:IOV_MAX], offset)
            if got == 0:
                raise StoreError(f"{self.name}: shard file {path} ends at byte {offset}, inside a clip")
            offset += got
            while buffers and got >= len(buffers[0]):
                got -= len(buffers.pop(0))
            if got:
                buffers[0] = buffers[0][got:]

    def _index(self, shard: int, fd: int, path: Path) -> np.ndarray:
        """(S, 2) uint64 (offset, nbytes) of each clip of the shard, checked; kept per file version."""
        stat = os.fstat(fd)
        version = (stat.st_ino, stat.st_size, stat.st_mtime_ns)
        cached = self._indexes.get(shard)
        if cached is not None and cached[0] == version:
            return cached[1]
        data_end = stat.st_size - self.index_bytes
        if data_end < 0:
            raise StoreError(f"{self.name}: shard file {path} has {stat.st_size} bytes, "
                             f"shorter than its index ({self.index_bytes} bytes)")
        raw = os.pread(fd, self.index_bytes, data_end)
        stored, computed = int.from_bytes(raw[-4:], "little"), google_crc32c.value(raw[:-4])
        if stored != computed:
            raise StoreError(f"{self.name}: the index of shard file {path} is damaged "
                             f"(crc32c {computed:#010x}, stored {stored:#010x})")
        index = np.frombuffer(raw, "<u8", count=2 * self.shard_size).reshape(self.shard_size, 2)
        written = index[:, 0] != MISSING
        if ((index[~written, 1] != MISSING).any() or (index[written, 1] != self.chunk_bytes).any()
                or (index[written, 0] + self.chunk_bytes > data_end).any()):
            raise StoreError(f"{self.name}: the index of shard file {path} does not match the array "
                             f"(clips of {self.chunk_bytes} bytes before byte {data_end})")
        self._indexes[shard] = (version, index)
        return index
