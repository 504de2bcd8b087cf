"""The MLflow UI shows a sweep's runs and filters them by the ditsweep tags.

The live `mlflow server` and the tiny real sweep are the ones of tests/test_report.py. Each page
is loaded in headless Chromium (Debian's `chromium`; tests/browser.py installs it when missing),
which runs the UI's JavaScript and prints the resulting DOM; screenshots of the experiment page
and of the trial list are kept in tests/artifacts/ for the CI run.
"""

import html
import re
import subprocess
from pathlib import Path
from urllib.parse import urlencode

import matplotlib.image
import pytest

import browser
from test_report import LAYOUTS, _runs_of, mlflow_server, served_sweep  # noqa: F401 (fixtures)

pytestmark = pytest.mark.slow
ARTIFACTS = Path(__file__).parent / "artifacts"
WINDOW = (1600, 1000)


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
