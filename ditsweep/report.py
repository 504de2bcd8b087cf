"""The paper's tables and figures, regenerated from a sweep's MLflow runs.

    python -m ditsweep.report EXPERIMENT [--tracking-uri URI] [--out DIR] [--reference paper]

Reads the sweep's parent run (newest one of the experiment unless --parent-run-id), the trials it
planned (`trials.json`) and its child runs, and writes to DIR as Markdown (REPORT.md), CSV and PNG:

- Table 1 (global vs local, with the % change row), Table 2 (placement: head, mix, tail) and
  Table 3 (window size: same, smaller, larger), each for FID and for the mean PSNR gap, with the
  cells the sweep has; a table the sweep has no layouts for says so.
- PSNR-gap bar charts in the manner of Figs. 6-8 and PSNR train/test curves as in Fig. 2.

Every number is the mean ± sample standard deviation over the seeds and dataset shuffles of a
cell. A trial that failed, never ran or logged no value is a gap that says why, never a zero.
The files are also logged as artifacts (`report/`) of the sweep's parent run.
"""

import argparse
import json
import math
import os
import re
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; also safe inside Ray/CI processes without a display
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
from mlflow.entities import ViewType  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

from ditsweep.tracking.mlflow_runs import ROLE_TAG, TRIAL_TAG, retrying  # noqa: E402
from ditsweep.tracking.tags import configuration, dataset_name, readable_layout  # noqa: E402

FAILURE_TAG = "ditsweep.failure"
CELL_KEYS = ["model", "variant", "config", "dataset", "n_train"]
CURVES = ("psnr_train_t", "psnr_test_t", "psnr_gap_t")


@dataclass(frozen=True)
class Metric:
    key: str    # the MLflow metric
    title: str
    digits: int


METRICS = (Metric("fid", "FID ↓", 4), Metric("psnr_gap_mean", "Mean PSNR gap (dB) ↓", 3))


@dataclass(frozen=True)
class TableSpec:
    """One of the paper's tables: its rows (config name, label) in order, and for each compared
    configuration its baseline (the % change row, and the direction in `--reference paper`)."""
    key: str
    title: str
    rows: tuple[tuple[str, str], ...]
    baseline: dict[str, str]
    triggers: frozenset[str]    # the table exists when the sweep has one of these
    pct_rows: bool = True
    mark_best: bool = False     # bold the lowest value per column, as the paper's Table 2 does
    missing_hint: str = ""


TABLES = (
    TableSpec("table1", "Table 1: global vs local attention",
              rows=(("global", "DiT (global)"), ("local", "w/ Local")),
              baseline={"local": "global"}, triggers=frozenset({"local"}),
              missing_hint="needs layouts global and local"),
    TableSpec("table2", "Table 2: placement of the local windows (head, mix, tail)",
              rows=(("global", "DiT (global)"), ("local", "w/ Local (head)"),
                    ("local-mix", "w/ Local (mix)"), ("local-tail", "w/ Local (tail)"),
                    ("local9", "w/ Local9 (head)"), ("local9-mix", "w/ Local9 (mix)"),
                    ("local9-tail", "w/ Local9 (tail)")),
              baseline={c: "global" for c in ("local", "local-mix", "local-tail", "local9",
                                              "local9-mix", "local9-tail")},
              triggers=frozenset({"local-mix", "local-tail", "local9", "local9-mix", "local9-tail"}),
              pct_rows=False, mark_best=True,
              missing_hint="needs layouts local-mix / local-tail (or local9, local9-mix, local9-tail)"),
    TableSpec("table3", "Table 3: effective window size (same, smaller, larger)",
              rows=(("uniform5", "Local 5*6"), ("pairs357", "Local 3*2,5*2,7*2 (same size)"),
                    ("local", "Local"), ("local-smaller", "Local (smaller windows)"),
                    ("local9", "Local9"), ("local9-larger", "Local9 (larger windows)")),
              baseline={"pairs357": "uniform5", "local-smaller": "local", "local9-larger": "local9"},
              triggers=frozenset({"pairs357", "local-smaller", "local9-larger"}),
              missing_hint="needs layouts uniform5 + pairs357, local + local-smaller or "
                           "local9 + local9-larger (12-block models)"),
)


# ---------------------------------------------------------------------------------------------
# Reading the sweep from MLflow


@dataclass
class SweepData:
    experiment: str
    experiment_id: str
    parent_run_id: str
    sweep: str
    trials: pd.DataFrame                       # one row per planned (or found) trial
    curves: pd.DataFrame = field(default_factory=pd.DataFrame)


def load_sweep(client: MlflowClient, experiment: str, parent_run_id: str | None = None,
               with_curves: bool = True) -> SweepData:
    exp = retrying(lambda: client.get_experiment_by_name(experiment), "get experiment")
    if exp is None:
        raise LookupError(f"no MLflow experiment named {experiment!r}")
    parent = (retrying(lambda: client.get_run(parent_run_id), "get sweep run") if parent_run_id
              else _newest_sweep_run(client, exp))
    planned = _planned_trials(client, parent.info.run_id)
    # Deleted runs too, so that a deleted trial says so instead of looking as if it never ran.
    children = _search(client, exp.experiment_id,
                       f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    trials = _trial_frame(planned, children)
    sweep = parent.data.tags.get("ditsweep.sweep", parent.info.run_name or "")
    data = SweepData(experiment, exp.experiment_id, parent.info.run_id, sweep, trials)
    if with_curves:
        data.curves = _curves(client, trials)
    return data


def _newest_sweep_run(client: MlflowClient, exp):
    runs = retrying(lambda: client.search_runs([exp.experiment_id], f"tags.`{ROLE_TAG}` = 'sweep'",
                                               max_results=1,
                                               order_by=["attributes.start_time DESC"]), "search")
    if not runs:
        raise LookupError(f"experiment {exp.name!r} has no sweep run (tag {ROLE_TAG}=sweep); "
                          "was it made by `python -m ditsweep.run`?")
    return runs[0]


def _search(client: MlflowClient, exp_id: str, query: str) -> list:
    runs, token = [], None
    while True:
        page = retrying(lambda: client.search_runs([exp_id], query, ViewType.ALL, max_results=1000,
                                                   page_token=token), "search runs")
        runs += list(page)
        token = page.token
        if not token:
            return runs


def _planned_trials(client: MlflowClient, run_id: str) -> list[dict]:
    """The parent's trials.json; empty for a sweep that predates it (then the runs are all)."""
    with tempfile.TemporaryDirectory() as d:
        try:
            path = client.download_artifacts(run_id, "trials.json", d)
        except Exception:  # MLflow raises several types for a missing artifact
            return []
        return json.loads(Path(path).read_text())


def _trial_frame(planned: list[dict], runs: list) -> pd.DataFrame:
    """Planned trials joined with their runs by trial name; runs without a plan are kept too."""
    by_name: dict[str, object] = {}
    for run in sorted(runs, key=_run_preference):
        by_name.setdefault(run.data.tags.get(TRIAL_TAG) or run.info.run_name, run)
    names = [p["trial"] for p in planned] + sorted(set(by_name) - {p["trial"] for p in planned})
    plan = {p["trial"]: p for p in planned}
    rows = [_trial_row(name, plan.get(name, {}), by_name.get(name)) for name in names]
    columns = ["trial", "run_id", "model", "arch", "variant", "layout", "layout_shown", "config",
               "dataset", "dataset_uri", "n_train", "seed", "status", "reason", "loss",
               *[m.key for m in METRICS]]
    return pd.DataFrame(rows, columns=columns)


def _run_preference(run) -> tuple:
    # A trial with several runs (a deleted one and its rerun): prefer a live, finished, new one.
    return (run.info.lifecycle_stage == "deleted", run.info.status != "FINISHED",
            -(run.info.start_time or 0))


def _trial_row(name: str, plan: dict, run) -> dict:
    params = run.data.params if run else {}
    get = lambda key, default="": params.get(key, plan.get(key, default))  # noqa: E731
    arch, layout = str(get("arch", "dit")), str(get("layout", "-"))
    status, reason = _status(run)
    metrics = run.data.metrics if run else {}
    return {
        "trial": name, "run_id": run.info.run_id if run else "",
        "model": str(get("model")), "arch": arch, "variant": str(get("variant", "standard")),
        "layout": layout, "layout_shown": readable_layout(layout, arch),
        "config": configuration(layout, arch), "dataset": dataset_name(str(get("dataset"))),
        "dataset_uri": str(get("dataset")), "n_train": int(get("n_train", 0)),
        "seed": int(get("seed", 0)), "status": status, "reason": reason,
        "loss": metrics.get("loss", math.nan),
        # Only a finished trial's numbers count: a failed one may have logged partial values.
        **{m.key: metrics.get(m.key, math.nan) if status == "finished" else math.nan
           for m in METRICS},
    }


def _status(run) -> tuple[str, str]:
    if run is None:
        return "not run", "not run (no MLflow run: the trial never started)"
    if run.info.lifecycle_stage == "deleted":
        return "deleted", "deleted: its MLflow run was deleted"
    status = run.info.status
    if status == "FINISHED":
        return "finished", ""
    if status == "FAILED":
        why = run.data.tags.get(FAILURE_TAG) or "no reason recorded; see the Ray Tune trial log"
        return "failed", f"failed: {why}"
    if status == "KILLED":
        return "killed", "killed before it finished"
    return "running", f"unfinished (run status {status})"


def _curves(client: MlflowClient, trials: pd.DataFrame) -> pd.DataFrame:
    """The per-timestep PSNR curves of the finished trials, one row per (trial, curve, t)."""
    rows = []
    for trial in trials[trials.status == "finished"].itertuples():
        for key in CURVES:
            history = retrying(lambda: client.get_metric_history(trial.run_id, key), "history")
            rows += [{"trial": trial.trial, "curve": key, "t": m.step, "value": m.value}
                     for m in history]
    curves = pd.DataFrame(rows, columns=["trial", "curve", "t", "value"])
    return curves.merge(trials[["trial", *CELL_KEYS]], on="trial")


# ---------------------------------------------------------------------------------------------
# Cells: mean ± std over seeds/shuffles, with the reason for every missing trial


def cell_stats(trials: pd.DataFrame, metric: str) -> pd.DataFrame:
    """One row per cell (model, variant, config, dataset, N): mean, std, n (trials with a value),
    n_planned and a note naming why the others have none."""
    rows = []
    for key, group in trials.groupby(CELL_KEYS, sort=False):
        values = group[metric].dropna()
        missing = group[group[metric].isna()]
        reasons = [r if r else f"no {metric} logged" for r in missing.reason]
        rows.append({**dict(zip(CELL_KEYS, key)), "mean": values.mean() if len(values) else math.nan,
                     "std": values.std(ddof=1) if len(values) > 1 else math.nan,
                     "n": len(values), "n_planned": len(group), "note": _count_reasons(reasons)})
    return pd.DataFrame(rows, columns=[*CELL_KEYS, "mean", "std", "n", "n_planned", "note"])


def _count_reasons(reasons: list[str]) -> str:
    counts = Counter(reasons)
    return "; ".join(r if c == 1 else f"{c}x {r}" for r, c in counts.items())


def format_cell(mean: float, std: float, n: int, n_planned: int, note: str, digits: int) -> str:
    if n == 0:
        return note or "no data"
    text = f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if n > 1 else "")
    if n < n_planned:
        text += f" (n={n}/{n_planned}; {note})"
    return text


# ---------------------------------------------------------------------------------------------
# Tables


def build_table(spec: TableSpec, trials: pd.DataFrame, metric: Metric) -> pd.DataFrame | None:
    """The table in long form (one row per cell and per % change cell), or None when the sweep
    has none of the table's layouts."""
    present = set(trials.config)
    if not spec.triggers & present:
        return None
    stats = cell_stats(trials, metric.key)
    shown = _shown_configs(spec, present)
    stats = stats[stats.config.isin(shown)]
    columns = sorted({(d, n) for d, n in zip(stats.dataset, stats.n_train)},
                     key=lambda c: (_first_index(trials.dataset, c[0]), c[1]))
    out = []
    for (model, variant), group in stats.groupby(["model", "variant"], sort=False):
        cells = {(r.config, r.dataset, r.n_train): r for r in group.itertuples()}
        for config, label in spec.rows:
            if config not in shown or not any(k[0] == config for k in cells):
                continue
            for dataset, n_train in columns:
                out.append(_value_row(spec, metric, model, variant, config, label, dataset,
                                      n_train, cells.get((config, dataset, n_train))))
            base = spec.baseline.get(config)
            if spec.pct_rows and base in shown:
                for dataset, n_train in columns:
                    out.append(_pct_row(spec, metric, model, variant, config, base, dataset, n_train,
                                        cells.get((config, dataset, n_train)),
                                        cells.get((base, dataset, n_train))))
    return pd.DataFrame(out)


def _shown_configs(spec: TableSpec, present: set[str]) -> set[str]:
    """A configuration is shown when the sweep has it and it is either compared in this table
    or the baseline of a compared configuration the sweep has."""
    compared = {c for c, _ in spec.rows if c in spec.baseline and c in present}
    baselines = {spec.baseline[c] for c in compared}
    return {c for c, _ in spec.rows if c in present and (c in compared or c in baselines)}


def _first_index(series: pd.Series, value) -> int:
    return int((series == value).values.argmax())


def _value_row(spec, metric, model, variant, config, label, dataset, n_train, cell) -> dict:
    row = {"table": spec.key, "metric": metric.key, "model": model, "variant": variant,
           "configuration": config, "label": _label(label, variant), "row": "value",
           "dataset": dataset, "n_train": n_train}
    if cell is None:  # this configuration was not planned at this (dataset, N)
        return {**row, "mean": math.nan, "std": math.nan, "n": 0, "n_planned": 0,
                "note": "not in this sweep", "display": "— (not in this sweep)"}
    return {**row, "mean": cell.mean, "std": cell.std, "n": cell.n, "n_planned": cell.n_planned,
            "note": cell.note, "display": format_cell(cell.mean, cell.std, cell.n, cell.n_planned,
                                                      cell.note, metric.digits)}


def _pct_row(spec, metric, model, variant, config, base, dataset, n_train, cell, base_cell) -> dict:
    row = {"table": spec.key, "metric": metric.key, "model": model, "variant": variant,
           "configuration": config, "label": f"% change {config} vs {base}", "row": "pct_change",
           "dataset": dataset, "n_train": n_train, "std": math.nan, "n": 0, "n_planned": 0}
    for name, c in ((config, cell), (base, base_cell)):
        if c is None or c.n == 0:
            why = "not in this sweep" if c is None else c.note
            return {**row, "mean": math.nan, "note": f"{name}: {why}", "display": f"n/a ({name}: {why})"}
    if base_cell.mean == 0:  # e.g. a PSNR gap of exactly 0 (it is clipped at 0)
        return {**row, "mean": math.nan, "note": f"{base} is 0", "display": f"n/a ({base} is 0)"}
    pct = (cell.mean - base_cell.mean) / base_cell.mean * 100
    return {**row, "mean": pct, "note": "", "display": f"{pct:+.2f}%"}


def _label(label: str, variant: str) -> str:
    return label if variant == "standard" else f"{label} [{variant}]"


def table_markdown(table: pd.DataFrame, mark_best: bool = False) -> str:
    """Wide Markdown: one line per (model, configuration row), one column per (dataset, N)."""
    table = table.copy()
    table["column"] = [f"{d} N={n}" for d, n in zip(table.dataset, table.n_train)]
    if mark_best:
        values = table[(table.row == "value") & table["mean"].notna()]
        if not values.empty:
            best = values.groupby(["model", "variant", "column"])["mean"].idxmin().values
            table.loc[best, "display"] = "**" + table.loc[best, "display"] + "**"
    wide = table.pivot_table(index=["model", "label"], columns="column", values="display",
                             aggfunc="first", sort=False)
    wide = wide[list(dict.fromkeys(table.column))].reset_index()
    wide.columns = ["model", "configuration", *wide.columns[2:]]
    return markdown(wide)


def markdown(df: pd.DataFrame) -> str:
    """A GitHub Markdown table (tabulate is not a dependency)."""
    def cell(value) -> str:
        text = "" if value is None or (isinstance(value, float) and math.isnan(value)) else str(value)
        return text.replace("|", "\\|").replace("\n", " ")
    lines = ["| " + " | ".join(cell(c) for c in df.columns) + " |",
             "|" + "|".join("---" for _ in df.columns) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Figures


def plot_gap_bars(spec: TableSpec, table: pd.DataFrame, path: Path) -> None:
    """PSNR-gap bars in the manner of Figs. 6-8: one panel per model and dataset, bars per
    configuration grouped by N, ± std error bars, hatched baseline; a missing cell is labelled
    with its reason instead of being drawn as a bar of height 0."""
    values = table[table.row == "value"]
    panels = list(dict.fromkeys(zip(values.model, values.variant, values.dataset)))
    fig, axes = plt.subplots(1, len(panels), figsize=(max(6.5, 4.5 * len(panels)), 4), squeeze=False)
    baselines = set(spec.baseline.values())
    for ax, (model, variant, dataset) in zip(axes[0], panels):
        cells = values[(values.model == model) & (values.variant == variant)
                       & (values.dataset == dataset)]
        configs = list(dict.fromkeys(cells.configuration))
        ns = sorted(set(cells.n_train))
        width = 0.8 / len(configs)
        for i, config in enumerate(configs):
            for j, n in enumerate(ns):
                cell = cells[(cells.configuration == config) & (cells.n_train == n)].iloc[0]
                x = j + (i - (len(configs) - 1) / 2) * width
                if cell.n == 0:
                    ax.text(x, 0.02, _short_reason(cell.note), rotation=90, ha="center",
                            va="bottom", fontsize=7, color="tab:red", transform=ax.get_xaxis_transform())
                    continue
                ax.bar(x, cell["mean"], width, color=f"C{i}", hatch="//" if config in baselines else None,
                       edgecolor="black", linewidth=0.5, label=cell.label if j == 0 else None,
                       yerr=None if math.isnan(cell["std"]) else cell["std"], capsize=3)
        ax.set_xticks(range(len(ns)), [f"N={n}" for n in ns])
        ax.set_xlim(-0.5, len(ns) - 0.5)  # keep the reason labels of missing bars inside
        ax.set_title(f"{model}{'' if variant == 'standard' else f' [{variant}]'} — {dataset}", fontsize=9)
        ax.set_ylabel("mean PSNR gap (dB)")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.suptitle(f"{spec.title}\nPSNR gap ↓, mean ± std over seeds", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _short_reason(note: str) -> str:
    """The first word of a cell's note for a figure, e.g. 'failed' for '2x failed: training
    diverged ...' (the full reason is in the table)."""
    first = re.sub(r"^\d+x ", "", note.split(";")[0])
    return re.split(r"[:(]", first)[0].strip()[:24] or "no data"


def plot_curves(curves: pd.DataFrame, trials: pd.DataFrame, dataset: str, path: Path) -> None:
    """Fig. 2 style: per configuration, (a) PSNR on train (solid) and test (dashed) images and
    (b) the PSNR gap against the diffusion timestep; one colour per N, shaded ± std."""
    sub = trials[trials.dataset == dataset]
    groups = list(dict.fromkeys(zip(sub.model, sub.variant, sub.config)))
    ns = sorted(set(sub.n_train))
    fig, axes = plt.subplots(len(groups), 2, figsize=(10, 3 * len(groups)), squeeze=False)
    for (model, variant, config), (ax_psnr, ax_gap) in zip(groups, axes):
        for k, n in enumerate(ns):
            cell = sub[(sub.model == model) & (sub.variant == variant) & (sub.config == config)
                       & (sub.n_train == n)]
            if cell.empty:
                continue
            data = curves[curves.trial.isin(cell.trial)]
            if data.empty:
                ax_gap.plot([], [], color=f"C{k}", label=f"N={n}: {_count_reasons(list(cell.reason))}"[:60])
                continue
            done = data.trial.nunique()
            for key, ax, style in (("psnr_train_t", ax_psnr, "-"), ("psnr_test_t", ax_psnr, "--"),
                                   ("psnr_gap_t", ax_gap, "-")):
                stat = data[data.curve == key].groupby("t")["value"].agg(["mean", "std"])
                ax.plot(stat.index, stat["mean"], style, color=f"C{k}",
                        label=(f"N={n}" + (f" ({done}/{len(cell)} runs)" if done < len(cell) else ""))
                        if key != "psnr_test_t" else None)
                ax.fill_between(stat.index, stat["mean"] - stat["std"].fillna(0),
                                stat["mean"] + stat["std"].fillna(0), color=f"C{k}", alpha=0.2)
        name = f"{model} {config}" + ("" if variant == "standard" else f" [{variant}]")
        ax_psnr.set_title(f"{name}: PSNR train (solid) / test (dashed)", fontsize=9)
        ax_gap.set_title(f"{name}: PSNR gap", fontsize=9)
        for ax in (ax_psnr, ax_gap):
            ax.set_xlabel("diffusion timestep t")
            ax.set_ylabel("dB")
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7)
    fig.suptitle(f"PSNR curves on {dataset} (mean ± std over seeds)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def curve_table(curves: pd.DataFrame) -> pd.DataFrame:
    """Mean, std and count of each curve per cell and timestep."""
    if curves.empty:
        return pd.DataFrame(columns=[*CELL_KEYS, "curve", "t", "mean", "std", "n"])
    grouped = curves.groupby([*CELL_KEYS, "curve", "t"], sort=False)["value"]
    return grouped.agg(mean="mean", std=lambda v: v.std(ddof=1), n="count").reset_index()


# ---------------------------------------------------------------------------------------------
# The paper's numbers beside this sweep's


def compare_with_paper(tables: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """For every FID cell of Tables 1-3 that the paper also reports (same model, dataset, N and
    configuration): both values, both changes vs the table's baseline, and whether the direction
    of the change agrees."""
    from ditsweep.reference import paper_dataset, paper_table

    paper = paper_table()
    paper = paper[(paper.metric == "fid") & (paper.run == "main")]
    specs = {s.key: s for s in TABLES}
    rows = []
    for key, table in tables.items():
        values = table[(table.row == "value") & (table.metric == "fid")]
        for cell in values.itertuples():
            pset = paper_dataset(cell.dataset, list(paper.dataset.unique()))
            ref = _paper_value(paper, key, cell.model, pset, cell.n_train, cell.configuration)
            if ref is None or cell.variant != "standard":
                continue
            base = specs[key].baseline.get(cell.configuration)
            base_cell = values[(values.model == cell.model) & (values.variant == cell.variant)
                               & (values.dataset == cell.dataset) & (values.n_train == cell.n_train)
                               & (values.configuration == base)]
            paper_base = _paper_value(paper, key, cell.model, pset, cell.n_train, base) if base else None
            ours = cell.mean if cell.n else math.nan
            ours_base = base_cell["mean"].iloc[0] if len(base_cell) and base_cell.n.iloc[0] else math.nan
            rows.append({"table": key, "model": cell.model, "dataset": cell.dataset,
                         "paper_dataset": pset, "n_train": cell.n_train,
                         "configuration": cell.configuration, "baseline": base or "",
                         "sweep_fid": cell.display, "paper_fid": ref,
                         "sweep_change_pct": _pct(ours, ours_base),
                         "paper_change_pct": _pct(ref, paper_base),
                         "direction": _agreement(ours, ours_base, ref, paper_base, base, cell.note)})
    columns = ["table", "model", "dataset", "paper_dataset", "n_train", "configuration",
               "baseline", "sweep_fid", "paper_fid", "sweep_change_pct", "paper_change_pct",
               "direction"]
    comparison = pd.DataFrame(rows, columns=columns)
    # The same cell against the same baseline appears in several tables (e.g. local vs global in
    # Tables 1 and 2): list it once, naming every table.
    same = ["model", "dataset", "n_train", "configuration", "baseline"]
    tables_of = comparison.groupby(same, sort=False)["table"].agg(", ".join)
    comparison = comparison.drop_duplicates(same).drop(columns="table")
    return comparison.merge(tables_of.reset_index(), on=same)[columns]


def _paper_value(paper: pd.DataFrame, table: str, model: str, dataset: str | None, n: int,
                 config: str) -> float | None:
    hit = paper[(paper.table == table) & (paper.model == model) & (paper.dataset == dataset)
                & (paper.n_train == n) & (paper.configuration == config)]
    return float(hit.value.iloc[0]) if len(hit) else None


def _pct(value: float | None, base: float | None) -> float:
    if value is None or base is None or math.isnan(value) or math.isnan(base) or base == 0:
        return math.nan
    return (value - base) / base * 100


def _agreement(ours, ours_base, ref, ref_base, base, note) -> str:
    if not base:
        return "baseline"
    if ref_base is None:
        return f"n/a (the paper has no {base} cell)"
    if math.isnan(ours):
        return f"n/a (this sweep: {note or 'no value'})"
    if math.isnan(ours_base):
        return f"n/a (this sweep has no {base} value)"
    word = lambda d: "lower" if d < 0 else "higher" if d > 0 else "equal"  # noqa: E731
    mine, theirs = word(ours - ours_base), word(ref - ref_base)
    verdict = "agrees" if mine == theirs else "disagrees"
    return f"{verdict} (sweep {mine}, paper {theirs} than {base})"


def _no_reference_match(trials: pd.DataFrame) -> str:
    from ditsweep.reference import paper_table

    paper = paper_table()
    return ("No cell of this sweep has a counterpart in the paper's Tables 1-3, which cover models "
            f"{', '.join(sorted(paper.model.unique()))} on {', '.join(paper.dataset.unique())} at "
            f"N in {{{', '.join(map(str, sorted(paper.n_train.unique())))}}}; this sweep has "
            f"{', '.join(sorted(trials.model.unique()))} on {', '.join(trials.dataset.unique())} "
            f"at N in {{{', '.join(map(str, sorted(trials.n_train.unique())))}}}.")


# ---------------------------------------------------------------------------------------------
# The report


def write_report(experiment: str, tracking_uri: str, out_dir: str, parent_run_id: str | None = None,
                 reference: str | None = None, log_artifacts: bool = True) -> Path:
    """Write REPORT.md, CSVs and PNGs of a sweep to `out_dir`, log them as artifacts `report/`
    of the sweep's parent run (default: the experiment's newest) and return REPORT.md's path."""
    if reference not in (None, "paper"):
        raise ValueError(f"unknown reference {reference!r}; the only one is 'paper'")
    client = MlflowClient(tracking_uri)
    data = load_sweep(client, experiment, parent_run_id)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data.trials.to_csv(out / "runs.csv", index=False)

    sections, fid_tables = [], {}
    for spec in TABLES:
        sections.append(_table_section(spec, data, out, fid_tables))
    sections.append(_curves_section(data, out))
    if reference == "paper":
        sections.append(_reference_section(fid_tables, data.trials, out))
    sections.append(_unfinished_section(data.trials))

    report = out / "REPORT.md"
    report.write_text(_header(data) + "\n\n".join(sections) + "\n")
    if log_artifacts:
        retrying(lambda: client.log_artifacts(data.parent_run_id, str(out), "report"), "log report")
    return report


def _header(data: SweepData) -> str:
    counts = Counter(data.trials.status)
    summary = ", ".join(f"{counts[s]} {s}" for s in ("finished", "failed", "running", "killed",
                                                     "deleted", "not run") if counts[s])
    return (f"# Sweep report: {data.sweep}\n\n"
            f"Experiment `{data.experiment}` (id {data.experiment_id}), sweep run "
            f"`{data.parent_run_id}`, generated {datetime.now(timezone.utc):%Y-%m-%d %H:%M UTC}.\n\n"
            f"Trials: {len(data.trials)} planned; {summary}.\n\n"
            "Each cell is the mean ± sample standard deviation (n-1) over the cell's seeds and "
            "dataset shuffles. `(n=k/m; ...)` marks a cell where only k of its m trials have a "
            "value, and says why; a cell with no value shows the reason instead of a number. "
            "`—` marks a cell this sweep did not plan.\n\n")


def _table_section(spec: TableSpec, data: SweepData, out: Path, fid_tables: dict) -> str:
    parts = [f"## {spec.title}"]
    longs = []
    for metric in METRICS:
        table = build_table(spec, data.trials, metric)
        if table is None:
            return (f"## {spec.title}\n\nNo data: this sweep has none of this table's layouts "
                    f"({spec.missing_hint}).")
        longs.append(table)
        parts.append(f"### {metric.title}")
        if data.trials[metric.key].notna().any():
            parts.append(table_markdown(table, spec.mark_best))
        else:
            parts.append(f"No finished trial of this sweep logged `{metric.key}`.")
        if metric.key == "fid":
            fid_tables[spec.key] = table
    pd.concat(longs).to_csv(out / f"{spec.key}.csv", index=False)
    gap = longs[-1]
    if (gap.row == "value").any() and data.trials.psnr_gap_mean.notna().any():
        plot_gap_bars(spec, gap, out / f"{spec.key}_psnr_gap.png")
        parts.append(f"![{spec.key} PSNR gap]({spec.key}_psnr_gap.png)")
    return "\n\n".join(parts)


def _curves_section(data: SweepData, out: Path) -> str:
    parts = ["## PSNR curves (in the manner of Fig. 2)"]
    curve_table(data.curves).to_csv(out / "psnr_curves.csv", index=False)
    if data.curves.empty:
        return parts[0] + "\n\nNo finished trial logged PSNR curves (`psnr_train_t`, `psnr_test_t`)."
    for dataset in dict.fromkeys(data.trials.dataset):
        name = f"psnr_curves_{dataset}.png"
        plot_curves(data.curves, data.trials, dataset, out / name)
        parts.append(f"![PSNR curves on {dataset}]({name})")
    return "\n\n".join(parts)


def _reference_section(fid_tables: dict, trials: pd.DataFrame, out: Path) -> str:
    comparison = compare_with_paper(fid_tables) if fid_tables else pd.DataFrame()
    comparison.to_csv(out / "paper_comparison.csv", index=False)
    head = ("## This sweep beside the paper (FID, Tables 1-3)\n\n"
            "Paper values: `ditsweep/reference/paper_tables.csv` (main runs). The direction compares "
            "each configuration's change against the table's baseline in this sweep and in the paper.")
    if comparison.empty:
        return f"{head}\n\n{_no_reference_match(trials)}"
    shown = comparison.copy()
    for col in ("sweep_change_pct", "paper_change_pct"):
        shown[col] = [f"{v:+.2f}%" if not math.isnan(v) else "" for v in shown[col]]
    shown["paper_fid"] = [f"{v:.4f}" for v in shown.paper_fid]
    return f"{head}\n\n{markdown(shown)}"


def _unfinished_section(trials: pd.DataFrame) -> str:
    bad = trials[trials.status != "finished"]
    if bad.empty:
        return "## Trials\n\nAll trials finished."
    return "## Trials that did not finish\n\n" + markdown(bad[["trial", "status", "reason"]])


# ---------------------------------------------------------------------------------------------


def default_tracking_uri() -> str:
    # Same default as ditsweep.spec.resolve_tracking_uri, without importing torch for a report.
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ditsweep.report",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("experiment", help="MLflow experiment of the sweep (the sweep's name by default)")
    parser.add_argument("--tracking-uri", default=None,
                        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else ./mlflow.db)")
    parser.add_argument("--out", default=None, help="output directory (default: reports/EXPERIMENT)")
    parser.add_argument("--parent-run-id", default=None,
                        help="the sweep's parent run (default: the experiment's newest sweep run)")
    parser.add_argument("--reference", choices=["paper"], default=None,
                        help="also print the paper's numbers for the same cells and whether the "
                             "direction of each change agrees")
    parser.add_argument("--no-log", action="store_true",
                        help="do not log the report as artifacts of the sweep's parent run")
    args = parser.parse_args(argv)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # keep stdout readable
    out = args.out or str(Path("reports") / args.experiment)
    try:
        path = write_report(args.experiment, args.tracking_uri or default_tracking_uri(), out,
                            args.parent_run_id, args.reference, log_artifacts=not args.no_log)
    except LookupError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.reference:
        comparison = Path(out) / "paper_comparison.csv"
        text = path.read_text()
        print(text[text.index("## This sweep beside the paper"):].split("\n## ")[0])
        print(f"\n(also in {comparison})")
    print(f"report: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
