"""Measured speeds of one GPU model, for `--dry-run`'s cost estimate.

A calibration file (JSON, one per GPU model, `ditsweep/bench/calibration/<gpu-slug>.json`) holds what
`python -m ditsweep.bench --gpu` measured on that GPU: training steps/s per (model, layout,
precision, compile, trials sharing the GPU), and the seconds of each evaluation. Every figure an
estimate uses comes back with its provenance: measured (which GPU, when), or the assumption that
replaced a missing measurement. Nothing here is ever filled in by hand.

    {"format": 1, "gpu": "NVIDIA H100 80GB HBM3", "measured_at": "2026-11-26", "source": "...",
     "software": {"torch": "2.11.0+cu130", ...},
     "train": [{"model": "DiT-XS/1", "layout": "3,5,7,...", "resolution": 32, "batch_size": 64,
                "precision": "fp32", "compile": false, "trials_per_gpu": 1, "steps_per_second": 4.35,
                "first_step_s": 1.46, "peak_mem_gib": 23.7}],
     "eval": [{"metric": "psnr_gap", "model": "DiT-XS/1", "layout": "...", "num_images": 300,
               "steps": 50, "seconds": 36.5}]}

A train row may carry `"fuse": k` (k trials trained as one fused model, ditsweep/train/fused.py):
its `steps_per_second` is then the group's (each member's) steps/s, and `trial_steps_per_second`
= k x that. Rows without "fuse" (every file written before fused training) are k = 1.

eval metrics: psnr_gap (num_images K, steps S), fid_sampling (seconds per 1000 images at
`steps` sampler steps), jacobian (one Jacobian of a resolution x resolution image).
"""

import functools
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from ditsweep.models.presets import has_local_blocks

FORMAT = 1
PACKAGE_DIR = Path(__file__).with_name("calibration")
DIR_ENV = "DITSWEEP_CALIBRATION_DIR"  # searched before the files shipped with ditsweep


@dataclass(frozen=True)
class Figure:
    """A number and where it comes from ("measured on ..." or "assumed: ...")."""
    value: float
    source: str

    @property
    def measured(self) -> bool:
        return self.source.startswith("measured")


def gpu_slug(gpu: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3' (the file name)."""
    return re.sub(r"[^a-z0-9]+", "-", gpu.lower()).strip("-")


def kernel_family(layout: str) -> str:
    """The attention kernels a training step runs, which decide its speed: 'global' (every
    block global), 'local' (any neighborhood window), or 'unet' ('-'). (Not the MLflow tag
    ditsweep.layout_family, which says where the windows sit: tracking/tags.py.)"""
    if layout in ("-", "unet"):
        return "unet"
    return "local" if has_local_blocks(layout) else "global"


class Calibration:
    def __init__(self, data: dict, path: Path | None = None):
        if data.get("format") != FORMAT:
            raise ValueError(f"{path}: calibration format {data.get('format')!r}, expected {FORMAT}")
        self.data, self.path = data, path
        self.gpu: str = data["gpu"]
        self.where = f"measured on {self.gpu} ({data.get('measured_at', 'date unknown')})"

    @classmethod
    def load(cls, path: str | Path) -> "Calibration":
        path = Path(path)
        return cls(json.loads(path.read_text()), path)

    # ---- training --------------------------------------------------------------------------
    def fused_ks(self) -> list[int]:
        """The fuse k of the measured train rows (1 always counts: rows without "fuse")."""
        return sorted({fuse_of(r) for r in self.data.get("train", [])} | {1})

    def train_speed(self, model: str, layout: str, resolution: int, batch_size: int, precision: str,
                    compile: bool, trials_per_gpu: int, fuse: int = 1) -> Figure | None:
        """Trial-steps/s of ONE trial's share of the GPU: its steps/s when `trials_per_gpu` trials
        share the GPU, or, with `fuse` k > 1, k x the steps/s of a group of k fused trials (a
        trial then costs 1/k of the group's GPU time). None when nothing comparable was
        measured. Missing figures are replaced by conservative stand-ins, each named in the
        source: the same layout family, tf32 by fp32 (TF32 is never slower), compiled by
        uncompiled, k trials per GPU by the single trial's speed / k (no gain), a fuse k that
        was not measured (same precision and compile) by training alone (fuse 1)."""
        if fuse > 1:
            fused = self._fused_speed(model, layout, resolution, batch_size, precision, compile, fuse)
            if fused is not None:
                return fused
            alone = self.train_speed(model, layout, resolution, batch_size, precision, compile, trials_per_gpu)
            if alone is None:
                return None
            note = f"assumed: fuse {fuse} not measured: trained alone (fuse 1)"
            if alone.measured:
                return Figure(alone.value, f"{note} [{alone.source}]")
            return Figure(alone.value, f"{note}; {alone.source.removeprefix('assumed: ')}")
        family = kernel_family(layout)
        comparable = [r for r in self.data.get("train", []) if r["resolution"] == resolution
                      and r["batch_size"] == batch_size and kernel_family(r["layout"]) == family]
        rows = [r for r in comparable if r["model"] == model]
        if not rows:  # another preset of the family was measured: scale its speed by FLOPs
            for other in dict.fromkeys(r["model"] for r in comparable):
                ref = self.train_speed(other, layout, resolution, batch_size, precision, compile,
                                       trials_per_gpu)
                if ref is not None:
                    ratio = (step_flops(other, layout, resolution, batch_size)
                             / step_flops(model, layout, resolution, batch_size))
                    return Figure(ref.value * ratio, f"assumed: {model} not measured; {other}'s speed "
                                  f"x {ratio:.3f} (FLOPs per step, {other} / {model}) "
                                  f"[{ref.source.removeprefix('assumed: ')}]")
            return None
        assumptions = []

        def pick(prec: str, comp: bool, k: int):
            found = [r for r in rows if r["precision"] == prec and bool(r["compile"]) == comp
                     and int(r.get("trials_per_gpu", 1)) == k and fuse_of(r) == 1]
            exact = [r for r in found if r["layout"] == layout]
            return (exact or found or [None])[0]

        k = trials_per_gpu
        packing = [f"{k} trials per GPU not measured: 1/{k} of one trial's speed"] if k > 1 else []
        candidates = [(precision, compile, k, [])]
        if k > 1:
            candidates.append((precision, compile, 1, packing))
        if precision == "tf32":
            candidates.append(("fp32", compile, 1, ["tf32 not measured: the fp32 figure"] + packing))
        if compile:
            candidates.append((precision, False, 1, ["compile not measured: the uncompiled figure"] + packing))
            if precision == "tf32":
                candidates.append(("fp32", False, 1, ["tf32 compiled not measured: the fp32 uncompiled "
                                                      "figure"] + packing))
        for prec, comp, n, notes in candidates:
            row = pick(prec, comp, n)
            if row is not None:
                factor = n / k  # a figure for n trials per GPU, stretched to k
                assumptions.extend(notes)
                break
        else:
            return None
        what = (f"{row['model']} layout {row['layout']} {row['precision']}"
                f"{' compiled' if row['compile'] else ''}, {int(row.get('trials_per_gpu', 1))}/GPU")
        if row["layout"] != layout:
            assumptions.append(f"layout {layout} taken as {row['layout']} (same family)")
        source = f"{self.where}: {what}"
        if assumptions:
            source = "assumed: " + "; ".join(assumptions) + f" [{source}]"
        return Figure(row["steps_per_second"] * factor, source)

    def _fused_speed(self, model: str, layout: str, resolution: int, batch_size: int, precision: str,
                     compile: bool, fuse: int) -> Figure | None:
        """k x the measured steps/s of a fused group of `fuse` trials (this preset, same family,
        precision and compile), or None: fused rows are never stood in for by other settings."""
        family = kernel_family(layout)
        rows = [r for r in self.data.get("train", []) if fuse_of(r) == fuse and r["model"] == model
                and r["resolution"] == resolution and r["batch_size"] == batch_size
                and kernel_family(r["layout"]) == family and r["precision"] == precision
                and bool(r["compile"]) == compile]
        row = next((r for r in rows if r["layout"] == layout), rows[0] if rows else None)
        if row is None:
            return None
        source = (f"{self.where}: {model} layout {row['layout']} {precision}{' compiled' if compile else ''}, "
                  f"fuse {fuse}: {fuse} x {row['steps_per_second']:.4g} steps/s of the group")
        if row["layout"] != layout:
            source = f"assumed: layout {layout} taken as {row['layout']} (same family) [{source}]"
        return Figure(fuse * row["steps_per_second"], source)

    # ---- evaluation ------------------------------------------------------------------------
    def eval_seconds(self, metric: str, model: str, precision: str | None = None, **size) -> Figure | None:
        """Seconds of one evaluation, scaled linearly from the measured one to `size`
        (psnr_gap: num_images, steps; fid_sampling: images, steps; jacobian: resolution).
        `precision` (e.g. "bf16" for eval.precision bf16): rows measured so are preferred; a
        figure of another precision stands in, said so."""
        rows = [r for r in self.data.get("eval", []) if r["metric"] == metric]
        if precision is not None:  # the precision asked for first, then any
            rows = sorted(rows, key=lambda r: r.get("precision") != precision)
        row = next((r for r in rows if r["model"] == model), rows[0] if rows else None)
        if row is None:
            return None
        scale, notes = 1.0, []
        for key, value in size.items():
            if key in row and row[key] != value:
                power = 2 if key == "resolution" else 1  # a Jacobian has (C*H*W) rows
                scale *= (value / row[key]) ** power
                notes.append(f"{key} {row[key]} -> {value}")
        if row["model"] != model:
            notes.append(f"{model} taken as {row['model']}")
        source = f"{self.where}: {metric} of {row['model']} " + " ".join(
            f"{k}={row[k]}" for k in ("num_images", "steps", "images", "resolution") if k in row)
        if notes:
            source += " (scaled: " + ", ".join(notes) + ")"
        if precision is not None and row.get("precision") != precision:
            source = (f"assumed: {metric} in {precision} not measured: the "
                      f"{row.get('precision', 'unnamed')} figure [{source}]")
        return Figure(row["seconds"] * scale, source)


def fuse_of(row: dict) -> int:
    """A train row's fuse k (rows written before fused training have none: 1)."""
    return int(row.get("fuse", 1))


@functools.lru_cache(maxsize=64)
def step_flops(model: str, layout: str, resolution: int, batch_size: int) -> float:
    """FLOPs of one training step (forward + backward) of a preset, counted on the meta device
    (no memory, no compute): the ratio between presets stands in for an unmeasured speed."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from ditsweep.models import build_model
    with torch.device("meta"):  # construction only: index tables cached by the forward stay real
        net = build_model(model, resolution, 3, layout=None if layout in ("-", "unet") else layout,
                          attention_backend="torch")
    x = torch.empty(batch_size, 3, resolution, resolution, device="meta")
    t = torch.zeros(batch_size, dtype=torch.long, device="meta")
    with FlopCounterMode(display=False) as counter:
        net(x, t).float().pow(2).mean().backward()
    return float(counter.get_total_flops())


def find_calibration(gpu: str | None) -> Calibration | None:
    """The calibration file of a GPU model: $DITSWEEP_CALIBRATION_DIR first, then the files
    shipped in ditsweep/bench/calibration/. None when there is none."""
    if not gpu:
        return None
    dirs = [Path(d) for d in os.environ.get(DIR_ENV, "").split(os.pathsep) if d] + [PACKAGE_DIR]
    for d in dirs:
        path = d / f"{gpu_slug(gpu)}.json"
        if path.is_file():
            return Calibration.load(path)
    return None


def write_calibration(path: str | Path, gpu: str, measured_at: str, source: str, software: dict,
                      train: list[dict], evals: list[dict], drift: list[dict] | None = None) -> Path:
    """Write a calibration file (what `bench --gpu` measured); returns its path. `drift`: the
    bf16-vs-tf32 drift rows and verdict, kept as a record (no estimate reads them)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {"format": FORMAT, "gpu": gpu, "measured_at": measured_at, "source": source,
            "software": software, "train": train, "eval": evals}
    if drift:
        data["drift"] = drift
    Calibration(data)  # validate before writing
    path.write_text(json.dumps(data, indent=1) + "\n")
    return path
