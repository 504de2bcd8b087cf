"""Sweep validation: every kind of bad input gives one message naming file, field and value,
and `python -m ditsweep.run` exits with code 2 before any trial starts."""

import subprocess

import pytest
from conftest import PYTHON, REPO, tiny_sweep, write_sweep

from ditsweep.config import SpecError, expand, load_sweep


def error_for(tmp_path, sweep: dict) -> str:
    path = write_sweep(tmp_path, sweep)
    with pytest.raises(SpecError) as info:
        load_sweep(path)
    message = str(info.value)
    assert message.startswith(str(path)), message
    return message


def test_shipped_sweeps_are_valid():
    for path in [REPO / "sweeps/smoke.yaml", REPO / "sweeps/cpu_repro.yaml"]:  # paper sweeps:
        sweep = load_sweep(path)                                               # test_paper_sweeps
        assert expand(sweep, path), path


def test_laptop_reproduction_is_replicated_and_its_windows_are_local():
    """Every cell of sweeps/cpu_repro.yaml has >= 3 shuffles x 2 seeds (6 replicates: the fewest
    the claims' sign-test interval needs for 95%), and its largest window covers at most a fifth
    of the token grid (the paper's 13x13 on 32x32: 16.5%)."""
    trials = expand(load_sweep(REPO / "sweeps/cpu_repro.yaml"))
    cells = {}
    for t in trials:
        cells.setdefault((t.layout_name, t.n_train), set()).add((t.dataset, t.seed))
    assert {("global", 10), ("local", 10), ("local-tail", 10), ("global", 1000)} <= set(cells)
    for cell, replicates in cells.items():
        assert len({d for d, _ in replicates}) >= 3 and len({s for _, s in replicates}) >= 2, cell
        assert len(replicates) >= 6, cell
    grid = trials[0].data.resolution  # patch 1: one token per pixel
    windows = {int(w) for t in trials for w in t.layout.split(",") if w != "G"}
    assert max(windows) ** 2 / grid ** 2 <= 0.20, (windows, grid)


def test_smoke_sweep_has_the_promised_trials():
    trials = expand(load_sweep(REPO / "sweeps/smoke.yaml"))
    assert len(trials) >= 4
    assert {t.layout_name for t in trials} == {"global", "local"}
    assert {t.n_train for t in trials} == {10, 1000}
    local = next(t for t in trials if t.layout_name == "local")
    assert local.layout == "3,5,7,G,G,G"


@pytest.mark.parametrize("grid_change, field, value", [
    ({"model": ["DiT-Q/7"]}, "grid.model", "DiT-Q/7"),
    ({"layout": ["locall"]}, "grid.layout", "locall"),
    ({"layout": [[3, 4, 5, "G", "G", "G"]]}, "grid.layout", "4"),
    ({"layout": [[3, 5, 9, "G", "G", "G"]]}, "grid.layout", "9"),
    ({"layout": [[3, 5, "G"]]}, "grid.layout", "3"),
    ({"n_train": [100000]}, "grid.n_train", "100000"),
    ({"dataset": ["builtin:imagenet"]}, "grid.dataset", "builtin:imagenet"),
])
def test_bad_grid_values_are_named(tmp_path, grid_change, field, value):
    sweep = tiny_sweep()
    sweep["grid"].update(grid_change)
    message = error_for(tmp_path, sweep)
    assert field in message and value in message, message


def test_window_larger_than_grid_says_the_grid(tmp_path):
    sweep = tiny_sweep()
    sweep["grid"]["layout"] = ["9,G,G,G,G,G"]
    message = error_for(tmp_path, sweep)
    assert "9" in message and "8x8" in message, message


def test_misspelt_key_is_named_with_suggestion(tmp_path):
    sweep = tiny_sweep()
    sweep["grid"]["layuot"] = sweep["grid"].pop("layout")
    message = error_for(tmp_path, sweep)
    assert "grid.layuot" in message and "unknown key" in message and "grid.layout" in message


def test_unknown_top_level_key_and_bad_type(tmp_path):
    sweep = tiny_sweep()
    sweep["trian"] = {}
    assert "trian" in error_for(tmp_path, sweep)
    sweep = tiny_sweep(train__steps="many")
    message = error_for(tmp_path, sweep)
    assert "train.steps" in message and "many" in message


def test_unset_environment_variable(tmp_path, monkeypatch):
    monkeypatch.delenv("DITSWEEP_NOPE", raising=False)
    sweep = tiny_sweep()
    sweep["grid"]["dataset"] = ["${DITSWEEP_NOPE}/celeba"]
    message = error_for(tmp_path, sweep)
    assert "DITSWEEP_NOPE" in message and "grid.dataset" in message


def test_cli_exits_2_before_starting_anything(tmp_path):
    sweep = tiny_sweep()
    sweep["grid"]["layout"] = [[3, 4, 5, "G", "G", "G"]]
    path = write_sweep(tmp_path, sweep)
    proc = subprocess.run([PYTHON, "-m", "ditsweep.run", str(path)], capture_output=True, text=True,
                          cwd=tmp_path, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert str(path) in proc.stderr and "grid.layout" in proc.stderr and "4" in proc.stderr
    assert not (tmp_path / "ray_results").exists() and not (tmp_path / "mlflow.db").exists()


def test_dry_run_prints_the_trial_table(tmp_path):
    sweep = tiny_sweep()
    sweep["grid"].update(layout=["global", "local"], n_train=[10, 100], seed=[0, 1])
    path = write_sweep(tmp_path, sweep)
    proc = subprocess.run([PYTHON, "-m", "ditsweep.run", str(path), "--dry-run"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "8 trials" in proc.stdout and "3,5,7,G,G,G" in proc.stdout
    assert not (tmp_path / "ray_results").exists()
    # --resume is still accepted (a sweep now continues without it; old scripts keep working).
    resumed = subprocess.run([PYTHON, "-m", "ditsweep.run", str(path), "--dry-run", "--resume"],
                             capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert resumed.returncode == 0 and resumed.stdout == proc.stdout, resumed.stderr
