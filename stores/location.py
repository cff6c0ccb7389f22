"""Where a store lives: a local folder, or a URL of object storage (s3://, gs://, az://, file://).

    where = Location.parse("s3://bucket/stores/train")
    where.remote, where.scheme, where.bucket, where.key      # True, "s3", "bucket", "stores/train"
    objects = where.object_store(endpoint_url="http://127.0.0.1:9000")  # an obstore store under the key
    zarr.open_group(zarr.storage.ObjectStore(objects, read_only=True))

Object storage goes through obstore (pinned; README "Stores past one machine" says why): one
Rust client for S3, GCS and Azure, read by zarr (``zarr.storage.ObjectStore``) and by its own range
requests (``obstore.get_ranges`` merges neighbouring ranges into one request). Credentials and
endpoints come from each cloud's usual environment variables, which obstore reads (``AWS_*`` such as
AWS_ACCESS_KEY_ID, AWS_ENDPOINT_URL, AWS_ALLOW_HTTP; ``GOOGLE_*``; ``AZURE_*``), and for an
S3-compatible server from the config key ``stores.endpoint_url``. None is ever kept in a Location,
shown by ``str()`` or written anywhere: a URL that carries them (``user:secret@``, a query string)
is refused.

Process model: obstore runs a Rust (tokio) runtime in the process. A process that has used it must
not fork a child that uses it: with obstore 0.12.1 the forked child hangs on its first request,
even with a store of its own (measured here); a child started by forkserver or spawn works.
Processes that read a URL store (DataLoader workers, decode pools) are started so.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from urllib.parse import urlsplit

from xmei.errors import UserError

__all__ = ["SCHEMES", "Location", "LocationError", "use_endpoint"]

SCHEMES = ("s3", "gs", "az", "file")  # what a store argument may start with (then ://)
# a request is tried again for a minute at most (obstore's default: 3 minutes), so that a wrong
# endpoint or a server gone ends a command with its error within a minute
RETRIES = {"max_retries": 5, "retry_timeout": timedelta(seconds=60)}


class LocationError(UserError, ValueError):
    """A store location that cannot be used: the message names it and what is expected."""


@dataclass(frozen=True)
class Location:
    """A store's place: ``scheme`` "" for a local path (``path`` then), else the URL's scheme,
    ``bucket`` (for az://, the account and container: "account/container") and ``key`` (the
    prefix of the store's objects, without slashes at either end)."""

    scheme: str
    bucket: str = ""
    key: str = ""
    path: Path | None = None

    @classmethod
    def parse(cls, where: str | Path) -> "Location":
        """A local path (str or Path, or file://), or an s3:// gs:// az:// URL; anything else that
        looks like a URL is a LocationError naming the schemes taken."""
        if isinstance(where, Path) or "://" not in str(where):
            return cls("", path=Path(where))
        text = str(where)
        parts = urlsplit(text)
        scheme = parts.scheme.lower()
        if scheme not in SCHEMES:
            raise LocationError(f"{_shown(text)}: a store is a folder or a URL of {', '.join(s + '://' for s in SCHEMES)}; "
                                f"not {scheme}://")
        if parts.username or parts.password or parts.query or parts.fragment:
            raise LocationError(f"{_shown(text)}: credentials and options do not go in a store's URL (it is printed "
                                "and recorded); give them by the cloud's environment variables "
                                "(AWS_ACCESS_KEY_ID, GOOGLE_APPLICATION_CREDENTIALS, AZURE_STORAGE_ACCOUNT_KEY, ...)")
        if scheme == "file":
            if parts.netloc not in ("", "localhost"):
                raise LocationError(f"{text}: a file:// URL names a local path (file:///abs/path), not host "
                                    f"{parts.netloc}")
            return cls("", path=Path(parts.path))
        key = parts.path.strip("/")
        bucket = parts.netloc
        if scheme == "az":  # az://account/container/key
            container, _, key = key.partition("/")
            bucket = f"{bucket}/{container}" if container else ""
        if not bucket:
            raise LocationError(f"{text}: no {'account/container' if scheme == 'az' else 'bucket'} in the URL")
        if not key:
            raise LocationError(f"{text}: a store needs a key under the bucket ({scheme}://{bucket}/NAME), "
                                "not the bucket's root")
        return cls(scheme, bucket, key)

    @property
    def remote(self) -> bool:
        return bool(self.scheme)

    def __str__(self) -> str:
        return f"{self.scheme}://{self.bucket}/{self.key}".rstrip("/") if self.remote else str(self.path)

    @property
    def parent(self) -> "Location":
        """The location holding this one (for a URL, the key one level up, perhaps the bucket's root)."""
        if self.remote:
            return Location(self.scheme, self.bucket, self.key.rpartition("/")[0])
        return Location("", path=self.path.parent)

    @property
    def name(self) -> str:
        return self.key.rpartition("/")[2] if self.remote else self.path.name

    def absolute(self) -> str:
        """The URL, or the folder's absolute path (links resolved): what a worker elsewhere is given."""
        return str(self) if self.remote else str(self.path.resolve())

    def child(self, name: str) -> "Location":
        """The location of ``name`` inside this one (a subfolder, or a longer key)."""
        if self.remote:
            return Location(self.scheme, self.bucket, "/".join(filter(None, (self.key, name.strip("/")))))
        return Location("", path=self.path / name)

    def object_store(self, endpoint_url: str | None = None, read_only: bool = False):
        """The obstore store whose paths are relative to this location (a LocalStore for a folder,
        created when missing unless ``read_only``). ``endpoint_url``: an S3-compatible server
        (http:// is allowed then); credentials as the module docstring says."""
        from obstore.store import LocalStore, from_url

        if not self.remote:
            if not read_only:
                self.path.mkdir(parents=True, exist_ok=True)
            return LocalStore(self.path.resolve())
        options = {}
        if endpoint_url is not None:
            if self.scheme != "s3":
                raise LocationError(f"stores.endpoint_url is for S3-compatible servers; {self} is {self.scheme}://")
            options = {"endpoint": endpoint_url,
                       "client_options": {"allow_http": endpoint_url.startswith("http://")}}
        return from_url(str(self), retry_config=RETRIES, **options)


def use_endpoint(endpoint_url: str | None) -> None:
    """Make ``endpoint_url`` (``stores.endpoint_url``: an S3-compatible server) the endpoint of every
    s3:// store this process opens, and of the processes it starts (DataLoader workers, a local
    dask cluster), as AWS_ENDPOINT_URL (and AWS_ALLOW_HTTP for an http:// one). None: as the
    environment says. It goes into the environment, never into a store, log or checkpoint."""
    if endpoint_url:
        os.environ["AWS_ENDPOINT_URL"] = endpoint_url
        if endpoint_url.startswith("http://"):
            os.environ["AWS_ALLOW_HTTP"] = "true"


def _shown(text: str) -> str:
    """A URL as a message may show it: what could be a secret (user:secret@, a query) cut out."""
    parts = urlsplit(text)
    host = parts.hostname or ""
    return f"{parts.scheme}://{host}{parts.path}" + (" (with a query, not shown)" if parts.query else "")
