"""A real S3 endpoint for tests: moto's standalone server on a loopback port, in a subprocess.

    from s3server import S3Server, s3_server      # s3_server is a pytest fixture

    with S3Server() as server:                    # python -m moto.server -H 127.0.0.1 -p PORT
        server.create_bucket("data")
        env = server.env()                        # endpoint + dummy credentials for clients
        ...
        snapshot = server.snapshot()              # every object, kept on local disk
        server.stop()                             # the endpoint is gone (connections refused)
        server.start(restore=snapshot)            # back on the same port with the same objects

moto keeps its objects in memory, so a restarted server is empty; `start(restore=...)` loads
the objects in a staging server on another port of the same process before the real port
opens, so no client ever sees the endpoint up but empty.

Run as a script (`python tests/s3server.py --port P --restore DIR`) it is that restoring server.
"""

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

FAKE_KEY_ID = "AKIADITSWEEPTESTKEY0"
FAKE_SECRET = "ditsweep-test-secret-Zq8vW3xK9pL2mN7r"  # distinctive: tests grep logs for it
REGION = "us-east-1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class S3Server:
    """moto's S3 server as a subprocess on 127.0.0.1; restartable on the same port."""

    def __init__(self, port: int | None = None, secret: str = FAKE_SECRET):
        self.port = port or free_port()
        self.secret = secret
        self.proc: subprocess.Popen | None = None
        self.workdir = Path(tempfile.mkdtemp(prefix="s3server-"))
        self.log_path = self.workdir / "server.log"

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        """Environment for clients: the endpoint (boto3 reads it natively) and dummy credentials."""
        return {"AWS_ENDPOINT_URL_S3": self.endpoint_url, "AWS_ACCESS_KEY_ID": FAKE_KEY_ID,
                "AWS_SECRET_ACCESS_KEY": self.secret, "AWS_DEFAULT_REGION": REGION}

    def client(self):
        import boto3
        return boto3.client("s3", endpoint_url=self.endpoint_url, region_name=REGION,
                            aws_access_key_id=FAKE_KEY_ID, aws_secret_access_key=self.secret)

    def create_bucket(self, name: str) -> None:
        self.client().create_bucket(Bucket=name)

    def start(self, restore: Path | None = None, timeout: float = 60) -> "S3Server":
        if self.proc is not None:
            raise RuntimeError("server already running")
        env = {**os.environ, **self.env()}
        if restore is None:
            cmd = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)]
        else:
            cmd = [sys.executable, __file__, "--port", str(self.port), "--restore", str(restore)]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + timeout
        while not self.is_up():
            if self.proc.poll() is not None:
                raise RuntimeError(f"moto server exited with {self.proc.returncode}; see {self.log_path}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"moto server did not answer within {timeout}s; see {self.log_path}")
            time.sleep(0.1)
        return self

    def is_up(self) -> bool:
        try:
            with urllib.request.urlopen(self.endpoint_url + "/moto-api/", timeout=1):
                return True
        except OSError:
            return False

    def stop(self) -> None:
        if self.proc is None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def snapshot(self) -> Path:
        """Copy every object to a local directory (bucket/key) that `start(restore=...)` loads."""
        target = Path(tempfile.mkdtemp(prefix="snapshot-", dir=self.workdir))
        _dump(self.client(), target)
        return target

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> "S3Server":
        return self.start() if self.proc is None else self

    def __exit__(self, *exc) -> None:
        self.close()


def _dump(client, target: Path) -> None:
    for bucket in client.list_buckets()["Buckets"]:
        (target / bucket["Name"]).mkdir(parents=True, exist_ok=True)
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket["Name"]):
            for obj in page.get("Contents", []):
                path = target / bucket["Name"] / obj["Key"]
                path.parent.mkdir(parents=True, exist_ok=True)
                client.download_file(bucket["Name"], obj["Key"], str(path))


def _load(client, source: Path) -> None:
    for bucket_dir in sorted(p for p in source.iterdir() if p.is_dir()):
        client.create_bucket(Bucket=bucket_dir.name)
        for path in sorted(p for p in bucket_dir.rglob("*") if p.is_file()):
            client.upload_file(str(path), bucket_dir.name, path.relative_to(bucket_dir).as_posix())


@pytest.fixture(scope="module")
def s3_server():
    """A running server for a test module, with the client environment set (endpoint, dummy keys)."""
    with S3Server() as server, pytest.MonkeyPatch.context() as mp:
        for name in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_SESSION_TOKEN", "AWS_CONFIG_FILE",
                     "AWS_SHARED_CREDENTIALS_FILE"):
            mp.delenv(name, raising=False)
        mp.setenv("AWS_CONFIG_FILE", str(server.workdir / "no-config"))  # ignore ~/.aws
        mp.setenv("AWS_SHARED_CREDENTIALS_FILE", str(server.workdir / "no-credentials"))
        for name, value in server.env().items():
            mp.setenv(name, value)
        yield server


def _serve(port: int, restore: Path) -> None:
    """The restoring server: load the objects through a staging port, then open the real one."""
    import boto3
    from moto.server import ThreadedMotoServer

    staging_port = free_port()
    staging = ThreadedMotoServer(ip_address="127.0.0.1", port=staging_port, verbose=False)
    staging.start()
    _load(boto3.client("s3", endpoint_url=f"http://127.0.0.1:{staging_port}", region_name=REGION),
          restore)
    # Both servers share the process's moto backends: the real port opens with the data in place.
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    staging.stop()
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        server.stop()


if __name__ == "__main__":
    import signal

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--restore", type=Path, required=True)
    args = parser.parse_args()
    _serve(args.port, args.restore)
