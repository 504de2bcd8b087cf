"""FID through torch-fidelity's real code path, offline: a randomly initialised InceptionV3
weights file stands in for the real one (the numbers are meaningless, the behaviour is not)."""

import pytest
import torch
from conftest import tiny_sweep, write_sweep

from ditsweep.config import SpecError, load_sweep
from ditsweep.config.weights import INCEPTION_ENV, weights_file
from ditsweep.data import load_split
from ditsweep.eval.fid import fid, to_uint8_rgb, write_random_inception_weights


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return str(write_random_inception_weights(tmp_path_factory.mktemp("inception") / "random.pth"))


def photos(n: int) -> torch.Tensor:
    train, _ = load_split("builtin:photos", 8, n, 0)
    return torch.from_numpy(train).permute(0, 3, 1, 2).contiguous()  # uint8 [n, 3, 8, 8]


@pytest.mark.slow  # ~80 InceptionV3 passes at 299x299 on a CPU: about half a minute
def test_fid_of_a_set_with_itself_is_zero_and_grows_with_a_brightness_shift(weights, tmp_path):
    images = photos(16)
    values = []
    for shift in (0, 16, 32, 64):
        shifted = (images.int() + shift).clamp(0, 255).to(torch.uint8)
        # The reference statistics are computed once and then read from the cache.
        values.append(fid(shifted, images, weights, batch_size=16, reference_key="photos16",
                          cache_dir=str(tmp_path)))
    assert abs(values[0]) < 1e-2
    assert all(a < b for a, b in zip(values, values[1:])), values
    assert [p.name.endswith("stat-fid-2048.pt") for p in tmp_path.glob("ditsweep-ref-*")] == [True]


def test_missing_or_unset_weights_name_the_setting(tmp_path):
    with pytest.raises(ValueError, match=r"eval\.fid\.feature_extractor_weights_path.*does not exist"):
        weights_file(str(tmp_path / "nope.pth"))
    with pytest.raises(ValueError, match=r"eval\.fid\.feature_extractor_weights_path: not set"):
        fid(torch.zeros(2, 3, 8, 8, dtype=torch.uint8), torch.zeros(2, 3, 8, 8, dtype=torch.uint8), None)
    with pytest.raises(ValueError, match="only local paths and file://"):
        weights_file("https://example.com/inception.pth")
    real = tmp_path / "w.pth"
    real.write_bytes(b"x")
    assert weights_file(f"file://{real}") == real


def test_sweep_validation_requires_the_weights_when_fid_is_on(tmp_path, monkeypatch):
    monkeypatch.delenv(INCEPTION_ENV, raising=False)
    path = write_sweep(tmp_path, tiny_sweep(eval={"fid": {"enabled": True}}))
    setting = r"eval\.fid\.feature_extractor_weights_path: "
    with pytest.raises(SpecError, match=setting + r".*not set, and \$DITSWEEP_INCEPTION_WEIGHTS"):
        load_sweep(path)
    missing = {"enabled": True, "feature_extractor_weights_path": str(tmp_path / "x")}
    path = write_sweep(tmp_path, tiny_sweep(eval={"fid": missing}))
    with pytest.raises(SpecError, match=setting + ".*does not exist"):
        load_sweep(path)
    weights = tmp_path / "inception.pth"
    weights.write_bytes(b"x")
    monkeypatch.setenv(INCEPTION_ENV, str(weights))  # the Docker images' default
    path = write_sweep(tmp_path, tiny_sweep(eval={"fid": {"enabled": True}}))
    assert load_sweep(path).eval.fid.feature_extractor_weights_path == str(weights)


def test_uint8_rgb_conversion():
    gray = torch.tensor([-1.0, 0.0, 1.0, 2.0]).reshape(1, 1, 2, 2)
    u8 = to_uint8_rgb(gray)
    assert u8.dtype == torch.uint8 and u8.shape == (1, 3, 2, 2)
    assert u8[0, 0].flatten().tolist() == [0, 128, 255, 255] and (u8[0, 0] == u8[0, 2]).all()


def random_dits(k: int, layout: str = "3,5,7,G,G,G") -> list[torch.nn.Module]:
    """k DiT-T/1 of one architecture, every weight drawn (else the zero-init output is trivial)."""
    from ditsweep.models import build_model
    models = []
    for seed in range(k):
        torch.manual_seed(seed)
        model = build_model("DiT-T/1", image_size=8, layout=layout, attention_backend="torch").eval()
        for p in model.parameters():
            torch.nn.init.normal_(p, std=0.05)
        models.append(model)
    return models


def test_fused_sampling_gives_each_member_its_own_samples():
    """FID sampling of a fused group: one batched network call per step for both members, each
    member's samples equal to sampling it alone with its own seed (3 images in batches of 2,
    so the member-wise noise order across batches is checked too)."""
    from ditsweep.eval.samples import generate, generate_fused
    models = random_dits(2)
    fused = generate_fused(models, 3, (3, 8, 8), 6, seeds=[5, 7], batch_size=2)
    alone = [generate(m, 3, (3, 8, 8), 6, seed=s, batch_size=2) for m, s in zip(models, (5, 7))]
    for f, a in zip(fused, alone):
        assert f.shape == (3, 3, 8, 8)
        torch.testing.assert_close(f, a, rtol=1e-4, atol=1e-4)
    assert (alone[0] - alone[1]).abs().max() > 0.1  # two different members, not one twice


def test_group_jobs_draw_fid_samples_once_for_all_members(tmp_path, weights, monkeypatch):
    """run_group_jobs (a fused group's evaluations): both members' FID from the batched samples
    equals their FID from their own jobs, and the samples were drawn by one fused call."""
    from ditsweep.config import Sweep, expand
    from ditsweep.eval import jobs, samples
    from ditsweep.eval.jobs import EvalJob, run_group_jobs, run_job
    from ditsweep.tracking import TrialRun

    sweep = tiny_sweep(name="group", grid={"model": ["DiT-T/1"], "layout": ["local"], "n_train": [10],
                                           "seed": [0, 1], "dataset": ["builtin:photos"]},
                       eval={"fid": {"enabled": True, "num_samples": 4, "sampling_steps": 3,
                                     "reference_images": 10, "batch_size": 4,
                                     "feature_extractor_weights_path": str(weights)}},
                       tracking={"uri": f"sqlite:///{tmp_path / 'mlflow.db'}"})
    cfgs = expand(Sweep.model_validate(sweep))
    states = [m.state_dict() for m in random_dits(2)]
    group = [EvalJob(c.model_dump(), TrialRun(c.tracking_uri, c.experiment, None, c.trial, {}).run_id,
                     6, False, ["fid"], s) for c, s in zip(cfgs, states)]
    calls = []
    fused_generate = samples.generate_fused
    monkeypatch.setattr(samples, "generate_fused", lambda *a, **kw: calls.append(1) or fused_generate(*a, **kw))
    together = run_group_jobs(group, states)
    monkeypatch.setattr(samples, "generate_fused", None)  # alone: run_job samples by itself
    alone = [run_job(j, s) for j, s in zip(group, states)]
    assert calls == [1] and all(r.failures == {} for r in together + alone)
    for t, a in zip(together, alone):
        assert t.scalars["fid"] == pytest.approx(a.scalars["fid"], rel=1e-3)
    assert jobs.samples is samples
