"""Checkpoints stored under the trial identity, so any later attempt finds them again.

    STORAGE/checkpoints/IDENTITY/step_000040000.pt   the trainer's checkpoint file
    STORAGE/checkpoints/IDENTITY/latest.json         {"step": 40000, "file": "step_...pt", "final": false,
                                                      "run_id": "<the MLflow run that wrote it>"}

STORAGE is the sweep's `storage_path` (a local directory or s3://bucket/prefix, the same place
Tune keeps its experiment). A trial saves here every time it checkpoints, besides Tune's own
checkpoint, and reads `latest.json` when it starts: a trial interrupted in any earlier attempt
(another driver, a fresh Ray cluster after a RayJob retry, no `--resume`) continues from its last
step. The final checkpoint stays, for evaluations added later to a reused trial.

`latest.json` is written after the file it names (one put, atomic on S3 and by rename locally),
so a reader never sees a pointer to half a checkpoint.
"""

import json
import logging
import os
import tempfile
from pathlib import Path

from ditsweep.data import s3
from ditsweep.data.store import Store

log = logging.getLogger(__name__)
POINTER = "latest.json"


def checkpoint_root(storage: str) -> str:
    return f"{storage.rstrip('/')}/checkpoints"


class TrialCheckpoints:
    """The checkpoints of one trial identity."""

    def __init__(self, storage: str, identity: str):
        self.store = Store(f"{checkpoint_root(storage)}/{identity}")

    @classmethod
    def at(cls, location: str) -> "TrialCheckpoints":
        """The store at a location recorded earlier (a run's `ditsweep.checkpoint` tag)."""
        self = cls.__new__(cls)
        self.store = Store(location)
        return self

    @property
    def location(self) -> str:
        return self.store.root

    def latest(self) -> dict | None:
        """{"step", "file", "final"} of the newest checkpoint, or None when there is none."""
        try:
            return json.loads(self.store.read_bytes(POINTER))
        except s3.NotFound:
            return None

    def fetch(self, directory: Path) -> dict | None:
        """Copy the newest checkpoint into `directory/checkpoint.pt` (Trainer.load reads it);
        returns its pointer, or None when there is none. Raises when the pointer names a file
        that is gone."""
        pointer = self.latest()
        if pointer is None:
            return None
        with open(Path(directory) / "checkpoint.pt", "wb") as f:
            try:
                self.store.download(pointer["file"], f)
            except s3.NotFound:
                raise FileNotFoundError(f"{self.store.url(pointer['file'])}: checkpoint named by "
                                        f"{self.store.url(POINTER)} is gone") from None
        return pointer

    def save(self, checkpoint_file: str | Path, step: int, final: bool = False, keep: int = 1,
             run_id: str = "") -> str:
        """Store a checkpoint file for `step`, point latest.json at it, and delete older ones
        beyond `keep`. Returns the stored file's URL."""
        previous = self.latest()
        name = f"step_{step:09d}.pt"
        with tempfile.TemporaryDirectory() as d:  # put_file moves a local file: hand it a copy
            copy = Path(d) / name
            copy.write_bytes(Path(checkpoint_file).read_bytes())
            self.store.put_file(str(copy), name)
        history = [name] + [f for f in (previous or {}).get("history", [previous and previous["file"]])
                            if f and f != name]
        pointer = {"step": step, "file": name, "final": final, "run_id": run_id,
                   "history": history[:keep]}
        self.store.put_bytes(POINTER, json.dumps(pointer).encode())
        for old in history[keep:]:
            self._delete(old)
        return self.store.url(name)

    def _delete(self, name: str) -> None:
        try:
            if self.store.is_s3:
                bucket, key = s3.split_url(self.store.url(name))
                s3.client(self.store.settings.endpoint_url).delete_object(Bucket=bucket, Key=key)
            else:
                os.remove(self.store.url(name))
        except Exception as e:  # an old checkpoint left behind costs space, not correctness
            log.warning("could not delete old checkpoint %s: %s", self.store.url(name), e)
