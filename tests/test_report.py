"""The report (the paper's tables and figures from MLflow) and the tags that make runs searchable.

These tests log runs by hand into a SQLite store, to pin down exact cases (a failed trial, one
that never ran, the paper's numbers). The report of a real sweep on a live `mlflow server` is in
tests/test_served_sweep.py.
"""

import math

import pandas as pd
import pytest
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from ditsweep.report import main as report_main
from ditsweep.report import write_report
from ditsweep.tracking.tags import configuration, layout_family, trial_tags, window_config

LAYOUTS = {"global": "G,G,G,G,G,G", "local": "3,5,7,G,G,G"}


# ---------------------------------------------------------------------------------------------
# Tags


def test_tags_of_every_preset_layout_name_it():
    from ditsweep.models.presets import LAYOUTS as PRESET_LAYOUTS

    for depth, layouts in PRESET_LAYOUTS.items():
        for name, entries in layouts.items():
            layout = ",".join(str(e) for e in entries)
            windows, _, placement = name.partition("-")
            if placement not in ("mix", "tail"):  # local, local9, local-smaller, uniform5, ...
                windows, placement = name, "head"
            if name == "global":
                windows, placement = "none", "global"
            assert layout_family(layout) == placement, (depth, name)
            assert window_config(layout) == windows, (depth, name)
            assert configuration(layout) == name, (depth, name)


def test_trial_tags_answer_the_questions_people_filter_by():
    tags = trial_tags("DiT-XS/1", "dit", "G,G,G,G,G,G,3,5,7,9,11,13", "local-tail", 10000,
                      "s3://bucket/celeba32/?seed=2", "standard")
    assert tags == {"ditsweep.dataset": "s3://bucket/celeba32/?seed=2",
                    "ditsweep.dataset_name": "celeba32", "ditsweep.n_train": "10000",
                    "ditsweep.layout_family": "tail", "ditsweep.window_config": "local",
                    "ditsweep.layout": "local-tail: G*6,3,5,7,9,11,13", "ditsweep.model": "DiT-XS/1",
                    "ditsweep.variant": "standard"}
    # A hand-written layout equal to a preset gets the preset's tags.
    mix = trial_tags("DiT-XS/1", "dit", "3,3,3,G,5,5,5,G,7,7,7,G", "custom", 1000, "builtin:photos",
                     "weight-sharing")
    assert mix["ditsweep.layout_family"] == "mix" and mix["ditsweep.window_config"] == "local9"
    assert mix["ditsweep.layout"] == "local9-mix: 3*3,G,5*3,G,7*3,G [weight-sharing]"
    custom = trial_tags("DiT-T/1", "dit", "7,G,G,G,G,3", "custom", 10, "builtin:photos", "standard")
    assert custom["ditsweep.layout_family"] == "mix" and custom["ditsweep.window_config"] == "3,7"
    assert custom["ditsweep.layout"] == "custom: 7,G*4,3"
    unet = trial_tags("UNet-T", "unet", "-", "unet", 10, "builtin:digits", "standard")
    assert unet["ditsweep.layout_family"] == "unet" and unet["ditsweep.layout"] == "unet"


# ---------------------------------------------------------------------------------------------
# The report from hand-logged runs: exact failure cases and the paper's numbers

XS_LAYOUTS = {"global": ",".join(["G"] * 12), "local": "3,5,7,9,11,13" + ",G" * 6,
              "local-tail": "G," * 6 + "3,5,7,9,11,13", "local-smaller": "3,5,7,9,11,13,15,17,19,G,G,G"}


def _log_sweep(uri: str, name: str, trials: list[dict]) -> str:
    """A parent run with trials.json and child runs as ditsweep.run makes them."""
    client = MlflowClient(uri)
    exp = client.create_experiment(name)
    parent = client.create_run(exp, run_name=name, tags={"ditsweep.sweep": name,
                                                         "ditsweep.role": "sweep"}).info.run_id
    fields = ("trial", "model", "arch", "layout_name", "layout", "variant", "n_train", "seed", "dataset")
    client.log_dict(parent, [{k: t[k] for k in fields} for t in trials], "trials.json")
    for t in trials:
        if t["status"] is None:  # planned, never started
            continue
        tags = {"ditsweep.trial": t["trial"], "ditsweep.role": "trial", "ditsweep.sweep_run_id": parent,
                **trial_tags(*(t[k] for k in ("model", "arch", "layout", "layout_name", "n_train",
                                              "dataset", "variant")))}
        if t.get("failure"):
            tags["ditsweep.failure"] = t["failure"]
        run = client.create_run(exp, run_name=t["trial"], tags=tags).info.run_id
        for key in fields[1:]:
            client.log_param(run, key, t[key])
        client.log_batch(run, metrics=[Metric(k, v, 0, 100) for k, v in t["metrics"].items()])
        client.set_terminated(run, t["status"])
    client.set_terminated(parent)
    return parent


def _xs_trials() -> list[dict]:
    """DiT-XS/1 on CelebA at the paper's N, 2 seeds; local-tail at N=1e5 has a failed seed and
    local-smaller at N=1e5 never ran."""
    fid = {"global": 10.0, "local": 8.0, "local-tail": 18.0, "local-smaller": 7.5}
    trials = []
    for config, layout in XS_LAYOUTS.items():
        for n in (10000, 100000):
            for seed in (0, 1):
                t = dict(trial=f"{len(trials):03d}_{config}_N{n}_s{seed}", model="DiT-XS/1", arch="dit",
                         layout_name=config, layout=layout, variant="standard", n_train=n, seed=seed,
                         dataset="s3://bucket/celeba32", status="FINISHED",
                         metrics={"fid": fid[config] / (1 if n == 10000 else 4) + seed / 10,
                                  "psnr_gap_mean": 1.0 + seed + (config == "global")})
                if config == "local-tail" and n == 100000 and seed == 1:
                    t.update(status="FAILED", failure="training diverged: loss is nan at step 17",
                             metrics={"fid": 99.0})  # a failed trial's partial value must not count
                if config == "local-smaller" and n == 100000:
                    t["status"] = None
                trials.append(t)
    return trials


def test_report_cells_say_why_they_are_missing_and_sit_beside_the_paper(tmp_path, capsys):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    parent = _log_sweep(uri, "xs", _xs_trials())
    out = tmp_path / "report"
    assert report_main(["xs", "--tracking-uri", uri, "--out", str(out), "--reference", "paper"]) == 0
    printed = capsys.readouterr().out
    md = (out / "REPORT.md").read_text()

    fid = pd.read_csv(out / "table2.csv").query("metric == 'fid'")
    tail = fid[(fid.configuration == "local-tail") & (fid.row == "value")].set_index("n_train")
    assert tail.loc[10000, "mean"] == pytest.approx(18.05) and tail.loc[10000, "n"] == 2
    assert tail.loc[100000, "n"] == 1 and tail.loc[100000, "mean"] == pytest.approx(4.5)
    assert tail.loc[100000, "display"] == \
        "4.5000 (n=1/2; failed: training diverged: loss is nan at step 17)"
    assert "**8.0500 ± 0.0707**" in md  # Table 2 marks the lowest FID per column, like the paper

    t3 = pd.read_csv(out / "table3.csv").query("metric == 'fid'")
    never = t3[(t3.configuration == "local-smaller") & (t3.n_train == 100000) & (t3.row == "value")]
    assert never.n.iloc[0] == 0 and math.isnan(never["mean"].iloc[0])
    assert never.display.iloc[0] == "2x not run (no MLflow run: the trial never started)"
    pct = t3[(t3.row == "pct_change") & (t3.n_train == 100000)].display.iloc[0]
    assert pct.startswith("n/a (local-smaller: 2x not run")

    t1 = pd.read_csv(out / "table1.csv")
    pct = t1[(t1.metric == "fid") & (t1.row == "pct_change")].set_index("n_train")["mean"]
    assert pct[10000] == pytest.approx((8.05 - 10.05) / 10.05 * 100)
    assert "| DiT-XS/1 | % change local vs global | -19.90% | -19.61% |" in md

    # --reference paper: the paper's value beside each cell, and whether the direction agrees.
    cmp = pd.read_csv(out / "paper_comparison.csv")
    compared = cmp[cmp.baseline.notna()].set_index(["configuration", "n_train"])  # not baselines
    assert compared.loc[("local", 10000), "paper_fid"] == 8.4580
    assert compared.loc[("local", 10000), "paper_dataset"] == "CelebA"
    assert compared.loc[("local", 10000), "table"] == "table1, table2"
    assert compared.loc[("local", 10000), "direction"] == \
        "agrees (sweep lower, paper lower than global)"
    assert compared.loc[("local-tail", 100000), "direction"] == \
        "disagrees (sweep higher, paper lower than global)"
    assert compared.loc[("local-smaller", 100000), "direction"].startswith(
        "n/a (this sweep: 2x not run")
    assert set(cmp[cmp.baseline.isna()].direction) == {"baseline"}
    assert "This sweep beside the paper" in printed and "8.4580" in printed
    assert "| 000_global_N10000_s0 |" not in md and "| 011_local-tail_N100000_s1 | failed |" in md

    artifacts = {a.path for a in MlflowClient(uri).list_artifacts(parent, "report")}
    assert {"report/REPORT.md", "report/table1.csv", "report/table1_psnr_gap.png"} <= artifacts


def test_report_of_a_sweep_without_paper_cells_says_which_tables_are_empty(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    trials = [dict(trial=f"00{s}_global_s{s}", model="DiT-T/1", arch="dit", layout_name="global",
                   layout=LAYOUTS["global"], variant="standard", n_train=10, seed=s,
                   dataset="builtin:photos", status="FINISHED", metrics={"psnr_gap_mean": 2.0 + s})
              for s in (0, 1)]
    _log_sweep(uri, "only-global", trials)
    md = write_report("only-global", uri, str(tmp_path / "out"), reference="paper",
                      log_artifacts=False).read_text()
    for title in ("Table 1", "Table 2", "Table 3"):
        assert f"{title}:" in md
    assert md.count("No data: this sweep has none of this table's layouts") == 3
    assert "No cell of this sweep has a counterpart in the paper" in md


def test_table5_and_dagger_rows_beside_the_papers_runs(tmp_path):
    """Table 5's rows are (layout, variant) pairs; trials with seed 143 (batch 128) are Table 1's
    dagger rows, compared with the paper's dagger runs, on another shuffle of the same dataset."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    fid = {("global", "standard"): 10.0, ("local", "standard"): 8.0,
           ("global", "weight-sharing"): 9.0, ("global", "pca-attention"): 12.0}
    trials = []
    for (config, variant), value in fid.items():
        for n in (10000, 100000):
            trials.append(dict(trial=f"{len(trials):03d}_{config}_{variant}_N{n}", model="DiT-XS/1",
                               arch="dit", layout_name=config, layout=XS_LAYOUTS[config], variant=variant,
                               n_train=n, seed=43, dataset="s3://bucket/celeba32", status="FINISHED",
                               metrics={"fid": value / (1 if n == 10000 else 4), "psnr_gap_mean": 1.0}))
    for config, value in (("global", 11.0), ("local", 9.0)):
        trials.append(dict(trial=f"{len(trials):03d}_{config}_dagger", model="DiT-XS/1", arch="dit",
                           layout_name=config, layout=XS_LAYOUTS[config], variant="standard",
                           n_train=10000, seed=143, dataset="s3://bucket/celeba32-shuffle1",
                           status="FINISHED", metrics={"fid": value, "psnr_gap_mean": 2.0}))
    _log_sweep(uri, "t5", trials)
    out = tmp_path / "report"
    md = write_report("t5", uri, str(out), reference="paper", log_artifacts=False).read_text()

    t5 = pd.read_csv(out / "table5.csv").query("metric == 'fid' and model == 'DiT-XS/1'")
    values = t5[t5.row == "value"].set_index(["configuration", "n_train"])["mean"]
    assert values[("global+pca-attention", 10000)] == 12.0
    assert values[("global+weight-sharing", 100000)] == 2.25
    pct = t5[t5.row == "pct_change"].set_index(["configuration", "n_train"])["display"]
    assert pct[("global+pca-attention", 10000)] == "+20.00%"
    assert "| DiT-XS/1 | w/ PCA | 12.0000 | 3.0000 |" in md
    assert "| DiT-XS/1 | w/ Weight Sharing | 9.0000 | 2.2500 |" in md

    t1 = pd.read_csv(out / "table1.csv").query("metric == 'fid' and row == 'value'")
    dagger = t1[t1.model == "DiT-XS/1 †"].set_index(["configuration", "n_train"])
    assert dagger.loc[("local", 10000), "mean"] == 9.0
    assert dagger.loc[("local", 10000), "dataset"] == "celeba32"  # the shuffle is the same cell
    assert "| DiT-XS/1 † | w/ Local | 9.0000 |" in md

    cmp = pd.read_csv(out / "paper_comparison.csv").set_index(["model", "configuration", "n_train"])
    assert cmp.loc[("DiT-XS/1", "global+pca-attention", 10000), "paper_fid"] == 11.3872
    assert cmp.loc[("DiT-XS/1", "global+pca-attention", 10000), "direction"] == \
        "agrees (sweep higher, paper higher than global)"
    assert cmp.loc[("DiT-XS/1 †", "local", 10000), "paper_fid"] == 8.4258   # the paper's dagger run
    assert cmp.loc[("DiT-XS/1 †", "local", 10000), "direction"] == \
        "agrees (sweep lower, paper lower than global)"


def test_sign_test_interval_is_the_exact_binomial_interval_of_the_median():
    from ditsweep.report.claims import sign_test_interval

    six = sign_test_interval([0.3, -0.1, 0.2, 0.5, -0.4, 0.1])
    # n=6: [d(1), d(6)] covers the median with 1 - 2/64 = 96.9%; [d(2), d(5)] only 78%
    assert (six.low, six.high, six.median) == (-0.4, 0.5, pytest.approx(0.15))
    assert six.confidence == pytest.approx(1 - 2 / 64)
    twelve = sign_test_interval(range(12))   # n=12: P(Bin <= 2) = 79/4096, so [d(3), d(10)]
    assert (twelve.low, twelve.high) == (2, 9) and twelve.confidence == pytest.approx(1 - 2 * 79 / 4096)
    five = sign_test_interval([-1, -2, -3, -4, -5])  # 1 - 2/32 = 93.75% < 95%: no interval
    assert five.confidence == 0 and (five.low, five.high) == (-math.inf, math.inf)


def _replicated_trials() -> list[dict]:
    """3 dataset shuffles x 2 seeds of global / local / local-tail at N=10 and N=1000, with three
    planted effects: a clear one (local < global at N=10 in all six replicates), a reversed one
    (local > local-tail at N=10 in all six) and a null one (local vs global at N=1000 and head vs
    tail at N=1000: signs alternate)."""
    layouts = {"local-tail": "G,G,G,3,5,7", **LAYOUTS}
    trials = []
    for shuffle in (3, 4, 5):
        for seed in (0, 1):
            r = shuffle + seed / 10       # each replicate has its own level
            wobble = (-1) ** (shuffle + seed) * 0.05
            gaps = {("global", 10): 4.0 * r, ("local", 10): 3.0 * r, ("local-tail", 10): 2.0 * r,
                    ("global", 1000): 0.10 * r, ("local", 1000): 0.10 * r * (1 + wobble),
                    ("local-tail", 1000): 0.10 * r * (1 - wobble)}
            for (c, n), gap in gaps.items():
                trials.append(dict(trial=f"{c}_N{n}_d{shuffle}_s{seed}", model="DiT-T/1", arch="dit",
                                   layout_name=c, layout=layouts[c], variant="standard", n_train=n,
                                   seed=seed, dataset=f"builtin:photos?seed={shuffle}",
                                   status="FINISHED", metrics={"psnr_gap_mean": gap}))
    return trials


def test_claims_have_intervals_over_replicates_and_verdicts_for_clear_reversed_and_null_effects(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    _log_sweep(uri, "claims", _replicated_trials())
    out = tmp_path / "report"
    md = write_report("claims", uri, str(out), log_artifacts=False).read_text()
    claims = pd.read_csv(out / "claims.csv")
    row = lambda claim, n: claims[(claims.claim == claim) & claims.compared.str.contains(f"N={n},")].iloc[0]  # noqa: E731
    memo = claims[claims.claim == "memorisation at tiny N"].iloc[0]
    assert (memo.pairs, memo.paper_side, memo.verdict) == (18, "18/18", "agrees")
    clear = row("local attention helps at small N", 10)   # -25% in every replicate
    assert (clear.pairs, clear["median"], clear.interval, clear.verdict) == (6, "-25.0%", "[-25.0%, -25.0%]", "agrees")
    reversed_ = row("head better than tail", 10)           # local 3r vs tail 2r: +50%
    assert (reversed_.paper_side, reversed_["median"], reversed_.verdict) == ("0/6", "+50.0%", "disagrees")
    for claim in ("local attention helps at small N", "head better than tail"):
        null = row(claim, 1000)                             # +-5% or +-10%, three of each sign
        assert null.paper_side == "3/6" and null.verdict == "not resolved at this scale"
        assert null.interval.startswith("[-") and ", +" in null.interval
        assert null.confidence == "96.9%"
    assert "## The paper's claims this sweep can test" in md and "sign-test" in md


def test_claims_of_fewer_than_six_replicates_are_never_resolved():
    from ditsweep.report.claims import claim_table

    rows = [dict(model="DiT-T/1", variant="standard", dataset="photos", dataset_uri="builtin:photos",
                 seed=s, config=c, n_train=10, psnr_gap_mean=g)
            for s in range(5) for c, g in (("local", 1.0), ("global", 2.0))]
    table = claim_table(pd.DataFrame(rows))
    assert table.iloc[0].paper_side == "5/5"
    assert table.iloc[0].verdict == "not resolved (too few replicates)"


def test_eigenvectors_of_dit_and_unet_side_by_side(tmp_path):
    """Figs. 1 and 3: the report draws the final eigenvectors every trial stored as data
    (jacobian/eigenvectors_t{t}.pt, as the jacobian evaluation writes them), one row per model."""
    import torch

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    trials = [dict(trial=f"00{i}_{model}_N{n}", model=model, arch=arch, layout_name=layout_name,
                   layout=layout, variant="standard", n_train=n, seed=0, dataset="builtin:photos",
                   status="FINISHED", metrics={"psnr_gap_mean": 1.0})
              for i, (model, arch, layout_name, layout, n) in enumerate(
                  [("DiT-T/1", "dit", "global", LAYOUTS["global"], 10), ("UNet-T", "unet", "unet", "-", 10)])]
    _log_sweep(uri, "eig", trials)
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("eig").experiment_id
    for run in client.search_runs([exp], "tags.`ditsweep.role` = 'trial'"):
        path = tmp_path / "eigenvectors_t100.pt"
        torch.save({"values": torch.linspace(1, 0, 8), "vectors": torch.randn(8, 3, 8, 8),
                    "timestep": 100, "step": 6}, path)
        client.log_artifact(run.info.run_id, str(path), "jacobian")
    out = tmp_path / "report"
    md = write_report("eig", uri, str(out), log_artifacts=False).read_text()
    assert "## Jacobian eigenvectors (in the manner of Figs. 1 and 3)" in md
    assert "![Jacobian eigenvectors at t100](jacobian_eigenvectors_t100.png)" in md
    assert (out / "jacobian_eigenvectors_t100.png").stat().st_size > 5000
