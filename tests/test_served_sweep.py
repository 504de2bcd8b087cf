"""One real tiny sweep, served: `python -m ditsweep.run` (DiT-T/1, global and local layouts x
2 seeds, N=10) logs to a live `mlflow server` on loopback, and every test here reads that one
sweep back: its runs and metrics in MLflow, the report the run command wrote and one built from
its runs, a search through the REST API, and the MLflow UI in headless Chromium (Debian's
`chromium`; tests/browser.py installs it when missing), with screenshots of the experiment page
and of the trial list kept in tests/artifacts/ for the CI run. One file, so that the suite's
parallel workers (pytest-xdist, one file per worker) run the sweep once.
"""

import html
import json
import math
import re
import statistics
import subprocess
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import urlencode
from urllib.request import Request, urlopen

import matplotlib.image
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

import browser
import procs
from conftest import PYTHON, tiny_sweep, write_sweep
from ditsweep.report import write_report

pytestmark = pytest.mark.slow
SWEEP = "report-tiny"
LAYOUTS = {"global": "G,G,G,G,G,G", "local": "3,5,7,G,G,G"}
ARTIFACTS = Path(__file__).parent / "artifacts"
WINDOW = (1600, 1000)


# ---------------------------------------------------------------------------------------------
# The server and the sweep

@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """`mlflow server` on a free loopback port, SQLite backend (tests/procs.py)."""
    root, port = tmp_path_factory.mktemp("mlflow-server"), procs.free_port()
    process = procs.mlflow_server(root / "mlflow.db", root / "artifacts", port)
    yield SimpleNamespace(url=f"http://127.0.0.1:{port}")
    procs.stop(process)


@pytest.fixture(scope="module")
def served_sweep(mlflow_server, tmp_path_factory):
    """A tiny real sweep (DiT-T/1, global and local, 2 seeds, N=10) logged to the server. pytest
    keeps a fixture's error for its scope: a failed sweep fails every test here, run once."""
    return _run_sweep(mlflow_server.url, tmp_path_factory.mktemp("sweep"))


def _run_sweep(url: str, workdir: Path) -> SimpleNamespace:
    sweep = tiny_sweep(name=SWEEP, tracking={"uri": url})
    sweep["grid"].update(layout=list(LAYOUTS), seed=[0, 1])
    path = write_sweep(workdir, sweep)
    proc = subprocess.run([PYTHON, "-m", "ditsweep.run", str(path)], cwd=workdir,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    client = MlflowClient(url)
    exp = client.get_experiment_by_name(SWEEP)
    runs = client.search_runs([exp.experiment_id])
    parent = next(r for r in runs if r.data.tags.get("ditsweep.role") == "sweep")
    # Taken before any test writes a report itself: what the run command left on its parent run.
    after_run = [a.path for a in client.list_artifacts(parent.info.run_id, "report")]
    return SimpleNamespace(url=url, experiment=SWEEP, experiment_id=exp.experiment_id,
                           parent_run_id=parent.info.run_id, stdout=proc.stdout,
                           trials={r.info.run_name: r for r in runs if r is not parent},
                           report_after_run=after_run)


def _runs_of(sweep, layout: str) -> list:
    return sorted((r for r in sweep.trials.values() if r.data.params["layout"] == layout),
                  key=lambda r: int(r.data.params["seed"]))


# ---------------------------------------------------------------------------------------------
# The run command's results in MLflow

def test_tiny_sweep_through_tune_lands_in_mlflow(served_sweep):
    assert "4/4 trials finished" in served_sweep.stdout
    assert "mean PSNR gap" in served_sweep.stdout and LAYOUTS["local"] in served_sweep.stdout

    client = MlflowClient(served_sweep.url)
    runs = client.search_runs([served_sweep.experiment_id])
    parents = [r for r in runs if r.data.tags.get("ditsweep.role") == "sweep"]
    children = [r for r in runs if r.data.tags.get("ditsweep.role") == "trial"]
    assert len(parents) == 1 and len(children) == 4
    assert parents[0].info.status == "FINISHED"
    assert sorted(r.data.params["layout"] for r in children) == sorted(2 * list(LAYOUTS.values()))
    for run in children:
        assert run.data.tags["ditsweep.sweep_run_id"] == parents[0].info.run_id
        assert run.info.status == "FINISHED"
        params = run.data.params
        assert params["n_train"] == "10" and params["dataset"] == "builtin:photos"
        assert params["model"] == "DiT-T/1" and params["train.steps"] == "6"
        loss = client.get_metric_history(run.info.run_id, "loss")
        assert [m.step for m in sorted(loss, key=lambda m: m.step)] == [2, 4, 6]
        gap = client.get_metric_history(run.info.run_id, "psnr_gap_mean")
        assert [m.step for m in gap] == [6]
        for curve in ("psnr_train_t", "psnr_test_t", "psnr_gap_t"):
            steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, curve))
            assert len(steps) == 5 and steps[0] == 0 and steps[-1] == 999
        gap_curve = client.get_metric_history(run.info.run_id, "psnr_gap_t")
        mean_gap = sum(m.value for m in gap_curve) / len(gap_curve)
        assert abs(mean_gap - gap[0].value) < 1e-9
        artifacts = [a.path for a in client.list_artifacts(run.info.run_id)]
        assert "psnr_gap.png" in artifacts


# ---------------------------------------------------------------------------------------------
# The report

def test_report_of_a_real_sweep_matches_its_runs(served_sweep, tmp_path):
    path = write_report(SWEEP, served_sweep.url, str(tmp_path / "report"))
    out = path.parent
    assert path.name == "REPORT.md"
    files = {p.name for p in out.iterdir()}
    assert {"REPORT.md", "runs.csv", "table1.csv", "table1_psnr_gap.png", "psnr_curves.csv",
            "psnr_curves_photos.png"} <= files
    assert not {"table2.csv", "table3.csv"} & files  # this sweep has no placement/window rows
    md = path.read_text()
    assert "Trials: 4 planned; 4 finished." in md
    assert md.count("No data: this sweep has none of this table's layouts") == 2

    table = pd.read_csv(out / "table1.csv")
    assert list(table.columns) == ["table", "metric", "model", "variant", "configuration", "label",
                                   "row", "dataset", "n_train", "mean", "std", "n", "n_planned",
                                   "note", "display"]
    assert set(table.metric) == {"fid", "psnr_gap_mean"}
    for metric in ("psnr_gap_mean", "fid"):
        rows = table[table.metric == metric]
        assert list(zip(rows.configuration, rows.row)) == [("global", "value"), ("local", "value"),
                                                           ("local", "pct_change")]
        assert set(zip(rows.model, rows.dataset, rows.n_train)) == {("DiT-T/1", "photos", 10)}
        logged = {c: [r.data.metrics.get(metric) for r in _runs_of(served_sweep, LAYOUTS[c])]
                  for c in LAYOUTS}
        if None in logged["global"] + logged["local"]:  # FID evaluation not in this build/sweep
            assert metric == "fid" and "No finished trial of this sweep logged `fid`" in md
            continue
        values = rows[rows.row == "value"].set_index("configuration")
        for config, numbers in logged.items():
            assert values.loc[config, "mean"] == pytest.approx(statistics.mean(numbers), abs=1e-12)
            assert values.loc[config, "std"] == pytest.approx(statistics.stdev(numbers), abs=1e-12)
            assert (values.loc[config, "n"], values.loc[config, "n_planned"]) == (2, 2)
            assert values.loc[config, "display"] in md
        base, local = statistics.mean(logged["global"]), statistics.mean(logged["local"])
        pct = rows[rows.row == "pct_change"].iloc[0]
        if base:
            assert pct["mean"] == pytest.approx((local - base) / base * 100)
        else:
            assert pct["display"] == "n/a (global is 0)"

    # Fig. 2 curves: mean over the seeds at every timestep.
    curves = pd.read_csv(out / "psnr_curves.csv")
    client = MlflowClient(served_sweep.url)
    runs = _runs_of(served_sweep, LAYOUTS["local"])
    histories = [{m.step: m.value for m in client.get_metric_history(r.info.run_id, "psnr_test_t")}
                 for r in runs]
    mine = curves[(curves.config == "local") & (curves.curve == "psnr_test_t")].set_index("t")
    assert sorted(mine.index) == sorted(histories[0])
    for t in histories[0]:
        assert mine.loc[t, "mean"] == pytest.approx(statistics.mean(h[t] for h in histories))
        assert mine.loc[t, "n"] == 2

    logged = {a.path for a in client.list_artifacts(served_sweep.parent_run_id, "report")}
    assert {"report/REPORT.md", "report/table1.csv", "report/psnr_curves_photos.png"} <= logged


def test_run_command_writes_the_report_when_the_sweep_ends(served_sweep):
    assert "report/REPORT.md" in served_sweep.report_after_run, (
        "`python -m ditsweep.run` did not log report/REPORT.md on the sweep's parent run")


def test_failed_and_deleted_trials_show_their_reason_not_a_number(served_sweep, tmp_path):
    client = MlflowClient(served_sweep.url)
    local0, local1 = (r.info.run_id for r in _runs_of(served_sweep, LAYOUTS["local"]))
    global0, global1 = _runs_of(served_sweep, LAYOUTS["global"])
    reason = "training diverged: loss is nan at step 4 (set by the test)"
    try:
        client.set_tag(local0, "ditsweep.failure", reason)
        client.set_terminated(local0, "FAILED")
        client.delete_run(local1)
        client.delete_run(global1.info.run_id)
        out = write_report(SWEEP, served_sweep.url, str(tmp_path / "report"),
                           log_artifacts=False).parent
    finally:  # the other tests (and the UI test) see the sweep as it was
        client.restore_run(local1)
        client.restore_run(global1.info.run_id)
        client.set_terminated(local0, "FINISHED")
        client.delete_tag(local0, "ditsweep.failure")

    table = pd.read_csv(out / "table1.csv").query("metric == 'psnr_gap_mean'")
    local = table[(table.configuration == "local") & (table.row == "value")].iloc[0]
    assert local.n == 0 and math.isnan(local["mean"])
    assert local.display == f"failed: {reason}; deleted: its MLflow run was deleted"
    only = global0.data.metrics["psnr_gap_mean"]
    glob = table[(table.configuration == "global") & (table.row == "value")].iloc[0]
    assert glob.n == 1 and glob["mean"] == pytest.approx(only)
    assert glob.display == f"{only:.3f} (n=1/2; deleted: its MLflow run was deleted)"
    assert table[table.row == "pct_change"].display.iloc[0].startswith("n/a (local: failed: ")
    md = (out / "REPORT.md").read_text()
    assert f"| DiT-T/1 | w/ Local | failed: {reason}; deleted: its MLflow run was deleted |" in md
    assert "Trials: 4 planned; 1 finished, 1 failed, 2 deleted." in md


def _search(url: str, experiment_id: str, query: str) -> list[str]:
    """POST /api/2.0/mlflow/runs/search; the names of the matching runs."""
    body = json.dumps({"experiment_ids": [experiment_id], "filter": query, "max_results": 100})
    request = Request(f"{url}/api/2.0/mlflow/runs/search", data=body.encode(), method="POST",
                      headers={"Content-Type": "application/json"})
    with urlopen(request, timeout=30) as response:
        runs = json.load(response).get("runs", [])  # no "runs" key when nothing matches
    return sorted(r["info"]["run_name"] for r in runs)


def test_rest_search_filters_the_sweeps_runs_by_tag(served_sweep):
    url, exp = served_sweep.url, served_sweep.experiment_id
    names = {c: sorted(r.info.run_name for r in _runs_of(served_sweep, LAYOUTS[c])) for c in LAYOUTS}
    trials = sorted(names["global"] + names["local"])
    assert _search(url, exp, "tags.`ditsweep.layout_family` = 'head'") == names["local"]
    assert _search(url, exp, "tags.`ditsweep.layout_family` = 'global' and "
                             "tags.`ditsweep.n_train` = '10'") == names["global"]
    assert _search(url, exp, "tags.`ditsweep.dataset` = 'builtin:photos'") == trials
    assert _search(url, exp, "tags.`ditsweep.dataset_name` = 'photos'") == trials
    assert _search(url, exp, "tags.`ditsweep.window_config` = 'local'") == names["local"]
    assert _search(url, exp, "tags.`ditsweep.layout` = 'local: 3,5,7,G*3'") == names["local"]
    assert _search(url, exp, "tags.`ditsweep.layout_family` = 'tail'") == []
    assert _search(url, exp, "tags.`ditsweep.n_train` = '1000'") == []
    assert _search(url, exp, "params.layout_name = 'local' and tags.`ditsweep.model` = 'DiT-T/1'") \
        == names["local"]

# ---------------------------------------------------------------------------------------------
# The MLflow UI

def _chromium(url: str, profile: Path, output: list[str], budget_ms: int) -> subprocess.CompletedProcess:
    chromium = browser.ensure()
    # A fresh profile per call and no background traffic: the page is all the browser loads.
    # --virtual-time-budget lets the UI's JavaScript fetch and render before the DOM or the
    # screenshot is taken (virtual time does not advance while requests are pending).
    args = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
            "--no-first-run", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--hide-scrollbars", f"--user-data-dir={profile}",
            f"--window-size={WINDOW[0]},{WINDOW[1]}", f"--virtual-time-budget={budget_ms}",
            *output, url]
    return subprocess.run(args, capture_output=True, text=True, timeout=180)


def _page_text(url: str, tmp_path: Path, expect: list[str]) -> str:
    """The visible text of the page after its JavaScript ran; retried with a longer budget if
    the expected strings are not there yet (a slow CI machine)."""
    for attempt, budget in enumerate((15000, 45000)):
        proc = _chromium(url, tmp_path / f"profile-dom-{attempt}", ["--dump-dom"], budget)
        assert proc.returncode == 0, proc.stderr[-2000:]
        dom = re.sub(r"<(script|style)\b.*?</\1>", " ", proc.stdout, flags=re.S)
        text = re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", " ", dom)))
        if all(e in text for e in expect):
            break
    return text


def _runs_page(served_sweep, search: str | None = None) -> str:
    """The experiment's run list. With a filter, the UI lists the matching runs flat (instead of
    nesting them under the sweep's parent run) when the order is not by date: sort by run name
    (the UI's own key for its "Run Name" sort)."""
    page = f"{served_sweep.url}/#/experiments/{served_sweep.experiment_id}/runs"
    if search is None:
        return page
    return page + "?" + urlencode({"searchFilter": search, "orderByKey": "tags.`mlflow.runName`",
                                   "orderByAsc": "true"})


def _names(served_sweep) -> dict[str, list[str]]:
    return {c: sorted(r.info.run_name for r in _runs_of(served_sweep, LAYOUTS[c])) for c in LAYOUTS}


def test_experiment_page_opens_on_the_trials(served_sweep, tmp_path):
    """A person opens the experiment's own URL (what `mlflow ui` links to) and sees the trials.

    MLflow 3.17's UI picks GenAI or model-training pages from a per-browser switch (default
    GenAI), not from the experiment's kind tag; a fresh browser therefore lands on the GenAI
    overview once, where the person clicks "Model training" (the browser keeps that choice).
    From then on the plain URL opens on the runs table, every trial a row of its own."""
    names = _names(served_sweep)
    trials = names["global"] + names["local"]
    plain = f"{served_sweep.url}/#/experiments/{served_sweep.experiment_id}"
    with browser.Page(tmp_path / "profile-person") as page:
        # The UI settles on a page of its choice, with the kind it chose in the URL.
        page.open(plain, until=lambda p: "Model training" in p.text() and "workflowType=" in p.url())
        if "workflowType=genai" in page.url():  # the first visit of a fresh browser
            clicked = page.evaluate("""(() => { const el = [...document.querySelectorAll('[role=button]')]
                .find(e => e.innerText.trim() === 'Model training'); if (el) el.click(); return !!el; })()""")
            assert clicked, page.text()[-1500:]
            page.open(page.url(), until=lambda p: "workflowType=machine_learning" in p.url())
        page.open(plain, until=lambda p: "/runs" in p.url() and all(n in p.text() for n in trials))
        assert re.search(r"\b5 matching runs", page.text())  # 1 sweep run + 4 trial runs
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(ARTIFACTS / "mlflow_experiment_page.png")
    image = matplotlib.image.imread(ARTIFACTS / "mlflow_experiment_page.png")
    assert image[..., :3].std() > 0.05  # a rendered page, not a blank one


def test_trial_list_shows_every_trial_and_is_screenshotted(served_sweep, tmp_path):
    names = _names(served_sweep)
    trials = names["global"] + names["local"]
    url = _runs_page(served_sweep, "tags.`ditsweep.role` = 'trial'")
    text = _page_text(url, tmp_path, trials)
    for name in trials:
        assert name in text, f"{name} not on the page: {text[-1500:]}"
    assert re.search(r"\b4 matching runs", text)

    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "mlflow_ui_trials.png"
    shot.unlink(missing_ok=True)
    proc = _chromium(url, tmp_path / "profile-shot", [f"--screenshot={shot}"], 15000)
    assert proc.returncode == 0 and shot.exists(), proc.stderr[-2000:]
    image = matplotlib.image.imread(shot)
    assert image.shape[:2] == (WINDOW[1], WINDOW[0])
    assert image[..., :3].std() > 0.05  # a rendered page, not a blank one


def test_ui_search_filters_runs_by_layout_family(served_sweep, tmp_path):
    names = _names(served_sweep)
    url = _runs_page(served_sweep, "tags.`ditsweep.layout_family` = 'head'")
    text = _page_text(url, tmp_path, names["local"])
    assert all(n in text for n in names["local"]), text[-1500:]
    assert not any(n in text for n in names["global"])
    assert re.search(r"\b2 matching runs", text)
