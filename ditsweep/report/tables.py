"""The paper's tables: which configurations each has, cells as mean ± std over seeds with the
reason for every missing trial, the % change rows, and Markdown."""

import math
from collections import Counter
from dataclasses import dataclass

import pandas as pd

from ditsweep.report.runs import CELL_KEYS, Metric

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
    variant_rows: bool = False  # rows are (layout, variant) pairs "global+weight-sharing" (Table 5)
    always_shown: bool = True   # False: no section at all for a sweep without its configurations


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
    TableSpec("table5", "Table 5: reducing FLOPs (local) vs parameters (weight sharing, PCA)",
              rows=(("global", "DiT (global)"), ("local", "w/ Local"),
                    ("global+weight-sharing", "w/ Weight Sharing"),
                    ("global+pca-attention", "w/ PCA")),
              baseline={c: "global" for c in ("local", "global+weight-sharing", "global+pca-attention")},
              triggers=frozenset({"global+weight-sharing", "global+pca-attention"}),
              variant_rows=True, always_shown=False,
              missing_hint="needs variants weight-sharing or pca-attention of the global layout"),
)


def variant_configs(trials: pd.DataFrame) -> pd.DataFrame:
    """Trials with the variant folded into the configuration (global + weight-sharing ->
    "global+weight-sharing"), for tables whose rows are variants."""
    config = [c if v == "standard" else f"{c}+{v}" for c, v in zip(trials.config, trials.variant)]
    return trials.assign(config=config, variant="standard")



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
                     "n": len(values), "n_planned": len(group), "note": count_reasons(reasons)})
    return pd.DataFrame(rows, columns=[*CELL_KEYS, "mean", "std", "n", "n_planned", "note"])


def count_reasons(reasons: list[str]) -> str:
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
    if spec.variant_rows:
        trials = variant_configs(trials)
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
