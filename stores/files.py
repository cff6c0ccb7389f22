"""The files of one store, by key ("zarr.json", "visual/c/3/0/0/0", "failures/shard_00003.json"):
a local folder's files, or the objects of a bucket under the store's key (stores.location).

    files = store_files("s3://bucket/stores/train")      # or a folder, or a Location
    files.read("zarr.json")                             # bytes; FileNotFoundError when there is none
    files.write("failures.jsonl", data, "the failures log")  # whole: a reader sees the old or the new
    files.name("zarr.json")                             # what messages show: s3://bucket/stores/train/zarr.json
    zarr.open_group(files.zarr_store(read_only=True))

Writes are whole on both: a folder's file goes through a partial file and a rename
(xmei.errors.write_whole), an object is one PUT (or a multipart upload, which the server makes
visible only when complete). Object storage has no folders and no rename; a store there says it is
complete by what it writes last (stores.store). Many small objects are read concurrently
(:meth:`ObjectFiles.read_many`). A :class:`ObjectFiles` pickles as its location and opens its client anew
in the process that unpickles it (a DataLoader worker, a dask worker); its endpoint and
credentials come from that process's environment (stores.location).
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator

import obstore

from stores.location import Location
from xmei.errors import UserError, decode_text, json_lines, json_value, parse_json_lines, read_json, write_whole

__all__ = ["CONCURRENT", "FolderFiles", "ObjectChanged", "ObjectFiles", "ObjectStorageError", "store_files"]

CONCURRENT = 16  # requests in flight at once from one process (objects, shards of a batch)
STREAM_BYTES = 8 * 2**20  # the pieces a copy streams a shard file in (one may be 270 MB: 64 clips of 4.2 MB)
MISSING = (FileNotFoundError, obstore.exceptions.NotFoundError)
CREDENTIALS = {
    "s3": "credentials come from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or AWS_PROFILE), the endpoint of an "
          "S3-compatible server from stores.endpoint_url or AWS_ENDPOINT_URL",
    "gs": "credentials come from GOOGLE_APPLICATION_CREDENTIALS (or GOOGLE_SERVICE_ACCOUNT)",
    "az": "credentials come from AZURE_STORAGE_ACCOUNT_KEY (or AZURE_STORAGE_SAS_KEY, AZURE_CLIENT_ID ...)",
}


class ObjectChanged(Exception):
    """An object read by a version (ETag) that it no longer is: rewritten since."""


class ObjectStorageError(UserError, OSError):
    """A request to object storage that failed for another reason than a missing object: the
    message names the object and where the credentials and endpoint come from."""


def store_files(where: str | Path | Location) -> "FolderFiles | ObjectFiles":
    """The files of the store at ``where`` (a folder, a file:// or an s3:// gs:// az:// URL)."""
    location = where if isinstance(where, Location) else Location.parse(where)
    return ObjectFiles(location) if location.remote else FolderFiles(location.path)


class FolderFiles:
    """A store's files in a local folder (``root``)."""

    remote = False

    def __init__(self, root: Path):
        self.root = Path(root)
        self.where = str(self.root)

    def name(self, key: str = "") -> str:
        return str(self.root / key) if key else self.where

    def path(self, key: str) -> Path:
        return self.root / key

    def read(self, key: str) -> bytes:
        return (self.root / key).read_bytes()

    def read_many(self, keys: Iterable[str]) -> list[bytes | OSError | None]:
        """Each key's bytes, None where there is no file, the error where it cannot be read."""
        return [_or_error(self.read, key) for key in keys]

    def json(self, key: str, what: str, error: type[UserError], kind: type | None = dict, hint: str = "") -> Any:
        """The JSON value of a file (xmei.errors.read_json: ``error`` naming it when it cannot be)."""
        return read_json(self.root / key, what, error, kind, hint)

    def lines(self, key: str, what: str, error: type[UserError], hint: str = ""):
        """(line number, value) of a JSON Lines file (xmei.errors.json_lines)."""
        return json_lines(self.root / key, what, error, hint)

    def exists(self, key: str = "") -> bool:
        return (self.root / key).exists()

    def sizes(self) -> dict[str, int]:
        """Every file under the folder, by key: its size in bytes."""
        return {p.relative_to(self.root).as_posix(): p.stat().st_size for p in self.root.rglob("*") if p.is_file()}

    def chunks(self, key: str) -> Iterator[bytes]:
        """The file's bytes, a piece at a time (a copy streams them: stores.store.copy_store)."""
        with open(self.root / key, "rb") as f:
            while piece := f.read(STREAM_BYTES):
                yield piece

    def put(self, key: str, source: "FolderFiles | ObjectFiles") -> None:
        """The same key of ``source`` streamed into this folder (the caller writes into a folder
        renamed into place when whole)."""
        path = self.root / key
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as f:
            for piece in source.chunks(key):
                f.write(piece)

    def write(self, key: str, data: bytes | str, what: str, hint: str = "") -> None:
        path = self.root / key
        path.parent.mkdir(parents=True, exist_ok=True)
        write_whole(path, data if isinstance(data, str) else (lambda partial: partial.write_bytes(data)), what, hint)

    def zarr_store(self, read_only: bool) -> Any:
        from zarr.storage import LocalStore

        return LocalStore(self.root, read_only=read_only)


class ObjectFiles:
    """A store's objects in a bucket, under its location's key (stores.location). A missing object
    is a FileNotFoundError; any other failure of a request (credentials refused, no endpoint) an
    :class:`ObjectStorageError` naming the object and where its credentials come from."""

    remote = True

    def __init__(self, location: Location):
        self.location = location
        self.where = str(location)
        self._objects = None
        self._pool: ThreadPoolExecutor | None = None

    def __getstate__(self) -> dict:
        return {"location": self.location}  # no client and no threads travel: the other process opens its own

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["location"])

    @property
    def objects(self):
        """The obstore store under the location's key, opened on first use in this process."""
        if self._objects is None:
            self._objects = self.location.object_store()
        return self._objects

    @property
    def pool(self) -> ThreadPoolExecutor:
        """Threads for concurrent requests (obstore's calls release the GIL while they wait)."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(CONCURRENT, thread_name_prefix="xmei-objects")
        return self._pool

    def name(self, key: str = "") -> str:
        return f"{self.where}/{key}" if key else self.where

    @contextmanager
    def _request(self, key: str, doing: str) -> Iterator[None]:
        try:
            yield
        except MISSING:
            raise FileNotFoundError(f"{self.name(key)}: no such object") from None
        except obstore.exceptions.BaseError as err:
            raise ObjectStorageError(f"{self.name(key)}: cannot {doing} ({type(err).__name__}: {_first_line(err)}); "
                                     f"{CREDENTIALS[self.location.scheme]}") from None

    def read(self, key: str) -> bytes:
        with self._request(key, "read it"):
            return bytes(obstore.get(self.objects, key).bytes())

    def read_many(self, keys: Iterable[str]) -> list[bytes | OSError | None]:
        """Each key's bytes, None where there is no object, the error where it cannot be read:
        CONCURRENT requests at a time."""
        return list(self.pool.map(lambda key: _or_error(self.read, key), keys))

    def json(self, key: str, what: str, error: type[UserError], kind: type | None = dict, hint: str = "") -> Any:
        """The JSON value of an object, worded as xmei.errors.read_json words a file's."""
        return json_value(self._text(key, what, error, hint), self.name(key), what, error, kind, hint)

    def lines(self, key: str, what: str, error: type[UserError], hint: str = ""):
        """(line number, value) of a JSON Lines object, as xmei.errors.json_lines gives a file's."""
        return parse_json_lines(self._text(key, what, error, hint), self.name(key), what, error, hint)

    def _text(self, key: str, what: str, error: type[UserError], hint: str) -> str:
        name, then = self.name(key), f"; {hint}" if hint else ""
        try:
            data = self.read(key)
        except FileNotFoundError:
            raise error(f"{name} ({what}) does not exist{then}") from None
        except OSError as err:
            raise error(f"{name} ({what}) {err}{then}") from None
        return decode_text(data, name, what, error, hint)

    def exists(self, key: str = "") -> bool:
        """Whether the object ``key`` exists; with no key, whether any object lies under the store's."""
        with self._request(key, "list it" if not key else "look it up"):
            if not key:
                return any(len(batch) for batch in obstore.list(self.objects, chunk_size=1))
            try:
                obstore.head(self.objects, key)
            except MISSING:
                return False
            return True

    def sizes(self) -> dict[str, int]:
        """Every object under the store's key: its size."""
        with self._request("", "list it"):
            return {o["path"]: int(o["size"]) for batch in obstore.list(self.objects, chunk_size=1000) for o in batch}

    def chunks(self, key: str) -> Iterator[memoryview]:
        """The object's bytes, a piece at a time (one request, streamed)."""
        with self._request(key, "read it"):
            for piece in obstore.get(self.objects, key).stream(min_chunk_size=STREAM_BYTES):
                yield memoryview(piece)

    def put(self, key: str, source: "FolderFiles | ObjectFiles") -> None:
        """The same key of ``source`` streamed into one object here (a multipart upload past 5 MB,
        which the server shows only whole)."""
        with self._request(key, "write it"):
            data = source.path(key) if isinstance(source, FolderFiles) else source.chunks(key)
            obstore.put(self.objects, key, data)

    def write(self, key: str, data: bytes | str, what: str, hint: str = "") -> None:
        with self._request(key, f"write it ({what})"):
            obstore.put(self.objects, key, data.encode() if isinstance(data, str) else data)

    def create(self, key: str, data: bytes) -> bool:
        """Write ``key`` only when no object has that name (a conditional PUT: one writer wins);
        False when one had."""
        with self._request(key, "create it"):
            try:
                obstore.put(self.objects, key, data, mode="create")
            except obstore.exceptions.AlreadyExistsError:
                return False
            return True

    def delete(self, key: str) -> None:
        with self._request(key, "delete it"):
            obstore.delete(self.objects, key)

    def remove_all(self) -> None:
        """Delete every object under the store's key."""
        with self._request("", "delete its objects"):
            for batch in obstore.list(self.objects, chunk_size=1000):
                if len(batch):
                    obstore.delete(self.objects, [o["path"] for o in batch])

    def zarr_store(self, read_only: bool) -> Any:
        from zarr.storage import ObjectStore

        return ObjectStore(self.objects, read_only=read_only)

    def ranges(self, key: str, starts: list[int], ends: list[int], version: str | None = None) -> list[memoryview]:
        """Byte ranges [start, end) of one object, one request each (none merged here: the caller
        merges neighbours, so that it can count its requests). ``version``: the ETag :meth:`tail`
        gave; an :class:`ObjectChanged` when the object has been rewritten since."""
        condition = {"if_match": version} if version else {}
        out = []
        with self._request(key, "read it"):
            for start, end in zip(starts, ends):
                try:
                    got = obstore.get(self.objects, key, options={"range": (start, end), **condition})
                except obstore.exceptions.PreconditionError:
                    raise ObjectChanged(self.name(key)) from None
                out.append(memoryview(got.bytes()))
        return out

    def tail(self, key: str, n: int) -> tuple[memoryview, int, str | None]:
        """The last ``n`` bytes of an object (one suffix-range request), its size and its version
        (ETag); FileNotFoundError when there is none."""
        with self._request(key, "read it"):
            got = obstore.get(self.objects, key, options={"range": {"suffix": n}})
            return memoryview(got.bytes()), int(got.meta["size"]), got.meta.get("e_tag")

def _or_error(read, key: str) -> bytes | OSError | None:
    try:
        return read(key)
    except FileNotFoundError:
        return None
    except OSError as err:
        return err


def _first_line(err: BaseException) -> str:
    """obstore's messages run to many lines of the client's debug output: the first is the reason."""
    return str(err).strip().splitlines()[0] if str(err).strip() else ""
