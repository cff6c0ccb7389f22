"""Whole clips of a store's per-clip arrays, read straight from the shard files.

An uncompressed per-clip array (``visual``, ``audio``, ``status``...: N clips in shards of S, as
:func:`~stores.store.create_store` makes it) is one file per shard, written by Zarr v3's
``sharding_indexed`` codec (checked against zarr 3.1.6):

    ARRAY/c/<shard>/0/.../0        one ``/0`` per axis of a clip; clips shard*S ... shard*S + S-1
        [clip bytes][crc32c][clip bytes][crc32c]...   each clip one inner chunk: C-order little-endian
                                                      bytes, then their crc32c (uint32 little-endian)
        [index]                              S x (offset, nbytes) uint64 little-endian, 16*S bytes
        [crc32c of the index]                uint32 little-endian, 4 bytes

Stores written before clips carried a crc32c have none after the clip bytes; they read the same,
unchecked. A clip equal to the fill value is not written (all-zero features of a failed clip or of
a clip without audio): its index entry is (2**64-1, 2**64-1). A shard with no clip written has no
file. Both read as the fill value (whether a missing file is allowed is the store's to say: see
:meth:`~stores.store.FeatureStore.file_problems`). Zarr writes a shard's chunks in Morton order,
which over (S, 1, ..., 1) chunks is clip order, so a run of consecutive clips is one byte range,
read with one ``preadv``; the reader follows the offsets of the index, not that rule.

:class:`ClipReader` reads this way only when the array's ``zarr.json`` is exactly that layout;
any other (a zstd-compressed store, another chunk key encoding...) is read through Zarr, a shard
at a time, each shard file's index checked first as here (Zarr reads an emptied file as the fill
value). Each shard index is checked (crc32c) when it is read and kept, per shard, until the file
changes; each clip's crc32c when the clip is read. A damaged file is a StoreError naming the
array, the shard file, the shard and its clips. Reads are ``os.preadv`` on files opened per call:
no threads, no open handles, so a reader can be forked into DataLoader workers.

A store in object storage (stores.location) is read by :class:`ObjectClipReader`, the same layout
by range requests: each shard's index by one suffix-range request (its last 16*S+4 bytes), kept
per shard for the reader's life; the clips of one read that lie in one shard object by one
request per run of clips that lie back to back (or with less than GAP_BYTES between them); the
shards of one read concurrently (stores.files.CONCURRENT at a time). Each range request asks for
the object's version (ETag) whose index is kept: an object rewritten since (a clip's crc32c would
not tell: a read shifted by whole clips meets another clip and its own crc32c) has its index
fetched again and is read once more. ``requests`` counts what it sent.
Its process must not have been forked from one that used object storage (stores.location):
DataLoader workers reading such a store start by forkserver (xmei.data.loader).
"""
from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Iterator, Sequence

import google_crc32c
import numpy as np
import zarr

from stores.files import FolderFiles, ObjectChanged, ObjectFiles
from stores.store import DECODE_ERRORS, StoreError

__all__ = ["ClipReader", "ObjectClipReader"]

MISSING = 2**64 - 1  # index entry of an inner chunk that was not written
IOV_MAX = 1024  # buffers one preadv takes on Linux
SCATTER_BYTES = 4096  # clips at least this big are read straight into their arrays, smaller ones via one buffer
NUMERIC = {"bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
           "float16", "float32", "float64"}
LITTLE = {"name": "bytes", "configuration": {"endian": "little"}}
CRC32C = {"name": "crc32c"}
GAP_BYTES = 256 * 1024  # clips of one shard object this close are read by one range request, the gap discarded


def _sharding(meta: dict) -> dict:
    """The configuration of the array's one ``sharding_indexed`` codec, {} when it has none."""
    codecs = meta.get("codecs", [])
    ok = len(codecs) == 1 and isinstance(codecs[0], dict) and codecs[0].get("name") == "sharding_indexed"
    return codecs[0].get("configuration", {}) if ok else {}


def _indexed(meta: dict) -> bool:
    """Whether the shard files are where :meth:`ClipReader.shard_file` says, each ending in an
    index of bytes + crc32c (what this module checks, whether or not it reads the clips itself)."""
    sharding = _sharding(meta)
    return (bool(sharding) and sharding.get("index_codecs") == [LITTLE, CRC32C]
            and sharding.get("index_location", "end") == "end"
            and meta.get("chunk_key_encoding") == {"name": "default", "configuration": {"separator": "/"}})


def _direct_layout(meta: dict) -> str | None:
    """None when ``meta`` (an array's zarr.json) is the layout read directly, else what differs."""
    shape, clip = meta.get("shape", []), meta.get("shape", [])[1:]
    grid = meta.get("chunk_grid", {})
    shards = grid.get("configuration", {}).get("chunk_shape", [])
    codecs = meta.get("codecs", [])
    sharding = _sharding(meta)
    serializers = [LITTLE] if meta.get("data_type") not in ("bool", "int8", "uint8") else [LITTLE, {"name": "bytes"}]
    inner_ok = [[s, *check] for s in serializers for check in ([], [CRC32C])]  # with or without a crc32c
    checks = {
        "zarr format 3 array": meta.get("zarr_format") == 3 and meta.get("node_type") == "array",
        "fixed-size numeric data type": meta.get("data_type") in NUMERIC,
        "numeric fill value": isinstance(meta.get("fill_value"), (int, float)),
        "regular chunk grid of (S, *clip shape)": grid.get("name") == "regular" and len(shape) >= 1
        and len(shards) == len(shape) and shards[1:] == clip,
        "default chunk keys with '/'": meta.get("chunk_key_encoding") == {"name": "default",
                                                                         "configuration": {"separator": "/"}},
        "no storage transformers": not meta.get("storage_transformers"),
        "one sharding_indexed codec": len(codecs) == 1 and bool(sharding),
        "inner chunks of one clip": sharding.get("chunk_shape") == [1, *clip],
        "uncompressed little-endian inner chunks": sharding.get("codecs") in inner_ok,
        "index of bytes + crc32c": sharding.get("index_codecs") == [LITTLE, CRC32C],
        "index at the end": sharding.get("index_location", "end") == "end",
    }
    missing = [what for what, ok in checks.items() if not ok]
    return ", ".join(missing) if missing else None


class ClipReader:
    """Whole clips of one per-clip array of a store, in any order (repeats allowed):

        reader = store.clip_reader("visual")
        clips = reader.read([7, 3, 4])      # (3, *clip shape): clip 7, clip 3, clip 4
        reader.direct                       # False: read through Zarr (e.g. a zstd store)
        reader.check_shard(2)               # shard 2 has a file, its index sound (else StoreError)
    """

    @staticmethod
    def of(array: zarr.Array, files: FolderFiles | ObjectFiles, name: str) -> "ClipReader":
        """The reader of array ``name`` of the store whose files are ``files``: of a folder or of object storage."""
        return (ObjectClipReader if files.remote else ClipReader)(array, files, name)

    def __init__(self, array: zarr.Array, files: FolderFiles | ObjectFiles, name: str):
        self.files, self.name = files, name
        self.folder = None if files.remote else files.path(name)  # a local array's folder
        self.array = array
        meta = files.json(f"{name}/zarr.json", f"the metadata of array {self.name!r}", StoreError)
        self.why_not_direct = _direct_layout(meta)  # None: shard files are read directly
        self.num_clips = int(array.shape[0])
        self.clip_shape: tuple[int, ...] = tuple(array.shape[1:])
        self.dtype = np.dtype(array.dtype)
        self.shard_size = int((array.shards or array.chunks)[0])
        self.indexed = _indexed(meta)  # the shard files' indexes are checked here, read directly or not
        if self.indexed:
            self.index_bytes = 16 * int(np.prod([s // c for s, c in zip(array.shards, array.chunks)])) + 4
        if self.direct:
            self.dtype = self.dtype.newbyteorder("<")
            self.fill = np.array(meta["fill_value"], self.dtype)
            self.chunk_bytes = int(np.prod(self.clip_shape, dtype=np.int64)) * self.dtype.itemsize
            self.checksummed = _sharding(meta)["codecs"][-1] == CRC32C  # each clip's bytes followed by their crc32c
            self.stored_bytes = self.chunk_bytes + 4 * self.checksummed  # one clip in the file
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

    def shard_key(self, shard: int) -> str:
        return "/".join([self.name, "c", str(shard), *["0"] * len(self.clip_shape)])

    def shard_file(self, shard: int) -> Path:
        """The shard's file of a local store."""
        return self.files.path(self.shard_key(shard))

    def shard_name(self, shard: int) -> str:
        """The shard's file or object, as messages name it."""
        return self.files.name(self.shard_key(shard))

    def has_file(self, shard: int) -> bool:
        """Whether the shard has a file (object): none when no clip of it was written."""
        return self.files.exists(self.shard_key(shard))

    def span(self, shard: int) -> str:
        """"shard 3, clips 24-31": what a message about a shard file names besides the file."""
        first = shard * self.shard_size
        return f"shard {shard}, clips {first}-{min(first + self.shard_size, self.num_clips) - 1}"

    def check_shard(self, shard: int) -> bool:
        """Whether the shard has a file (without one, its clips read as the fill value), its index
        read and checked; a StoreError when the file is damaged. True, unchecked, for a layout whose
        files this module does not know."""
        if not self.indexed:
            return True
        path = self.shard_file(shard)
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return False
        except OSError as err:
            raise StoreError(f"{self.name}: shard file {path} ({self.span(shard)}) cannot be read: {err}") from err
        try:
            self._index(shard, fd)
        finally:
            os.close(fd)
        return True

    def check_shards(self, shards: Sequence[int]) -> dict[int, bool | StoreError]:
        """:meth:`check_shard` of each shard: whether it has a file, or the StoreError of a damaged one."""
        return dict(zip(shards, map(self._check_or_error, shards)))

    def _check_or_error(self, shard: int) -> bool | StoreError:
        try:
            return self.check_shard(shard)
        except StoreError as err:
            return err

    def _checked(self, clips: Sequence[int] | np.ndarray) -> np.ndarray:
        clips = np.asarray(clips, dtype=np.int64).reshape(-1)  # (n,)
        outside = (clips < 0) | (clips >= self.num_clips)
        if outside.any():
            raise IndexError(f"{self.name}: clip {clips[outside][0]} out of range for {self.num_clips} clips")
        return clips

    def _by_shard(self, clips: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
        """(shard, slots of ``clips`` in it, ascending) for each shard the clips are in, in order."""
        shards = clips // self.shard_size
        by_shard = np.argsort(shards, kind="stable")  # slots grouped by shard, ascending within
        cuts = np.flatnonzero(np.diff(shards[by_shard])) + 1
        for slots in np.split(by_shard, cuts) if len(clips) else []:
            yield int(shards[slots[0]]), slots

    def _read_zarr(self, clips: np.ndarray) -> np.ndarray:
        """Through Zarr, a shard at a time: its index checked first, a decoding error naming it."""
        out = np.empty((len(clips), *self.clip_shape), self.dtype)
        for shard, slots in self._by_shard(clips):
            self.check_shard(shard)  # Zarr reads an emptied or cut file as the fill value
            unique, inverse = np.unique(clips[slots], return_inverse=True)
            try:
                values = self.array.oindex[unique]  # (unique clips, *clip shape)
            except DECODE_ERRORS as err:
                bad = ", ".join(map(str, self._undecodable(unique)))
                raise StoreError(f"{self.name}: shard file {self.shard_name(shard)} ({self.span(shard)}): clip(s) "
                                 f"{bad} do not decode, damaged ({err})") from err
            out[slots] = values[inverse]
        return out

    def _undecodable(self, clips: np.ndarray) -> list[int]:
        """Those of ``clips`` that Zarr cannot decode, one read each (after a read of them all failed)."""
        bad = []
        for clip in clips.tolist():
            try:
                self.array[clip]
            except DECODE_ERRORS:
                bad.append(clip)
        return bad

    def _read_direct(self, clips: np.ndarray, rows: np.ndarray | list[np.ndarray]) -> None:
        """Clip ``clips[i]`` into ``rows[i]`` ((chunk bytes,) uint8), shard by shard."""
        for shard, slots in self._by_shard(clips):
            self._read_shard(shard, clips[slots] - shard * self.shard_size, slots, rows)

    def _read_shard(self, shard: int, local: np.ndarray, slots: np.ndarray,
                    rows: np.ndarray | list[np.ndarray]) -> None:
        """Clips ``local`` (within the shard) into ``rows[slots]`` (slots ascending): one preadv
        for each run of consecutive slots whose clips lie back to back in the file; every clip's
        crc32c checked, all that fail named in one error."""
        path = self.shard_file(shard)
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:  # no clip of the shard was written
            for slot in slots:
                rows[slot].view(self.dtype)[...] = self.fill
            return
        except OSError as err:
            raise StoreError(f"{self.name}: shard file {path} ({self.span(shard)}) cannot be read: {err}") from err
        bad: list[int] = []  # clips whose crc32c does not match
        try:
            starts = self._index(shard, fd)[local, 0]  # (n,) byte offsets, MISSING if not written
            written = starts != MISSING
            joins = (written[1:] & written[:-1] & (np.diff(slots) == 1)  # (n-1,): clip k+1 goes on k's read
                     & (starts[1:] == starts[:-1] + np.uint64(self.stored_bytes)))
            for run in np.split(np.arange(len(slots)), np.flatnonzero(~joins) + 1):
                first = slots[run[0]]
                if not written[run[0]]:  # a clip not written is a run of its own
                    rows[first].view(self.dtype)[...] = self.fill
                    continue
                # consecutive rows of one array, or each clip its own array
                one = isinstance(rows, np.ndarray)
                targets = rows[first:first + len(run)] if one else [rows[s] for s in slots[run]]
                failing = self._read_run(fd, path, shard, int(starts[run[0]]), targets)
                bad += [shard * self.shard_size + int(local[run[i]]) for i in failing]
        finally:
            os.close(fd)
        if bad:
            raise StoreError(f"{self.name}: shard file {path} ({self.span(shard)}): clip(s) "
                             f"{', '.join(map(str, sorted(set(bad))))} fail their checksum (crc32c), damaged")

    def _read_run(self, fd: int, path: Path, shard: int, offset: int,
                  targets: np.ndarray | list[np.ndarray]) -> list[int]:
        """Clips stored back to back from byte ``offset`` on into ``targets`` ((chunk bytes,) uint8
        each: rows of one array, or a list); the positions in ``targets`` whose crc32c fails."""
        if not self.checksummed:
            one = isinstance(targets, np.ndarray)  # consecutive rows of one array: one buffer
            self._pread(fd, [memoryview(targets).cast("B")] if one else [memoryview(t) for t in targets],
                        offset, path, shard)
            return []
        if self.chunk_bytes >= SCATTER_BYTES:  # each clip straight into its row, its crc32c beside it
            sums = np.empty((len(targets), 4), np.uint8)
            self._pread(fd, [view for t, s in zip(targets, sums) for view in (memoryview(t), memoryview(s))],
                        offset, path, shard)
            data = targets
        else:  # small clips (status, flags): the run into one buffer, then copied out
            run = np.empty((len(targets), self.stored_bytes), np.uint8)
            self._pread(fd, [memoryview(run).cast("B")], offset, path, shard)
            data, sums = run[:, :self.chunk_bytes], run[:, self.chunk_bytes:]
            for target, values in zip(targets, data):
                target[...] = values
        stored = np.ascontiguousarray(sums).view("<u4").reshape(-1)  # (n,)
        return [i for i, (values, crc) in enumerate(zip(data, stored)) if google_crc32c.value(values) != crc]

    def _pread(self, fd: int, buffers: list[memoryview], offset: int, path: Path, shard: int) -> None:
        """Fill ``buffers`` (bytes) from byte ``offset`` of the file on, IOV_MAX buffers per call; a
        short read goes on where it stopped."""
        while buffers:
            got = os.preadv(fd, buffers[:IOV_MAX], offset)
            if got == 0:
                raise StoreError(f"{self.name}: shard file {path} ({self.span(shard)}) ends at byte {offset}, "
                                 "inside a clip: cut short")
            offset += got
            while buffers and got >= len(buffers[0]):
                got -= len(buffers.pop(0))
            if got:
                buffers[0] = buffers[0][got:]

    def _index(self, shard: int, fd: int) -> np.ndarray:
        """(S, 2) uint64 (offset, nbytes) of each clip of the shard, checked; kept per file version."""
        stat = os.fstat(fd)
        version = (stat.st_ino, stat.st_size, stat.st_mtime_ns)
        cached = self._indexes.get(shard)
        if cached is not None and cached[0] == version:
            return cached[1]
        if stat.st_size < self.index_bytes:
            raise self._short(shard, stat.st_size)
        index = self._checked_index(shard, os.pread(fd, self.index_bytes, stat.st_size - self.index_bytes),
                                    stat.st_size)
        self._indexes[shard] = (version, index)
        return index

    def _short(self, shard: int, size: int) -> StoreError:
        return StoreError(f"{self.name}: shard file {self.shard_name(shard)} ({self.span(shard)}) has {size} bytes, "
                          f"shorter than its index ({self.index_bytes} bytes): emptied or cut short")

    def _checked_index(self, shard: int, raw: bytes | memoryview, size: int) -> np.ndarray:
        """The (S, 2) index of a shard file of ``size`` bytes from its last ``raw`` bytes, checked."""
        path, data_end = self.shard_name(shard), size - self.index_bytes
        stored, computed = int.from_bytes(raw[-4:], "little"), google_crc32c.value(bytes(raw[:-4]))
        if stored != computed:
            raise StoreError(f"{self.name}: the index of shard file {path} is damaged ({self.span(shard)}; crc32c "
                             f"{computed:#010x}, stored {stored:#010x}): the file was changed, cut short or replaced")
        index = np.frombuffer(raw, "<u8", count=(self.index_bytes - 4) // 8).reshape(-1, 2)
        written = index[:, 0] != MISSING
        sizes, end = index[written, 1], np.uint64(data_end)
        if ((index[~written, 1] != MISSING).any() or (self.direct and (sizes != self.stored_bytes).any())
                or (sizes > end).any() or (index[written, 0] > end - np.minimum(sizes, end)).any()):
            raise StoreError(f"{self.name}: the index of shard file {path} does not match the array "
                             f"({self.span(shard)}; clips before byte {data_end})")
        return index


class ObjectClipReader(ClipReader):
    """A :class:`ClipReader` of a store in object storage (the module docstring): range requests,
    indexes kept per shard, shards concurrently. ``requests``: how many it has sent."""

    def __init__(self, array: zarr.Array, files: ObjectFiles, name: str):
        super().__init__(array, files, name)
        self.requests = 0
        self._counting = threading.Lock()  # the shards of a read are fetched in threads

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_indexes": {}, "_counting": None}  # a process it goes to fetches indexes anew

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _counting=threading.Lock())

    def _sent(self, requests: int) -> None:
        with self._counting:
            self.requests += requests

    def check_shard(self, shard: int) -> bool:
        return not self.indexed or self._object_index(shard) is not None

    def check_shards(self, shards: Sequence[int]) -> dict[int, bool | StoreError]:
        """:meth:`ClipReader.check_shards`, the shards' indexes fetched concurrently."""
        return dict(zip(shards, self.files.pool.map(self._check_or_error, shards)))

    def _object_index(self, shard: int, again: bool = False) -> np.ndarray | None:
        """The shard's index, checked (one suffix-range request the first time, or ``again``); None
        when the shard has no object. Kept with the object's version (ETag)."""
        if again or shard not in self._indexes:
            try:
                raw, size, version = self.files.tail(self.shard_key(shard), self.index_bytes)
            except FileNotFoundError:
                return None
            except OSError as err:
                raise StoreError(f"{self.name}: shard object {self.shard_name(shard)} ({self.span(shard)}) cannot "
                                 f"be read: {err}") from err
            finally:
                self._sent(1)
            if size < self.index_bytes:
                raise self._short(shard, size)
            self._indexes[shard] = (version, self._checked_index(shard, raw, size))
        return self._indexes[shard][1]

    def _read_direct(self, clips: np.ndarray, rows: np.ndarray | list[np.ndarray]) -> None:
        """Clip ``clips[i]`` into ``rows[i]``: the shards' indexes first, then each shard's clips,
        the shards concurrently; every clip whose crc32c fails named in one error."""
        shards = list(self._by_shard(clips))
        list(self.files.pool.map(self._object_index, [s for s, _ in shards if s not in self._indexes]))
        bad = [b for found in self.files.pool.map(lambda job: self._fetch_shard(*job, clips, rows), shards)
               for b in found]
        if bad:
            raise StoreError(f"{self.name}: {'; '.join(bad)}: they fail their checksum (crc32c), damaged")

    def _fetch_shard(self, shard: int, slots: np.ndarray, clips: np.ndarray,
                     rows: np.ndarray | list[np.ndarray]) -> list[str]:
        """The clips of ``slots`` (all in ``shard``) into their rows, one request per run of clips
        close together in the object, each asking for the version whose index is kept: an object
        rewritten since has its index fetched again, once. Those whose crc32c fails, as a message."""
        local = clips[slots] - shard * self.shard_size
        try:
            failing = self._fetch_clips(shard, self._object_index(shard), local, slots, rows)
        except ObjectChanged:
            failing = self._fetch_clips(shard, self._object_index(shard, again=True), local, slots, rows)
        if not failing:
            return []
        names = ", ".join(str(shard * self.shard_size + c) for c in sorted(set(local[failing].tolist())))
        return [f"shard object {self.shard_name(shard)} ({self.span(shard)}): clip(s) {names}"]

    def _fetch_clips(self, shard: int, index: np.ndarray | None, local: np.ndarray, slots: np.ndarray,
                     rows: np.ndarray | list[np.ndarray]) -> list[int]:
        """Positions (into ``local``) of the clips whose crc32c fails; the others are in their rows."""
        starts = np.full(len(local), MISSING, np.uint64) if index is None else index[local, 0]
        for i in np.flatnonzero(starts == MISSING):  # not written: the fill value
            rows[slots[i]].view(self.dtype)[...] = self.fill
        written = np.flatnonzero(starts != MISSING)
        if not len(written):
            return []
        order = written[np.argsort(starts[written], kind="stable")]  # by offset in the object
        first = starts[order].astype(np.int64)
        last = first + self.stored_bytes
        cuts = np.flatnonzero(first[1:] - last[:-1] > GAP_BYTES) + 1  # a new request where the gap is too big
        runs = np.split(np.arange(len(order)), cuts)
        begins, ends = [int(first[r[0]]) for r in runs], [int(last[r].max()) for r in runs]
        try:
            got = self.files.ranges(self.shard_key(shard), begins, ends, self._indexes[shard][0])
        except OSError as err:
            raise StoreError(f"{self.name}: shard object {self.shard_name(shard)} ({self.span(shard)}) cannot be "
                             f"read: {err}") from err
        finally:
            self._sent(len(runs))
        failing = []
        for run, begin, data in zip(runs, begins, got):
            for position in order[run]:
                at = int(starts[position]) - begin
                if at + self.stored_bytes > len(data):
                    raise StoreError(f"{self.name}: shard object {self.shard_name(shard)} ({self.span(shard)}) "
                                     f"ends inside clip {shard * self.shard_size + int(local[position])}: cut short")
                target = rows[slots[position]]
                target[...] = np.frombuffer(data[at:at + self.chunk_bytes], np.uint8)
                if self.checksummed:
                    stored = int.from_bytes(data[at + self.chunk_bytes:at + self.stored_bytes], "little")
                    if google_crc32c.value(target) != stored:
                        failing.append(int(position))
        return failing
