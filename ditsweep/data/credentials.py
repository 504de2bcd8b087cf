"""Keep S3 credentials out of Ray's logs.

Ray Tune copies AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN and
AWS_SECURITY_TOKEN from the driver's environment into every trainable's `runtime_env`
(ray/tune/execution/class_cache.py), and Ray's runtime-env agent logs each runtime env in full
at INFO level (`logs/runtime_env_agent.log` on every node). A driver started with credentials in
its environment therefore writes the secret key into the session logs.

`move_env_credentials_to_file()` moves them, before Ray starts, into a private (0600)
shared-credentials file named by AWS_SHARED_CREDENTIALS_FILE. boto3's standard chain finds them
there, in the driver and in every process Ray starts from it; Tune has nothing to copy. On a
cluster whose pods get credentials from their own environment (KubeRay secrets), the workers
keep using those.
"""

import atexit
import configparser
import os
import shutil
import tempfile

CREDENTIAL_ENV = {"AWS_ACCESS_KEY_ID": "aws_access_key_id",
                  "AWS_SECRET_ACCESS_KEY": "aws_secret_access_key",
                  "AWS_SESSION_TOKEN": "aws_session_token",
                  "AWS_SECURITY_TOKEN": "aws_security_token"}


def move_env_credentials_to_file() -> str | None:
    """Move AWS credentials from os.environ into a private credentials file; returns its path.

    Does nothing (returns None) when the environment holds no key pair. The file is removed when
    the process exits. Call it in the driver after the sweep is validated and before ray.init.
    """
    if not (os.environ.get("AWS_ACCESS_KEY_ID") and os.environ.get("AWS_SECRET_ACCESS_KEY")):
        return None
    directory = tempfile.mkdtemp(prefix="ditsweep-aws-")  # mode 0700: only this user
    path = os.path.join(directory, "credentials")
    profile = os.environ.get("AWS_PROFILE", "default")
    config = configparser.ConfigParser(interpolation=None)
    config[profile] = {key: os.environ[env] for env, key in CREDENTIAL_ENV.items()
                       if os.environ.get(env)}
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        config.write(f)
    atexit.register(shutil.rmtree, directory, ignore_errors=True)
    os.environ["AWS_SHARED_CREDENTIALS_FILE"] = path
    for env in CREDENTIAL_ENV:
        os.environ.pop(env, None)
    return path
