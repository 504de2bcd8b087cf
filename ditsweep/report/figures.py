"""The paper's figures from a sweep: PSNR-gap bars (Figs. 6-8) and PSNR curves (Fig. 2)."""

import math
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; also safe inside Ray/CI processes without a display
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from ditsweep.report.runs import CELL_KEYS  # noqa: E402
from ditsweep.report.tables import TableSpec, count_reasons  # noqa: E402


def plot_gap_bars(spec: TableSpec, table: pd.DataFrame, trials: pd.DataFrame, path: Path) -> None:
    """PSNR-gap bars in the manner of Figs. 6-8: one panel per model and dataset, bars per
    configuration grouped by N, ± std error bars and one dot per trial (seed and shuffle), so
    the spread behind each mean shows; hatched baseline; a missing cell is labelled with its
    reason instead of being drawn as a bar of height 0. `trials`: the trials the table was made
    from (their `config` as the table's)."""
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
                runs = trials[(trials.model == model) & (trials.variant == variant)
                              & (trials.dataset == dataset) & (trials.config == config)
                              & (trials.n_train == n)].psnr_gap_mean.dropna()
                ax.scatter([x] * len(runs), runs, s=9, color="black", zorder=3,
                           label="one trial" if i == j == 0 and len(runs) else None)
        ax.set_xticks(range(len(ns)), [f"N={n}" for n in ns])
        ax.set_xlim(-0.5, len(ns) - 0.5)  # keep the reason labels of missing bars inside
        ax.set_title(f"{model}{'' if variant == 'standard' else f' [{variant}]'} — {dataset}", fontsize=9)
        ax.set_ylabel("mean PSNR gap (dB)")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    most = int(values.n.max()) if len(values) else 0
    spread = ("one run per bar" if most <= 1
              else f"mean ± std over up to {most} seeds/shuffles, dots: single trials")
    fig.suptitle(f"{spec.title}\nPSNR gap ↓, {spread}", fontsize=10)
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
                ax_gap.plot([], [], color=f"C{k}", label=f"N={n}: {count_reasons(list(cell.reason))}"[:60])
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
    runs_per_cell = sub.groupby(["model", "variant", "config", "n_train"]).size()
    spread = ("one run per curve" if runs_per_cell.max() == 1
              else f"mean ± std over up to {runs_per_cell.max()} seeds/shuffles")
    fig.suptitle(f"PSNR curves on {dataset} ({spread})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def curve_table(curves: pd.DataFrame) -> pd.DataFrame:
    """Mean, std and count of each curve per cell and timestep."""
    if curves.empty:
        return pd.DataFrame(columns=[*CELL_KEYS, "curve", "t", "mean", "std", "n"])
    grouped = curves.groupby([*CELL_KEYS, "curve", "t"], sort=False)["value"]
    return grouped.agg(mean="mean", std=lambda v: v.std(ddof=1), n="count").reset_index()


def plot_eigenvectors_side_by_side(rows: list[tuple[str, dict]], count: int, title: str,
                                   path: Path) -> None:
    """Figs. 1 and 3: one row per trial (e.g. DiT and UNet at each N), its `count` leading
    Jacobian eigenvectors as split-channel images (R, G, B side by side), each on a symmetric
    colour scale and titled with its eigenvalue. `rows` holds (label, {"values", "vectors"})."""
    import torch

    count = min(count, min(len(d["values"]) for _, d in rows))
    fig, axes = plt.subplots(len(rows), count, figsize=(2.0 * count + 1.2, 1.0 * len(rows) + 0.8),
                             squeeze=False)
    for r, (label, data) in enumerate(rows):
        for k in range(count):
            v = data["vectors"][k]  # [C, H, W]
            gap = torch.full((v.shape[1], 1), float("nan"))
            panel = torch.cat([torch.cat([v[c], gap], dim=1) for c in range(v.shape[0])], dim=1)[:, :-1]
            limit = float(v.abs().max()) or 1.0
            ax = axes[r, k]
            ax.imshow(panel.numpy(), cmap="RdBu_r", vmin=-limit, vmax=limit, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"$\\lambda_{{{k + 1}}}$={float(data['values'][k]):.3f}", fontsize=7)
            if k == 0:
                ax.set_ylabel(label, fontsize=7, rotation=0, ha="right", va="center")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
