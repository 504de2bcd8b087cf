"""The training loop: determinism, exact resume from a checkpoint, and divergence."""

import pytest
import torch

from conftest import images, trial
from ditsweep.data import to_model_range
from ditsweep.train.loop import Trainer, TrainingDiverged



def test_images_are_scaled_to_minus_one_one():
    x = images()
    assert x.shape == (10, 3, 8, 8) and x.min() >= -1 and x.max() <= 1


def test_same_seed_same_losses_and_other_seed_differs():
    a = [Trainer(trial(), images()).train_step() for _ in range(1)]
    t1, t2 = Trainer(trial(), images()), Trainer(trial(), images())
    la = [t1.train_step() for _ in range(4)]
    lb = [t2.train_step() for _ in range(4)]
    assert la == lb and a[0] == la[0]
    cfg = trial()
    other = Trainer(cfg.model_copy(update={"seed": 1}), images())
    assert [other.train_step() for _ in range(4)] != la


def test_resume_from_checkpoint_continues_the_same_sequence(tmp_path):
    full = Trainer(trial(), images())
    expected = [full.train_step() for _ in range(6)]
    first = Trainer(trial(), images())
    got = [first.train_step() for _ in range(3)]
    first.save(tmp_path, extra={"mlflow_run_id": "abc"})
    torch.manual_seed(1234)  # disturb the global RNG: the checkpoint must restore it
    second = Trainer(trial(), images())
    assert second.load(tmp_path) == {"mlflow_run_id": "abc"} and second.step == 3
    got += [second.train_step() for _ in range(3)]
    assert got == expected
    for p, q in zip(full.ema.parameters(), second.ema.parameters()):
        assert torch.equal(p, q)


def test_ema_starts_as_copy_and_follows_decay():
    t = Trainer(trial(train__ema_decay=0.5), images())
    for p, q in zip(t.model.parameters(), t.ema.parameters()):
        assert torch.equal(p, q)
    before = [p.detach().clone() for p in t.ema.parameters()]
    t.train_step()
    for e0, e1, p in zip(before, t.ema.parameters(), t.model.parameters()):
        assert torch.allclose(e1, 0.5 * e0 + 0.5 * p, atol=1e-6)


def test_divergence_is_an_error_that_says_so():
    t = Trainer(trial(train__lr=1e6), images())
    with pytest.raises(TrainingDiverged, match="diverged: loss is (nan|inf)"):
        for _ in range(50):
            t.train_step()


def test_bf16_autocast_on_cpu_trains():
    t = Trainer(trial(train__precision="bf16"), images())
    losses = [t.train_step() for _ in range(2)]
    assert all(torch.isfinite(torch.tensor(losses)))


def test_streamed_batches_train_from_packed_shards(tmp_path):
    """data.stream: batches come from the WebDataset stream of a packed dataset, only from the
    training part (the last N images of the manifest order)."""
    import numpy as np

    from ditsweep.data import load_split
    from ditsweep.data.pack import pack
    from ditsweep.data.stream import stream_train_batches

    pack("builtin:photos", str(tmp_path / "packed"), resolution=8, shard_size=500, seed=0)
    uri = str(tmp_path / "packed")
    cfg = trial(data__stream=True)
    cfg = cfg.model_copy(update={"dataset": uri})
    trainer = Trainer(cfg, None)
    trainer.batches = stream_train_batches(uri, 10, cfg.train.batch_size, seed=0, shuffle_buffer=20,
                                           resolution=8)
    losses = [trainer.train_step() for _ in range(3)]
    assert all(np.isfinite(losses)) and trainer.step == 3
    train_u8, _ = load_split(uri, 8, 10, 0)
    allowed = {img.tobytes() for img in to_model_range(train_u8).numpy()}
    batch = next(trainer.batches)
    assert batch.shape == (cfg.train.batch_size, 3, 8, 8)
    assert all(x.numpy().tobytes() in allowed for x in batch)
