"""The paper's claims a sweep can test, each with an interval and a verdict.

Each claim compares mean PSNR gaps of trials that differ in one thing and share everything else:
model, variant, dataset, its shuffle (the `?seed=` of a built-in dataset, or a `-shuffleN`
copy of a packed one) and the training seed. One such pair is one replicate; its paired relative
difference is (gap a - gap b) / gap b. The claims:

- memorisation at tiny N (Figs. 2, 6): the gap at the sweep's smallest N is larger than at its
  largest, pairs per configuration and replicate;
- local attention helps at small N (Fig. 6, Table 1): local head < global, at each N;
- head better than tail (Fig. 7, Table 2): local head < local tail, at each N.

The interval is the exact sign-test (binomial) interval of the median paired relative
difference, at least 95% coverage: with sorted differences d(1) <= ... <= d(n) it is
[d(k), d(n+1-k)] for the largest k with 2 * P(Binomial(n, 1/2) < k) <= 5%. It assumes only that
replicates are independent, nothing about the shape of their spread, which matters with six of
them. The verdict: "agrees" when the whole interval lies on the paper's side of zero, "disagrees"
when it lies on the other side, "not resolved at this scale" when it includes zero. Fewer than 6
replicates can never resolve a claim: [d(1), d(n)] then covers the median with < 95%.
"""

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

CONFIDENCE = 0.95
# A replicate: the same model, dataset shuffle and training seed (dataset_uri keeps the shuffle).
REPLICATE = ["model", "variant", "dataset", "dataset_uri", "seed"]
COLUMNS = ["claim", "paper", "compared", "pairs", "paper_side", "median", "interval",
           "confidence", "verdict"]


@dataclass
class SignInterval:
    """The median of paired differences and its exact sign-test interval (-inf/inf: none)."""
    median: float
    low: float
    high: float
    confidence: float  # the interval's exact coverage (0 when there is none)


def sign_test_interval(differences, confidence: float = CONFIDENCE) -> SignInterval:
    """Distribution-free interval for the median of `differences` (see the module docstring)."""
    d = np.sort(np.asarray(differences, dtype=float))
    n = len(d)
    if n == 0:
        return SignInterval(math.nan, -math.inf, math.inf, 0.0)
    # P(Binomial(n, 1/2) <= j) for j = 0..n
    cdf = np.cumsum([math.comb(n, j) for j in range(n + 1)]) / 2.0 ** n
    k = 0
    while k + 1 <= n // 2 and 2 * cdf[k] <= 1 - confidence:  # k + 1 is still a valid order
        k += 1
    median = float(np.median(d))
    if k == 0:
        return SignInterval(median, -math.inf, math.inf, 0.0)
    return SignInterval(median, float(d[k - 1]), float(d[n - k]), float(1 - 2 * cdf[k - 1]))


def verdict(interval: SignInterval, paper_below_zero: bool) -> str:
    """agrees / disagrees / not resolved at this scale, from where the interval lies."""
    if not interval.high < 0 and not interval.low > 0:
        return "not resolved at this scale" if interval.confidence else "not resolved (too few replicates)"
    below = interval.high < 0
    return "agrees" if below == paper_below_zero else "disagrees"


def paired_differences(trials: pd.DataFrame, a: dict, b: dict, on: list[str]) -> np.ndarray:
    """(gap a - gap b) / gap b for every pair of finished trials matching `a` and `b` that agree
    on the columns `on`. A pair whose b gap is 0 (nothing to compare against) is left out."""
    done = trials[trials.psnr_gap_mean.notna()]
    left = done[(done[list(a)] == pd.Series(a)).all(axis=1)]
    right = done[(done[list(b)] == pd.Series(b)).all(axis=1)]
    merged = left.merge(right, on=on, suffixes=("_a", "_b"))
    merged = merged[merged.psnr_gap_mean_b > 0]
    return ((merged.psnr_gap_mean_a - merged.psnr_gap_mean_b) / merged.psnr_gap_mean_b).to_numpy()


def _row(claim: str, paper: str, compared: str, diffs: np.ndarray) -> dict:
    """The paper's direction is always a < b here: a negative relative difference."""
    ci = sign_test_interval(diffs)
    shown = "-" if not ci.confidence else f"[{ci.low:+.1%}, {ci.high:+.1%}]"
    return {"claim": claim, "paper": paper, "compared": compared, "pairs": len(diffs),
            "paper_side": f"{int((diffs < 0).sum())}/{len(diffs)}",
            "median": "-" if not len(diffs) else f"{ci.median:+.1%}", "interval": shown,
            "confidence": f"{ci.confidence:.1%}" if ci.confidence else "-",
            "verdict": verdict(ci, paper_below_zero=True)}


def claim_table(trials: pd.DataFrame) -> pd.DataFrame:
    """One row per testable claim (per N where the paper states it per N): the median paired
    relative difference over replicates, its sign-test interval and the verdict."""
    rows = []
    ns = sorted(trials.n_train.unique())
    configs = set(trials.config)
    if len(ns) > 1:
        small, large = ns[0], ns[-1]
        diffs = np.concatenate([
            paired_differences(trials, {"config": c, "n_train": large}, {"config": c, "n_train": small},
                               REPLICATE + ["config"]) for c in sorted(configs)])
        rows.append(_row("memorisation at tiny N", "the PSNR gap shrinks as N grows (Figs. 2, 6)",
                         f"gap at N={large} vs N={small}, per configuration and replicate", diffs))
    for claim, paper, a, b in (
            ("local attention helps at small N", "local has a smaller gap than global (Fig. 6, Table 1)",
             "local", "global"),
            ("head better than tail", "local windows at the head beat the tail (Fig. 7, Table 2)",
             "local", "local-tail")):
        if not {a, b} <= configs:
            continue
        for n in ns:
            diffs = paired_differences(trials, {"config": a, "n_train": n}, {"config": b, "n_train": n},
                                       REPLICATE + ["n_train"])
            if len(diffs):
                rows.append(_row(claim, paper, f"gap of {a} vs {b} at N={n}, per replicate", diffs))
    return pd.DataFrame(rows, columns=COLUMNS)
