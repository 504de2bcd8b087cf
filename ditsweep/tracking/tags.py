"""Search-friendly tags for a trial's MLflow run.

MLflow's compare view and search filter on tags and params by exact value, so a trial carries
the answers to the questions people ask as short tags: which dataset, which N, where the local
windows sit (`layout_family`) and which windows they are (`window_config`), e.g.

    tags.`ditsweep.layout_family` = 'head' and tags.`ditsweep.n_train` = '10000'

Everything here is derived from the layout string ("3,5,7,G,G,G"), so a layout written out by
hand gets the same tags as the preset it equals. This module imports nothing heavy: the report
uses it too.
"""

import re

DATASET_TAG = "ditsweep.dataset"            # the URI, exactly as the `dataset` param
DATASET_NAME_TAG = "ditsweep.dataset_name"  # its short name, shuffles folded: celeba32, photos
N_TRAIN_TAG = "ditsweep.n_train"
FAMILY_TAG = "ditsweep.layout_family"
WINDOWS_TAG = "ditsweep.window_config"
LAYOUT_TAG = "ditsweep.layout"
MODEL_TAG = "ditsweep.model"
VARIANT_TAG = "ditsweep.variant"

# The window multisets of the paper's Table 4 (and of the tiny 6-block presets), keyed by model
# depth so that a hand-written 12-block layout with windows 3,5,7 is not taken for the 6-block
# "local". Mirrors ditsweep.models.presets.LAYOUTS (tests/test_report.py checks that they agree);
# kept here as data so that reading tags never imports torch.
WINDOW_CONFIG_NAMES: dict[tuple[int, tuple[int, ...]], str] = {
    (12, (3, 5, 7, 9, 11, 13)): "local",
    (12, (3, 3, 3, 5, 5, 5, 7, 7, 7)): "local9",
    (12, (3, 5, 7, 9, 11, 13, 15, 17, 19)): "local-smaller",
    (12, (5, 5, 5, 7, 7, 7, 9, 9, 9)): "local9-larger",
    (12, (5, 5, 5, 5, 5, 5)): "uniform5",
    (12, (3, 3, 5, 5, 7, 7)): "pairs357",
    (6, (3, 5, 7)): "local",
}


def parse_layout(layout: str) -> list[int | None]:
    """"3,5,G" -> [3, 5, None] (None = global attention). "-" (a UNet) -> []."""
    if layout.strip() in ("", "-"):
        return []
    return [None if e.strip().upper() == "G" else int(e) for e in layout.split(",")]


def layout_family(layout: str, arch: str = "dit") -> str:
    """global (all G), head (windows then G), tail (G then windows), mix (alternating),
    custom (anything else, e.g. windows only) or unet."""
    entries = parse_layout(layout)
    if arch != "dit" or not entries:
        return "unet"
    kinds = "".join("G" if e is None else "W" for e in entries)
    runs = re.sub(r"(.)\1+", r"\1", kinds)  # "WWWGGG" -> "WG"
    return {"G": "global", "WG": "head", "GW": "tail"}.get(runs, "mix" if len(runs) > 2 else "custom")


def window_config(layout: str, arch: str = "dit") -> str:
    """A short name for the multiset of window sizes: the Table-4 name when there is one
    ("local", "local9", ...), else the sorted sizes ("3,7"); "none" without windows."""
    entries = parse_layout(layout)
    windows = tuple(sorted(e for e in entries if e is not None))
    if arch != "dit" or not windows:
        return "none"
    return WINDOW_CONFIG_NAMES.get((len(entries), windows), ",".join(map(str, windows)))


def configuration(layout: str, arch: str = "dit") -> str:
    """The paper's name of a layout, from the layout string alone: "global", "local",
    "local-mix", "local9-tail", "uniform5", ... or "custom:<layout>" / "unet"."""
    family, windows = layout_family(layout, arch), window_config(layout, arch)
    if family in ("unet", "global"):
        return family
    named = windows in WINDOW_CONFIG_NAMES.values()
    if named and family == "head":
        return windows
    if named and family in ("mix", "tail") and windows in ("local", "local9"):
        return f"{windows}-{family}"
    return f"custom:{layout}"


def readable_layout(layout: str, arch: str = "dit") -> str:
    """Run-length form in the paper's notation: "3,5,7,G,G,G" -> "3,5,7,G*3";
    "3,3,3,5,5,5,7,7,7,G,G,G" -> "3*3,5*3,7*3,G*3"."""
    entries = parse_layout(layout)
    if arch != "dit" or not entries:
        return "unet"
    parts: list[str] = []
    for e in entries:
        token = "G" if e is None else str(e)
        if parts and parts[-1].split("*")[0] == token:
            count = int(parts[-1].split("*")[1]) if "*" in parts[-1] else 1
            parts[-1] = f"{token}*{count + 1}"
        else:
            parts.append(token)
    return ",".join(parts)


def dataset_name(uri: str) -> str:
    """The short name of a dataset URI: builtin:photos?seed=1 -> photos,
    s3://bucket/celeba32/ -> celeba32. The shuffle (?seed=) is dropped on purpose: runs on
    different shuffles of one dataset are replicates of the same cell."""
    base = uri.split("?")[0].rstrip("/")
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", base.split("/")[-1].split(":")[-1]).strip("-") or uri


def trial_tags(model: str, arch: str, layout: str, layout_name: str, n_train: int, dataset: str,
               variant: str) -> dict[str, str]:
    """Tags for a trial's run, e.g. for DiT-XS/1 with layout "local-tail" on s3://b/celeba32:
    dataset=s3://b/celeba32, dataset_name=celeba32, n_train=10000, layout_family=tail, window_config=local,
    layout="local-tail: G*6,3,5,7,9,11,13"."""
    family = layout_family(layout, arch)
    shown = readable_layout(layout, arch)
    name = layout_name if layout_name and layout_name != "custom" else configuration(layout, arch)
    if name.startswith("custom:"):
        name = "custom"
    readable = shown if name == shown else f"{name}: {shown}"
    if variant and variant != "standard":
        readable += f" [{variant}]"
    return {
        DATASET_TAG: dataset,
        DATASET_NAME_TAG: dataset_name(dataset),
        N_TRAIN_TAG: str(int(n_train)),
        FAMILY_TAG: family,
        WINDOWS_TAG: window_config(layout, arch),
        LAYOUT_TAG: readable,
        MODEL_TAG: model,
        VARIANT_TAG: variant or "standard",
    }
