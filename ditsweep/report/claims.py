"""The paper's claims a small sweep can test, and whether this sweep agrees, seed by seed.

Each claim is a comparison of mean PSNR gaps between trials that differ in one thing and share
model, dataset, N and seed; the verdict counts the seeds (and shuffles) that agree:

- memorisation at tiny N (Figs. 2, 6): the gap at the sweep's smallest N is larger than at its
  largest, per configuration;
- local attention generalises better at small N (Table 1, Fig. 6): local head < global at the
  smallest N;
- head better than tail (Table 2, Fig. 7): local head < local tail, at every N.
"""

import pandas as pd

KEY = ["model", "variant", "dataset", "seed"]


def _pairs(trials: pd.DataFrame, a: dict, b: dict, on: list[str]) -> list[tuple]:
    """(context, gap a, gap b) for trials matching `a` and `b` with equal `on` columns."""
    done = trials[trials.psnr_gap_mean.notna()]
    left = done[(done[list(a)] == pd.Series(a)).all(axis=1)]
    right = done[(done[list(b)] == pd.Series(b)).all(axis=1)]
    merged = left.merge(right, on=on, suffixes=("_a", "_b"))
    return [(row, row.psnr_gap_mean_a, row.psnr_gap_mean_b) for row in merged.itertuples()]


def _verdict(agree: int, total: int) -> str:
    if total == 0:
        return "not testable"
    if agree == total:
        return "agrees"
    return "agrees mostly" if agree * 2 > total else "disagrees"


def claim_table(trials: pd.DataFrame) -> pd.DataFrame:
    """One row per testable claim: what the paper says, what this sweep compared, in how many
    seeds it agrees, and the verdict."""
    rows = []
    ns = sorted(trials.n_train.unique())
    configs = set(trials.config)
    if len(ns) > 1:
        small, large = ns[0], ns[-1]
        pairs = []
        for config in sorted(configs):
            pairs += _pairs(trials, {"config": config, "n_train": small},
                            {"config": config, "n_train": large}, KEY + ["config"])
        agree = sum(a > b for _, a, b in pairs)
        rows.append(("memorisation at tiny N", "the PSNR gap shrinks as N grows (Figs. 2, 6)",
                     f"gap at N={small} > gap at N={large}, per configuration and seed", agree, len(pairs)))
    if {"local", "global"} <= configs:
        pairs = _pairs(trials, {"config": "local", "n_train": ns[0]},
                       {"config": "global", "n_train": ns[0]}, KEY + ["n_train"])
        agree = sum(a < b for _, a, b in pairs)
        rows.append(("local attention helps at small N",
                     "local has a smaller gap than global (Table 1, Fig. 6)",
                     f"gap of local < global at N={ns[0]}, per seed", agree, len(pairs)))
    if {"local", "local-tail"} <= configs:
        pairs = _pairs(trials, {"config": "local"}, {"config": "local-tail"}, KEY + ["n_train"])
        agree = sum(a < b for _, a, b in pairs)
        rows.append(("head better than tail", "local windows at the head beat the tail (Table 2, Fig. 7)",
                     "gap of local (head) < local-tail, per N and seed", agree, len(pairs)))
    return pd.DataFrame([{"claim": c, "paper": p, "compared": how, "agreeing": f"{a}/{t}",
                          "verdict": _verdict(a, t)} for c, p, how, a, t in rows],
                        columns=["claim", "paper", "compared", "agreeing", "verdict"])
