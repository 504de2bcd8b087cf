"""S3 through boto3: one client per process, retries with backoff, whole-object reads, uploads.

Credentials come from boto3's standard chain (environment, shared config/profiles, IRSA, instance
metadata); nothing here reads or stores them except to blank them in error text. The endpoint is
boto3's too: `AWS_ENDPOINT_URL_S3`, then `AWS_ENDPOINT_URL`, then the config file, unless an explicit
`endpoint_url` is given. MinIO, Ceph, R2 or moto's server are all just another endpoint.

Two layers of retries:
- botocore retries each request (mode "adaptive" by default: backoff plus client-side rate
  limiting on throttling); `AWS_RETRY_MODE` / `AWS_MAX_ATTEMPTS` override it as usual;
- on top, every whole-object operation (download a shard, upload a shard) is retried with
  exponential backoff until `retry_seconds` have passed, because botocore does not retry an
  error in the middle of a response body, and because an endpoint that restarts can be gone
  for longer than botocore's few attempts.
"""

import logging
import os
import random
import threading
import time
from dataclasses import dataclass, field
from typing import BinaryIO, Callable, TypeVar

import boto3
import botocore.exceptions as bce
from boto3.exceptions import S3UploadFailedError
from boto3.s3.transfer import TransferConfig
from botocore.config import Config

from ditsweep.data.errors import DataError, describe, register_secret

log = logging.getLogger(__name__)
T = TypeVar("T")

MiB = 1024 * 1024
_THROTTLING = {"SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded",
               "TooManyRequests", "RequestTimeout", "InternalError", "ServiceUnavailable"}
_NOT_FOUND = {"NoSuchKey", "404", "NotFound"}
_DENIED = {"AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken",
           "InvalidToken"}


def _env_float(name: str, default: float) -> float:
    return float(os.environ.get(name, default))


@dataclass(frozen=True)
class S3Settings:
    """How to talk to S3. Defaults come from the environment so Ray workers inherit them."""
    endpoint_url: str | None = None  # None: boto3's own lookup (AWS_ENDPOINT_URL_S3, ...)
    retry_seconds: float = field(default_factory=lambda: _env_float("DITSWEEP_S3_RETRY_SECONDS", 300))
    multipart_threshold: int = field(
        default_factory=lambda: int(_env_float("DITSWEEP_S3_MULTIPART_THRESHOLD", 64 * MiB)))
    multipart_chunksize: int = 16 * MiB  # S3 needs >= 5 MiB parts; boto3 raises smaller values


class NotFound(DataError):
    """The object does not exist."""


class NoSuchBucket(DataError):
    """The bucket does not exist (not a NotFound: a missing bucket is not a missing file)."""


def split_url(url: str) -> tuple[str, str]:
    """`s3://bucket/some/key` -> ("bucket", "some/key")."""
    if not url.startswith("s3://"):
        raise ValueError(f"not an s3:// URL: {url!r}")
    bucket, _, key = url[len("s3://"):].partition("/")
    if not bucket:
        raise ValueError(f"s3 URL without a bucket: {url!r}")
    return bucket, key


_clients: dict[tuple, object] = {}
_lock = threading.Lock()
# A client is reused until one of these changes (a test moving to another endpoint, say).
_CLIENT_ENV = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_PROFILE",
               "AWS_SHARED_CREDENTIALS_FILE", "AWS_DEFAULT_REGION", "AWS_RETRY_MODE",
               "AWS_MAX_ATTEMPTS")


def client(endpoint_url: str | None = None):
    """A boto3 S3 client for this process (clients are thread-safe but must not cross a fork)."""
    key = (os.getpid(), endpoint_url, *(os.environ.get(name) for name in _CLIENT_ENV))
    with _lock:
        if key not in _clients:
            session = boto3.session.Session()
            credentials = session.get_credentials()
            if credentials is not None:  # remember them only to blank them in messages
                frozen = credentials.get_frozen_credentials()
                for value in (frozen.access_key, frozen.secret_key, frozen.token):
                    register_secret(value)
            retries = {"mode": os.environ.get("AWS_RETRY_MODE", "adaptive"),
                       "max_attempts": int(os.environ.get("AWS_MAX_ATTEMPTS", 6))}
            config = Config(retries=retries, connect_timeout=10, read_timeout=60, tcp_keepalive=True)
            _clients[key] = session.client("s3", endpoint_url=endpoint_url, config=config)
        return _clients[key]


def _transient(exc: BaseException) -> bool:
    """Worth retrying: connection trouble, a broken body, throttling or a server-side error."""
    if isinstance(exc, S3UploadFailedError) and exc.__cause__ is not None:
        return _transient(exc.__cause__)
    if isinstance(exc, (bce.ConnectionError, bce.HTTPClientError, bce.IncompleteReadError,
                        ConnectionError, TimeoutError)):
        return True
    if isinstance(exc, bce.ClientError):
        code = exc.response.get("Error", {}).get("Code", "")
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        return code in _THROTTLING or status == 429 or status >= 500
    return False


def _permanent_error(url: str, exc: BaseException) -> DataError:
    """Turn a non-retryable boto error into a DataError that says what to fix."""
    cause = exc.__cause__ if isinstance(exc, S3UploadFailedError) and exc.__cause__ else exc
    if isinstance(cause, bce.NoCredentialsError):
        return DataError(f"{url}: no AWS credentials found (set AWS_ACCESS_KEY_ID and "
                         "AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or use IRSA)")
    if isinstance(cause, bce.ClientError):
        code = cause.response.get("Error", {}).get("Code", "")
        if code == "NoSuchBucket":
            return NoSuchBucket(f"{url}: bucket does not exist")
        if code in _NOT_FOUND:
            return NotFound(f"{url}: no such object")
        if code in _DENIED:
            return DataError(f"{url}: access denied ({code}); check the credentials of the standard "
                             "AWS chain and the endpoint (AWS_ENDPOINT_URL_S3)")
    return DataError(f"{url}: {describe(cause)}")


def with_retries(url: str, what: str, fn: Callable[[], T], settings: S3Settings) -> T:
    """Run `fn` (one whole-object operation), retrying transient errors with backoff."""
    start, attempt = time.monotonic(), 0
    while True:
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - classified just below
            if not _transient(exc):
                raise _permanent_error(url, exc) from None
            attempt += 1
            elapsed = time.monotonic() - start
            delay = min(10.0, 0.5 * 2 ** (attempt - 1)) * random.uniform(0.5, 1.0)
            if elapsed + delay > settings.retry_seconds:
                raise DataError(f"{url}: {what} failed after {attempt} attempts in {elapsed:.0f}s "
                                f"({describe(exc)})") from None
            log.warning("%s: %s failed (%s); retry %d in %.1fs", url, what, describe(exc), attempt, delay)
            time.sleep(delay)


def download(url: str, dest: BinaryIO, settings: S3Settings | None = None) -> None:
    """Write the whole object into `dest` (from its start; rewound and truncated on each retry)."""
    settings = settings or S3Settings()
    bucket, key = split_url(url)
    start = dest.tell()

    def attempt() -> None:
        dest.seek(start)
        dest.truncate()
        body = client(settings.endpoint_url).get_object(Bucket=bucket, Key=key)["Body"]
        try:
            for chunk in body.iter_chunks(chunk_size=MiB):
                dest.write(chunk)
        finally:
            body.close()

    with_retries(url, "download", attempt, settings)


def read_bytes(url: str, settings: S3Settings | None = None) -> bytes:
    """The whole object as bytes (for small objects such as manifest.json)."""
    settings = settings or S3Settings()
    bucket, key = split_url(url)

    def attempt() -> bytes:
        body = client(settings.endpoint_url).get_object(Bucket=bucket, Key=key)["Body"]
        with body:
            return body.read()

    return with_retries(url, "read", attempt, settings)


def upload_file(path: str, url: str, settings: S3Settings | None = None) -> None:
    """Upload a local file; multipart (in parallel parts) when larger than the threshold."""
    settings = settings or S3Settings()
    bucket, key = split_url(url)
    transfer = TransferConfig(multipart_threshold=settings.multipart_threshold,
                              multipart_chunksize=settings.multipart_chunksize)
    with_retries(url, "upload", lambda: client(settings.endpoint_url).upload_file(
        path, bucket, key, Config=transfer), settings)


def put_bytes(url: str, data: bytes, settings: S3Settings | None = None) -> None:
    settings = settings or S3Settings()
    bucket, key = split_url(url)
    with_retries(url, "upload", lambda: client(settings.endpoint_url).put_object(
        Bucket=bucket, Key=key, Body=data), settings)
