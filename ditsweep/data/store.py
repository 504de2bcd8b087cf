"""Where a packed dataset lives: a local directory or an S3 prefix, behind one small interface.

Packing writes shards and a manifest into a `Store`; reading fetches them back. Local paths need
no retries; S3 goes through `s3.py`, which retries and blanks credentials in errors.
"""

import os
import shutil
from pathlib import Path
from typing import BinaryIO
from urllib.parse import unquote, urlparse

from ditsweep.data import s3
from ditsweep.data.errors import DataError


class Store:
    """A directory of files named by `name` (e.g. `shard-000000.tar`, `manifest.json`)."""

    def __init__(self, location: str, settings: s3.S3Settings | None = None):
        self.is_s3 = location.startswith("s3://")
        if self.is_s3:
            s3.split_url(location)  # checks there is a bucket
            self.root = location.rstrip("/")
        else:
            self.root = str(local_path(location))
        self.settings = settings or s3.S3Settings()

    def __repr__(self) -> str:
        return f"Store({self.root!r})"

    def url(self, name: str) -> str:
        """The printable location of one file (an s3:// URL or a local path)."""
        return f"{self.root}/{name}"

    def read_bytes(self, name: str) -> bytes:
        if self.is_s3:
            return s3.read_bytes(self.url(name), self.settings)
        try:
            return Path(self.url(name)).read_bytes()
        except FileNotFoundError:
            raise s3.NotFound(f"{self.url(name)}: no such file") from None

    def download(self, name: str, dest: BinaryIO) -> None:
        """Copy the file's bytes into `dest`."""
        if self.is_s3:
            s3.download(self.url(name), dest, self.settings)
            return
        try:
            with open(self.url(name), "rb") as f:
                shutil.copyfileobj(f, dest, 1 << 20)
        except FileNotFoundError:
            raise s3.NotFound(f"{self.url(name)}: no such file") from None

    def local_file(self, name: str) -> str | None:
        """The path of the file when the store is local (readers can then skip the copy)."""
        return None if self.is_s3 else self.url(name)

    def put_file(self, path: str, name: str) -> None:
        """Store a finished local file under `name` (moved when local, uploaded to S3)."""
        if self.is_s3:
            s3.upload_file(path, self.url(name), self.settings)
        else:
            os.makedirs(self.root, exist_ok=True)
            shutil.move(path, self.url(name))

    def put_bytes(self, name: str, data: bytes) -> None:
        if self.is_s3:
            s3.put_bytes(self.url(name), data, self.settings)
            return
        os.makedirs(self.root, exist_ok=True)
        tmp = self.url(name) + ".tmp"
        Path(tmp).write_bytes(data)
        os.replace(tmp, self.url(name))  # readers never see half a manifest


def local_path(location: str) -> Path:
    """A local path or file:// URI as an absolute path.

    Relative paths are taken from where the sweep was started: Ray Tune runs each trial in its
    own working directory and leaves the original one in TUNE_ORIG_WORKING_DIR.
    """
    if location.startswith("file://"):
        parsed = urlparse(location)
        if parsed.netloc not in ("", "localhost"):
            raise DataError(f"{location}: file:// URIs must name a local path (file:///abs/path)")
        return Path(unquote(parsed.path))
    base = Path(os.environ.get("TUNE_ORIG_WORKING_DIR", os.getcwd()))
    return (base / Path(location).expanduser()).resolve()
