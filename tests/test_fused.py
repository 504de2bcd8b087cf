"""Fused trials (ditsweep/train/fused.py): k members trained as one model give each member the
loss history and weights it gets alone, keep their own checkpoints, fail alone, and are grouped
only when they can be."""

import pytest
import torch
from mlflow.tracking import MlflowClient

from conftest import tiny_sweep
from ditsweep.config import Sweep, expand
from ditsweep.data import load_split, to_model_range
from ditsweep.sweep.groups import fuse_groups, fusion_summary, group_name, tune_entry
from ditsweep.train.fused import FusedTrainer
from ditsweep.train.loop import Trainer, TrainingDiverged

STEPS = 4


def members(k: int, model: str = "DiT-T/1", layout: str | None = "global", **overrides):
    """k trials differing in N and seed (and so in data, initialisation and draws)."""
    sweep = tiny_sweep(grid={"model": [model], "n_train": [10, 20], "seed": [0, 1],
                             "dataset": ["builtin:photos"], **({"layout": [layout]} if layout else {})},
                       **overrides)
    sweep["train"]["log_every"] = 1
    return expand(Sweep.model_validate(sweep))[:k]


def data(cfg):
    return to_model_range(load_split(cfg.dataset, cfg.data.resolution, cfg.n_train, 0)[0])


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def assert_same_as_alone(member, alone: Trainer, tol: float = 1e-5):
    """Weights, EMA and AdamW moments of a member equal its unfused run's to `tol` (relative,
    per tensor): the batched matmuls only sum in another order."""
    state, ref = member.state_dict(), alone.state_dict()
    assert state["step"] == ref["step"]
    for key in ("model", "ema"):
        for name, value in ref[key].items():
            assert relative(state[key][name], value) <= tol, (key, name, relative(state[key][name], value))
    for i, moments in ref["opt"]["state"].items():
        assert int(state["opt"]["state"][i]["step"]) == int(moments["step"])
        for name in ("exp_avg", "exp_avg_sq"):
            assert relative(state["opt"]["state"][i][name], moments[name]) <= tol


@pytest.mark.parametrize("layout", ["global", "3,3,5,5,G,G"])
@pytest.mark.parametrize("k", [1, 2, 4])
def test_each_member_trains_as_it_would_alone(k, layout):
    cfgs = members(k, layout=layout)
    fused = FusedTrainer(cfgs, [data(c) for c in cfgs])
    fused_losses = [[] for _ in cfgs]
    for _ in range(STEPS):
        fused.train_step()
        for i, m in enumerate(fused.members):
            fused_losses[i].append(m.read_loss())
    for i, cfg in enumerate(cfgs):
        alone = Trainer(cfg, data(cfg))
        losses = [alone.train_step().item() for _ in range(STEPS)]
        assert fused_losses[i] == pytest.approx(losses, rel=1e-5)
        assert_same_as_alone(fused.members[i], alone)
    if k > 1:  # the members really differ: fusion did not train one model k times
        assert fused_losses[0] != fused_losses[1]


def test_unets_are_refused_with_a_reason():
    cfgs = members(2, model="UNet-T", layout=None)
    with pytest.raises(ValueError, match="UNet-T is a UNet: only DiT trials can be fused"):
        FusedTrainer(cfgs, [data(c) for c in cfgs])
    groups = fuse_groups(cfgs + members(3), 4)
    assert [len(g) for g in groups] == [3, 1, 1]  # the DiTs together, each UNet alone
    assert "3 trials fused into 1 groups" in fusion_summary(groups)
    assert "2 train alone (UNet-T is a UNet" in fusion_summary(groups)


def test_groups_are_even_and_only_of_equal_shape():
    cfgs = members(4) + members(4, layout="3,3,5,5,G,G") + members(1, train__steps=7)
    groups = fuse_groups(cfgs, 3)  # 4 of one layout: 2 + 2, not 3 + 1
    assert [[c.trial for c in g] for g in groups] == [
        [cfgs[0].trial, cfgs[1].trial], [cfgs[2].trial, cfgs[3].trial],
        [cfgs[4].trial, cfgs[5].trial], [cfgs[6].trial, cfgs[7].trial], [cfgs[8].trial]]
    assert fuse_groups(cfgs, 1) == [[c] for c in cfgs]
    entry = tune_entry(groups[0])
    assert entry["trial"] == group_name(groups[0]) == f"{cfgs[0].trial}+1"
    assert [m["trial"] for m in entry["members"]] == [cfgs[0].trial, cfgs[1].trial]
    assert tune_entry([cfgs[8]]) == cfgs[8].model_dump()


def test_a_member_checkpoint_is_an_ordinary_trial_checkpoint(tmp_path):
    """Saved from the group, a member resumes in a plain Trainer (and the other way round, a
    member of a new group starts from a Trainer's checkpoint) and goes on as if never stopped."""
    cfgs = members(2)
    fused = FusedTrainer(cfgs, [data(c) for c in cfgs])
    for _ in range(2):
        fused.train_step()
    fused.members[1].save(tmp_path)
    alone = Trainer(cfgs[1], data(cfgs[1]))
    alone.load(tmp_path)
    reference = Trainer(cfgs[1], data(cfgs[1]))
    expected = [reference.train_step().item() for _ in range(4)]
    assert [alone.train_step().item() for _ in range(2)] == pytest.approx(expected[2:], rel=1e-5)
    alone.save(tmp_path)  # step 4 for member 1; member 0 starts fresh: members at different steps
    group = FusedTrainer(cfgs, [data(c) for c in cfgs])
    group.members[1].load(tmp_path)
    assert [m.step for m in group.members] == [0, 4]
    for _ in range(2):
        group.train_step()
    reference.train_step(), reference.train_step()
    assert_same_as_alone(group.members[1], reference)
    first = Trainer(cfgs[0], data(cfgs[0]))
    first.train_step(), first.train_step()
    assert_same_as_alone(group.members[0], first)


def test_a_diverging_member_is_dropped_and_the_others_go_on():
    cfgs = members(3)
    images = [data(c) for c in cfgs]
    images[1] = images[1].clone()
    images[1][:] = float("nan")  # member 1's loss is NaN from its first step
    fused = FusedTrainer(cfgs, images)
    fused.train_step()
    with pytest.raises(TrainingDiverged, match=f"loss is nan at step 1 \\(trial {cfgs[1].trial}"):
        fused.members[1].read_loss()
    with pytest.raises(TrainingDiverged):
        fused.members[1].save(".")  # a diverged member is never checkpointed
    assert list(fused.diverged()) == [1]
    fused.drop([1])
    assert [m.cfg.trial for m in fused.members] == [cfgs[0].trial, cfgs[2].trial]
    for _ in range(STEPS - 1):
        fused.train_step()
    assert not fused.diverged()
    for member, cfg in zip(fused.members, (cfgs[0], cfgs[2])):
        alone = Trainer(cfg, data(cfg))
        for _ in range(STEPS):
            alone.train_step()
        assert_same_as_alone(member, alone)


def test_the_group_trainable_records_each_member_in_its_own_run(tmp_path, monkeypatch):
    """train_group outside Tune (tune.report is a no-op there): one member's data cannot be read
    (deterministic: recorded, not retried), one diverges (recorded, dropped), two finish with
    their own loss history."""
    from ditsweep.tracking import start_sweep_run
    from ditsweep.train import group_trainable
    from ditsweep.train.trainable import TRIAL_KEY

    off = {"enabled": False}
    sweep = tiny_sweep(name="group", tracking={"uri": f"sqlite:///{tmp_path / 'mlflow.db'}"},
                       grid={"model": ["DiT-T/1"], "layout": ["global"], "n_train": [10, 20],
                             "seed": [0, 1], "dataset": ["builtin:photos"]},
                       eval={"psnr_gap": off, "attention": off, "samples": off})
    cfgs = expand(Sweep.model_validate(sweep))
    parent = start_sweep_run(cfgs[0].tracking_uri, cfgs[0].experiment, "group", {})
    cfgs = [c.model_copy(update={"parent_run_id": parent}) for c in cfgs]
    cfgs[0] = cfgs[0].model_copy(update={"dataset": str(tmp_path / "no-such-dataset")})
    real, loaded = group_trainable.to_model_range, []

    def nan_for_the_second(u8):  # cfgs[0] fails before: the second to load data is cfgs[2]
        loaded.append(len(u8))
        return real(u8) * (float("nan") if len(loaded) == 2 else 1.0)
    monkeypatch.setattr(group_trainable, "to_model_range", nan_for_the_second)
    entry = tune_entry(cfgs)
    group_trainable.train_group({TRIAL_KEY: entry})
    client = MlflowClient(cfgs[0].tracking_uri)
    runs = {r.data.tags["ditsweep.trial"]: r for r in client.search_runs(
        [client.get_experiment_by_name("group").experiment_id]) if r.data.tags.get("ditsweep.role") == "trial"}
    assert sorted(runs) == sorted(c.trial for c in cfgs)
    assert runs[cfgs[0].trial].info.status == "FAILED"
    assert runs[cfgs[0].trial].data.tags["ditsweep.failure"].startswith("DataError: ")
    diverged = runs[cfgs[2].trial]
    assert diverged.info.status == "FAILED" and diverged.data.tags["ditsweep.failure_kind"] == "deterministic"
    # the reason a single trial's divergence gets, so the failure summary groups them together
    assert diverged.data.tags["ditsweep.failure"].startswith("TrainingDiverged: training diverged: loss is nan at step 1")
    for cfg in (cfgs[1], cfgs[3]):
        run = runs[cfg.trial]
        assert run.info.status == "FINISHED"
        history = client.get_metric_history(run.info.run_id, "loss")
        assert [m.step for m in history] == [2, 4, 6]
        alone = Trainer(cfg, data(cfg))
        losses = [alone.train_step().item() for _ in range(6)]
        assert history[-1].value == pytest.approx(sum(losses[4:]) / 2, rel=1e-5)
