"""The paper's tables and figures, regenerated from a sweep's MLflow runs.

    python -m ditsweep.report EXPERIMENT [--tracking-uri URI] [--out DIR] [--reference paper]

Reads the sweep's parent run (newest one of the experiment unless --parent-run-id), the trials it
planned (`trials.json`) and its child runs, and writes to DIR as Markdown (REPORT.md), CSV and PNG:

- Table 1 (global vs local, with the % change row), Table 2 (placement: head, mix, tail) and
  Table 3 (window size: same, smaller, larger), each for FID and for the mean PSNR gap, with the
  cells the sweep has; a table the sweep has no layouts for says so.
- Table 1's dagger rows (seed 143, batch 128: "DiT-XS/1 †") when the sweep has such trials, and
  Table 5 (global, local, weight sharing, PCA attention) when it has those variants.
- PSNR-gap bar charts in the manner of Figs. 6-8 and PSNR train/test curves as in Fig. 2.
- The leading Jacobian eigenvectors of every model side by side (DiT vs UNet, Figs. 1 and 3).
- The paper's claims the sweep can test: the median paired relative difference over replicates
  (dataset shuffle x seed), its exact sign-test interval and a verdict (claims.py).

One file per job: runs.py reads MLflow, tables.py makes the tables, figures.py the figures,
paper.py puts the paper's numbers beside them, claims.py tests the paper's claims.

Every number is the mean ± sample standard deviation over the seeds and dataset shuffles of a
cell. A trial that failed, never ran or logged no value is a gap that says why, never a zero.
The files are also logged as artifacts (`report/`) of the sweep's parent run.
"""

import argparse
import math
import os
import sys
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd
from mlflow.tracking import MlflowClient

from ditsweep.report.claims import claim_table
from ditsweep.report.figures import curve_table, plot_curves, plot_eigenvectors_side_by_side, plot_gap_bars
from ditsweep.report.paper import compare_with_paper, no_reference_match
from ditsweep.report.runs import METRICS, SweepData, load_sweep
from ditsweep.report.tables import TABLES, TableSpec, build_table, markdown, table_markdown, variant_configs
from ditsweep.tracking.mlflow_runs import retrying

__all__ = ["write_report", "main", "load_sweep"]


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
        section = _table_section(spec, data, out, fid_tables)
        if section:
            sections.append(section)
    sections.append(_curves_section(data, out))
    sections += [s for s in (_eigenvector_section(client, data, out), _claims_section(data, out)) if s]
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
            if not spec.always_shown:
                return ""
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
        shown = variant_configs(data.trials) if spec.variant_rows else data.trials
        plot_gap_bars(spec, gap, shown, out / f"{spec.key}_psnr_gap.png")
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


def _eigenvector_section(client: MlflowClient, data: SweepData, out: Path) -> str:
    """Figs. 1 and 3 from the trials' final jacobian/eigenvectors_t*.pt: one row per model,
    configuration and N (the first seed and dataset of each), one figure per timestep."""
    import tempfile

    import torch

    done = data.trials[data.trials.status == "finished"]
    done = done[done.dataset == done.dataset.iloc[0]] if len(done) else done
    first = done.sort_values(["seed"]).drop_duplicates(["model", "variant", "config", "n_train"])
    by_t: dict[str, list] = {}
    with tempfile.TemporaryDirectory() as d:
        for trial in first.sort_values(["arch", "model", "config", "n_train"],
                                       ascending=[False, True, True, True]).itertuples():
            files = retrying(lambda: client.list_artifacts(trial.run_id, "jacobian"), "list")
            for f in files:
                if f.path.endswith(".pt"):
                    local = retrying(lambda: client.download_artifacts(trial.run_id, f.path, d), "get")
                    label = f"{trial.model} {trial.config}\nN={trial.n_train}"
                    by_t.setdefault(Path(f.path).stem.split("_")[-1], []).append(
                        (label, torch.load(local, weights_only=True)))
    if not by_t:
        return ""
    parts = ["## Jacobian eigenvectors (in the manner of Figs. 1 and 3)",
             "The leading eigenvectors of d x0_hat / d x_t (symmetric part) for one training image, "
             "per model, configuration and N (first seed), split into R, G, B."]
    for t, rows in sorted(by_t.items()):
        name = f"jacobian_eigenvectors_{t}.png"
        plot_eigenvectors_side_by_side(rows, 8, f"Jacobian eigenvectors at {t}: UNet vs DiT (Figs. 1, 3)",
                                       out / name)
        parts.append(f"![Jacobian eigenvectors at {t}]({name})")
    return "\n\n".join(parts)


def _claims_section(data: SweepData, out: Path) -> str:
    claims = claim_table(data.trials)
    if claims.empty:
        return ""
    claims.to_csv(out / "claims.csv", index=False)
    return ("## The paper's claims this sweep can test\n\n"
            "Mean PSNR gap per trial, paired within a replicate (same model, dataset shuffle and "
            "seed). `median`: the median paired relative difference (a - b) / b over the `pairs`; "
            "negative is the paper's direction, `paper_side` counts the pairs on it. `interval`: "
            "the exact sign-test interval of that median (coverage in `confidence`, at least 95%). "
            "The verdict says `agrees` or `disagrees` only when the interval excludes zero; with "
            "fewer than 6 pairs no interval reaches 95%, so nothing is resolved.\n\n"
            + markdown(claims))


def _reference_section(fid_tables: dict, trials: pd.DataFrame, out: Path) -> str:
    comparison = compare_with_paper(fid_tables) if fid_tables else pd.DataFrame()
    comparison.to_csv(out / "paper_comparison.csv", index=False)
    head = ("## This sweep beside the paper (FID, Tables 1-3 and 5)\n\n"
            "Paper values: `ditsweep/reference/paper_tables.csv` (main runs). The direction compares "
            "each configuration's change against the table's baseline in this sweep and in the paper.")
    if comparison.empty:
        return f"{head}\n\n{no_reference_match(trials)}"
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


def default_tracking_uri() -> str:
    # Same default as ditsweep.config.resolve_tracking_uri, without importing torch for a report.
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
