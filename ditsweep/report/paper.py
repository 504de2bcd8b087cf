"""The paper's numbers beside a sweep's: for each FID cell the paper also reports, both values,
both changes against the table's baseline, and whether the direction agrees."""

import math

import pandas as pd

from ditsweep.reference import paper_dataset, paper_table
from ditsweep.report.runs import DAGGER
from ditsweep.report.tables import TABLES


def compare_with_paper(tables: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """For every FID cell of Tables 1-3 and 5 that the paper also reports (same model, dataset, N and
    configuration): both values, both changes vs the table's baseline, and whether the direction
    of the change agrees."""
    paper = paper_table()
    paper = paper[paper.metric == "fid"]
    specs = {s.key: s for s in TABLES}
    rows = []
    for key, table in tables.items():
        values = table[(table.row == "value") & (table.metric == "fid")]
        for cell in values.itertuples():
            pset = paper_dataset(cell.dataset, list(paper.dataset.unique()))
            ref = _paper_value(paper, key, cell.model, pset, cell.n_train, cell.configuration)
            # Table 1's dagger rows are the paper's "alt" runs; Tables 2, 3, 5 repeat its main runs.
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
    run = "alt" if model.endswith(DAGGER) else "main"
    hit = paper[(paper.table == table) & (paper.model == model.removesuffix(DAGGER))
                & (paper.run == run) & (paper.dataset == dataset) & (paper.n_train == n)
                & (paper.configuration == config)]
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


def no_reference_match(trials: pd.DataFrame) -> str:
    paper = paper_table()
    return ("No cell of this sweep has a counterpart in the paper's Tables 1-3 and 5, which cover models "
            f"{', '.join(sorted(paper.model.unique()))} on {', '.join(paper.dataset.unique())} at "
            f"N in {{{', '.join(map(str, sorted(paper.n_train.unique())))}}}; this sweep has "
            f"{', '.join(sorted(trials.model.unique()))} on {', '.join(trials.dataset.unique())} "
            f"at N in {{{', '.join(map(str, sorted(trials.n_train.unique())))}}}.")
