"""Which trials train fused (`resources.fuse: k`): trials that share everything that shapes the
model and its updates (train/fused.py FUSION_FIELDS) are grouped, up to k per group, in sweep
order; a trial that cannot be fused (a UNet, streamed data, PCA attention) trains alone.

    groups = fuse_groups(trials, 4)     # [[t0, t1, t2, t3], [t4], ...]
    entries = [tune_entry(g) for g in groups]
"""

import math

from ditsweep.config import TrialConfig
from ditsweep.train.fused import MEMBERS, fusion_key, unfusable


def fuse_groups(trials: list[TrialConfig], k: int) -> list[list[TrialConfig]]:
    """Trials as groups of at most k (sizes as even as possible: a group of 4 and one of 1 would
    leave the fifth trial alone on a GPU as long as the four)."""
    if k <= 1:
        return [[t] for t in trials]
    by_key: dict[tuple, list[TrialConfig]] = {}
    alone = []
    for t in trials:
        key = fusion_key(t)
        if key is None:
            alone.append([t])
        else:
            by_key.setdefault(key, []).append(t)
    groups = []
    for members in by_key.values():
        count = math.ceil(len(members) / k)
        size, extra = divmod(len(members), count)
        start = 0
        for i in range(count):
            end = start + size + (1 if i < extra else 0)
            groups.append(members[start:end])
            start = end
    return groups + alone


def fusion_summary(groups: list[list[TrialConfig]]) -> str | None:
    """One line for the console: how the trials were grouped, and why some train alone."""
    fused = [g for g in groups if len(g) > 1]
    if not fused:
        return None
    reasons = sorted({unfusable(g[0]) for g in groups if len(g) == 1 and unfusable(g[0])})
    line = (f"{sum(map(len, fused))} trials fused into {len(fused)} groups "
            f"({', '.join(str(len(g)) for g in fused)} members)")
    alone = sum(1 for g in groups if len(g) == 1)
    if alone:
        line += f"; {alone} train alone" + (f" ({'; '.join(reasons)})" if reasons else "")
    return line


def group_name(members: list[TrialConfig]) -> str:
    """The Tune trial's name (and folder) of a group: its first member's name and the count."""
    return f"{members[0].trial}+{len(members) - 1}"


def tune_entry(members: list[TrialConfig]) -> dict:
    """What goes under TRIAL_KEY in the Tune config: a trial, or a group of them."""
    if len(members) == 1:
        return members[0].model_dump()
    return {"trial": group_name(members), MEMBERS: [m.model_dump() for m in members]}
