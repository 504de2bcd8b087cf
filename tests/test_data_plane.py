"""The data plane against a real S3 endpoint (moto's server on loopback): pack, stream, split,
integrity errors, retries across a server restart, and no credential in any log or MLflow param."""

import io
import json
import os
import shutil
import subprocess
import tarfile
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from conftest import PYTHON, REPO, tiny_sweep, write_sweep
from ditsweep.data import DataError, dataset_size, load_range, load_split, parse_dataset_uri
from ditsweep.data.__main__ import main as data_cli
from ditsweep.data.builtin import load_builtin
from ditsweep.data.errors import scrub
from ditsweep.data.pack import pack
from ditsweep.data.s3 import S3Settings
from ditsweep.data.sources import center_crop, image_files
from ditsweep.data.store import Store
from ditsweep.data.stream import EndlessShardList, stream_train_batches
from s3server import FAKE_SECRET, S3Server, s3_server  # noqa: F401 - s3_server is a fixture

RES, SHARD = 8, 500  # builtin:photos at 8x8: 3510 images in 8 shards, the last one holds 10
BUCKET = "ditsweep-data"


@pytest.fixture(scope="module")
def packed(s3_server, tmp_path_factory):
    """builtin:photos packed once to a local directory and once to S3 (multipart forced)."""
    s3_server.create_bucket(BUCKET)
    local = tmp_path_factory.mktemp("packed") / "photos8"
    pack("builtin:photos", str(local), RES, SHARD, seed=0, progress=False)
    uri = f"s3://{BUCKET}/photos8"
    pack("builtin:photos", uri, RES, SHARD, seed=0, progress=False,
         settings=S3Settings(multipart_threshold=64 * 1024))  # every shard is > 64 KiB
    return {"local": str(local), "s3": uri}


def manifest_of(uri: str) -> dict:
    return json.loads(Store(parse_dataset_uri(uri).location).read_bytes("manifest.json"))


def copy_dataset(server: S3Server, src: str, dst: str) -> str:
    """Copy every object of s3://BUCKET/src to s3://BUCKET/dst; returns the new URI."""
    client = server.client()
    for obj in client.list_objects_v2(Bucket=BUCKET, Prefix=src + "/")["Contents"]:
        # get + put, not copy_object: moto's copy of a multipart object keeps a checksum that no
        # longer matches, which botocore then rejects
        data = client.get_object(Bucket=BUCKET, Key=obj["Key"])["Body"].read()
        client.put_object(Bucket=BUCKET, Key=dst + obj["Key"][len(src):], Body=data)
    return f"s3://{BUCKET}/{dst}"


# --- packing and reading back ---------------------------------------------------------------

def test_s3_and_local_packs_are_identical_and_in_builtin_order(packed, s3_server):
    ref = load_builtin("photos", RES, seed=0)
    from_s3, _ = load_split(packed["s3"], RES, len(ref), 0)
    from_local, _ = load_split(packed["local"], RES, len(ref), 0)
    assert from_s3.dtype == np.uint8 and from_s3.shape == ref.shape
    assert np.array_equal(from_s3, from_local) and np.array_equal(from_s3, ref)

    m_s3, m_local = manifest_of(packed["s3"]), manifest_of(packed["local"])
    assert m_s3 == m_local  # byte-identical shards: same sha256 everywhere
    assert m_s3["count"] == len(ref) and m_s3["resolution"] == RES and m_s3["seed"] == 0
    assert [s["count"] for s in m_s3["shards"]] == [SHARD] * 7 + [len(ref) - 7 * SHARD]
    # uploaded in parts: S3 gives multipart objects an ETag ending in -<parts>
    etag = s3_server.client().head_object(Bucket=BUCKET, Key="photos8/shard-000000.tar")["ETag"]
    assert etag.strip('"').endswith("-1")
    # the split of the packed dataset is the split of the built-in one, image for image
    train, test = load_split(packed["s3"], RES, 100, 300)
    b_train, b_test = load_split("builtin:photos", RES, 100, 300)
    assert np.array_equal(train, b_train) and np.array_equal(test, b_test)


def test_uri_forms_and_resolution(packed, tmp_path, monkeypatch):
    local = packed["local"]
    n = dataset_size(packed["s3"], RES)
    assert dataset_size(local, RES) == dataset_size("file://" + local, RES) == n
    monkeypatch.chdir(Path(local).parent.parent)
    assert dataset_size(os.path.join(Path(local).parent.name, "photos8"), RES) == n
    # inside a Tune trial relative paths are taken from the sweep's original directory
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TUNE_ORIG_WORKING_DIR", str(Path(local).parent))
    assert dataset_size("photos8", RES) == n
    with pytest.raises(ValueError, match=r"packed at resolution 8.*data.resolution is 32"):
        dataset_size(packed["s3"], 32)
    with pytest.raises(ValueError, match="unsupported dataset URI"):
        parse_dataset_uri("gs://bucket/x")
    with pytest.raises(DataError) as err:
        parse_dataset_uri(f"s3://AKIAXX:{FAKE_SECRET}@{BUCKET}/photos8")
    assert FAKE_SECRET not in str(err.value) and "standard AWS chain" in str(err.value)


def test_split_reads_only_the_shards_it_needs(packed, monkeypatch):
    fetched = []
    original = Store.download
    monkeypatch.setattr(Store, "download",
                        lambda self, name, dest: (fetched.append(name), original(self, name, dest)))
    train, test = load_split(packed["s3"], RES, 10, 0)
    assert fetched == ["shard-000007.tar"] and len(train) == 10 and len(test) == 0
    fetched.clear()
    load_split(packed["s3"], RES, 10, 10)  # test images come from the first shard
    assert sorted(fetched) == ["shard-000000.tar", "shard-000007.tar"]
    fetched.clear()
    train, _ = load_split(packed["s3"], RES, 600, 0)  # 10 + 500 + 90: the last three shards
    assert sorted(fetched) == ["shard-000005.tar", "shard-000006.tar", "shard-000007.tar"]
    fetched.clear()
    first_ten = load_range(packed["s3"], RES, 3510 - 600, 3510 - 590)  # a streamed trial's eval set
    assert fetched == ["shard-000005.tar"] and np.array_equal(first_ten, train[:10])
    assert np.array_equal(load_range("builtin:photos", RES, 3510 - 600, 3510 - 590), first_ten)


def test_stream_train_batches_from_s3(packed, tmp_path):
    n_train = 600
    train, _ = load_split(packed["local"], RES, n_train, 0)
    allowed = {img.tobytes() for img in train}
    cache = tmp_path / "cache"
    batches = stream_train_batches(packed["s3"], n_train, 32, seed=0, shuffle_buffer=100,
                                   num_workers=2, cache_dir=str(cache))
    seen = set()
    for _ in range(60):  # > 3 passes over the training set: the stream is endless
        batch = next(batches)
        assert batch.shape == (32, 3, RES, RES) and batch.dtype.is_floating_point
        assert batch.min() >= -1 and batch.max() <= 1
        u8 = ((batch + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
        for img in u8:
            assert img.tobytes() in allowed  # only training images, never a test one
            seen.add(img.tobytes())
    assert len(seen) > 0.9 * n_train
    # only the three shards of the last 600 images were downloaded (into the cache)
    assert sorted(p.name.split("-", 1)[1] for p in cache.iterdir()) == [
        "shard-000005.tar", "shard-000006.tar", "shard-000007.tar"]
    # N=10 lives in one shard: two workers still both deliver (they take turns on it)
    small = stream_train_batches(packed["local"], 10, 4, seed=1, num_workers=2)
    assert {next(small).shape for _ in range(6)} == {(4, 3, RES, RES)}


def test_shards_are_split_by_node(monkeypatch):
    urls = [f"s{i}" for i in range(6)]
    per_rank = []
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        stream = wds.split_by_node(iter(EndlessShardList(urls, seed=3)))
        per_rank.append([next(stream)["url"] for _ in range(3)])  # one epoch's share
    assert sorted(per_rank[0] + per_rank[1]) == urls


# --- packing a folder -------------------------------------------------------------------------

def test_pack_a_folder_with_class_subfolders(tmp_path):
    rng = np.random.default_rng(0)
    src = tmp_path / "images"
    (src / "cats").mkdir(parents=True)
    (src / "dogs").mkdir()
    Image.fromarray(rng.integers(0, 255, (40, 60, 3), np.uint8)).save(src / "cats" / "a.jpg")
    Image.fromarray(rng.integers(0, 255, (30, 20, 4), np.uint8)).save(src / "cats" / "b.png")  # RGBA
    Image.fromarray(rng.integers(0, 255, (50, 50), np.uint8)).save(src / "dogs" / "c.bmp")  # grey
    Image.fromarray(rng.integers(0, 255, (10, 12, 3), np.uint8)).save(src / "dogs" / "d.webp")
    (src / "notes.txt").write_text("not an image")
    dest = tmp_path / "packed"
    assert data_cli(["pack", str(src), str(dest), "--resolution", "16", "--shard-size", "3",
                     "--seed", "5", "--workers", "2"]) == 0

    files = image_files(src)
    assert files == ["cats/a.jpg", "cats/b.png", "dogs/c.bmp", "dogs/d.webp"]
    order = [files[i] for i in np.random.default_rng(5).permutation(len(files))]
    manifest = manifest_of(str(dest))
    assert manifest["count"] == 4 and [s["count"] for s in manifest["shards"]] == [3, 1]
    images, _ = load_split(str(dest), 16, 4, 0)
    for index, name in enumerate(order):
        expected = center_crop(Image.open(src / name), 16)
        assert np.array_equal(images[index], expected), name
    with tarfile.open(dest / "shard-000000.tar") as tar:
        meta = json.load(tar.extractfile("00000000.json"))
    assert meta == {"index": 0, "source": order[0], "class": order[0].split("/")[0]}

    limited = pack(str(src), str(tmp_path / "limited"), 16, seed=5, limit=2, progress=False)
    assert limited.count == 2  # a random subset: the first two of the same shuffle
    assert np.array_equal(load_split(str(tmp_path / "limited"), 16, 2, 0)[0], images[:2])

    (src / "dogs" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    with pytest.raises(DataError, match="broken.jpg: cannot read image"):
        pack(str(src), str(tmp_path / "again"), 16, progress=False)


def test_center_crop_is_square_and_rgb():
    img = Image.fromarray(np.zeros((100, 300), np.uint8))
    assert center_crop(img, 32).shape == (32, 32, 3)
    small = Image.fromarray(np.zeros((5, 7, 3), np.uint8))
    assert center_crop(small, 32).shape == (32, 32, 3)


# --- integrity --------------------------------------------------------------------------------

def test_wrong_checksum_and_corrupted_shard_on_s3(packed, s3_server):
    client = s3_server.client()
    wrong = copy_dataset(s3_server, "photos8", "wrong-sum")
    manifest = manifest_of(wrong)
    manifest["shards"][7]["sha256"] = "0" * 64
    client.put_object(Bucket=BUCKET, Key="wrong-sum/manifest.json", Body=json.dumps(manifest))
    with pytest.raises(DataError, match=rf"^{wrong}/shard-000007.tar: sha256 mismatch "
                                        r"\(manifest 0000000000000000\.\.\., got [0-9a-f]{16}\.\.\.\)"):
        load_split(wrong, RES, 10, 0)

    corrupt = copy_dataset(s3_server, "photos8", "corrupt")
    key = "corrupt/shard-000007.tar"
    data = bytearray(client.get_object(Bucket=BUCKET, Key=key)["Body"].read())
    data[1600:1610] = bytes(b ^ 0xFF for b in data[1600:1610])  # inside the first PNG
    client.put_object(Bucket=BUCKET, Key=key, Body=bytes(data))
    with pytest.raises(DataError, match=rf"^{corrupt}/shard-000007.tar: sha256 mismatch"):
        load_split(corrupt, RES, 10, 0)
    assert data_cli(["verify", corrupt]) == 1
    assert data_cli(["verify", packed["s3"]]) == 0


def _rewrite_shard(dataset: Path, shard: str, edit) -> None:
    """Replace a shard of a local packed dataset and make the manifest agree with it."""
    path = dataset / shard
    edit(path)
    manifest = json.loads((dataset / "manifest.json").read_text())
    for s in manifest["shards"]:
        if s["name"] == shard:
            s["sha256"] = __import__("hashlib").sha256(path.read_bytes()).hexdigest()
            s["bytes"] = path.stat().st_size
    (dataset / "manifest.json").write_text(json.dumps(manifest))


def test_truncated_tar_bad_image_and_missing_files(packed, tmp_path):
    # truncated, with a manifest that agrees with the truncated bytes: the tar reader catches it
    truncated = tmp_path / "truncated"
    shutil.copytree(packed["local"], truncated)
    _rewrite_shard(truncated, "shard-000007.tar",
                   lambda p: p.write_bytes(p.read_bytes()[:-20000 - 300]))
    with pytest.raises(DataError, match=rf"^{truncated}/shard-000007.tar: .*truncated"):
        load_split(str(truncated), RES, 10, 0)

    # an image that does not decode: the error names the shard and the sample
    bad_image = tmp_path / "bad_image"
    shutil.copytree(packed["local"], bad_image)

    def break_last_png(path: Path) -> None:
        samples = list(wds.DataPipeline(wds.SimpleShardList([str(path)]), wds.tarfile_to_samples()))
        samples[-1]["png"] = b"\x89PNG definitely not an image"
        with open(path, "wb") as f, wds.TarWriter(f, encoder=False, mtime=0) as w:
            for s in samples:
                w.write({"__key__": s["__key__"], "png": s["png"], "json": s["json"]})
    _rewrite_shard(bad_image, "shard-000007.tar", break_last_png)
    last = f"{3510 - 1:08d}"
    with pytest.raises(DataError, match=rf"^{bad_image}/shard-000007.tar: sample {last}.png does not decode"):
        load_split(str(bad_image), RES, 10, 0)

    missing = tmp_path / "missing"
    shutil.copytree(packed["local"], missing)
    (missing / "shard-000007.tar").unlink()
    with pytest.raises(DataError, match=rf"^{missing}/shard-000007.tar: shard listed in the manifest is missing"):
        load_split(str(missing), RES, 10, 0)
    (missing / "manifest.json").unlink()
    with pytest.raises(DataError, match=rf"^{missing}: no manifest.json"):
        dataset_size(str(missing), RES)


def test_missing_manifest_and_bucket_on_s3(packed, s3_server):
    with pytest.raises(DataError, match=rf"^s3://{BUCKET}/nothing-here: no manifest.json"):
        dataset_size(f"s3://{BUCKET}/nothing-here", RES)
    with pytest.raises(DataError, match="s3://no-such-bucket/x/manifest.json: bucket does not exist"):
        dataset_size("s3://no-such-bucket/x", RES)


# --- retries ------------------------------------------------------------------------------------

@pytest.fixture
def own_server(monkeypatch):
    """A server of the test's own, which it may stop and restart."""
    with S3Server() as server:
        for name, value in server.env().items():
            monkeypatch.setenv(name, value)
        monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")  # let our own backoff do the waiting
        server.create_bucket(BUCKET)
        yield server


def test_stream_survives_the_server_stopping_mid_read(own_server, monkeypatch):
    monkeypatch.setenv("DITSWEEP_S3_RETRY_SECONDS", "60")
    uri = f"s3://{BUCKET}/photos8"
    pack("builtin:photos", uri, RES, 250, progress=False)  # 15 shards
    n_train = 3000  # 12 shards
    batches = stream_train_batches(uri, n_train, 50, seed=0, shuffle_buffer=10)
    next(batches)  # the first shard is being read
    snapshot = own_server.snapshot()
    own_server.stop()
    assert not own_server.is_up()
    down = 3.0
    restarter = threading.Timer(down, lambda: own_server.start(restore=snapshot))
    start = time.monotonic()
    restarter.start()
    try:
        for _ in range(n_train // 50 + 10):  # more than an epoch: every shard is read again
            assert next(batches).shape == (50, 3, RES, RES)
    finally:
        restarter.join()
    assert time.monotonic() - start >= down  # it really waited for the endpoint to come back
    assert own_server.is_up()

    # load_split started while the endpoint is away also waits for it
    own_server.stop()
    restarter = threading.Timer(down, lambda: own_server.start(restore=snapshot))
    restarter.start()
    train, test = load_split(uri, RES, 10, 10)
    restarter.join()
    assert np.array_equal(train, load_builtin("photos", RES)[-10:])


def test_an_error_in_the_middle_of_a_body_is_retried_from_the_start(monkeypatch):
    # botocore retries requests, not a response body that breaks halfway: that is our retry's job
    import botocore.exceptions

    from ditsweep.data import s3

    payload = bytes(range(256)) * 5000
    calls = []

    class Body:
        def __init__(self, broken: bool):
            self.broken = broken

        def iter_chunks(self, chunk_size):
            yield payload[: len(payload) // 2]
            if self.broken:
                raise botocore.exceptions.ResponseStreamingError(error="connection reset")
            yield payload[len(payload) // 2:]

        def close(self):
            pass

    class Client:
        def get_object(self, Bucket, Key):
            calls.append(Key)
            return {"Body": Body(broken=len(calls) == 1)}

    monkeypatch.setattr(s3, "client", lambda endpoint_url=None: Client())
    dest = io.BytesIO()
    s3.download("s3://bucket/key", dest, S3Settings(retry_seconds=10))
    assert dest.getvalue() == payload and calls == ["key", "key"]


def test_retries_are_bounded(own_server, monkeypatch):
    uri = f"s3://{BUCKET}/photos8"
    pack("builtin:photos", uri, RES, SHARD, progress=False)
    own_server.stop()
    monkeypatch.setenv("DITSWEEP_S3_RETRY_SECONDS", "3")
    start = time.monotonic()
    with pytest.raises(DataError, match=rf"^{uri}/manifest.json: read failed after \d+ attempts"):
        dataset_size(uri, RES)
    assert time.monotonic() - start < 20


def test_credentials_are_scrubbed(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", FAKE_SECRET)
    text = (f"https://AKIA:{FAKE_SECRET}@host/b/k?X-Amz-Credential=AKIA%2F&X-Amz-Signature=abc "
            f"secret={FAKE_SECRET}")
    clean = scrub(text)
    assert FAKE_SECRET not in clean and "X-Amz-Signature" not in clean and "https://***@host/b/k" in clean
    assert FAKE_SECRET not in str(DataError(text))
    # an endpoint URL that embeds keys never shows them in an error, on a refused connection
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", f"http://AKIA:{FAKE_SECRET}@127.0.0.1:9")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAXXXXXXXXXXXXXXXX")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    monkeypatch.setenv("DITSWEEP_S3_RETRY_SECONDS", "1")
    with pytest.raises(DataError) as err:
        dataset_size("s3://bucket/x", RES)
    assert FAKE_SECRET not in str(err.value) and "s3://bucket/x/manifest.json" in str(err.value)


def test_env_credentials_move_to_a_private_file(monkeypatch, tmp_path):
    import boto3

    from ditsweep.data.credentials import move_env_credentials_to_file

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAMOVEDKEY")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", FAKE_SECRET)
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))  # restored after
    path = move_env_credentials_to_file()
    assert "AWS_SECRET_ACCESS_KEY" not in os.environ and "AWS_ACCESS_KEY_ID" not in os.environ
    assert os.environ["AWS_SHARED_CREDENTIALS_FILE"] == path
    assert os.stat(path).st_mode & 0o777 == 0o600
    creds = boto3.session.Session().get_credentials().get_frozen_credentials()
    assert (creds.access_key, creds.secret_key) == ("AKIAMOVEDKEY", FAKE_SECRET)
    assert move_env_credentials_to_file() is None  # nothing left to move


# --- a sweep trial trains from s3 -------------------------------------------------------------

@pytest.mark.slow
def test_sweep_trial_trains_from_s3_and_no_secret_leaks(packed, s3_server, tmp_path):
    from mlflow.tracking import MlflowClient

    bad = copy_dataset(s3_server, "photos8", "sweep-bad")
    key = "sweep-bad/shard-000007.tar"
    client = s3_server.client()
    data = client.get_object(Bucket=BUCKET, Key=key)["Body"].read()
    client.put_object(Bucket=BUCKET, Key=key, Body=data[: len(data) // 2])  # truncated upload

    sweep = tiny_sweep(name="s3sweep")
    sweep["grid"]["dataset"] = [packed["s3"], bad]
    sweep["data"]["resolution"] = RES
    path = write_sweep(tmp_path, sweep)
    ray_tmp = tempfile.mkdtemp(prefix="r", dir="/tmp")  # short: Ray's socket paths are limited
    env = {**os.environ, **s3_server.env(), "RAY_TMPDIR": ray_tmp,
           "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    try:
        proc = subprocess.run([PYTHON, "-m", "ditsweep.run", str(path)], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=600)
        out = proc.stdout + proc.stderr
        # one trial trained from S3; the one with the broken shard failed with the shard's name,
        # and the sweep went on
        assert proc.returncode == 1, out[-4000:]
        assert "1/2 trials finished" in proc.stdout, out[-4000:]
        assert f"{bad}/shard-000007.tar: sha256 mismatch" in out

        ml = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
        exp = ml.get_experiment_by_name("s3sweep")
        runs = ml.search_runs([exp.experiment_id])
        children = [r for r in runs if r.data.tags.get("ditsweep.role") == "trial"]
        good = [r for r in children if r.data.params.get("dataset") == packed["s3"]]
        assert len(good) == 1 and good[0].info.status == "FINISHED"
        assert ml.get_metric_history(good[0].info.run_id, "psnr_gap_mean")

        # the secret was in every process's environment; it is nowhere in what they wrote
        for run in runs:
            values = [*run.data.params.values(), *run.data.tags.values(), *run.data.params.keys()]
            assert not any(FAKE_SECRET in str(v) for v in values), run.info.run_id
        assert FAKE_SECRET not in out
        leaks = [str(p) for root in (tmp_path, Path(ray_tmp)) for p in Path(root).rglob("*")
                 if p.is_file() and not p.is_socket() and FAKE_SECRET.encode() in _read(p)]
        assert not leaks, (f"secret written to {leaks}. Ray Tune copies AWS_* keys into each "
                           "trainable's runtime_env, which runtime_env_agent.log records: the driver "
                           "must call ditsweep.data.credentials.move_env_credentials_to_file() "
                           "before ray.init")
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError:
        return b""
