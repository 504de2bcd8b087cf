"""Data errors that are safe to show: they name the dataset and shard, never a credential.

Every message that leaves the data plane (exception text, log lines) goes through `scrub`, because
botocore errors and endpoint URLs can carry secrets: keys embedded in a URL (`https://KEY:SECRET@
host`), presigned query strings (`?X-Amz-Credential=...&X-Amz-Signature=...`) and, in the worst
case, the secret values themselves.
"""

import os
import re

# Values that must never be printed: the standard AWS environment variables, plus whatever
# credentials a boto3 session resolved (profiles, IRSA), registered by s3.py when it makes a client.
_SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_ACCESS_KEY_ID")
_registered: set[str] = set()

_USERINFO = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://)[^/\s@'\"]+@")
_QUERY = re.compile(r"(https?://[^\s?'\"]+)\?[^\s'\"]*")


def register_secret(value: str | None) -> None:
    """Remember a credential value so that `scrub` blanks it wherever it appears."""
    if value and len(value) >= 4:  # a too-short value would blank innocent text
        _registered.add(value)


def scrub(text: str) -> str:
    """`text` with URL credentials, query strings of http(s) URLs and known secrets replaced by ***."""
    text = _USERINFO.sub(r"\1***@", str(text))
    text = _QUERY.sub(r"\1?***", text)
    secrets = _registered | {os.environ[k] for k in _SECRET_ENV if len(os.environ.get(k, "")) >= 4}
    for secret in sorted(secrets, key=len, reverse=True):
        text = text.replace(secret, "***")
    return text


class DataError(ValueError):
    """A dataset cannot be read: the message starts with the URI of the dataset or shard.

    Example: `s3://bucket/celeba32/shard-000003.tar: sha256 mismatch (manifest abc..., got def...)`.
    The single-string constructor keeps the exception picklable (Ray ships it between processes).
    """

    def __init__(self, message: str):
        super().__init__(scrub(message))


def describe(exc: BaseException) -> str:
    """A short, scrubbed description of a lower-level exception (class name and message)."""
    return scrub(f"{type(exc).__name__}: {exc}")
